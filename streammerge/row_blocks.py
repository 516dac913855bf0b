"""Values derived from products, computed in fixed, aligned row blocks so that a range equals the whole.

A matrix product's bits depend on the shapes it is computed at: BLAS picks its kernels, and so its
summation order, by shape (and by CPU). A LoRA view W₀ + s·B·A, an OFT fold W·Rᵀ or a rank-K
second moment a·b computed for rows [r0, r1) on their own can therefore differ in the last bits
from the same rows of the whole product, and a merged model would depend on ``--chunk-size``, on
where a resumed run restarted, or on which process computed a tensor.

Every such value is computed here in blocks of ``rows_per_block(row_elements)`` rows aligned to the
tensor's first row (the last block may be shorter, and is always the same shorter block); a range
read computes the blocks it overlaps, each at its one fixed shape on freshly allocated (aligned)
memory, and slices them. A range is then bit-identical to the same range of the whole tensor, on any
machine. Across machines (another CPU, another BLAS) the blocks themselves may round differently;
README says what holds there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .threads import one_thread

BLOCK_ELEMENTS = 1 << 20  # elements of one block (4 MiB in fp32): the unit of every product


def rows_per_block(row_elements: int) -> int:
    """Rows in one block of a tensor whose rows hold ``row_elements`` elements: a function of the
    tensor's shape only, never of how a read is split."""
    return max(1, BLOCK_ELEMENTS // max(1, row_elements))


def overlapping_blocks(r0: int, r1: int, rows: int, block: int) -> Iterator[tuple[int, int]]:
    """The aligned blocks [b0, b1) of a ``rows``-row tensor that overlap rows [r0, r1)."""
    for b0 in range(r0 - r0 % block, r1, block):
        yield b0, min(b0 + block, rows)


def rows_in_blocks(r0: int, r1: int, rows: int, row_elements: int,
                   compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Rows [r0, r1) of a ``rows``-row tensor whose block [b0, b1) is ``compute(b0, b1)``, a tensor with
    ``b1 - b0`` rows. ``compute`` is only ever called on whole aligned blocks."""
    if not 0 <= r0 <= r1 <= rows:
        raise ValueError(f"rows [{r0}, {r1}) outside a tensor of {rows} rows")
    block = rows_per_block(row_elements)
    out: torch.Tensor | None = None
    for b0, b1 in overlapping_blocks(r0, r1, rows, block):
        with one_thread():  # a product's bits may depend on the thread count (threads.py)
            part = compute(b0, b1)
        lo, hi = max(r0, b0), min(r1, b1)
        if b0 <= r0 and r1 <= b1:  # one block holds the whole range
            return part[lo - b0 : hi - b0] if (lo, hi) != (b0, b1) else part
        if out is None:
            out = torch.empty((r1 - r0, *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[lo - r0 : hi - r0] = part[lo - b0 : hi - b0]
        del part
    if out is None:  # an empty range
        with one_thread():
            return compute(r0, r0)
    return out


def fresh(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` in newly allocated memory: an operand whose address (and so any
    alignment-dependent kernel choice) does not depend on where a view started."""
    return x.clone(memory_format=torch.contiguous_format)
