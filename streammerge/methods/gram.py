"""Pairwise dot products of n per-expert vectors over a tensor, gathered in one pass of chunks.

G[i, j] = ⟨xᵢ, xⱼ⟩ per group (``group_sums``: fp32 products and units, fp64 across units; the same bits
for any chunking or blocking). Memory stays flat in n:

- ``blocks`` given (experts read in small flat ranges, ``ExpertInput.load_stored_range``): the chunk is
  walked in blocks of ``BLOCK`` elements, every expert's vector of a block in memory at once (n · 1 MB),
  so each expert is read once per chunk;
- otherwise, per chunk, expert j is loaded once and each earlier expert i < j is loaded again beside it
  (n(n+1)/2 loads per chunk instead of n, two expert chunks in memory at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .base import ChunkInputs
from .group_sums import Grouping, GroupSums

BLOCK = 1 << 18  # elements per block of the blocked pass: 1 MB of fp32 per expert, a multiple of group_sums.UNIT

# ``blocks(inputs)``: (offset in the chunk, [n fp32 vectors]) for consecutive blocks covering the chunk, or
# None where the chunk cannot be read in blocks (the pass then loads whole chunks, in pairs)
Blocks = Callable[[ChunkInputs], Iterator[tuple[int, list[torch.Tensor]]] | None]


def gram(chunks: Callable[[], Iterator[ChunkInputs]], vector: Callable[[ChunkInputs, int], torch.Tensor],
         grouping: Callable[[ChunkInputs], Grouping], blocks: Blocks | None = None) -> torch.Tensor:
    """(n, n, groups) fp64: Σ over each group of vectorᵢ·vectorⱼ (``vector(inputs, i)``: fp32 chunk;
    ``grouping(inputs)``: how the tensor is cut into vectors; ``blocks``: the same vectors block by block)."""
    sums: dict[tuple[int, int], GroupSums] = {}
    n = 0
    for inputs in chunks():
        n = len(inputs.experts)
        if not sums:
            kind = grouping(inputs)
            sums = {(i, j): GroupSums(inputs.shape, kind, inputs.device) for j in range(n) for i in range(j + 1)}
        walk = blocks(inputs) if blocks is not None else None
        if walk is not None:
            for offset, xs in walk:
                for j in range(n):
                    for i in range(j + 1):
                        sums[i, j].add(inputs.start + offset, xs[i] * xs[j])
                del xs
            continue
        for j in range(n):
            xj = vector(inputs, j)
            for i in range(j + 1):
                xi = xj if i == j else vector(inputs, i)
                sums[i, j].add(inputs.start, xi * xj)
                del xi
            del xj
    first = next(iter(sums.values())).result()
    out = torch.empty((n, n, first.numel()), dtype=torch.float64, device=first.device)
    for (i, j), s in sums.items():
        out[i, j] = out[j, i] = s.result()
    return out
