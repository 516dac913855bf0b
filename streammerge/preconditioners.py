"""The OTA authors' ``preconditioner_path`` files, opened as the second moments a merge reads.

A ``preconditioner_path`` (per model, under ``parameters:``) is one of

- a name-keyed ``exp_avg_sq`` ``.safetensors`` file (the authors' export) or a streammerge sidecar;
- a torch file (``.pt``/``.bin``/``.pth``): ``{name: tensor}`` or an optimizer state dict, keyed by name
  or by integer id (then named from the expert's own folder, as ``streammerge sidecar convert``
  does), or a Hugging Face Trainer checkpoint folder.

Keys are looked up as the authors' loader does: ``name``, then ``name.exp_avg_sq``, then ``name`` with
``weight`` replaced by ``weight.exp_avg_sq``. Every key is checked while planning (present, same
shape as the model's tensor), so a bad file is refused before anything is written.

**Approximations at merge time** (the authors' ``rank1_approx: true`` and ``rank: K``), per tensor
and only for 2-D tensors, computed from the file when the merge reaches the tensor, never for the
whole model at once:

- rank 1: v̂ = r·(c/Σv) with row sums r and column sums c in fp32 (as theirs) over fixed row blocks, Σv
  in fp64 (zeros where Σv = 0). Handed to the method as factors (``rank1_chunk``), so the merge forms
  v̂ (and vᵢ^p) per chunk from two vectors.
- rank K (not embeddings or lm_head, as the authors' ``is_embed`` exclusion): the truncated SVD of v
  (seeded randomized subspace iteration in fp64, ``io.second_moment_factors``), v̂ = max(a·b, 0). The
  product a·b is formed in fixed row blocks aligned to the tensor's start and chunks are sliced from
  them, so values do not depend on how the engine chunks the tensor. K ≥ min(m, n) keeps v (their
  full-rank reconstruction is v up to rounding).

The FFG mask is computed from v̂ by the method, as theirs is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .io.second_moment_factors import _row_blocks, _truncated_svd
from .io.second_moment_sources import TORCH_SUFFIXES, Source, _lookup, open_source
from .sidecar import SecondMoments, load
from .threads import one_thread

RANK1_BLOCK_ELEMENTS = 1 << 22  # rows of the rank-1 sums are read this many elements at a time (few ops)
# the value check and the row sums run over tiles of whole rows of at most this many elements, each a
# cache-resident pass (the factor pass runs on one thread, see ``_rank1_factors``)
RANK1_TILE_ELEMENTS = (1 << 15) - 1
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                      "embed_out.weight", "embed_in.weight")


def is_embedding(name: str) -> bool:
    """mergekit's ``is_embed`` for the architectures it knows: input embeddings and the output head."""
    return name.endswith(EMBEDDING_SUFFIXES)


def key_candidates(name: str) -> list[str]:
    """The authors' lookup order for tensor ``name`` in a preconditioner file."""
    return [name, f"{name}.exp_avg_sq", name.replace("weight", "weight.exp_avg_sq")]


