"""The shared core of task-vector methods (mergekit's ``generalized_task_arithmetic``).

    τ'ᵢ = sparsify(θᵢ − θ₀)                 (identity, magnitude top-k, or DARE's random drop)
    without consensus:  δ = Σ wᵢτ'ᵢ,                  divisor = Σ wᵢ       (|divisor| < 1e-8 → 1)
    with sign consensus: s = sign(Σ wᵢτ'ᵢ) (0 → +),  kᵢ = [sign(wᵢτ'ᵢ) = s]
                         δ = Σ kᵢwᵢτ'ᵢ,               divisor = Σ kᵢwᵢ     (0 → 1)
    θ = θ₀ + λ·(δ / divisor if normalize else δ)

Experts are loaded one at a time, once each, so memory holds the base, the accumulators and one
expert whatever the number of experts. The consensus is computed in that single pass: besides the
sign sum S = Σ wᵢτ'ᵢ (accumulated in expert order, as mergekit sums, so the elected sign is the same
to the bit), it accumulates the positive and negative parts P = Σ max(wᵢτ'ᵢ, 0), N = Σ min(wᵢτ'ᵢ, 0)
and their weights WP = Σ wᵢ[wᵢτ'ᵢ > 0], WN = Σ wᵢ[wᵢτ'ᵢ < 0]; then δ, divisor = (P, WP) where S ≥ 0,
else (N, WN). Adding the zeros of the other sign is exact, so δ equals mergekit's masked sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import ChunkInputs

# sparsify(inputs, expert_index, delta) -> sparsified delta (may modify delta in place)
Sparsifier = Callable[[ChunkInputs, int, torch.Tensor], torch.Tensor]


def _no_sparsify(inputs: ChunkInputs, i: int, delta: torch.Tensor) -> torch.Tensor:
    return delta


def weighted_delta(inputs: ChunkInputs, i: int, sparsify: Sparsifier) -> torch.Tensor:
    """wᵢ · sparsify(θᵢ − θ₀) for expert i, fp32 (one fresh tensor)."""
    expert = inputs.experts[i]
    delta = expert.delta(inputs.base)
    delta = sparsify(inputs, i, delta)
    if expert.params.weight != 1:  # x·1 is x: skip the pass
        delta *= expert.params.weight
    return delta


def merge_task_vectors(
    inputs: ChunkInputs, sparsify: Sparsifier = _no_sparsify, consensus: bool = False
) -> torch.Tensor:
    p = inputs.params
    n = len(inputs.experts)
    if n == 0:
        return inputs.base.clone()
    if consensus:
        sign_sum = torch.zeros_like(inputs.base)
        pos, neg = torch.zeros_like(inputs.base), torch.zeros_like(inputs.base)
        pos_w, neg_w = torch.zeros_like(inputs.base), torch.zeros_like(inputs.base)
        for i in range(n):
            w = inputs.experts[i].params.weight
            wd = weighted_delta(inputs, i, sparsify)
            sign_sum += wd
            pos_w.add_(wd > 0, alpha=w)
            neg_w.add_(wd < 0, alpha=w)
            neg += wd.clamp(max=0)
            pos += wd.clamp_(min=0)
            del wd
        elect = sign_sum >= 0  # zero counts as +
        del sign_sum
        mixed = torch.where(elect, pos, neg)
        divisor = torch.where(elect, pos_w, neg_w)
        del pos, neg, pos_w, neg_w, elect
        divisor[divisor == 0] = 1.0
    else:
        mixed = weighted_delta(inputs, 0, sparsify)  # 0 + x is x: no zero buffer to fill
        for i in range(1, n):
            mixed += weighted_delta(inputs, i, sparsify)
        total = sum(e.params.weight for e in inputs.experts)
        divisor = 1.0 if abs(total) < 1e-8 else total
    if p.normalize:
        mixed /= divisor
    if p.lambda_ != 1:
        mixed *= p.lambda_
    mixed += inputs.base
    return mixed
