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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from streammerge.methods.orthomerge import OrthoMergeParams, decouple_merge  # noqa: E402

CPU_SHAPES = ["4096x4096"]
CUDA_SHAPES = ["4096x4096", "1024x4096", "14336x4096", "4096x14336"]  # Llama-3-8B: q/o, k/v, gate/up, down


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


def main() -> None:
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
    args = ap.parse_args()
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
