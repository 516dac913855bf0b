"""Time Orthogonal-Residual Decoupling of one weight matrix against one SVD plus one solve of its size.

    python scripts/bench_ortho.py                       # CPU: one 4096x4096 fp32 matrix, 2 experts
    python scripts/bench_ortho.py --device cuda         # + Llama-8B shapes: d_in 4096 and 14336
    python scripts/bench_ortho.py --shapes 2048x2048 --experts 3 --residual ties

Per shape (d_out x d_in) the run times, in the same process and on the same device:

- the reference: ``torch.linalg.svd`` of a d_in x d_in fp32 matrix plus ``torch.linalg.solve`` of a
  d_in x d_in system with d_in right-hand sides — what decoupling needs per expert at the least (the SVD
  for the polar factor, the solve for the inverse Cayley map);
- ``decouple_merge`` of the matrix with N synthetic experts (W₀ + 1 % noise), whole, divided by N.

It prints wall times (seconds; with ``--repeats`` the best of several) as a markdown table;
"ratio" is decoupling per expert over SVD + solve
(target <= 1.5 on CPU). Synthetic data: fp32 standard normal weights scaled by 1/sqrt(d_in). Nothing is
read from or written to disk.

Dense vs subspace Procrustes (``methods/ord_subspace.py``), each (shape, path) in its own child process
so that its peak RSS is its own:

    python scripts/bench_ortho.py --compare --shapes 1024x4096,2048x7168 --threads 1
    python scripts/bench_ortho.py --layer --threads 1            # Llama-3.1-8B's 7 matrices of one layer
    python scripts/bench_ortho.py --layer --dense q,k,v,o         # "before" on those matrices only

``--compare`` prints per shape: decoupling per expert by each path, the speedup, the subspace basis size
k, and each child's peak working set: peak RSS over the RSS once the inputs exist, in MB and in units
of one d_out x d_in fp32 matrix. ``--layer``: the "after" child runs every matrix by the path ORD picks
(``auto``), the "before" child the dense path on the ``--dense`` matrices (default all); per matrix the
wall time of the whole decoupling (all experts), then totals and each child's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from streammerge.methods.orthomerge import DecoupleReport, OrthoMergeParams, decouple_merge  # noqa: E402

CPU_SHAPES = ["4096x4096"]
CUDA_SHAPES = ["4096x4096", "1024x4096", "14336x4096", "4096x14336"]  # Llama-3-8B: q/o, k/v, gate/up, down
LLAMA_8B_LAYER = {  # Llama-3.1-8B, one decoder layer: (d_out, d_in)
    "q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
    "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_shape(
    d_out: int, d_in: int, n_experts: int, params: OrthoMergeParams, device: torch.device, seed: int, repeats: int
) -> dict[str, float]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    w0 = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device)
    noise = [0.01 * torch.randn(d_out, d_in, generator=g) / d_in**0.5 for _ in range(n_experts)]
    experts = [(lambda k=k: w0 + k.to(device)) for k in noise]  # loaders: fresh memory per call, like the engine's
    square = (torch.randn(d_in, d_in, generator=g) / d_in**0.5).to(device)
    rhs = torch.randn(d_in, d_in, generator=g).to(device)
    steps = {
        "svd": lambda: torch.linalg.svd(square, full_matrices=False),
        "solve": lambda: torch.linalg.solve(square + torch.eye(d_in, device=device), rhs),
        "decouple": lambda: decouple_merge(w0, experts, params),
    }
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits both sides alike
        for step, fn in steps.items():
            best[step] = min(best[step], timed(fn, device))
    return {**best, "per_expert": best["decouple"] / n_experts}


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _inputs(d_out: int, d_in: int, n_experts: int, seed: int):
    """W₀ and loaders of N experts W₀ + 1 % noise, built in place (no temporaries in the RSS baseline)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g).mul_(d_in**-0.5)
    noise = [torch.randn(d_out, d_in, generator=g).mul_(0.01 * d_in**-0.5) for _ in range(n_experts)]
    return w0, [(lambda k=k: torch.add(w0, k)) for k in noise]


