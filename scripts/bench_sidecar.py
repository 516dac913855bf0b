"""Benchmark sidecar conversion: wall time, peak RSS (child process) and size ratio to fp32 exp_avg_sq.

    python scripts/bench_sidecar.py                          # ~0.55 B-param Llama-shaped exp_avg_sq set
    python scripts/bench_sidecar.py --ranks 1,exact --torch  # also from a name-keyed torch .pt file

Builds (once, reused) a fake name-keyed fp32 exp_avg_sq safetensors file with Llama shapes (hidden
1536, intermediate 4096, 16 layers, vocab 32000, untied lm_head by default), written one tensor at a
time with streammerge's own planned-layout writer; values are log-normal like real second moments.
Each conversion runs as a child process (``bench_merge.measure``: ``os.wait4`` ru_maxrss). Prints a
markdown table and the checks of issue 4: rank-1 size <= 1 % of fp32, and peak RSS <= ``import
torch`` RSS + 3 x the largest tensor in fp32.
"""

from __future__ import annotations

import argparse
import math
import sys
import zlib
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench_merge import ROOT, add_shape_options, gb, llama_shapes, measure, torch_import_rss  # noqa: E402

from streammerge.io.safetensors_format import TensorSpec  # noqa: E402
from streammerge.io.writer import ShardWriter, plan_shards  # noqa: E402


def fake_second_moment(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()) if seed else zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g).mul_(2.0).sub_(22.0).exp_()


def build(
    folder: Path, shapes: dict[str, tuple[int, ...]], with_torch: bool, seed: int = 0
) -> tuple[Path, Path | None]:
    folder.mkdir(parents=True, exist_ok=True)
    st = folder / "model.safetensors"
    if not (folder / ".complete").exists():
        print(f"building {st} ...", file=sys.stderr, flush=True)
        specs = [TensorSpec(n, torch.float32, s) for n, s in shapes.items()]
        shards = plan_shards(specs, max_shard_bytes=1 << 62)
        with ShardWriter(folder, shards) as writer:
            for name, shape in shapes.items():
                writer.write(name, fake_second_moment(name, shape, seed))
                writer.finish_tensor(name)
            writer.finalize()
        (folder / ".complete").write_text("ok")
    pt = folder / "exp_avg_sq.pt"
    if with_torch and not pt.exists():
        print(f"building {pt} (needs the whole set in RAM once) ...", file=sys.stderr, flush=True)
        from safetensors.torch import load_file

        torch.save(load_file(st), pt)
    return st, pt if with_torch else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_options(ap)
    ap.add_argument("--ranks", default="1", help="comma-separated: exact, 1, K")
    ap.add_argument("--torch", action="store_true", help="also convert from a name-keyed torch .pt file")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "bench_data")
    args = ap.parse_args()

    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    numel = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values()) * 4
    tag = f"exp-avg-sq-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    st, pt = build(args.data_dir / tag, shapes, args.torch)
    torch_rss = torch_import_rss()
    budget = torch_rss + 3 * largest
    print(
        f"\nset: {numel / 1e9:.3f} B fp32 exp_avg_sq values ({gb(numel * 4)}), {len(shapes)} tensors, largest "
        f"{gb(largest)}; `import torch` RSS {gb(torch_rss)}; RSS budget (torch + 3 x largest) {gb(budget)}\n"
    )
    print("| source | rank | wall s | CPU s | peak RSS | within budget | sidecar bytes | ratio to fp32 |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |", flush=True)
    out = args.data_dir / "runs"
    out.mkdir(parents=True, exist_ok=True)
    for src in [p for p in (st, pt) if p is not None]:
        for rank in args.ranks.split(","):
            target = out / f"{src.stem}-{rank}.sidecar"
            code = (
                f"import sys; sys.path.insert(0, {str(ROOT)!r}); import streammerge.sidecar as s; s.convert("
                f"{str(src)!r}, {str(target)!r}, rank={rank!r}, "
                "overwrite=True)"
            )
            wall, rss, rc, cpu = measure([sys.executable, "-c", code])
            size = target.stat().st_size if rc == 0 else 0
            print(
                f"| {src.suffix[1:]} | {rank} | {wall:.1f} | {cpu:.1f} | {gb(rss)} | "
                f"{'yes' if rss <= budget else 'NO'} | {size:,} | {size / (numel * 4):.3%} |"
                + ("" if rc == 0 else " FAILED"),
                flush=True,
            )
            target.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
