"""Arcee Fusion (mergekit ``arcee_fusion``): take the other model's value only where it matters most.

    importance = |θ₁ − θ₀| · KL(softmax(θ₁) ‖ softmax(θ₀))    (KL per row of the last dimension, +1e-8
                                                              on both distributions, as mergekit)
    threshold = Q₂ + 1.5·(Q₃ − Q₁)    (quartiles of the importance over the tensor: Tukey's upper fence)
    θ = θ₀ + (θ₁ − θ₀)·[importance ≥ threshold]

Not elementwise: the softmax needs whole rows and the quartiles the whole tensor, so the engine hands
this method whole tensors (as ORD): base, the other model and the importance are held, about three
fp32 copies of the tensor; the softmax and the output are computed in blocks of rows. Quartile qₖ is
the element at index ⌊qₖ·(n − 1)⌋ of the sorted importances, found exactly by a radix selection (one
histogram of the upper 16 bits of the fp32 bit patterns, then a selection among the few values in
the quartiles' buckets). mergekit sorts; for tensors over 1,000,000 elements it sorts
a random sample of 1,000,000 (drawn with replacement from torch's global RNG, unseeded), so its
quartiles, and the mask near the fence, vary between runs; here they are exact and reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ChunkInputs, MergeMethod, NoParams

BLOCK = 1 << 20  # elements per block of rows for the softmax and the output
QUANTILES = (0.25, 0.5, 0.75)
KL_EPS = 1e-8


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1) if x.dim() <= 1 else x.reshape(-1, x.shape[-1])


def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ₀| · KL per row, fp32, the shape of ``base`` (mergekit's ``_compute_importance``)."""
    b, o = _rows(base), _rows(other)
    out = torch.empty_like(b)
    step = max(1, BLOCK // max(1, b.shape[1]))
    for r in range(0, b.shape[0], step):
        x, y = o[r : r + step], b[r : r + step]
        p = F.softmax(x, dim=-1) + KL_EPS
        q = F.softmax(y, dim=-1) + KL_EPS
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        del p, q
        out[r : r + step] = (x - y).abs_().mul_(kl)
    return out.reshape(base.shape)


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like the fp32 values (negative floats: all bits but the sign flipped)."""
    bits = x.reshape(-1).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def kth_smallest(x: torch.Tensor, ks: list[int]) -> list[float]:
    """Exact k-th smallest (0-based) values of a finite fp32 tensor, in two passes over it.

    Pass 1 histograms the raw upper 16 bits of every value (bin h + 32768). The upper 16 bits of the
    order key (``_order_keys``) are the raw ones for non-negative values and the raw ones with their
    lower 15 bits flipped for negative values, so the key histogram is the raw one with its negative
    half reversed: no per-element key transform. That histogram fixes the key bucket of each k. Pass 2
    keeps the values whose upper bits fall in one of those (at most len(ks)) buckets, by a table
    lookup, and histograms their lower 16 key bits per bucket (memory: three histograms and one block)."""
    flat = x.reshape(-1).view(torch.int32)
    device = x.device
    raw = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for s in range(0, flat.numel(), BLOCK):
        raw += torch.bincount((flat[s : s + BLOCK] >> 16) + 32768, minlength=1 << 16)
    below = torch.cat([raw[: 1 << 15].flip(0), raw[1 << 15 :]]).cumsum(0)  # counts in key order, cumulated
    found = []  # (key bucket, elements in lower buckets) per k
    for k in ks:
        bucket = int(torch.searchsorted(below, torch.tensor(k, device=device), right=True))
        found.append((bucket, int(below[bucket - 1]) if bucket > 0 else 0))
    # key bucket -> raw bin: the same above 2^15, mirrored below
    raw_bin = {b: b if b >= 1 << 15 else (1 << 15) - 1 - b for b, _ in found}
    wanted = torch.zeros(1 << 16, dtype=torch.bool, device=device)
    wanted[list(raw_bin.values())] = True
    low = {b: torch.zeros(1 << 16, dtype=torch.int64, device=device) for b in raw_bin}
    for s in range(0, flat.numel(), BLOCK):
        block = flat[s : s + BLOCK]
        keys = _order_keys(block[wanted[(block >> 16) + 32768]].view(torch.float32))  # usually few
        keys_high = (keys >> 16) + 32768
        for b, hist in low.items():
            hist += torch.bincount(keys[keys_high == b] & 0xFFFF, minlength=1 << 16)
    out = []
    for k, (bucket, before) in zip(ks, found, strict=True):
        j = int(torch.searchsorted(low[bucket].cumsum(0), torch.tensor(k - before, device=device), right=True))
        key = torch.tensor([((bucket - 32768) << 16) | j], dtype=torch.int32)
        out.append(float((key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32)))
    return out


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁), fp32 0-d, with mergekit's quantile indices ⌊q·(n − 1)⌋."""
    index = (torch.tensor(QUANTILES) * (scores.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.tensor(v, dtype=torch.float32) for v in kth_smallest(scores, index))
    return median + 1.5 * (q3 - q1)


def merge(inputs: ChunkInputs) -> torch.Tensor:
    base, other = inputs.base, inputs.experts[0].load()
    if base.numel() == 0:
        return base
    scores = importance(base, other)
    threshold = fusion_threshold(scores).to(inputs.device)
    b, o, s = base.reshape(-1), other.reshape(-1), scores.reshape(-1)
    for i in range(0, b.numel(), BLOCK):  # θ₀ + (θ₁ − θ₀)·mask, in place in the base
        mask = (s[i : i + BLOCK] >= threshold).float()
        b[i : i + BLOCK] += (o[i : i + BLOCK] - b[i : i + BLOCK]).mul_(mask)
    return base


METHOD = MergeMethod("arcee_fusion", merge, NoParams, NoParams, base_model="required", elementwise=False,
                     expert_count=(1, 1))
