"""TIES merging (mergekit ``ties``): trim each task vector to its top-k magnitudes, elect a sign, merge
the agreeing entries (see ``task_vectors`` for the consensus formula). ``normalize`` default true.

Trim: per expert and tensor keep exactly k = max(1, int(density·numel)) entries of largest |τᵢ|
(density ≤ 0 keeps none, as mergekit). ``prepare`` finds the k-th largest |τᵢ| exactly by radix
selection on the fp32 bit pattern, streaming the tensor chunk by chunk twice (two 16-bit histograms:
O(n) time, chunk-sized memory; mergekit sorts the whole tensor, O(n log n) time and several copies).
Ties at the threshold (common with bf16 inputs) are broken by position: entries strictly above the
threshold are kept, then entries equal to it in row-major order until k are kept. mergekit uses an
unstable ``argsort`` there, so its choice among equal magnitudes is unspecified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, check_density
from .dare import L1_EPS
from .group_sums import GroupSums
from .task_vectors import merge_task_vectors

HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16  # non-negative fp32: 15 high bits after the sign, 16 low bits


@dataclass(frozen=True)
class TiesParams:
    normalize: bool = True
    lambda_: float = 1.0
    rescale: bool = False  # mergekit: scale kept entries to the unmasked L1 norm
    int8_mask: bool = False  # accepted for mergekit compatibility; masks are exact here anyway


@dataclass(frozen=True)
class TiesModelParams:
    weight: float
    density: float = 1.0

    def __post_init__(self):
        check_density(self.density)


@dataclass
class _Trim:
    """Per expert: keep |τ| > threshold, plus the first ``ties_left`` entries with |τ| == threshold."""

    threshold: float | None  # None: keep everything (density >= 1)
    ties_left: int  # threshold ties still to keep, in row-major order
    ties_total: int = 0  # entries equal to the threshold in the whole tensor
    scale: float = 1.0  # L1 rescale factor (``rescale: true``)


class RadixSelect:
    """Exact k-th largest of a non-negative, finite fp32 stream, seen in two passes of chunks.

    Non-negative IEEE floats order like their bit patterns read as int32. Pass 1 histograms every
    value's upper 16 bits; that fixes the bucket holding the k-th largest. Pass 2 histograms the lower
    16 bits of the values in that bucket, which fixes the value and how many are above and equal to it.
    """

    def __init__(self, k: int, device: torch.device):
        self.k = k
        self.high = torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
        self.low = torch.zeros(LOW_BINS, dtype=torch.int64, device=device)
        self.bucket = -1
        self.above_bucket = 0

    def add_high(self, magnitude: torch.Tensor) -> None:
        self.high += torch.bincount((magnitude.view(torch.int32) >> 16).reshape(-1), minlength=HIGH_BINS)

    def choose_bucket(self) -> None:
        from_top = self.high.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, torch.tensor(self.k, device=from_top.device)))
        self.bucket = HIGH_BINS - 1 - i
        self.above_bucket = int(from_top[i - 1]) if i > 0 else 0

    def low_keys(self, bits: torch.Tensor) -> torch.Tensor:
        """bits − (bucket·2¹⁶ − 1), clamped to [0, 2¹⁶ + 1]: the bucket's values land in bins 1..2¹⁶ by their
        low 16 bits, every other value in bin 0 (below) or 2¹⁶ + 1 (above). No boolean selection (2/3 of the
        pass on one thread of a loaded machine); with 2 idle threads both forms take ~7 ms per 4 M values."""
        return (bits - ((self.bucket << 16) - 1)).clamp_(0, LOW_BINS + 1)

    def add_low(self, magnitude: torch.Tensor) -> None:
        keys = self.low_keys(magnitude.view(torch.int32).reshape(-1))
        self.low += torch.bincount(keys, minlength=LOW_BINS + 2)[1:-1]

    def result(self) -> tuple[float, int, int]:
        """(k-th largest value, how many values are strictly above it, how many equal it)."""
        from_top = self.low.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor(self.k - self.above_bucket, device=from_top.device)))
        pattern = (self.bucket << 16) | (LOW_BINS - 1 - j)
        value = float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32))
        above = self.above_bucket + (int(from_top[j - 1]) if j > 0 else 0)
        return value, above, int(self.low[LOW_BINS - 1 - j])


def kth_largest(magnitude: torch.Tensor, k: int) -> float:
    """Exact k-th largest value (1-based) of a non-negative, finite fp32 tensor."""
    select = RadixSelect(k, magnitude.device)
    select.add_high(magnitude)
    select.choose_bucket()
    select.add_low(magnitude)
    return select.result()[0]


def _magnitudes(inputs: ChunkInputs, selected: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
    for i in selected:
        magnitude = inputs.experts[i].delta(inputs.base)
        yield i, magnitude.abs_()


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> list[_Trim]:
    first = next(chunks())
    numel = math.prod(first.shape)
    trims: list[_Trim] = []
    selects: dict[int, RadixSelect] = {}
    for i, expert in enumerate(first.experts):
        density = expert.params.density
        if density >= 1 or numel == 0:
            trims.append(_Trim(None, 0))
        elif density <= 0:  # mergekit: nothing kept
            trims.append(_Trim(math.inf, 0))
        else:
            trims.append(_Trim(0.0, 0))
            selects[i] = RadixSelect(max(1, int(density * numel)), first.device)
    rescale = first.params.rescale
    del first
    if not selects:
        return trims
    for inputs in chunks():
        for i, magnitude in _magnitudes(inputs, list(selects)):
            selects[i].add_high(magnitude)
    for select in selects.values():
        select.choose_bucket()
    for inputs in chunks():
        for i, magnitude in _magnitudes(inputs, list(selects)):
            selects[i].add_low(magnitude)
    for i, select in selects.items():
        threshold, above, tied = select.result()
        trims[i] = _Trim(threshold, select.k - above, tied)
    if rescale:
        _l1_scales(chunks, trims, list(selects))
    return trims


def _l1_scales(chunks: Callable[[], Iterator[ChunkInputs]], trims: list[_Trim], trimmed: list[int]) -> None:
    """scale = ‖τ‖₁ / ‖kept τ‖₁ per trimmed expert (mergekit's ``rescale_norm=l1``)."""
    totals: dict[int, GroupSums] = {}
    kept: dict[int, GroupSums] = {}
    for inputs in chunks():
        for i, magnitude in _magnitudes(inputs, trimmed):
            if i not in totals:  # chunk-independent fp64 sums
                totals[i] = GroupSums(inputs.shape, "all", inputs.device)
                kept[i] = GroupSums(inputs.shape, "all", inputs.device)
            totals[i].add(inputs.start, magnitude)
            kept[i].add(inputs.start, magnitude.mul_(magnitude > trims[i].threshold))
    for i, sums in totals.items():
        total = float(sums.result()[0])
        after = float(kept[i].result()[0]) + trims[i].ties_left * trims[i].threshold
        trims[i].scale = 1.0 if total < L1_EPS or after < L1_EPS else total / after


def trim_mask(delta: torch.Tensor, trim: _Trim) -> tuple[torch.Tensor, int, int]:
    """Boolean keep-mask for this chunk of τᵢ, the threshold ties it kept and the ties it saw."""
    magnitude = delta.abs()
    if trim.ties_left >= trim.ties_total:  # every remaining tie is kept: no counting (the usual case)
        return magnitude >= trim.threshold, 0, 0
    keep = magnitude > trim.threshold
    tied = (magnitude == trim.threshold).reshape(-1)
    seen = int(torch.count_nonzero(tied))
    if seen <= trim.ties_left:
        keep |= tied.reshape(keep.shape)
        return keep, seen, seen
    if trim.ties_left > 0:
        first = tied.nonzero().reshape(-1)[: trim.ties_left]
        keep.view(-1)[first] = True
    return keep, trim.ties_left, seen


def merge(inputs: ChunkInputs) -> torch.Tensor:
    trims: list[_Trim] = inputs.state
    ties = [(0, 0)] * len(trims)  # threshold ties (kept, seen) in this chunk, per expert

    def sparsify(_: ChunkInputs, i: int, delta: torch.Tensor) -> torch.Tensor:
        if trims[i].threshold is None:
            return delta
        keep, kept, seen = trim_mask(delta, trims[i])
        ties[i] = (kept, seen)
        delta.mul_(keep)
        if trims[i].scale != 1.0:
            delta *= trims[i].scale
        return delta

    out = merge_task_vectors(inputs, sparsify, consensus=True)
    for trim, (kept, seen) in zip(trims, ties, strict=False):
        trim.ties_left -= kept  # later chunks of this tensor see the remaining budget and ties
        trim.ties_total -= seen
    return out


METHOD = MergeMethod("ties", merge, TiesParams, TiesModelParams, base_model="required", prepare=prepare)
