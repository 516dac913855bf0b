"""DELLA (mergekit ``della`` / ``della_linear``, arXiv 2406.11617): magnitude-ranked random drop.

Each expert's task vector keeps entry (r, c) with a probability that grows with its magnitude rank in
its row, then is merged with TIES' sign consensus (``della``: ``normalize`` default true) or as task
arithmetic (``della_linear``: ``normalize`` default false); ``rescale`` defaults to true for both.
As mergekit 0.1.5's ``della_magprune``, for a tensor of rows of length C (a 1-D tensor is one row):

    rank(r, c) ∈ {0 … C−1}   position of |τᵢ[r, c]| in its row, ascending
    p(r, c) = (density − ε) + rank/(C − 1) · 2ε          from density − ε (smallest) to density + ε
    keep with probability p; with ``rescale``, kept entries are scaled so the tensor's L1 norm equals
    the unmasked one (mergekit's l1 rescale; not the paper's per-entry 1/p)

Per-model ``density`` (1.0) and ``epsilon`` (0.15); density ± ε must lie in (0, 1) when density < 1
(mergekit's check); density ≥ 1 keeps the whole task vector.

Randomness: entry j of expert i is kept where uᵢⱼ < pᵢⱼ, uᵢⱼ drawn as DARE's (``dare.uniforms``:
seeded from ``seed``, the tensor name, i and the 2²⁰-element block of j), so the same config and seed
give the same bytes whatever the chunking, device or order, and ε = 0 gives exactly DARE's masks.
mergekit draws from torch's global RNG; results agree in distribution, not in bits.

Equal magnitudes in a row are ranked by column (a stable sort); mergekit's argsort is unstable.
A row of one entry (C = 1) gets p = density (mergekit fails there: its rank normalisation is 0/0).
Tensors of three or more dimensions are refused (mergekit ranks them along dimension 1).

Streaming: ranks need whole rows, and a chunk may start or end inside a row. ``prepare`` reads the
tensor once in order, carrying a partial row into the next chunk; it ranks every row once, draws its
uniforms, computes the L1 norms and keeps each pruned expert's keep mask packed 8 entries to a byte
(numel/8 bytes per expert and tensor). ``merge`` reads its chunk's mask from there: no second sort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import PlanError
from .base import ChunkInputs, MergeMethod
from .dare import L1_EPS, uniforms
from .group_sums import GroupSums
from .task_vectors import merge_task_vectors


@dataclass(frozen=True)
class DellaParams:
    normalize: bool = True
    lambda_: float = 1.0
    rescale: bool = True
    int8_mask: bool = False  # accepted for mergekit compatibility; masks are exact here anyway


@dataclass(frozen=True)
class DellaLinearParams:
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = True
    int8_mask: bool = False


@dataclass(frozen=True)
class DellaModelParams:
    weight: float
    density: float = 1.0
    epsilon: float = 0.15

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon!r}")
        if self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(
                f"epsilon {self.epsilon!r} with density {self.density!r}: density ± epsilon must lie in (0, 1); "
                f"lower epsilon to below {min(self.density, 1 - self.density):g}"
            )


def row_length(tensor: str, shape: tuple[int, ...]) -> int:
    if len(shape) > 2:
        raise PlanError(
            f"tensor {tensor!r} has shape {tuple(shape)}: DELLA ranks magnitudes per row of 1-D and 2-D tensors only; "
            f"merge it with another method"
        )
    return shape[-1] if shape else 1


def keep_probabilities(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """(R, C) fp32 keep probabilities for rows of |τ| (R, C): linear in each entry's rank in its row."""
    rows, cols = magnitude.shape
    if cols == 1:
        return torch.full_like(magnitude, density)
    order = torch.sort(magnitude, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=magnitude.device).expand(rows, cols))
    rank_norm = ranks.to(torch.float32) / (cols - 1)  # mergekit: (rank − min) / (max − min), ranks 1…C
    return (density - epsilon) + rank_norm * 2 * epsilon


SHIFTS = torch.arange(8, dtype=torch.uint8)  # bit j of a packed byte holds entry 8·byte + j