class SourceSecondMoments(SecondMoments):
    """A torch file or Trainer folder (``io.second_moment_sources.Source``) read tensor by tensor; the
    last tensor read is kept so that chunks of it do not load it again."""

    def __init__(self, source: Source):
        self.source = source
        # the file the merge depends on (a Trainer folder's optimizer.pt), for the resume fingerprint
        self.path = source.torch_file.path if source.torch_file is not None else source.path
        self.metadata = dict(source.metadata)
        self._last: tuple[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return self.source.names

    def __contains__(self, name: str) -> bool:
        return name in self.source.entries

    def _tensor(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None
            entry = self.source.entries[name]
            if self.source.checkpoint is not None:
                t = self.source.checkpoint.read(name)
            else:
                t = _lookup(self.source.torch_file.before_read(entry.nbytes), entry.keys)
            self._last = (name, t.to(torch.float32).clone())
        return self._last[1]

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self.source.entries[name]
        if self.source.checkpoint is not None:
            return self.source.checkpoint.meta(name).shape
        return tuple(_lookup(self.source.torch_file.load(), entry.keys).shape)

    def stored_bytes(self, name: str) -> int:
        return self.source.entries[name].nbytes

    def step(self, name: str) -> int | None:
        step = self.source.entries[name].step
        return step if step is not None else self.metadata.get("step")

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name).clone()

    def get_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        self._check_range(name, start, count)
        return self._tensor(name).reshape(-1)[start : start + count].clone()

    def close(self) -> None:
        self._last = None
        self.source.close()


def open_preconditioner(path: Path, model_dir: Path) -> SecondMoments:
    """Open one ``preconditioner_path`` (see the module docstring); ``model_dir`` names id-keyed states."""
    if path.is_dir() or path.suffix in TORCH_SUFFIXES:
        return SourceSecondMoments(open_source(path, model_dir if model_dir.is_dir() else None))
    return load(path)


class BlockBuffer:
    """The fp32 memory the rank-1 factor pass reads its row blocks into, shared by every expert's
    ``Preconditioner`` (the merge computes one expert's factors at a time): one block for the whole merge,
    whatever the number of experts, and resident, so a block is not faulted in page by page again for
    every tensor (a fresh 16 MB buffer per block cost more than copying the file's bytes into it)."""

    def __init__(self):
        self._t: torch.Tensor | None = None

    def get(self, count: int) -> torch.Tensor:
        """A 1-D fp32 view of ``count`` elements; its contents are overwritten by the next ``get``."""
        if self._t is None or self._t.numel() < count:
            self._t = None
            self._t = torch.empty(max(count, RANK1_BLOCK_ELEMENTS), dtype=torch.float32)
        return self._t[:count]


class Preconditioner(SecondMoments):
    """One expert's preconditioner file as the merge reads it: model tensor names mapped to the file's
    keys, and each tensor approximated as its ``rank1_approx``/``rank`` asks (see the module docstring).

    ``keys``: model tensor name -> key in ``inner``. ``approx(name)``: (rank1_approx, rank) for the tensor.
    ``buffer``: where row blocks are read (give every expert's the same one); by default its own.
    """

    def __init__(self, inner: SecondMoments, keys: dict[str, str],
                 approx: Callable[[str], tuple[bool, int | None]], buffer: BlockBuffer | None = None):
        self.inner, self.path, self.metadata = inner, inner.path, inner.metadata
        self._keys, self._approx = keys, approx
        self._buffer = buffer if buffer is not None else BlockBuffer()
        self._factors: tuple[str, Any] | None = None  # (name, (r, cols) or (a, b))
        self._block: tuple[str, int, torch.Tensor] | None = None  # rank K: the last reconstructed row block

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.inner.shape(self._keys[name]))

    def representation(self, name: str) -> str:
        return self._kind(name)

    def stored_bytes(self, name: str) -> int:
        return self.inner.stored_bytes(self._keys[name])

    def step(self, name: str) -> int | None:
        return self.inner.step(self._keys[name])

    @property
    def beta2(self) -> float | None:
        return self.inner.beta2

    def _kind(self, name: str) -> str:
        shape = self.shape(name)
        if len(shape) != 2:
            return "exact"  # the authors approximate 2-D tensors only
        rank1, rank = self._approx(name)
        if rank1:
            return "rank1"
        if rank and not is_embedding(name) and rank < min(shape):
            return "rank-k"
        return "exact"

    def _rows(self, name: str, block_elements: int):
        """The tensor's fp32 (m, n) rows, one fixed row block at a time: (lo, hi, block), each block in the
        shared buffer (valid until the next one is read)."""
        m, n = self.shape(name)
        key = self._keys[name]
        rows = max(1, block_elements // max(n, 1))
        for lo, hi in ((i, min(i + rows, m)) for i in range(0, m, rows)):
            block = self._buffer.get((hi - lo) * n)
            self.inner.get_flat_into(key, lo * n, block)
            yield lo, hi, block.view(hi - lo, n)

    def _computed(self, name: str):
        if self._factors is not None and self._factors[0] == name:
            return self._factors[1]
        self._factors = self._block = None
        m, n = self.shape(name)
        if self._kind(name) == "rank1":
            with one_thread():
                factors = self._rank1_factors(name, m, n)
        else:
            v = self.inner.get(self._keys[name]).to(torch.float32).reshape(m, n)
            self._check_values(name, v)
            factors = _truncated_svd(v, self._approx(name)[1])
            del v
        self._factors = (name, factors)
        return factors

    def _rank1_factors(self, name: str, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, c/Σv): fp32 row and column sums as the authors' (torch's cascade sums: error ~ log(n)·ulp)
        over fixed row blocks, the total in fp64. Run on one thread: the column sums of a block are split
        across threads by columns (the same bits with any thread count), and on a loaded machine the
        hand-offs cost several times the sum itself."""
        r = torch.empty(m, dtype=torch.float32)
        c = torch.zeros(n, dtype=torch.float32)
        step = max(1, RANK1_TILE_ELEMENTS // max(n, 1))  # rows per tile
        for lo, hi, block in self._rows(name, RANK1_BLOCK_ELEMENTS):
            # the check and the row sums tile by tile (whole rows: the same bits as over the block)
            lows, highs = [], []
            for a in range(0, hi - lo, step):
                tile = block[a : a + step]
                low, high = torch.aminmax(tile)
                lows.append(low)
                highs.append(high)
                torch.sum(tile, dim=1, out=r[lo + a : lo + a + tile.shape[0]])
            if lows:  # torch's min/max carry a NaN through (Python's min/max would drop it by position)
                self._check_extremes(name, torch.stack(lows).min(), torch.stack(highs).max())
            c += block.sum(dim=0)
            del block, lows, highs
        total = float(r.sum(dtype=torch.float64))
        cols = (c.to(torch.float64) / total).to(torch.float32) if total != 0 else torch.zeros(n)
        return r, cols

    def _check_values(self, name: str, v: torch.Tensor) -> None:
        if v.numel():
            self._check_extremes(name, *torch.aminmax(v))

    def _check_extremes(self, name: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Refuse the tensor unless its smallest value ``lo`` is >= 0 and its largest ``hi`` finite (a NaN
        anywhere makes both NaN)."""
        if not (lo >= 0 and torch.isfinite(hi)):
            raise CheckpointError(
                f"{self.path}: second moment {self._keys[name]!r} has negative, NaN or infinite values "
                f"(min {float(lo):g}, max {float(hi):g}); the preconditioner file is corrupt"
            )

    def rank1_chunk(self, name: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        if self._kind(name) != "rank1":
            return self.inner.rank1_chunk(self._keys[name], start, count)
        self._check_range(name, start, count)
        r, cols = self._computed(name)
        n = cols.numel()
        row_lo, row_hi = start // n, (start + count - 1) // n + 1 if count else start // n
        return r[row_lo:row_hi], cols, start - row_lo * n

    def _rank_k_block(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of max(a·b, 0), fp32: one fixed block, formed once and kept."""
        if self._block is None or self._block[:2] != (name, lo):
            a, b = self._computed(name)
            self._block = None
            self._block = (name, lo, (a[lo:hi] @ b).clamp_(min=0).reshape(-1))
        return self._block[2]

    def get_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        self._check_range(name, start, count)
        kind = self._kind(name)
        if kind == "exact":
            return self.inner.get_flat(self._keys[name], start, count)
        m, n = self.shape(name)
        if kind == "rank1":
            r, cols = self._computed(name)
            if count == 0:
                return torch.empty(0, dtype=torch.float32)
            row_lo, row_hi = start // n, (start + count - 1) // n + 1
            return torch.outer(r[row_lo:row_hi], cols).reshape(-1)[start - row_lo * n : start - row_lo * n + count]
        out = torch.empty(count, dtype=torch.float32)
        for lo, hi in _row_blocks(m, n):
            a, b = max(start, lo * n), min(start + count, hi * n)
            if a < b:
                out[a - start : b - start] = self._rank_k_block(name, lo, hi)[a - lo * n : b - lo * n]
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.get_flat(name, 0, math.prod(self.shape(name))).reshape(self.shape(name))

    def close(self) -> None:
        self._factors = self._block = None
        self.inner.close()
