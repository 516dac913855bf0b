"""Model Breadcrumbs (mergekit ``breadcrumbs`` / ``breadcrumbs_ties``, arXiv 2312.06795).

Each expert's task vector loses its largest entries (outliers) and its smallest, then the rest is
merged as task arithmetic (``breadcrumbs``) or with TIES' sign consensus (``breadcrumbs_ties``);
``normalize`` and ``rescale`` default false for both, as mergekit 0.1.5.

Cut (mergekit's ``magnitude_outliers``), per expert and tensor of n entries, for density < 1:

    keep = int(density·n)            entries kept (0 keeps none: no "at least one" as in TIES)
    top  = int(gamma·n)              outliers asked to be removed
    bot  = max(0, n − keep − top)    smallest removed
    kept = entries ranked (bot, bot + keep] from the bottom, i.e. positions (n − bot − keep, n − bot]
           from the top; where keep + top > n fewer outliers are removed, so that keep entries stay.

density ≥ 1 keeps the whole task vector (gamma is not applied, as in mergekit). With ``rescale`` the
kept entries are scaled so the tensor's L1 norm equals the unmasked one (mergekit's l1 rescale).

Streaming: the two cut positions are found exactly by radix selection (``ties.RadixSelect``): one
pass for the 16 high bits (shared by both cuts), one for the low bits, one more for the L1 norms with
``rescale``; a tensor that is one chunk takes both histograms from one read of each expert. Entries
of equal magnitude are ranked by position, earlier entries higher (as TIES does here); mergekit sorts
with an unstable sort, so on bf16 inputs the two differ only at elements whose |τ| equals a cut value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod
from .dare import L1_EPS
from .task_vectors import merge_task_vectors
from .ties import LOW_BINS, RadixSelect


@dataclass(frozen=True)
class BreadcrumbsParams:
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = False
    int8_mask: bool = False  # accepted for mergekit compatibility; masks are exact here anyway


@dataclass(frozen=True)
class BreadcrumbsModelParams:
    weight: float
    density: float = 1.0
    gamma: float = 0.01

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1] (the fraction of largest entries removed), got {self.gamma!r}")


@dataclass
class TopCut:
    """The top k entries of a stream in the order (magnitude descending, position ascending):
    entries above ``threshold``, plus the first ``take`` of those equal to it. ``seen`` counts the
    entries equal to it in the chunks already processed (chunks come in order)."""

    k: int
    threshold: float = 0.0
    above: int = 0
    tied: int = 0
    take: int = 0
    seen: int = 0
    numel: int = 0  # entries of the whole tensor (a chunk of this size is the whole tensor)

    @classmethod
    def from_select(cls, select: RadixSelect, numel: int = 0) -> TopCut:
        threshold, above, tied = select.result()
        return cls(select.k, threshold, above, tied, select.k - above, numel=numel)

    def chunk_mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Boolean: which entries of this chunk (the next one in order) are among the top k."""
        if self.k == 0:
            return torch.zeros_like(magnitude, dtype=torch.bool)
        if self.take >= self.tied:  # every tie is in: no counting (the usual case)
            return magnitude >= self.threshold
        if self.seen >= self.take:  # the ties to keep were all in earlier chunks
            return magnitude > self.threshold
        top = magnitude > self.threshold
        equal = (magnitude == self.threshold).reshape(-1)
        n_equal = self.tied if equal.numel() == self.numel else int(torch.count_nonzero(equal))
        if self.seen + n_equal <= self.take:  # every tie of this chunk is in
            top.view(-1).logical_or_(equal)
        elif n_equal:  # the chunk where the kept ties end: find the first take − seen of its ties
            positions = equal.nonzero().reshape(-1)[: self.take - self.seen]
            top.view(-1)[positions] = True
        self.seen += n_equal
        return top

    def kept_sum(self, above_sum: float) -> float:
        """Σ of the top k, given the Σ of entries strictly above the threshold."""
        return above_sum + self.take * self.threshold if self.k else 0.0


@dataclass
class _Band:
    """Per expert: keep the entries in top ``upper`` and not in top ``lower`` (None: no cut)."""

    upper: TopCut | None
    lower: TopCut | None
    scale: float = 1.0

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor | None:
        if self.upper is None:
            return None
        if self.upper.k == 0:
            return torch.zeros_like(magnitude, dtype=torch.bool)
        keep = self.upper.chunk_mask(magnitude)
        if self.lower is not None:
            keep &= ~self.lower.chunk_mask(magnitude)
        return keep


