"""Whole-tensor sums (norms, dot products) gathered over chunks, with bits that do not depend on the chunking.

A tensor of ``numel`` elements is viewed as (R, W), row-major, and summed per *group*:

- ``"all"``: one group, the whole tensor (R = 1, W = numel);
- ``"rows"``: one group per row of the last dimension (W = shape[-1]), e.g. model_stock's ``filter_wise``;
- ``"cols"``: one group per index of the dimensions after the first (R = shape[0]), i.e. vectors along
  dim 0, e.g. nuslerp's ``nuslerp_row_wise``.

The sum of a group is fixed by the tensor's shape alone: elements are first summed in *units* aligned
to the tensor start (W ≤ UNIT: whole rows, or for ``"cols"`` blocks of ⌊UNIT/W⌋ whole rows; W > UNIT:
UNIT-element pieces of a row, the last piece of a row shorter), in the term's dtype; then a group
adds its units' sums one after another in fp64. A unit is summed by torch's own row reduction
(``x.view(m, L).sum(1)``, L ≤ UNIT): below torch's parallel grain (32768 elements) one row is never
split across threads, and rows are reduced independently, so a unit's bits do not depend on how many
units a chunk holds nor on the thread count (``tests/test_geometric_methods.py`` checks this
property of torch); column sums over a block of rows use ``tree_sum`` (elementwise adds only).
Chunks that end inside a unit leave it in a carry buffer (< UNIT elements) until the next chunk
completes it. Memory: the accumulator (one fp64 per group) plus the carry.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

UNIT = 1 << 14  # elements per summation unit: below torch's GRAIN_SIZE, a divisor of every CLI chunk size

Grouping = Literal["all", "rows", "cols"]


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` by pairwise halving (an odd last element is added to the last pair)."""
    x = x.movedim(dim, -1)
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    while x.shape[-1] > 1:
        n = x.shape[-1]
        h = n // 2
        y = x[..., :h] + x[..., h : 2 * h]
        if n % 2:
            y[..., h - 1 :] += x[..., n - 1 :]
        x = y
    return x[..., 0]


def group_layout(shape: tuple[int, ...], grouping: Grouping) -> tuple[int, int]:
    """(R, W): the (rows, row length) view of a tensor of ``shape`` for ``grouping``."""
    numel = math.prod(shape)
    if grouping == "all" or len(shape) == 0 or numel == 0:
        return 1, numel
    if grouping == "rows":
        return numel // shape[-1], shape[-1]
    return shape[0], numel // shape[0]


def n_groups(shape: tuple[int, ...], grouping: Grouping) -> int:
    r, w = group_layout(shape, grouping)
    return 1 if grouping == "all" else (r if grouping == "rows" else w)


def group_index(shape: tuple[int, ...], grouping: Grouping, start: int, count: int,
                device: torch.device) -> torch.Tensor | None:
    """The group of each element of the chunk [start, start + count) (int64), or None for ``"all"``."""
    r, w = group_layout(shape, grouping)
    if grouping == "all" or n_groups(shape, grouping) == 1:
        return None
    flat = torch.arange(start, start + count, device=device)
    return flat // w if grouping == "rows" else flat % w


def expand(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Per-group ``values`` as per-element ones for a chunk (``index`` from ``group_index``)."""
    return values.reshape(-1)[0] if index is None else values.reshape(-1)[index]


class GroupSums:
    """Σ of one per-element term over each group of a tensor, fed in order chunk by chunk (fp64)."""

    def __init__(self, shape: tuple[int, ...], grouping: Grouping, device: torch.device):
        self.grouping = grouping
        self.numel = math.prod(shape)
        self.rows, self.width = group_layout(shape, grouping)
        self.acc = torch.zeros(n_groups(shape, grouping), dtype=torch.float64, device=device)
        self.by_rows = grouping != "cols"
        # "cols" with short rows sums blocks of k whole rows; everything else units inside one row
        self.k = max(1, UNIT // self.width) if self.width else 1
        self.carry: torch.Tensor | None = None
        self.pos = 0  # flat position of the next element expected (the carry starts at pos - len(carry))

    def add(self, start: int, values: torch.Tensor) -> None:
        """Add the chunk [start, start + len(values)) of the term (fp32 or fp64, the same for every chunk)."""
        if start != self.pos:
            raise RuntimeError(f"GroupSums fed out of order: chunk at {start}, expected {self.pos}")
        data = values.reshape(-1)
        self.pos = start + data.numel()
        if self.carry is not None:
            data = torch.cat([self.carry, data])
        p0 = self.pos - data.numel()
        end = self._last_boundary(self.pos)
        self.carry = data[end - p0 :].clone() if end < self.pos else None
        if end > p0:
            self._sum_units(p0, data[: end - p0])

    def result(self) -> torch.Tensor:
        """The per-group sums (fp64, one per group) once the whole tensor was added."""
        if self.pos != self.numel:
            raise RuntimeError(f"GroupSums: {self.pos} of {self.numel} elements added")
        return self.acc

    def _last_boundary(self, q: int) -> int:
        """The last unit boundary at or before flat position q."""
        if q >= self.numel:
            return q
        w = self.width
        if w <= UNIT:
            step = w if self.by_rows else self.k * w
            return (q // step) * step
        if not self.by_rows:  # column sums add each row piece elementwise: no unit to complete
            return q
        r = q // w
        return r * w + ((q - r * w) // UNIT) * UNIT

    def _sum_units(self, p0: int, data: torch.Tensor) -> None:
        """Sum complete units: ``data`` is [p0, p0 + len) and starts and ends at unit boundaries."""
        w, n = self.width, data.numel()
        if w <= UNIT and self.by_rows:
            r0 = p0 // w
            self.acc[r0 : r0 + n // w] = data.view(n // w, w).sum(1)
            return
        if w <= UNIT:  # column sums over blocks of k whole rows, blocks added in order
            block = self.k * w
            full = n // block
            sums = list(tree_sum(data[: full * block].view(full, self.k, w), dim=1)) if full else []
            if n > full * block:  # the last, short block (tensor end)
                sums.append(tree_sum(data[full * block :].view(-1, w), dim=0))
            for s in sums:
                self.acc += s
            return
        p, q = p0, p0 + n
        while p < q:  # one row piece at a time (at most chunk / UNIT + 2 of them)
            r = p // w
            seg_end = min((r + 1) * w, q)
            seg = data[p - p0 : seg_end - p0]
            if not self.by_rows:
                c0 = p - r * w
                self.acc[c0 : c0 + seg.numel()] += seg
            else:
                full = seg.numel() // UNIT
                parts = seg[: full * UNIT].view(full, UNIT).sum(1).tolist() if full else []
                if seg.numel() > full * UNIT:  # the row's last, short unit
                    parts.append(float(seg[full * UNIT :].view(1, -1).sum(1)))
                total = float(self.acc[r])
                for s in parts:
                    total += s
                self.acc[r] = total
            p = seg_end
