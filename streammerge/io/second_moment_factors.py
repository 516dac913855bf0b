"""Compact representations of one Adam second-moment tensor v (non-negative, fp32) and their inverse.

A tensor is viewed as a matrix (m, n) = (shape[0], prod(shape[1:])). Three representations:

- ``exact``: v itself.
- ``rank1`` (the OTA authors' "rank-1 lemma", Adafactor-style): row sums r = v·1 (m,), column sums
  c = vᵀ·1 (n,) and the total Σv (fp64), all summed in fp64; v̂ = r·cᵀ / Σv (0 where Σv = 0).
- ``rank-k``: the truncated SVD of v as two factors a (m, k), b (k, n) with a·b = U_k·S_k·V_kᵀ;
  v̂ = max(a·b, 0) (a second moment is never negative; the authors' "SVD + ReLU").

1-D tensors, scalars and matrices with a dimension of 1 are always exact (nothing to gain), and so is
any tensor whose factors would not be smaller than v itself. Everything is computed in row blocks
of at most ``BLOCK_ELEMENTS`` elements, so besides v only block-sized fp64 temporaries are alive.

The rank-k SVD is a seeded randomized subspace iteration in fp64 over row blocks (see
``_truncated_svd``): O(m·n·k) time and O((m + n)·k) memory, where a full SVD would take
O(m·n·min(m, n)) time and several copies of v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..row_blocks import fresh, rows_in_blocks

Representation = Literal["exact", "rank1", "rank-k"]
BLOCK_ELEMENTS = 1 << 22  # rows per block = max(1, BLOCK_ELEMENTS // n)
OVERSAMPLE = 8  # rank-k: extra subspace dimensions
SUBSPACE_ITERATIONS = 4  # rank-k: power steps


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(m, n) of the matrix a tensor of ``shape`` is factored as, or None if it always stays exact."""
    if len(shape) < 2:
        return None
    m, n = shape[0], math.prod(shape[1:])
    return (m, n) if m > 1 and n > 1 else None


def representation_for(shape: tuple[int, ...], rank: int | None) -> tuple[Representation, int]:
    """Representation (and rank k) used for a tensor of ``shape`` when ``rank`` is requested (None: exact)."""
    mn = matrix_view(shape)
    if rank is None or mn is None:
        return "exact", 0
    m, n = mn
    if rank == 1:
        return ("rank1", 1) if m + n < m * n else ("exact", 0)
    if rank >= min(m, n) or rank * (m + n) >= m * n:
        return "exact", 0
    return "rank-k", rank


@dataclass(frozen=True)
class Factored:
    """One tensor in its representation. ``parts`` are fp32 tensors, in storage order."""

    representation: Representation
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor]  # exact: {"v"}; rank1: {"r", "c"}; rank-k: {"a", "b"}
    total: float | None = None  # rank1 only: Σv in fp64


def part_shapes(representation: Representation, shape: tuple[int, ...], rank: int) -> dict[str, tuple[int, ...]]:
    """The parts a representation stores for a tensor of ``shape``, in storage order."""
    if representation == "exact":
        return {"v": shape}
    m, n = shape[0], math.prod(shape[1:])
    if representation == "rank1":
        return {"r": (m,), "c": (n,)}
    return {"a": (m, rank), "b": (rank, n)}


