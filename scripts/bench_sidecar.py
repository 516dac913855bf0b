"""Benchmark sidecar conversion: wall time, peak RSS (child process) and size ratio to fp32 exp_avg_sq.

    python scripts/bench_sidecar.py                          # ~0.55 B-param Llama-shaped exp_avg_sq set
    python scripts/bench_sidecar.py --ranks 1,exact --torch  # also from a name-keyed torch .pt file
    python scripts/bench_sidecar.py --sharded 4 --repeats 3  # also ZeRO-2/3 and DCP folders of 4 ranks
    python scripts/bench_sidecar.py --sharded 8 --layouts dcp --no-unsharded  # DCP of 8 ranks only

Builds (once, reused) a fake name-keyed fp32 exp_avg_sq safetensors file with Llama shapes (hidden
1536, intermediate 4096, 16 layers, vocab 32000, untied lm_head by default), written one tensor at a
time with streammerge's own planned-layout writer; values are log-normal like real second moments.
Each conversion runs as a child process (``bench_merge.measure``: ``os.wait4`` ru_maxrss). Prints a
markdown table and the checks of issue 4: rank-1 size <= 1 % of fp32, and peak RSS <= ``import
torch`` RSS + 3 x the largest tensor in fp32.

``--sharded W`` also writes the same values as DeepSpeed ZeRO-2 and ZeRO-3 checkpoints of W ranks (the
rank-file layout ``streammerge/io/deepspeed_zero.py`` reads, written with ``torch.save`` by this script,
one param group, the fp32 master weights sharing exp_avg_sq's storage) and as FSDP2-style row shards
saved by ``dcp.save`` from W gloo processes, and converts those too; issue 14's
bars: peak RSS within the same budget whatever W, wall <= 1.5 x converting the unsharded safetensors.
"""

from __future__ import annotations

import argparse
import math
import statistics
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


