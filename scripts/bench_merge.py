"""Benchmark streammerge against mergekit: wall time and peak RSS, each merge in its own process.

    python scripts/bench_merge.py                       # ~0.5 B-param bf16 Llama set, base + 3 experts
    python scripts/bench_merge.py --hidden 512 --layers 4 --vocab 8000 --scaling-experts 2,8
    python scripts/bench_merge.py --ranks 2 --methods orthomerge,ties    # 1 process vs 2 torchrun ranks
    python scripts/bench_merge.py --methods breadcrumbs,breadcrumbs_ties,della,della_linear,sce,ram,ramplus_tl \
        --hidden 1024 --intermediate 2816 --layers 4 --scaling-experts ''    # the sparsifying methods, short

Builds (once, reused afterwards) a Llama-shaped set under --data-dir: base + N experts, two
safetensors shards each, written with the reference safetensors writer. Every merge runs as a child
process; its peak RSS is that child's ``ru_maxrss`` (``os.wait4``), wall time is measured around it.
Each input set is read once before timing so the page cache is warm for both tools. With
``--repeats N`` every timed row runs N times, the tools interleaved, and the table shows the median
wall and CPU time and the largest peak RSS (on a shared VM single runs vary by ±20 %). Prints markdown
tables: streammerge vs mergekit per method (and their ratio), the RSS budget check
(``import torch`` RSS + 4 × largest tensor in fp32), and streammerge's peak RSS versus expert count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def write_model(folder: Path, shapes: dict[str, tuple[int, ...]], seed: int, base_seed: int | None, cfg: dict) -> None:
    """A bf16 model in two shards. Experts are the base (same seed stream) plus a small perturbation."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map, total = {}, 0
    for file, group in files.items():
        tensors = {}
        for name in group:
            shape = shapes[name]
            g = torch.Generator().manual_seed(_seed(base_seed if base_seed is not None else seed, name))
            t = torch.randn(shape, generator=g) * (0.02 if len(shape) == 2 else 0.1) + (1.0 if len(shape) == 1 else 0.0)
            if base_seed is not None:
                g2 = torch.Generator().manual_seed(_seed(seed, name))
                t += 0.002 * torch.randn(shape, generator=g2)
            tensors[name] = t.to(torch.bfloat16)
            total += t.numel() * 2
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / ".complete").write_text("ok")


def build_set(data_dir: Path, args, n_experts: int) -> list[Path]:
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 128 or 1,
        "num_key_value_heads": args.hidden // 128 or 1,
        "vocab_size": args.vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    tag = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    folders = [data_dir / tag / "base"] + [data_dir / tag / f"expert{i}" for i in range(n_experts)]
    for i, folder in enumerate(folders):
        if not (folder / ".complete").exists():
            print(f"building {folder} ...", file=sys.stderr, flush=True)
            write_model(folder, shapes, seed=i, base_seed=None if i == 0 else 0, cfg=cfg)
    return folders


PAIR_METHODS = {"slerp": "t: 0.5", "nearswap": "t: 0.001", "arcee_fusion": ""}  # method: its parameters


