"""SCE: Select, Calculate, Erase (mergekit ``sce``, arXiv 2408.07990).

Per tensor, with τᵢ = θᵢ − θ₀ (no per-model parameters; ``select_topk`` (1.0) and ``int8_mask`` are
global, as in mergekit 0.1.5):

    Select:    σ²ⱼ = Var_i(τᵢⱼ) (population variance over experts). With select_topk < 1, keep the
               k = int(nnz(σ²)·select_topk) elements of largest σ² (the same elements for every
               expert; k = 0 keeps none); τᵢ ← τᵢ·maskⱼ.
    Calculate: wᵢ = mean(τᵢ²) / Σₖ mean(τₖ²) over the masked tensor (1/N each if that sum < 1e-6).
    Erase:     sⱼ = sign(Σᵢ τᵢⱼ) (0 counts +); mᵢⱼ = [sign(τᵢⱼ) = sⱼ] (a zero never agrees).
    θ = θ₀ + Σᵢ wᵢmᵢⱼτᵢⱼ / max(Σᵢ wᵢmᵢⱼ, 1e-6).

Streaming: the variance is computed by Welford's update in fp64, one expert at a time, which gives
torch.var's bits exactly (torch reduces with fp64 Welford too). The top-k threshold on σ² is found by
radix selection (``ties.RadixSelect``) in two passes; the second also sums τᵢ² above the threshold's
bucket and histograms it inside the bucket, so wᵢ needs a third pass only where some, but not all,
entries tied at the threshold are kept. Ties at the threshold are kept in row-major order (mergekit's
``topk`` picks among them arbitrarily: on bf16 inputs the two differ only at tied elements). The
merge pass recomputes σ² and the consensus sums in one read of each expert.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams
from .breadcrumbs import TopCut
from .ties import LOW_BINS, RadixSelect

DIVISOR_FLOOR = 1e-6  # mergekit: Σ wᵢmᵢ clamped to at least this
WEIGHT_SUM_EPS = 1e-6  # mergekit: below this total, uniform weights


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


def variance(inputs: ChunkInputs, each: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Population variance over experts of τ for this chunk (fp32, torch.var's bits); ``each(i, τᵢ)``
    sees every expert's τ on the way."""
    mean = m2 = None
    for i, expert in enumerate(inputs.experts):
        tau = expert.delta(inputs.base)
        x = tau.double()
        if mean is None:  # the first update from (0, 0) gives exactly (x, 0)
            mean, m2 = x, torch.zeros_like(x)
        else:
            d = x - mean
            mean += d / (i + 1)
            m2 += x.sub_(mean).mul_(d)  # torch's WelfordOps: m2 + δ·(x − new mean), rounded as there (no FMA)
            del x, d
        if each is not None:
            each(i, tau)
        del tau
    return m2.div_(len(inputs.experts)).float()


def variance_and_squares(inputs: ChunkInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """σ² for this chunk and every expert's τᵢ² (fp32)."""
    squares: list[torch.Tensor] = []
    var = variance(inputs, lambda i, tau: squares.append(tau.square_()))
    return var, squares


def _weights(squares: list[float], numel: int) -> list[float]:
    means = [s / numel if numel else 0.0 for s in squares]
    total = sum(means)
    if abs(total) < WEIGHT_SUM_EPS:
        return [1.0 / len(means)] * len(means)
    return [float(torch.tensor(m / total, dtype=torch.float32)) for m in means]


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> SceState | None:
    first = next(chunks())
    n, numel, topk = len(first.experts), math.prod(first.shape), first.params.select_topk
    device = first.device
    del first
    if n == 0:
        return None
    squares = [0.0] * n
    if topk >= 1 or numel == 0:
        for inputs in chunks():
            for i, expert in enumerate(inputs.experts):
                squares[i] += float(expert.delta(inputs.base).square_().sum(dtype=torch.float64))
        return SceState(_weights(squares, numel), None)

    # pass 1: non-zero count and high-bit histogram of σ²
    nonzero = 0
    probe = RadixSelect(1, device)
    for inputs in chunks():
        var = variance(inputs)
        nonzero += int(torch.count_nonzero(var))
        probe.add_high(var)
    k = int(torch.tensor(nonzero) * topk)  # mergekit: int(count_nonzero(var) * density), an fp32 product
    if k == 0:  # nothing kept: every τ masked, θ = θ₀
        return SceState([1.0 / n] * n, TopCut(0))
    select = RadixSelect(k, device)
    select.high = probe.high
    select.choose_bucket()

    # pass 2: low bits inside the bucket; Σ τᵢ² above the bucket, and per low bin inside it
    per_bin = torch.zeros(n, LOW_BINS, dtype=torch.float64, device=device)
    for inputs in chunks():
        var, tau_squares = variance_and_squares(inputs)
        bits = var.view(torch.int32)
        high = bits >> 16
        above, inside = high > select.bucket, high == select.bucket
        low = (bits[inside] & 0xFFFF).long()
        select.add_low(var)
        for i, sq in enumerate(tau_squares):
            squares[i] += float(sq[above].sum(dtype=torch.float64))
            per_bin[i].index_add_(0, low, sq[inside].double())
        del tau_squares, var, bits
    cut = TopCut.from_select(select)
    low_threshold = int(torch.tensor([cut.threshold], dtype=torch.float32).view(torch.int32)) & 0xFFFF
    for i in range(n):
        squares[i] += float(per_bin[i, low_threshold + 1 :].sum())
        if cut.take >= cut.tied:
            squares[i] += float(per_bin[i, low_threshold])
    if cut.take < cut.tied:  # pass 3: only some ties kept; sum τᵢ² over exactly those
        probe_cut = dataclasses.replace(cut)
        for inputs in chunks():
            var, tau_squares = variance_and_squares(inputs)
            tied_kept = probe_cut.chunk_mask(var) & (var == cut.threshold)
            for i, sq in enumerate(tau_squares):
                squares[i] += float(sq[tied_kept].sum(dtype=torch.float64))
    return SceState(_weights(squares, numel), cut)


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
    consensus = _Consensus(inputs.base, state.weights)
    keep = None
    if state.cut is None:
        for i, expert in enumerate(inputs.experts):
            consensus.add(i, expert.delta(inputs.base))
    else:
        keep = state.cut.chunk_mask(variance(inputs, consensus.add))
    merged = consensus.result()
    if keep is not None:
        merged.mul_(keep)  # masked elements: τ = 0 for every expert, merged 0
    return merged.add_(inputs.base)


METHOD = MergeMethod("sce", merge, SceParams, NoParams, base_model="required", prepare=prepare)
