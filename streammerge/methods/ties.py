"""TIES merging (mergekit ``ties``): trim each task vector to its top-k magnitudes, elect a sign, merge
the agreeing entries (see ``task_vectors`` for the consensus formula). ``normalize`` default true.

Trim: per expert and tensor keep exactly k = max(1, int(density·numel)) entries of largest |τᵢ|.
``prepare`` finds the k-th largest |τᵢ| over the whole tensor exactly by radix selection on the fp32
bit pattern (two 16-bit histograms, O(n); mergekit sorts the whole tensor, O(n log n)). Ties at the threshold (common with bf16 inputs) are broken by position: entries strictly
above the threshold are kept, then entries equal to it in row-major order until k are kept. mergekit
uses an unstable ``argsort`` there, so its choice among equal magnitudes is unspecified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod
from .dare import L1_EPS
from .task_vectors import merge_task_vectors


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


@dataclass
class _Trim:
    """Per expert: keep |τ| > threshold, plus the first ``ties_left`` entries with |τ| == threshold."""

    threshold: float | None  # None: keep everything (density >= 1)
    ties_left: int
    scale: float = 1.0  # L1 rescale factor (``rescale: true``)


def keep_count(density: float, numel: int) -> int:
    return max(1, int(density * numel))


def kth_largest(magnitude: torch.Tensor, k: int) -> float:
    """Exact k-th largest value (1-based) of a flat, non-negative, finite fp32 tensor.

    Non-negative IEEE floats order like their bit patterns read as int32, so the answer's upper 16
    bits are found from a histogram of every element's upper 16 bits, and its lower 16 bits from a
    histogram of the elements in that bucket.
    """
    bits = magnitude.view(torch.int32)
    high = bits >> 16  # (n,) in [0, 2^15)
    from_top = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(k, device=from_top.device)))
    bucket = (1 << 15) - 1 - i
    above = int(from_top[i - 1]) if i > 0 else 0
    low_bits = bits[high == bucket] & 0xFFFF
    del high
    from_top = torch.bincount(low_bits, minlength=1 << 16).flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k - above, device=from_top.device)))
    pattern = (bucket << 16) | ((1 << 16) - 1 - j)
    return float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32))


def prepare(inputs: ChunkInputs) -> list[_Trim]:
    trims = []
    for expert in inputs.experts:
        density = expert.params.density
        if density >= 1 or math.prod(inputs.shape) == 0:
            trims.append(_Trim(None, 0))
            continue
        if density <= 0:  # mergekit: nothing kept
            trims.append(_Trim(math.inf, 0))
            continue
        magnitude = expert.load()
        magnitude -= inputs.base
        magnitude.abs_()
        flat = magnitude.reshape(-1)
        k = keep_count(density, flat.numel())
        threshold = kth_largest(flat, k)
        above = flat > threshold
        n_above = int(above.sum())
        scale = 1.0
        if inputs.params.rescale:
            before = float(flat.sum())
            after = float(flat[above].sum()) + (k - n_above) * float(threshold)
            scale = 1.0 if before < L1_EPS or after < L1_EPS else before / after
        trims.append(_Trim(float(threshold), k - n_above, scale))
        del magnitude, flat, above
    return trims


def trim_mask(delta: torch.Tensor, trim: _Trim) -> tuple[torch.Tensor, int]:
    """Boolean keep-mask for this chunk of τᵢ and how many threshold ties it used."""
    magnitude = delta.abs()
    keep = magnitude > trim.threshold
    tied = (magnitude == trim.threshold).reshape(-1)
    n_tied = int(tied.sum())
    if n_tied <= trim.ties_left:
        keep |= tied.reshape(keep.shape)
        return keep, n_tied
    if trim.ties_left > 0:
        first = tied.nonzero().reshape(-1)[: trim.ties_left]
        keep.view(-1)[first] = True
    return keep, trim.ties_left


def merge(inputs: ChunkInputs) -> torch.Tensor:
    trims: list[_Trim] = inputs.state
    used = [0] * len(trims)  # ties consumed in this chunk; the same in both consensus passes

    def sparsify(_: ChunkInputs, i: int, delta: torch.Tensor) -> torch.Tensor:
        if trims[i].threshold is None:
            return delta
        keep, used[i] = trim_mask(delta, trims[i])
        delta.mul_(keep)
        if trims[i].scale != 1.0:
            delta *= trims[i].scale
        return delta

    out = merge_task_vectors(inputs, sparsify, consensus=True)
    for trim, n in zip(trims, used):
        trim.ties_left -= n  # later chunks of this tensor see the remaining tie budget
    return out


METHOD = MergeMethod("ties", merge, TiesParams, TiesModelParams, base_model="required", prepare=prepare)