def config_yaml(
    method: str,
    base: Path,
    experts: list[Path],
    extra_model: str = "",
    extra: str = "",
    sidecars: list[Path] | None = None,
    ffg_density: float | None = None,
) -> str:
    if method == "orthomerge":  # Orthogonal-Residual Decoupling of full fine-tunes (no per-model parameters)
        models = "".join(f"  - model: {e}\n" for e in experts)
        return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}parameters: {{lambda: 0.5}}\n"
                f"dtype: float32\nout_dtype: bfloat16\n{extra}")
    if method == "passthrough":  # one model, copied (cast to out_dtype)
        return f"merge_method: {method}\nmodels:\n  - model: {experts[0]}\ndtype: float32\nout_dtype: bfloat16\n"
    if method in PAIR_METHODS:  # the base and one other model
        params = f"parameters: {{{PAIR_METHODS[method]}}}\n" if PAIR_METHODS[method] else ""
        return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {experts[0]}\n"
                f"{params}dtype: float32\nout_dtype: bfloat16\n")
    if method == "nuslerp":
        experts = experts[:2]
    if method in UNWEIGHTED:
        models = "".join(f"  - model: {e}\n" for e in experts)
        head = f"merge_method: {method}\n" + ("" if method == "karcher" else f"base_model: {base}\n")
        return f"{head}models:\n{models}dtype: float32\nout_dtype: bfloat16\n{GLOBAL.get(method, '')}{extra}"
    if method == "ota":
        density = f"\n    parameters: {{density: {ffg_density}}}" if ffg_density else ""
        models = "".join(
            f"  - model: {e}\n    sidecar: {sc}{density}\n" for e, sc in zip(experts, sidecars, strict=False)
        )
    elif method in UNWEIGHTED:
        models = "".join(f"  - model: {e}\n{extra_model}" for e in experts)
    else:
        per_model = PER_MODEL.get(method, "")
        models = "".join(
            f"  - model: {e}\n    parameters: {{weight: {1.0 / len(experts):.4f}{per_model}}}\n{extra_model}"
            for e in experts
        )
    extra = GLOBAL.get(method, "") + extra
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}dtype: float32\nout_dtype: bfloat16\n{extra}"


def slices_yaml(kind: str, base: Path, experts: list[Path], layers: int) -> str:
    """A ``slices:`` config: ``passthrough`` stacks base layers [0, 3L/4) and expert0's [L/4, L) (1.5 L
    layers); ``ties`` merges base + experts 0, 1 over the first half and base + experts 1, 2 over the second."""
    q, h = layers // 4, layers // 2
    if kind == "passthrough":
        return (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {base}, layer_range: [0, {3 * q}]}}]\n"
                f"  - sources: [{{model: {experts[0]}, layer_range: [{q}, {layers}]}}]\ndtype: float32\n"
                f"out_dtype: bfloat16\n")
    e = [experts[i % len(experts)] for i in range(3)]
    half = "".join(
        f"  - sources:\n      - {{model: {base}, layer_range: [{lo}, {hi}]}}\n"
        + "".join(f"      - {{model: {x}, layer_range: [{lo}, {hi}], parameters: {{weight: 0.5, density: 0.5}}}}\n"
                  for x in pair)
        for (lo, hi), pair in (((0, h), e[:2]), ((h, layers), e[1:]))
    )
    return f"merge_method: ties\nbase_model: {base}\nslices:\n{half}dtype: float32\nout_dtype: bfloat16\n"


def build_raw_second_moments(args, experts: list[Path]) -> list[Path]:
    """A fake fp32 name-keyed exp_avg_sq .safetensors per expert (the OTA authors' export format; cached)."""
    from bench_sidecar import build as build_second_moments

    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    return [build_second_moments(e.parent / f"v-{e.name}", shapes, False, seed=i + 1)[0] for i, e in enumerate(experts)]


def authors_ota_yaml(base: Path, experts: list[Path], raw: list[Path], per_model_threshold: bool) -> str:
    """The authors' hf_ota_ffg_rank1lemma.yml (per-model thresholds) or hf_ota_ffg_global_thresh.yml layout."""
    thresholds = ["2.626e-19", "1.1152e-18", "3.8823e-21", "5.53727472e-19", "5.56821541e-19"]
    models = "".join(
        f"  - model: {e}\n    parameters:\n      preconditioner_path: {v}\n"
        + (f"      precond_threshold: {thresholds[i % len(thresholds)]}\n" if per_model_threshold else "")
        + "      rank1_approx: true\n"
        for i, (e, v) in enumerate(zip(experts, raw, strict=True))
    )
    glob = "" if per_model_threshold else "  precond_threshold: 6.0e-19\n"
    return (f"merge_method: ota\nbase_model: {base}\nparameters:\n  epsilon: 1e-26\n  normalise: none\n"
            f"  power: 0.5\n  fallback_to_base: true\n  rescale: false\n{glob}models:\n{models}dtype: bfloat16\n")