def _row_blocks(m: int, n: int) -> list[tuple[int, int]]:
    rows = max(1, BLOCK_ELEMENTS // max(n, 1))
    return [(i, min(i + rows, m)) for i in range(0, m, rows)]


def factorize(v: torch.Tensor, rank: int | None) -> Factored:
    """Represent ``v`` (any shape, non-negative, any float dtype) with the requested rank (None: exact)."""
    shape = tuple(v.shape)
    representation, k = representation_for(shape, rank)
    if representation == "exact":
        return Factored("exact", shape, {"v": v.to(torch.float32)})
    m, n = matrix_view(shape)
    mat = v.reshape(m, n)
    if representation == "rank1":
        r = torch.empty(m, dtype=torch.float64)
        c = torch.zeros(n, dtype=torch.float64)
        for lo, hi in _row_blocks(m, n):
            block = mat[lo:hi].to(torch.float64)
            r[lo:hi] = block.sum(dim=1)
            c += block.sum(dim=0)
            del block
        total = float(r.sum())
        return Factored("rank1", shape, {"r": r.to(torch.float32), "c": c.to(torch.float32)}, total)
    a, b = _truncated_svd(mat, k)
    return Factored("rank-k", shape, {"a": a, "b": b})


def _matmul_rows(mat: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """mat (m, n, any float) @ right (n, q, fp64) -> (m, q) fp64, in row blocks of mat."""
    m, n = mat.shape
    out = torch.empty(m, right.shape[1], dtype=torch.float64)
    for lo, hi in _row_blocks(m, n):
        out[lo:hi] = mat[lo:hi].to(torch.float64) @ right
    return out


def _t_matmul_rows(mat: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """matᵀ (n, m) @ left (m, q, fp64) -> (n, q) fp64, in row blocks of mat."""
    m, n = mat.shape
    out = torch.zeros(n, left.shape[1], dtype=torch.float64)
    for lo, hi in _row_blocks(m, n):
        out.addmm_(mat[lo:hi].to(torch.float64).T, left[lo:hi])
    return out


def _truncated_svd(mat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 factors a (m, k), b (k, n) with a·b ≈ the best rank-k approximation of ``mat`` (fp64 math).

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) on a q = k + OVERSAMPLE
    dimensional subspace with SUBSPACE_ITERATIONS power steps, then an exact SVD of the small
    projection. Seeded, so conversions are reproducible. Exact when q >= min(m, n); otherwise the
    error in the leading k directions shrinks like (σ_{q+1}/σ_k)^(2·iterations), negligible for
    second moments, whose spectrum is dominated by a few directions. Cost O(m·n·q) per step, memory
    O((m + n)·q) besides ``mat``.
    """
    m, n = mat.shape
    q = min(k + OVERSAMPLE, m, n)
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(_matmul_rows(mat, torch.randn(n, q, generator=g, dtype=torch.float64)))  # (m, q)
    for _ in range(SUBSPACE_ITERATIONS):
        co, _ = torch.linalg.qr(_t_matmul_rows(mat, basis))  # (n, q)
        basis, _ = torch.linalg.qr(_matmul_rows(mat, co))  # (m, q)
    small = _t_matmul_rows(mat, basis).T  # (q, n) = basisᵀ·mat
    u, sv, vh = torch.linalg.svd(small, full_matrices=False)
    a = (basis @ u[:, :k]) * sv[:k]  # (m, k) = U_k·S_k
    return a.to(torch.float32), vh[:k].to(torch.float32).contiguous()


def rank1_columns(f: Factored) -> torch.Tensor:
    """The column factor of a rank-1 v̂ = r·cᵀ / Σv with the scale folded in: c / Σv, formed in fp64 and
    rounded once to fp32 (zeros when Σv = 0), so that v̂ = outer(r, rank1_columns(f))."""
    c = f.parts["c"]
    return (c.to(torch.float64) / f.total).to(torch.float32) if f.total else torch.zeros_like(c)


def reconstruct_rows(f: Factored, row_lo: int, row_hi: int) -> torch.Tensor:
    """Rows [row_lo, row_hi) of v̂ as an fp32 (rows, n) matrix; compact representations only."""
    if f.representation == "rank1":
        return torch.outer(f.parts["r"][row_lo:row_hi], rank1_columns(f))
    if f.representation == "rank-k":
        a, b = f.parts["a"], f.parts["b"]
        return rows_in_blocks(row_lo, row_hi, a.shape[0], b.shape[1],
                              lambda b0, b1: (fresh(a[b0:b1]) @ b).clamp_(min=0))
    raise ValueError(f"reconstruct_rows: {f.representation} is not a factored representation")


def reconstruct(f: Factored) -> torch.Tensor:
    """v̂ in the tensor's full shape, fp32."""
    if f.representation == "exact":
        return f.parts["v"].reshape(f.shape)
    return reconstruct_rows(f, 0, f.shape[0]).reshape(f.shape)


def reconstruct_flat(f: Factored, start: int, count: int) -> torch.Tensor:
    """Flat elements [start, start + count) of v̂ (row-major), fp32, computing only the rows they span."""
    if f.representation == "exact":
        return f.parts["v"].reshape(-1)[start : start + count]
    n = math.prod(f.shape[1:])
    if count == 0:
        return torch.empty(0, dtype=torch.float32)
    row_lo, row_hi = start // n, (start + count - 1) // n + 1
    rows = reconstruct_rows(f, row_lo, row_hi).reshape(-1)
    offset = start - row_lo * n
    return rows[offset : offset + count]