class PackedMask:
    """A boolean mask over a tensor's flat entries, 8 to a byte, filled in order by ``append``."""

    def __init__(self, numel: int, device: torch.device):
        self.bytes = torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=device)
        self.pending = torch.zeros(0, dtype=torch.bool, device=device)  # < 8 entries not yet packed
        self.filled = 0  # entries packed into ``bytes``

    def append(self, keep: torch.Tensor) -> None:
        bits = torch.cat([self.pending, keep.reshape(-1)]) if self.pending.numel() else keep.reshape(-1)
        whole = bits.numel() // 8 * 8
        if whole:
            b0 = self.filled // 8
            packed = (bits[:whole].view(-1, 8).to(torch.uint8) << SHIFTS.to(bits.device)).sum(1, dtype=torch.uint8)
            self.bytes[b0 : b0 + whole // 8] = packed
            self.filled += whole
        self.pending = bits[whole:].clone()

    def finish(self) -> None:
        if self.pending.numel():  # the tensor's last, partial byte
            self.append(torch.zeros(8 - self.pending.numel(), dtype=torch.bool, device=self.pending.device))

    def get(self, start: int, count: int) -> torch.Tensor:
        """The mask of entries [start, start + count) (bool, flat)."""
        b0, b1 = start // 8, (start + count + 7) // 8
        bits = (self.bytes[b0:b1].unsqueeze(1) >> SHIFTS.to(self.bytes.device)) & 1
        return bits.view(-1)[start - 8 * b0 : start - 8 * b0 + count].bool()


@dataclass
class _Expert:
    mask: PackedMask
    scale: float = 1.0


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> list[_Expert | None]:
    first = next(chunks())
    cols = row_length(first.tensor, first.shape)
    numel = math.prod(first.shape)
    pruned = [i for i, e in enumerate(first.experts) if e.params.density < 1 and numel > 0]
    experts: list[_Expert | None] = [
        _Expert(PackedMask(numel, first.device)) if i in pruned else None for i in range(len(first.experts))
    ]
    rescale = first.params.rescale
    shape, device = first.shape, first.device
    del first
    if not pruned:
        return experts
    # L1 norms as DARE takes them: fixed-unit sums, independent of chunking and threads (group_sums.py)
    before = {i: GroupSums(shape, "all", device) for i in pruned}
    after = {i: GroupSums(shape, "all", device) for i in pruned}
    carry = {i: (torch.zeros(0), torch.zeros(0)) for i in pruned}  # partial row: (|τ|, u)
    for inputs in chunks():
        for i in pruned:
            p = inputs.experts[i].params
            magnitude = inputs.experts[i].delta(inputs.base).abs_()
            u = uniforms(inputs.seed, inputs.tensor, i, inputs.start, magnitude.numel()).to(magnitude.device)
            if rescale:
                before[i].add(inputs.start, magnitude)
            held_mag, held_u = carry[i]
            if held_mag.numel():
                magnitude, u = torch.cat([held_mag, magnitude]), torch.cat([held_u, u])
            full = magnitude.numel() // cols * cols
            if full:
                probs = keep_probabilities(magnitude[:full].view(-1, cols), p.density, p.epsilon)
                keep = u[:full] < probs.view(-1)
                del probs
                experts[i].mask.append(keep)
                if rescale:
                    after[i].add(inputs.start - held_mag.numel(), magnitude[:full] * keep)
                del keep
            carry[i] = (magnitude[full:].clone(), u[full:].clone())
            del magnitude, u
    for i in pruned:
        experts[i].mask.finish()
        if not rescale:
            continue
        b, a = float(before[i].result()[0]), float(after[i].result()[0])
        if b >= L1_EPS and a >= L1_EPS:
            experts[i].scale = b / a
    return experts


def _sparsify(inputs: ChunkInputs, i: int, delta: torch.Tensor) -> torch.Tensor:
    state: _Expert | None = inputs.state[i]
    if state is None:
        return delta
    delta.mul_(state.mask.get(inputs.start, delta.numel()).view(delta.shape))
    if state.scale != 1.0:
        delta *= state.scale
    return delta


def merge_ties(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs, _sparsify, consensus=True)


def merge_linear(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs, _sparsify, consensus=False)


TIES = MergeMethod("della", merge_ties, DellaParams, DellaModelParams, base_model="required", prepare=prepare)
LINEAR = MergeMethod("della_linear", merge_linear, DellaLinearParams, DellaModelParams, base_model="required",
                     prepare=prepare)