# what each method is benchmarked with beside the weight (mergekit's defaults otherwise)
PER_MODEL = {
    **dict.fromkeys(("ties", "dare_ties", "dare_linear"), ", density: 0.5"),
    **dict.fromkeys(("breadcrumbs", "breadcrumbs_ties"), ", density: 0.5, gamma: 0.01"),
    **dict.fromkeys(("della", "della_linear"), ", density: 0.5, epsilon: 0.15"),
}
# methods without a per-model weight (karcher uses no base_model)
UNWEIGHTED = {"model_stock", "karcher", "sce", "ram", "ramplus_tl"}
GLOBAL = {"sce": "parameters: {select_topk: 0.5}\n"}


def build_sidecars(data_dir: Path, args, experts: list[Path]) -> list[Path]:
    """A rank-1 sidecar per expert, converted by the CLI from a fake fp32 exp_avg_sq file (both cached)."""
    from bench_sidecar import build as build_second_moments

    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    out = []
    for i, expert in enumerate(experts):
        sidecar = expert.parent / f"{expert.name}.sidecar"
        if not sidecar.exists():
            raw, _ = build_second_moments(expert.parent / f"v-{expert.name}", shapes, False, seed=i + 1)
            print(f"converting {raw} -> {sidecar} ...", file=sys.stderr, flush=True)
            subprocess.run(
                [sys.executable, "-m", "streammerge.cli", "sidecar", "convert", str(raw), str(sidecar), "--rank", "1"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        out.append(sidecar)
    return out


# A small launcher process runs the command and reports its child's rusage. Measuring from this
# (large) process directly would count its own pages: a fork or vfork child shares or copies the
# parent's memory until exec, and ru_maxrss includes that.
LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
cpu = usage.ru_utime + usage.ru_stime
print(json.dumps([time.perf_counter() - t0, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), cpu]))
"""


def measure(cmd: list[str]) -> tuple[float, int, int, float]:
    """Run ``cmd`` as a child; return (wall s, peak RSS bytes of that child, exit code, CPU s)."""
    exe = shutil.which(cmd[0]) or cmd[0]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, exe, *cmd[1:]], stdout=subprocess.PIPE, stderr=err)
        wall, rss, code, cpu = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        if code != 0:
            err.seek(0)
            print(
                f"command failed ({code}): {' '.join(cmd)}\n{err.read().decode(errors='replace')[-2000:]}",
                file=sys.stderr,
            )
    return wall, rss, code, cpu


def warm(folders: list[Path]) -> None:
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def torch_import_rss() -> int:
    return measure([sys.executable, "-c", "import torch"])[1]


def run_tool(tool: str, cfg_path: Path, out: Path, extra: tuple[str, ...] = ()) -> tuple[float, int, int, float]:
    shutil.rmtree(out, ignore_errors=True)
    if tool == "streammerge":
        cmd = [
            sys.executable,
            "-m",
            "streammerge.cli",
            "merge",
            str(cfg_path),
            str(out),
            "--quiet",
            "--device",
            "cpu",
            *extra,
        ]
    else:
        cmd = [shutil.which("mergekit-yaml") or "mergekit-yaml", str(cfg_path), str(out)]
    result = measure(cmd)
    shutil.rmtree(out, ignore_errors=True)
    return result


def repeated(runs: list[tuple[float, int, int, float]]) -> tuple[float, int, int, float]:
    """Median wall and CPU, largest RSS, first non-zero exit code of repeated runs."""

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    codes = [r[2] for r in runs if r[2] != 0]
    return median([r[0] for r in runs]), max(r[1] for r in runs), codes[0] if codes else 0, median([r[3] for r in runs])


def output_digest(out: Path) -> str:
    """SHA-256 over the output folder's model files, by name (the journal left out)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(out.glob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def run_ranks(cfg_path: Path, out: Path, ranks: int, threads: int | None = None) -> tuple[float, float, float, str]:
    """One merge by ``ranks`` torchrun processes (1: a plain process; ``threads``: its OMP_NUM_THREADS).
    Returns (wall s of the command, the merge's own s as it reports, CPU s of the command's processes, digest
    of the output). torchrun gives each of several ranks one thread."""
    import re

    shutil.rmtree(out, ignore_errors=True)
    merge = ["merge", str(cfg_path), str(out), "--device", "cpu"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "streammerge", *merge]
    else:
        cmd = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "streammerge", *merge]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if proc.returncode != 0:
        print(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return wall, float("nan"), cpu, "FAILED"
    m = re.search(r" in ([0-9.]+) s \(", proc.stdout)
    digest = output_digest(out)
    shutil.rmtree(out, ignore_errors=True)
    return wall, float(m.group(1)) if m else float("nan"), cpu, digest


def add_shape_options(ap: argparse.ArgumentParser) -> None:
    """The Llama-shaped set's dimensions (default ~0.5 B parameters), shared by the bench scripts."""
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e10 else f"{n / 1e6:.0f} MB"


def time_rows(rows: list[tuple[str, str]], cfg_path: Path, out: Path, repeats: int, budget: int | None = None) -> None:
    """Time streammerge on each (label, config text), the rows interleaved ``repeats`` times, and print a
    table row each: median wall and CPU, largest peak RSS, wall relative to the first row (and, with
    ``budget``, whether the RSS is over it)."""
    runs: dict[str, list] = {label: [] for label, _ in rows}
    for _ in range(repeats):
        for label, text in rows:
            cfg_path.write_text(text)
            runs[label].append(run_tool("streammerge", cfg_path, out))
    first = None
    for label, _ in rows:
        wall, rss, code, cpu = repeated(runs[label])
        first = first or wall
        over = " (RSS OVER budget)" if budget is not None and rss > budget else ""
        print(f"| {label} | {wall:.1f} | {cpu:.1f} | {gb(rss)} | {wall / first:.2f}x |"
              + ("" if code == 0 else " FAILED") + over, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_options(ap)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--scaling-experts", default="2,8", help="expert counts for the RSS-growth table ('' to skip)")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "bench_data")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument(
        "--ota",
        action="store_true",
        help="also time OTA and OTA+FFG against task_arithmetic (builds rank-1 sidecars once)",
    )
    ap.add_argument(
        "--ota-authors",
        action="store_true",
        help="also time the OTA authors' rank1_approx configs (raw fp32 exp_avg_sq files, built once) against "
        "task_arithmetic",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs per timed row (median wall/CPU, max RSS)")
    ap.add_argument(
        "--sync-costs",
        action="store_true",
        help="also time task_arithmetic with --sync-every end / 1GB (default) / 0 (every tensor)",
    )
    ap.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="only time --methods with 1 process and with N torchrun ranks (same bytes checked), then stop",
    )
    ap.add_argument("--slices", action="store_true",
                    help="also time slices: configs (a passthrough frankenmerge, TIES over two slices) vs mergekit")
    ap.add_argument(
        "--one-thread-only",
        action="store_true",
        help="with --ranks: leave out the single process with torch's default threads (slow on a loaded machine)",
    )
    args = ap.parse_args()
    if args.ranks:
        bench_ranks(args)
        return

    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    params = sum(math.prod(s) for s in shapes.values())
    largest_fp32 = max(math.prod(s) for s in shapes.values()) * 4
    scaling = [int(x) for x in args.scaling_experts.split(",") if x]
    folders = build_set(args.data_dir, args, max([args.experts, *scaling]))
    base, experts = folders[0], folders[1 : 1 + args.experts]
    have_mergekit = shutil.which("mergekit-yaml") is not None and not args.skip_mergekit
    work = args.data_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    torch_rss = torch_import_rss()

    print(
        f"\nset: {params / 1e9:.3f} B params/model, bf16, base + {args.experts} experts, 2 shards each; "
        f"largest tensor {gb(largest_fp32)} in fp32; `import torch` RSS {gb(torch_rss)}; {os.cpu_count()} CPUs\n"
    )
    print("| method | tool | wall s | CPU s | peak RSS | wall ratio | RSS ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    warm([base, *experts])
    budget = torch_rss + 4 * largest_fp32
    rss_rows = []
    for method in args.methods.split(","):
        cfg_path = work / f"{method}.yaml"
        cfg_path.write_text(config_yaml(method, base, experts))
        sm_runs, mk_runs = [], []
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both tools alike
            sm_runs.append(run_tool("streammerge", cfg_path, work / "out-sm"))
            if have_mergekit:
                mk_runs.append(run_tool("mergekit", cfg_path, work / "out-mk"))
        sm_wall, sm_rss, sm_code, sm_cpu = repeated(sm_runs)
        mk = repeated(mk_runs) if mk_runs else None
        wr = f"{sm_wall / mk[0]:.2f}x" if mk and mk[2] == 0 else "-"
        rr = f"{sm_rss / mk[1]:.2f}x" if mk and mk[2] == 0 else "-"
        print(
            f"| {method} | streammerge | {sm_wall:.1f} | {sm_cpu:.1f} | {gb(sm_rss)} | {wr} | {rr} |"
            + ("" if sm_code == 0 else " FAILED")
        )
        if mk:
            print(
                f"| {method} | mergekit 0.1.5 | {mk[0]:.1f} | {mk[3]:.1f} | {gb(mk[1])} | 1.00x | 1.00x |"
                + ("" if mk[2] == 0 else " FAILED"),
                flush=True,
            )
        rss_rows.append((method, sm_rss))
    print(f"\nRSS budget (import torch + 4 x largest fp32 tensor) = {gb(budget)}")
    for method, rss in rss_rows:
        print(f"- {method}: {gb(rss)} ({'within' if rss <= budget else 'OVER'} budget)")

    if args.ota:
        sidecars = build_sidecars(args.data_dir, args, experts)
        warm([base, *experts])
        print("\n| method | wall s | CPU s | peak RSS | wall vs task_arithmetic |")
        print("| --- | ---: | ---: | ---: | ---: |", flush=True)
        rows = [
            ("task_arithmetic", config_yaml("task_arithmetic", base, experts)),
            ("ota (rank-1 sidecars)", config_yaml("ota", base, experts, sidecars=sidecars)),
            (
                "ota + FFG density 0.3 (two passes)",
                config_yaml("ota", base, experts, sidecars=sidecars, ffg_density=0.3),
            ),
        ]
        time_rows(rows, work / "ota-bench.yaml", work / "out-sm", args.repeats)

    if args.slices:
        print("\n| slices: config | tool | wall s | CPU s | peak RSS | wall ratio |")
        print("| --- | --- | ---: | ---: | ---: | ---: |", flush=True)
        for kind in ("passthrough", "ties"):
            cfg_path = work / f"slices-{kind}.yaml"
            cfg_path.write_text(slices_yaml(kind, base, experts, args.layers))
            sm_runs, mk_runs = [], []
            for _ in range(args.repeats):
                sm_runs.append(run_tool("streammerge", cfg_path, work / "out-sm"))
                if have_mergekit:
                    mk_runs.append(run_tool("mergekit", cfg_path, work / "out-mk"))
            sm, mk = repeated(sm_runs), repeated(mk_runs) if mk_runs else None
            label = "passthrough, 1.5x layers" if kind == "passthrough" else "ties, 2 slices"
            ratio = f"{sm[0] / mk[0]:.2f}x" if mk and mk[2] == 0 else "-"
            print(f"| {label} | streammerge | {sm[0]:.1f} | {sm[3]:.1f} | {gb(sm[1])} | {ratio} |"
                  + ("" if sm[2] == 0 else " FAILED"))
            if mk:
                print(f"| {label} | mergekit 0.1.5 | {mk[0]:.1f} | {mk[3]:.1f} | {gb(mk[1])} | 1.00x |"
                      + ("" if mk[2] == 0 else " FAILED"), flush=True)
    if args.ota_authors:
        raw = build_raw_second_moments(args, experts)
        warm([base, *experts, *[r.parent for r in raw]])
        print("\n| config (OTA authors' language, rank1_approx at merge time) | wall s | CPU s | peak RSS | "
              "wall vs task_arithmetic |")
        print("| --- | ---: | ---: | ---: | ---: |", flush=True)
        rows = [
            ("task_arithmetic", config_yaml("task_arithmetic", base, experts)),
            ("hf_ota_ffg_rank1lemma (per-model thresholds)", authors_ota_yaml(base, experts, raw, True)),
            ("hf_ota_ffg_global_thresh (global threshold)", authors_ota_yaml(base, experts, raw, False)),
        ]
        time_rows(rows, work / "ota-authors-bench.yaml", work / "out-sm", args.repeats, budget)
        print(f"RSS budget (import torch + 4 x largest fp32 tensor) = {gb(budget)}")

    if args.sync_costs:
        print("\n| --sync-every | wall s | CPU s | vs end-only |")
        print("| --- | ---: | ---: | ---: |", flush=True)
        cfg_path = work / "task_arithmetic.yaml"
        cfg_path.write_text(config_yaml("task_arithmetic", base, experts))
        settings = ("end", "1GB", "0")
        sync_runs: dict[str, list] = {x: [] for x in settings}
        for _ in range(args.repeats):
            for setting in settings:
                sync_runs[setting].append(run_tool("streammerge", cfg_path, work / "out-sm", ("--sync-every", setting)))
        first = None
        for setting in settings:
            wall, _, _, cpu = repeated(sync_runs[setting])
            first = first or wall
            print(f"| {setting} | {wall:.1f} | {cpu:.1f} | {wall / first:.2f}x |", flush=True)

    if scaling:
        print("\n| experts | method | wall s | CPU s | peak RSS | RSS vs first |")
        print("| ---: | --- | ---: | ---: | ---: | ---: |", flush=True)
        for method in args.methods.split(","):
            if method in PAIR_METHODS or method in ("nuslerp", "passthrough"):
                continue  # a fixed number of models
            first = None
            for n in scaling:
                cfg_path = work / f"{method}-{n}.yaml"
                cfg_path.write_text(config_yaml(method, base, folders[1 : 1 + n]))
                warm(folders[1 : 1 + n])
                wall, rss, _, cpu = run_tool("streammerge", cfg_path, work / "out-sm")
                first = first or rss
                print(
                    f"| {n} | {method} | {wall:.1f} | {cpu:.1f} | {gb(rss)} | {100 * (rss / first - 1):+.1f}% |",
                    flush=True,
                )


def bench_ranks(args) -> None:
    """``--ranks N``: each method merged by one process and by N torchrun ranks (gloo, CPU), interleaved."""
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    params = sum(math.prod(s) for s in shapes.values())
    folders = build_set(args.data_dir, args, args.experts)
    base, experts = folders[0], folders[1 : 1 + args.experts]
    work = args.data_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    warm([base, *experts])
    print(
        f"\nset: {params / 1e9:.3f} B params/model, bf16, base + {args.experts} experts (hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}); {os.cpu_count()} CPUs; "
        f"median of {args.repeats}\n"
    )
    print("| method | processes | wall s | merge s | CPU s | wall speed-up | merge speed-up | "
          "wall vs 1 thread | merge vs 1 thread | same bytes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
    for method in args.methods.split(","):
        cfg_path = work / f"{method}-ranks.yaml"
        cfg_path.write_text(config_yaml(method, base, experts))
        # (label, ranks, OMP threads): one process as a user runs it (torch's default threads), the same
        # with one thread (per-core baseline), and N ranks of one thread each (torchrun's default)
        setups = [("1", 1, None), ("1, 1 thread", 1, 1), (f"{args.ranks} ranks", args.ranks, None)]
        if args.one_thread_only:
            setups = setups[1:]
        runs: dict[str, list] = {label: [] for label, _, _ in setups}
        for _ in range(args.repeats):
            for label, n, threads in setups:
                runs[label].append(run_ranks(cfg_path, work / "out-ranks", n, threads))
        digests = {r[3] for rs in runs.values() for r in rs}
        rows = {label: [sorted(r[i] for r in rs)[len(rs) // 2] for i in range(3)] for label, rs in runs.items()}
        same = "yes" if len(digests) == 1 and "FAILED" not in digests else "NO"
        first, one = rows[setups[0][0]], rows["1, 1 thread"]  # speed-ups over the first row and over one thread
        for label, (wall, merge, cpu) in rows.items():
            print(
                f"| {method} | {label} | {wall:.1f} | {merge:.1f} | {cpu:.1f} | {first[0] / wall:.2f}x | "
                f"{first[1] / merge:.2f}x | {one[0] / wall:.2f}x | {one[1] / merge:.2f}x | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
