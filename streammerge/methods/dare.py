"""DARE (mergekit ``dare_linear`` / ``dare_ties``): drop each task-vector entry with probability
1 − density, rescale the kept ones by 1/density (``rescale`` default true), then merge as task
arithmetic (``dare_linear``) or with TIES' sign consensus (``dare_ties``); ``normalize`` default false.

Determinism: mergekit draws masks from torch's global RNG, so its output depends on execution order.
Here the mask of expert i over flat elements [b·B, (b+1)·B) of a tensor (B = ``RNG_BLOCK``) comes from
a CPU generator seeded with hash(seed, tensor name, i, b): the same config and seed give the same
bytes whatever the device, the chunking (a multiple of B) or the order tensors are processed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod
from .task_vectors import merge_task_vectors

RNG_BLOCK = 1 << 20  # elements; engine chunks are multiples of this


@dataclass(frozen=True)
class DareParams:
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = True
    int8_mask: bool = False  # accepted for mergekit compatibility; masks are exact here anyway


@dataclass(frozen=True)
class DareModelParams:
    weight: float
    density: float = 1.0


def block_seed(seed: int, tensor: str, expert: int, block: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{expert}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(seed: int, tensor: str, expert: int, start: int, numel: int, density: float) -> torch.Tensor:
    """Bernoulli(density) keep-mask for flat elements [start, start + numel); ``start`` % RNG_BLOCK == 0."""
    if start % RNG_BLOCK:
        raise ValueError(f"chunk start {start} is not a multiple of RNG_BLOCK")
    parts = []
    gen = torch.Generator()
    for offset in range(0, numel, RNG_BLOCK):
        gen.manual_seed(block_seed(seed, tensor, expert, (start + offset) // RNG_BLOCK))
        parts.append(torch.rand(min(RNG_BLOCK, numel - offset), generator=gen) < density)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _sparsify(inputs: ChunkInputs, i: int, delta: torch.Tensor) -> torch.Tensor:
    density = inputs.experts[i].params.density
    if density >= 1:
        return delta
    keep = keep_mask(inputs.seed, inputs.tensor, i, inputs.start, delta.numel(), density)
    delta.mul_(keep.to(delta.device).reshape(delta.shape))
    if inputs.params.rescale:
        delta /= density
    return delta


def merge_linear(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs, _sparsify, consensus=False)


def merge_ties(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs, _sparsify, consensus=True)


LINEAR = MergeMethod("dare_linear", merge_linear, DareParams, DareModelParams, base_model="required")
TIES = MergeMethod("dare_ties", merge_ties, DareParams, DareModelParams, base_model="required")