def child(job: dict) -> None:
    """One child process: decouple the given matrices by one path; print one JSON line."""
    torch.set_num_threads(job["threads"])
    params = OrthoMergeParams(variant=job["variant"], residual_method=job["residual"], lambda_=1.0 / job["experts"])
    out = {"times": {}, "cpu": {}, "k": {}, "failed": {}, "peak_extra": 0}
    w, e = _inputs(16, 64, 2, 0)  # warm up torch's kernels and buffers outside the measured peaks
    decouple_merge(w, e, params, path="dense"), decouple_merge(w, e, params, path="subspace")
    for name, (d_out, d_in) in job["matrices"].items():
        w0, experts = _inputs(d_out, d_in, job["experts"], job["seed"])
        baseline = _rss_bytes()
        report = DecoupleReport()
        best, best_cpu = float("inf"), float("inf")
        for _ in range(job.get("repeats", 1)):
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                decouple_merge(w0, experts, params, path=job["path"], report=report)
            except torch.linalg.LinAlgError as e:  # LAPACK gave up: say so, after how long, and go on
                reason = str(e).splitlines()[0].split(" because")[0] if str(e) else type(e).__name__
                out["failed"][name] = f"{reason} after {time.process_time() - start_cpu:.0f} CPU s"
                break
            best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
        if name in out["failed"]:
            del w0, experts
            continue
        out["times"][name], out["cpu"][name] = best, best_cpu
        out["k"][name] = report.largest_k[0] if report.subspace else d_in
        out["peak_extra"] = max(out["peak_extra"], _rss_bytes() - baseline)
        del w0, experts
    out["peak_rss"] = _rss_bytes()
    print(json.dumps(out), flush=True)