def build_zero(folder: Path, shapes: dict[str, tuple[int, ...]], world: int, stage: int, seed: int = 0) -> Path:
    """A ZeRO-``stage`` checkpoint of ``world`` ranks holding ``fake_second_moment`` as exp_avg_sq (once, reused)."""
    if (folder / ".complete").exists():
        return folder
    print(f"building {folder} ...", file=sys.stderr, flush=True)
    step = folder / "global_step3"
    step.mkdir(parents=True, exist_ok=True)
    numels = [math.prod(s) for s in shapes.values()]
    if stage == 3:  # each parameter padded to world * ceil(n / world), one slice per rank
        per_rank = sum(math.ceil(n / world) for n in numels)
    else:  # one flat group padded to 2 * world, split evenly
        per_rank = 2 * world * math.ceil(sum(numels) / (2 * world)) // world
    parts = [torch.zeros(per_rank) for _ in range(world)]
    offset = 0
    for (name, shape), n in zip(shapes.items(), numels, strict=True):
        v = fake_second_moment(name, shape, seed).reshape(-1)
        if stage == 3:
            k = math.ceil(n / world)
            for r in range(world):
                piece = v[r * k : (r + 1) * k]
                parts[r][offset : offset + piece.numel()] = piece
            offset += k
        else:
            for r in range(world):
                lo, hi = max(offset, r * per_rank), min(offset + n, (r + 1) * per_rank)
                if lo < hi:
                    parts[r][lo - r * per_rank : hi - r * per_rank] = v[lo - offset : hi - offset]
            offset += n
        del v
    lean = [per_rank] * world
    if stage != 3:
        lean[-1] -= per_rank * world - sum(numels)
    groups_key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    for r in range(world):
        v = parts[r] if stage == 3 else parts[r][: lean[r]]
        state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": v, "exp_avg_sq": parts[r]}},
                 "param_groups": [{"betas": (0.9, 0.98), "params": [0], "decoupled_weight_decay": True}]}
        osd = {"zero_stage": stage, "partition_count": world if stage == 3 else [world], groups_key: [v],
               "optimizer_state_dict" if stage == 3 else "base_optimizer_state": state}
        torch.save({"optimizer_state_dict": osd}, step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        parts[r] = None
    model = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    torch.save({"param_shapes": [{n: torch.Size(s) for n, s in shapes.items()}]}, step / model)
    (folder / "latest").write_text("global_step3")
    (folder / ".complete").write_text("ok")
    return folder


def _dcp_rank(rank: int, world: int, port: int, folder: str, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state = {}
    for name, shape in shapes.items():  # rows split as FSDP2 shards them (torch.chunk on dim 0)
        full = fake_second_moment(name, shape, seed)
        chunks = full.chunk(world)
        local = chunks[rank].clone() if rank < len(chunks) else full.new_empty((0, *shape[1:]))
        dt = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
        state[name] = {"step": torch.tensor(3.0), "exp_avg_sq": dt}
        del full, chunks
    dcp.save({"optimizer": {"state": state}}, checkpoint_id=folder)
    dist.barrier()
    dist.destroy_process_group()


def build_dcp(folder: Path, shapes: dict[str, tuple[int, ...]], world: int, seed: int = 0) -> Path:
    """The set as FSDP2 optimizer states (row shards) saved by ``dcp.save`` from ``world`` gloo ranks."""
    if (folder / ".complete").exists():
        return folder
    import socket

    import torch.multiprocessing as mp

    print(f"building {folder} ...", file=sys.stderr, flush=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    mp.spawn(_dcp_rank, args=(world, port, str(folder), shapes, seed), nprocs=world, join=True)
    (folder / ".complete").write_text("ok")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_options(ap)
    ap.add_argument("--ranks", default="1", help="comma-separated: exact, 1, K")
    ap.add_argument("--torch", action="store_true", help="also convert from a name-keyed torch .pt file")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "bench_data")
    ap.add_argument("--sharded", type=int, default=0, help="also convert ZeRO-2/3 folders of this many ranks")
    ap.add_argument("--layouts", default="zero2,zero3,dcp", help="with --sharded: which of zero2, zero3, dcp")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all sources; medians are reported")
    ap.add_argument("--unsharded", action=argparse.BooleanOptionalAction, default=True,
                    help="convert the unsharded safetensors too (the wall-time reference)")
    args = ap.parse_args()

    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    numel = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values()) * 4
    tag = f"exp-avg-sq-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    st, pt = build(args.data_dir / tag, shapes, args.torch)
    layouts = set(args.layouts.split(",")) if args.sharded else set()
    if layouts - {"zero2", "zero3", "dcp"}:
        ap.error(f"--layouts: unknown {sorted(layouts - {'zero2', 'zero3', 'dcp'})}")
    zero = [build_zero(args.data_dir / f"{tag}-zero{stage}-w{args.sharded}", shapes, args.sharded, stage)
            for stage in (2, 3) if f"zero{stage}" in layouts]
    if "dcp" in layouts:
        zero.append(build_dcp(args.data_dir / f"{tag}-dcp-w{args.sharded}", shapes, args.sharded))
    torch_rss = torch_import_rss()
    budget = torch_rss + 3 * largest
    print(
        f"\nset: {numel / 1e9:.3f} B fp32 exp_avg_sq values ({gb(numel * 4)}), {len(shapes)} tensors, largest "
        f"{gb(largest)}; `import torch` RSS {gb(torch_rss)}; RSS budget (torch + 3 x largest) {gb(budget)}\n"
    )
    out = args.data_dir / "runs"
    out.mkdir(parents=True, exist_ok=True)
    cases = [(src, rank) for src in (st if args.unsharded else None, pt, *zero) if src is not None
             for rank in args.ranks.split(",")]
    results: dict[tuple[Path, str], list[tuple[float, int, int, float, int]]] = {c: [] for c in cases}
    for _ in range(args.repeats):  # rounds interleave the sources, so a busy spell hits them alike
        for src, rank in cases:
            target = out / f"{src.stem}-{rank}.sidecar"
            code = (
                f"import sys; sys.path.insert(0, {str(ROOT)!r}); import streammerge.sidecar as s; s.convert("
                f"{str(src)!r}, {str(target)!r}, rank={rank!r}, "
                "overwrite=True)"
            )
            wall, rss, rc, cpu = measure([sys.executable, "-c", code])
            results[(src, rank)].append((wall, rss, rc, cpu, target.stat().st_size if rc == 0 else 0))
            target.unlink(missing_ok=True)
    print("| source | rank | wall s (median) | CPU s | peak RSS (max) | within budget | wall vs unsharded | "
          "sidecar bytes | ratio to fp32 |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |", flush=True)
    for (src, rank), runs in results.items():
        wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[3] for r in runs)
        rss, size, failed = max(r[1] for r in runs), runs[-1][4], any(r[2] for r in runs)
        ref = results.get((st, rank)) if args.unsharded else None
        vs = f"{wall / statistics.median(r[0] for r in ref):.2f}x" if ref else "-"
        label = src.suffix[1:] or " ".join(src.name.rsplit("-", 2)[1:])  # "zero3 w4": layout, ranks
        spread = f" ({min(r[0] for r in runs):.1f}-{max(r[0] for r in runs):.1f})" if len(runs) > 1 else ""
        print(
            f"| {label} | {rank} | {wall:.1f}{spread} | {cpu:.1f} | {gb(rss)} | {'yes' if rss <= budget else 'NO'} | "
            f"{vs} | {size:,} | {size / (numel * 4):.3%} |" + (" FAILED" if failed else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
