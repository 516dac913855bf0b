"""SCE: Select, Calculate, Erase (mergekit ``sce``, arXiv 2408.07990).

Per tensor, with τᵢ = θᵢ − θ₀ (no per-model parameters; ``select_topk`` (1.0) and ``int8_mask`` are
global, as in mergekit 0.1.5):

    Select:    σ²ⱼ = Var_i(τᵢⱼ) (population variance over experts). With select_topk < 1, keep the
               k = int(nnz(σ²)·select_topk) elements of largest σ² (the same elements for every
               expert; k = 0 keeps none); τᵢ ← τᵢ·maskⱼ.
    Calculate: wᵢ = mean(τᵢ²) / Σₖ mean(τₖ²) over the masked tensor (1/N each if that sum < 1e-6).
    Erase:     sⱼ = sign(Σᵢ τᵢⱼ) (0 counts +); mᵢⱼ = [sign(τᵢⱼ) = sⱼ] (a zero never agrees).
    θ = θ₀ + Σᵢ wᵢmᵢⱼτᵢⱼ / max(Σᵢ wᵢmᵢⱼ, 1e-6).

Streaming: σ² is computed by Welford's update in fp64, one expert at a time, which gives torch.var's
bits exactly (torch reduces with fp64 Welford too), and kept for the whole tensor as fp32 (one fp32
tensor of memory, whatever the number of experts). The top-k threshold on it is found by radix
selection (``ties.RadixSelect``); ties at the threshold are kept in row-major order (mergekit's
``topk`` picks among them arbitrarily: on bf16 inputs the kept sets differ only at tied elements).
Passes over the experts: σ², then Σ τᵢ² over the selected elements, then the merge (no σ² pass
with select_topk = 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams
from .breadcrumbs import TopCut
from .ties import RadixSelect

DIVISOR_FLOOR = 1e-6  # mergekit: Σ wᵢmᵢ clamped to at least this
WEIGHT_SUM_EPS = 1e-6  # mergekit: below this total, uniform weights
SLICE = 1 << 22  # elements of σ² histogrammed at a time


@dataclass(frozen=True)
class SceParams:
    select_topk: float = 1.0
    int8_mask: bool = False  # accepted for mergekit compatibility; masks are exact here anyway

    def __post_init__(self):
        if not 0 < self.select_topk <= 1:
            raise ValueError(f"select_topk must be in (0, 1] (the fraction of elements kept), got {self.select_topk!r}")


@dataclass
class SceState:
    weights: list[float]  # wᵢ, fp32 values
    cut: TopCut | None  # None: every element kept (select_topk = 1)
    variance: torch.Tensor | None = None  # σ² of the whole tensor, flat fp32 (with ``cut``)

    def keep(self, start: int, count: int) -> torch.Tensor | None:
        """Selected elements among flat [start, start + count) (chunks asked for in order)."""
        if self.cut is None:
            return None
        return self.cut.chunk_mask(self.variance[start : start + count])


def variance(inputs: ChunkInputs) -> torch.Tensor:
    """Population variance over experts of τ for this chunk (fp32, torch.var's bits)."""
    mean = m2 = None
    for i, expert in enumerate(inputs.experts):
        x = expert.delta(inputs.base).double()
        if mean is None:  # the first update from (0, 0) gives exactly (x, 0)
            mean, m2 = x, torch.zeros_like(x)
            continue
        d = x - mean
        mean += d / (i + 1)
        m2 += x.sub_(mean).mul_(d)  # torch's WelfordOps: m2 + δ·(x − new mean), rounded as there (no FMA)
        del x, d
    return m2.div_(len(inputs.experts)).float()


def _weights(squares: list[float], numel: int) -> list[float]:
    means = [s / numel if numel else 0.0 for s in squares]
    total = sum(means)
    if abs(total) < WEIGHT_SUM_EPS:
        return [1.0 / len(means)] * len(means)
    return [float(torch.tensor(m / total, dtype=torch.float32)) for m in means]


def _select(chunks: Callable[[], Iterator[ChunkInputs]], numel: int, topk: float,
            device: torch.device) -> tuple[TopCut, torch.Tensor]:
    """The top-k cut on σ² and σ² itself (one pass over the experts; the radix passes run on σ²)."""
    var = torch.empty(numel, dtype=torch.float32, device=device)
    for inputs in chunks():
        n = math.prod(inputs.base.shape)
        var[inputs.start : inputs.start + n] = variance(inputs).reshape(-1)
    k = int(torch.count_nonzero(var) * topk)  # mergekit: int(count_nonzero(var) * density), an fp32 product
    if k == 0:
        return TopCut(0), var
    select = RadixSelect(k, device)
    slices = range(0, numel, SLICE)  # bounded temporaries for the histograms
    for s in slices:
        select.add_high(var[s : s + SLICE])
    select.choose_bucket()
    for s in slices:
        select.add_low(var[s : s + SLICE])
    return TopCut.from_select(select), var


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> SceState | None:
    first = next(chunks())
    n, numel, topk, device = len(first.experts), math.prod(first.shape), first.params.select_topk, first.device
    del first
    if n == 0:
        return None
    state = SceState([1.0 / n] * n, None)
    if topk < 1 and numel > 0:
        state.cut, state.variance = _select(chunks, numel, topk, device)
        if state.cut.k == 0:  # nothing selected: every τ masked, θ = θ₀
            return state
    squares = [0.0] * n
    probe = dataclasses.replace(state, cut=dataclasses.replace(state.cut) if state.cut else None)
    for inputs in chunks():
        keep = probe.keep(inputs.start, math.prod(inputs.base.shape))
        for i, expert in enumerate(inputs.experts):
            sq = expert.delta(inputs.base).square_()
            squares[i] += float((sq if keep is None else sq[keep.view(sq.shape)]).sum(dtype=torch.float64))
            del sq
    state.weights = _weights(squares, numel)
    return state


class _Consensus:
    """Sign sum S = Σ τᵢ, parts P = Σ max(wᵢτᵢ, 0), N = Σ min(wᵢτᵢ, 0), weights WP = Σ wᵢ[τᵢ > 0],
    WN = Σ wᵢ[τᵢ < 0], accumulated expert by expert (see ``task_vectors``: adding the zeros of the
    other sign is exact, so P/WP equals mergekit's masked sums)."""

    def __init__(self, like: torch.Tensor, weights: list[float]):
        self.weights = weights
        self.sign_sum, self.pos, self.neg = (torch.zeros_like(like) for _ in range(3))
        self.pos_w, self.neg_w = torch.zeros_like(like), torch.zeros_like(like)

    def add(self, i: int, tau: torch.Tensor) -> None:
        w = self.weights[i]
        self.sign_sum += tau
        self.pos_w.add_(tau > 0, alpha=w)
        self.neg_w.add_(tau < 0, alpha=w)
        tau.mul_(w)  # mergekit: τ·(w·m) with m ∈ {0, 1}
        self.neg += tau.clamp(max=0)
        self.pos += tau.clamp_(min=0)

    def result(self) -> torch.Tensor:
        elect = self.sign_sum >= 0  # zero counts as +
        merged = torch.where(elect, self.pos, self.neg)
        divisor = torch.where(elect, self.pos_w, self.neg_w).clamp_(min=DIVISOR_FLOOR)
        del self.sign_sum, self.pos, self.neg, self.pos_w, self.neg_w
        return merged.div_(divisor)


def merge(inputs: ChunkInputs) -> torch.Tensor:
    state: SceState | None = inputs.state
    if state is None or (state.cut is not None and state.cut.k == 0):
        return inputs.base.clone()
    keep = state.keep(inputs.start, inputs.base.numel())
    consensus = _Consensus(inputs.base, state.weights)
    for i, expert in enumerate(inputs.experts):
        consensus.add(i, expert.delta(inputs.base))
    merged = consensus.result()
    if keep is not None:
        merged.mul_(keep.view(merged.shape))  # unselected elements: τ = 0 for every expert, merged 0
    return merged.add_(inputs.base)


METHOD = MergeMethod("sce", merge, SceParams, NoParams, base_model="required", prepare=prepare)
