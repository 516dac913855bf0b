"""OFT adapters' rotations as PEFT computes them: generators, rotation blocks, and folding into a weight.

PEFT >= 0.16 stores per module ``oft_R`` vectors (n, b(b−1)/2): each row a block's strict upper
triangle, row-major. ``oft_generator`` applies PEFT's COFT projection when the adapter has ``coft``;
``oft_rotation_blocks`` maps generators to rotations by exact Cayley or Cayley–Neumann as the adapter's
config says; ``fold_oft`` merges a rotation into a weight as PEFT's ``merge_and_unload`` does.
"""

from __future__ import annotations

import math

import torch

from .orthogonal import NeumannConvention, cayley, cayley_neumann, skew_from_vector, work_dtype


def coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """PEFT's COFT constraint (``OFTRotationModule._project_batch``): each block's skew matrix is
    scaled down to Frobenius norm eps/sqrt(n_stored_blocks) if it is larger. vec: (n, b(b−1)/2)."""
    radius = eps / math.sqrt(vec.shape[0])
    norms = math.sqrt(2.0) * torch.linalg.vector_norm(vec, dim=-1, keepdim=True)  # ‖U − Uᵀ‖_F = √2‖v‖
    return torch.where(norms <= radius, vec, vec * (radius / norms))


def oft_generator(vec: torch.Tensor, block_size: int, coft_eps: float | None = None) -> torch.Tensor:
    """The generator an OFT adapter really uses: its stored ``oft_R`` vector (n, b(b−1)/2), COFT-projected
    when the adapter has ``coft``; in ``work_dtype(b)``."""
    v = vec.to(work_dtype(block_size))
    return v if coft_eps is None else coft_project(v, block_size, coft_eps)


def oft_rotation_blocks(
    vec: torch.Tensor,
    block_size: int,
    neumann_terms: int | None = None,
    neumann_convention: NeumannConvention = "peft-0.18",
    coft_eps: float | None = None,
) -> torch.Tensor:
    """PEFT's rotation blocks from an ``oft_R`` vector: (n, b(b−1)/2) -> (n, b, b) in ``work_dtype(b)``.

    neumann_terms None: exact Cayley (``use_cayley_neumann: false``); else the Neumann series with that
    many terms in the given convention. coft_eps: the adapter's ``eps`` when ``coft`` is on.
    """
    q = skew_from_vector(oft_generator(vec, block_size, coft_eps), block_size)
    return cayley(q) if neumann_terms is None else cayley_neumann(q, neumann_terms, neumann_convention)


def fold_oft(weight: torch.Tensor, blocks: torch.Tensor, embedding: bool = False) -> torch.Tensor:
    """A weight with an OFT rotation merged in, as PEFT's ``merge`` / ``merge_and_unload``.

    weight: (d_out, d_in) Linear weight, or (num_embeddings, dim) Embedding weight.
    blocks: (n, b, b) with n·b = d_in, or (1, b, b) for ``block_share`` (repeated d_in/b times).
    Linear: W' = W·Rᵀ (the input x is rotated, x·R, before W); Embedding: W' = W·R (the output rows are
    rotated). R = blockdiag(blocks). Computed in the blocks' dtype; returns fp32.
    """
    d_out, d_in = weight.shape
    b = blocks.shape[-1]
    if d_in % b or blocks.shape[0] not in (1, d_in // b):
        raise ValueError(f"OFT blocks {tuple(blocks.shape)} do not tile a weight of shape {tuple(weight.shape)}")
    blocks = blocks.expand(d_in // b, b, b)
    w = weight.to(blocks.dtype).reshape(d_out, d_in // b, b)
    pattern = "onk,nkc->onc" if embedding else "onk,nck->onc"
    return torch.einsum(pattern, w, blocks).reshape(d_out, d_in).to(torch.float32)
