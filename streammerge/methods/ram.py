"""RAM, Reinforced Agent Merging (mergekit ``ram`` / ``ramplus_tl``, arXiv 2601.13572).

Per element j, an expert *contributes* where its task vector is non-negligible, |τᵢⱼ| > ε, and
cⱼ = number of contributing experts. Contributed entries are kept whole where one expert alone
contributes (unique) and averaged over the contributors where several do (overlap):

    ram:         θⱼ = θ₀ⱼ + Σᵢ [|τᵢⱼ| > ε] τᵢⱼ · (1 if cⱼ = 1 else 1/cⱼ)     (0 where cⱼ = 0)
    ramplus_tl:  unique entries of expert i are scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, α),
                 ρᵢ = sharedᵢ / max(uniqueᵢ, ε): expert i's counts of contributed entries in overlap
                 and in unique elements over the whole tensor ("tensor-local").

No weights, no λ, no normalisation: as mergekit 0.1.5 (``merge_methods/ram.py``), whose parameters
are all global: ``epsilon`` (1e-5) and for ``ramplus_tl`` ``r`` (0.1) and ``alpha`` (0.2).

Streaming: one pass per chunk accumulates cⱼ, S = Σ contributed τ and L = Σ λᵢ·contributed τ, then
unique elements take L and overlap elements S / c. mergekit sums τᵢ/cⱼ term by term, here the sum is
divided once: identical bits where cⱼ is a power of two (any merge of 2 experts), otherwise within an
ulp or two. ``ramplus_tl`` needs the per-expert counts first: ``prepare`` counts them in one pass
(each element's unique contributor is remembered as an index sum, so each expert is read once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams


def _finite(name: str, value: float, low: float | None = None) -> None:
    if not math.isfinite(value) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


@dataclass(frozen=True)
class RamParams:
    epsilon: float = 1e-5  # |τ| above this counts as a contribution

    def __post_init__(self):
        _finite("epsilon", self.epsilon, 0.0)


@dataclass(frozen=True)
class RamPlusParams:
    r: float = 0.1  # strength of the unique-entry boost
    alpha: float = 0.2  # cap on the shared/unique ratio ρ
    epsilon: float = 1e-5

    def __post_init__(self):
        _finite("epsilon", self.epsilon, 0.0)
        _finite("r", self.r)
        _finite("alpha", self.alpha, 0.0)


def _contributions(inputs: ChunkInputs, lambdas: list[float] | None) -> torch.Tensor:
    """Merged τ for this chunk: unique contributions (× λᵢ), overlapping ones averaged."""
    eps = inputs.params.epsilon
    count = torch.zeros_like(inputs.base, dtype=torch.int32)
    total = torch.zeros_like(inputs.base)  # S: every contributed τ
    boosted = None if lambdas is None else torch.zeros_like(inputs.base)  # L: λᵢ·contributed τ
    for i, expert in enumerate(inputs.experts):
        tau = expert.delta(inputs.base)
        hit = tau.abs() > eps
        count += hit
        tau.mul_(hit)  # mergekit: tv * nonzero_mask (exact zeros elsewhere)
        total += tau
        if boosted is not None:
            boosted += tau.mul_(lambdas[i]) if lambdas[i] != 1 else tau
        del tau, hit
    # count 0: the sum of τ·0, i.e. 0 (NaN where an input is NaN: the engine's output check sees it)
    unique = boosted if boosted is not None else total.clone()
    overlap = total.div_(count.clamp(min=1))
    return torch.where(count > 1, overlap, unique)


def merge_ram(inputs: ChunkInputs) -> torch.Tensor:
    if not inputs.experts:
        return inputs.base.clone()
    return _contributions(inputs, None).add_(inputs.base)


def prepare_ramplus(chunks: Callable[[], Iterator[ChunkInputs]]) -> list[float]:
    """λᵢ = 1 + r·clamp(sharedᵢ / max(uniqueᵢ, ε), 0, α) from whole-tensor counts (fp32, as mergekit)."""
    shared: list[int] = []
    unique: list[int] = []
    p = None
    for inputs in chunks():
        p, n = inputs.params, len(inputs.experts)
        if not shared:
            shared, unique = [0] * n, [0] * n
        count = torch.zeros_like(inputs.base, dtype=torch.int32)
        owner = torch.zeros_like(inputs.base, dtype=torch.int32)  # Σ i over contributors: the owner if count = 1
        contributed = []
        for i, expert in enumerate(inputs.experts):
            hit = expert.delta(inputs.base).abs_() > p.epsilon
            count += hit
            owner += hit * i
            contributed.append(int(torch.count_nonzero(hit)))
            del hit
        solo = torch.bincount(owner[count == 1], minlength=n).tolist()
        for i in range(n):
            unique[i] += solo[i]
            shared[i] += contributed[i] - solo[i]
    if p is None:
        return []
    # mergekit: shared / unique.clamp(min=ε) and 1 + r·ρ.clamp(0, α), in fp32
    rho = torch.tensor(shared, dtype=torch.int64) / torch.tensor(unique, dtype=torch.int64).clamp(min=p.epsilon)
    return (1 + p.r * rho.clamp(min=0, max=p.alpha)).tolist()


def merge_ramplus(inputs: ChunkInputs) -> torch.Tensor:
    if not inputs.experts:
        return inputs.base.clone()
    return _contributions(inputs, inputs.state).add_(inputs.base)


RAM = MergeMethod("ram", merge_ram, RamParams, NoParams, base_model="required")
RAMPLUS_TL = MergeMethod("ramplus_tl", merge_ramplus, RamPlusParams, NoParams, base_model="required",
                         prepare=prepare_ramplus)