def _run_child(job: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args, shapes: list[str]) -> None:
    job = {"experts": args.experts, "variant": args.variant, "residual": args.residual, "seed": args.seed,
           "threads": args.threads or torch.get_num_threads(), "repeats": args.repeats}
    print(f"ORD dense vs subspace Procrustes, {args.experts} experts, variant {args.variant}, {args.residual}; "
          f"CPU, {job['threads']} threads; torch {torch.__version__}; CPU seconds of the process per expert "
          f"(wall in brackets), peak working set over the inputs\n")
    print("| shape (d_out x d_in) | k | dense s/expert | subspace s/expert | speedup | dense peak | subspace peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        d_out, d_in = (int(x) for x in shape.lower().split("x"))
        res = {p: _run_child({**job, "path": p, "matrices": {shape: (d_out, d_in)}}) for p in ("subspace", "dense")}
        unit = 4 * d_out * d_in
        t = {p: r["cpu"][shape] / args.experts for p, r in res.items()}
        w = {p: r["times"][shape] / args.experts for p, r in res.items()}
        mem = {p: f"{r['peak_extra'] / 1e6:.0f} MB ({r['peak_extra'] / unit:.1f}x)" for p, r in res.items()}
        print(f"| {d_out} x {d_in} | {res['subspace']['k'][shape]} | {t['dense']:.1f} ({w['dense']:.1f}) | "
              f"{t['subspace']:.1f} ({w['subspace']:.1f}) | {t['dense'] / t['subspace']:.2f}x | {mem['dense']} | "
              f"{mem['subspace']} |", flush=True)


def _matrices(option: str, text: str) -> list[str]:
    names = list(LLAMA_8B_LAYER) if text == "all" else [m for m in text.split(",") if m]
    unknown = [m for m in names if m not in LLAMA_8B_LAYER]
    if unknown:
        raise SystemExit(f"{option}: unknown matrices {unknown}; choose from {', '.join(LLAMA_8B_LAYER)}")
    return names


def layer(args) -> None:
    dense = _matrices("--dense", args.dense)
    auto = _matrices("--after", args.after)
    job = {"experts": args.experts, "variant": args.variant, "residual": args.residual, "seed": args.seed,
           "threads": args.threads or torch.get_num_threads()}
    after = _run_child({**job, "path": "auto", "matrices": {m: LLAMA_8B_LAYER[m] for m in auto}})
    before = _run_child({**job, "path": "dense", "matrices": {m: LLAMA_8B_LAYER[m] for m in dense}}) if dense else None
    print(f"ORD on one Llama-3.1-8B layer, {args.experts} experts, variant {args.variant}, {args.residual}; CPU, "
          f"{job['threads']} threads; torch {torch.__version__}; CPU seconds of the process for all experts "
          f"(wall in brackets)\n")
    print("| matrix | shape | path after | before (dense) | after | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")

    def cell(res, name):
        if res is not None and name in res.get("failed", {}):
            return f"failed: {res['failed'][name]}"
        if res is None or name not in res["cpu"]:
            return "not run"
        return f"{res['cpu'][name]:.1f} ({res['times'][name]:.1f})"

    for name, (d_out, d_in) in LLAMA_8B_LAYER.items():
        k = after["k"].get(name, LLAMA_8B_LAYER[name][1] if name in after.get("failed", {}) else None)
        path = "not run" if k is None else "dense" if k == d_in and d_out > d_in / 2 else f"subspace, k = {k}"
        both = before is not None and name in before["cpu"] and name in after["cpu"]
        speedup = f"{before['cpu'][name] / after['cpu'][name]:.2f}x" if both else ""
        print(f"| {name} | {d_out} x {d_in} | {path} | {cell(before, name)} | {cell(after, name)} | {speedup} |")
    total_b = "" if before is None else f"{sum(before['cpu'].values()):.1f}"
    if before is not None and before.get("failed"):
        total_b += f" (without {', '.join(before['failed'])})"
    print(f"| total | | | {total_b} | {sum(after['cpu'].values()):.1f} | |")
    rss_b = "" if before is None else f"{before['peak_rss'] / 1e9:.2f} GB"
    print(f"| peak RSS of the process | | | {rss_b} | {after['peak_rss'] / 1e9:.2f} GB | |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--shapes",
        default=None,
        help="comma-separated d_outxd_in (default: 4096x4096 on CPU, plus the Llama-8B shapes on CUDA)",
    )
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--variant", choices=["G", "C"], default="G")
    ap.add_argument("--residual", choices=["task_arithmetic", "ties", "tsvm"], default="task_arithmetic")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time every step this many times (interleaved), keep "
        "the best: on a shared machine the least disturbed run",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="dense vs subspace path per shape, with peak memory")
    ap.add_argument("--layer", action="store_true", help="one Llama-3.1-8B layer, before (dense) and after (auto)")
    ap.add_argument("--dense", default="all", help="--layer: matrices the dense 'before' run covers (q,k,v,o,...)")
    ap.add_argument("--after", default="all", help="--layer: matrices the 'after' (auto path) run covers")
    args = ap.parse_args()
    if args.layer:
        layer(args)
        return
    if args.compare:
        compare(args, args.shapes.split(",") if args.shapes else ["1024x4096", "2048x7168"])
        return
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes.split(",") if args.shapes else CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    params = OrthoMergeParams(variant=args.variant, residual_method=args.residual, lambda_=1.0 / args.experts)
    if device.type == "cuda":  # warm up cuSOLVER / cuBLAS handles outside the timings
        small = torch.randn(256, 256, device=device)
        torch.linalg.svd(small), torch.linalg.solve(small, small), decouple_merge(small, [small + 0.01], params)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"OrthoMerge decoupling, {args.experts} experts, variant {args.variant}, {args.residual}; {name}; "
        f"torch {torch.__version__}; wall seconds\n"
    )
    print("| shape (d_out x d_in) | SVD | solve | SVD + solve | decouple, all experts | per expert | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        d_out, d_in = (int(x) for x in shape.lower().split("x"))
        t = bench_shape(d_out, d_in, args.experts, params, device, args.seed, args.repeats)
        ref = t["svd"] + t["solve"]
        print(
            f"| {d_out} x {d_in} | {t['svd']:.2f} | {t['solve']:.2f} | {ref:.2f} | {t['decouple']:.2f} | "
            f"{t['per_expert']:.2f} | {t['per_expert'] / ref:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
