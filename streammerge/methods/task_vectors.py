"""The shared core of task-vector methods (mergekit's ``generalized_task_arithmetic``).

    τ'ᵢ = sparsify(θᵢ − θ₀)                 (identity, magnitude top-k, or DARE's random drop)
    without consensus:  δ = Σ wᵢτ'ᵢ,                  divisor = Σ wᵢ       (|divisor| < 1e-8 → 1)
    with sign consensus: s = sign(Σ wᵢτ'ᵢ) (0 → +),  kᵢ = [sign(wᵢτ'ᵢ) = s]
                         δ = Σ kᵢwᵢτ'ᵢ,               divisor = Σ kᵢwᵢ     (0 → 1)
    θ = θ₀ + λ·(δ / divisor if normalize else δ)

Experts are loaded one at a time (twice with consensus: sign sum, then the disjoint sum), so memory
holds the base, two accumulators and one expert, whatever the number of experts.
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
    delta = expert.load()
    delta -= inputs.base
    delta = sparsify(inputs, i, delta)
    delta *= expert.params.weight
    return delta


def merge_task_vectors(inputs: ChunkInputs, sparsify: Sparsifier = _no_sparsify, consensus: bool = False) -> torch.Tensor:
    p = inputs.params
    n = len(inputs.experts)
    if n == 0:
        return inputs.base.clone()
    if consensus:
        sign_sum = torch.zeros_like(inputs.base)
        for i in range(n):
            sign_sum += weighted_delta(inputs, i, sparsify)
        majority = torch.where(sign_sum >= 0, 1.0, -1.0)
        del sign_sum
        mixed = torch.zeros_like(inputs.base)
        divisor = torch.zeros_like(inputs.base)
        for i in range(n):
            wd = weighted_delta(inputs, i, sparsify)
            agree = (torch.sign(wd) == majority).to(wd.dtype)
            mixed.addcmul_(wd, agree)
            divisor.add_(agree, alpha=inputs.experts[i].params.weight)
        divisor[divisor == 0] = 1.0
    else:
        mixed = torch.zeros_like(inputs.base)
        for i in range(n):
            mixed += weighted_delta(inputs, i, sparsify)
        total = sum(e.params.weight for e in inputs.experts)
        divisor = 1.0 if abs(total) < 1e-8 else total
    if p.normalize:
        mixed /= divisor
    if p.lambda_ != 1:
        mixed *= p.lambda_
    mixed += inputs.base
    return mixed