def band_positions(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(upper, lower): keep positions (lower, upper] counted from the largest |τ| (mergekit's arithmetic)."""
    keep = int(density * numel)
    bottom = max(0, numel - keep - int(gamma * numel))
    return numel - bottom, numel - bottom - keep


def _magnitudes(inputs: ChunkInputs, selected: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
    for i in selected:
        yield i, inputs.experts[i].delta(inputs.base).abs_()


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> list[_Band]:
    first = next(chunks())
    numel = math.prod(first.shape)
    bands: list[_Band] = []
    selects: dict[int, list[RadixSelect]] = {}
    for i, expert in enumerate(first.experts):
        if expert.params.density >= 1 or numel == 0:
            bands.append(_Band(None, None))
            continue
        upper, lower = band_positions(numel, expert.params.density, expert.params.gamma)
        if upper == lower:  # int(density·n) = 0: nothing kept
            bands.append(_Band(TopCut(0), None))
            continue
        bands.append(_Band(TopCut(upper), TopCut(lower) if lower > 0 else None))
        selects[i] = [RadixSelect(k, first.device) for k in (upper, lower) if k > 0]
    rescale = first.params.rescale
    one_chunk = first.base is not None and first.start == 0 and first.base.numel() == numel
    if not selects:
        return bands
    if one_chunk:  # the tensor is this chunk: both histograms from magnitudes already in memory, one read
        for i, magnitude in _magnitudes(first, list(selects)):
            _add_high(selects[i], magnitude)
            _add_low(selects[i], magnitude)
        del first, magnitude
    else:
        del first
        for inputs in chunks():
            for i, magnitude in _magnitudes(inputs, list(selects)):
                selects[i][0].add_high(magnitude)
        for group in selects.values():
            _choose_buckets(group)
        for inputs in chunks():
            for i, magnitude in _magnitudes(inputs, list(selects)):
                _add_low(selects[i], magnitude)
    for i, group in selects.items():
        if len(group) == 2 and group[1].bucket == group[0].bucket:
            group[1].low = group[0].low
        cuts = [TopCut.from_select(s, numel) for s in group]
        bands[i] = _Band(cuts[0], cuts[1] if len(cuts) > 1 else None)
    if rescale:
        _l1_scales(chunks, bands, list(selects))
    return bands


def _add_high(group: list[RadixSelect], magnitude: torch.Tensor) -> None:
    """The high histogram of a whole tensor's magnitudes, then each cut's bucket."""
    group[0].add_high(magnitude)
    _choose_buckets(group)


def _choose_buckets(group: list[RadixSelect]) -> None:
    for s in group[1:]:
        s.high = group[0].high  # same data, same histogram
    for s in group:
        s.choose_bucket()


def _add_low(group: list[RadixSelect], magnitude: torch.Tensor) -> None:
    """Each cut's low histogram; two cuts in different buckets share one counting pass."""
    selects = group_unique_buckets(group)
    if len(selects) == 1:
        selects[0].add_low(magnitude)
        return
    upper, lower = selects  # the upper cut (more entries kept) has the smaller value: bucket below the lower cut's
    bits = magnitude.view(torch.int32).reshape(-1)
    # each cut's key (``RadixSelect.low_keys``) is 0 below its bucket, 1..2¹⁶ inside, 2¹⁶ + 1 above. Their
    # sum is unique: 1..2¹⁶ in the upper cut's bucket, 2¹⁶ + 1 + (1..2¹⁶) in the lower cut's
    keys = upper.low_keys(bits)
    keys += lower.low_keys(bits)
    counts = torch.bincount(keys, minlength=2 * LOW_BINS + 3)
    upper.low += counts[1 : LOW_BINS + 1]
    lower.low += counts[LOW_BINS + 2 : 2 * LOW_BINS + 2]


def group_unique_buckets(group: list[RadixSelect]) -> list[RadixSelect]:
    """The selects of one expert that need their own low histogram (two cuts in one bucket share it)."""
    if len(group) == 2 and group[1].bucket == group[0].bucket:
        return group[:1]
    return group


def _l1_scales(chunks: Callable[[], Iterator[ChunkInputs]], bands: list[_Band], trimmed: list[int]) -> None:
    """scale = ‖τ‖₁ / ‖kept τ‖₁ per trimmed expert (mergekit's ``rescale_norm=l1``), sums in fp64."""
    total = dict.fromkeys(trimmed, 0.0)
    above = {i: [0.0, 0.0] for i in trimmed}
    for inputs in chunks():
        for i, magnitude in _magnitudes(inputs, trimmed):
            total[i] += float(magnitude.sum(dtype=torch.float64))
            for j, cut in enumerate((bands[i].upper, bands[i].lower)):
                if cut is not None and cut.k:
                    above[i][j] += float(magnitude[magnitude > cut.threshold].sum(dtype=torch.float64))
    for i in trimmed:
        band = bands[i]
        kept = band.upper.kept_sum(above[i][0]) - (band.lower.kept_sum(above[i][1]) if band.lower else 0.0)
        band.scale = 1.0 if total[i] < L1_EPS or kept < L1_EPS else total[i] / kept


def _sparsify(inputs: ChunkInputs, i: int, delta: torch.Tensor) -> torch.Tensor:
    band: _Band = inputs.state[i]
    keep = band.mask(delta.abs())
    if keep is None:
        return delta
    delta.mul_(keep)
    if band.scale != 1.0:
        delta *= band.scale
    return delta


def merge_linear(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs, _sparsify, consensus=False)


def merge_ties(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs, _sparsify, consensus=True)


LINEAR = MergeMethod("breadcrumbs", merge_linear, BreadcrumbsParams, BreadcrumbsModelParams,
                     base_model="required", prepare=prepare)
TIES = MergeMethod("breadcrumbs_ties", merge_ties, BreadcrumbsParams, BreadcrumbsModelParams,
                   base_model="required", prepare=prepare)
