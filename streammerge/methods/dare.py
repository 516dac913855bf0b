"""DARE (mergekit ``dare_linear`` / ``dare_ties``): drop each task-vector entry with probability
1 − density, rescale what is kept, then merge as task arithmetic (``dare_linear``) or with TIES' sign
consensus (``dare_ties``); ``normalize`` default false, ``rescale`` default true.

Rescaling (``rescale_mode``): ``l1`` (default, mergekit ≥ 0.1.5) scales the kept entries of each
expert's tensor so that its L1 norm equals the unmasked one (skipped when either norm is below 1e-7);
``density`` divides them by the density, as the DARE paper and mergekit 0.0.x do. Both agree in
expectation; ``l1`` needs one whole-tensor pass (``prepare``) for the norms.

Determinism: mergekit draws masks from torch's global RNG, so its output depends on execution order.
Here the mask of expert i over flat elements [b·B, (b+1)·B) of a tensor (B = ``RNG_BLOCK``) comes from
a CPU generator seeded with hash(seed, tensor name, i, b): the same config and seed give the same
bytes whatever the device, the chunking (a multiple of B) or the order tensors are processed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from .base import ChunkInputs, MergeMethod, check_density
from .group_sums import GroupSums
from .task_vectors import merge_task_vectors

RNG_BLOCK = 1 << 20  # elements; engine chunks are multiples of this
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor tolerance


@dataclass(frozen=True)
class DareParams:
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = True
    rescale_mode: Literal["l1", "density"] = "l1"
    int8_mask: bool = False  # accepted for mergekit compatibility; masks are exact here anyway

    def __post_init__(self):
        if self.rescale_mode not in ("l1", "density"):
            raise ValueError(f"rescale_mode must be 'l1' or 'density', got {self.rescale_mode!r}")


@dataclass(frozen=True)
class DareModelParams:
    weight: float
    density: float = 1.0

    def __post_init__(self):
        check_density(self.density)


def block_seed(seed: int, tensor: str, expert: int, block: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{expert}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def uniforms(seed: int, tensor: str, expert: int, start: int, numel: int) -> torch.Tensor:
    """U[0, 1) fp32 draws for flat elements [start, start + numel) of expert ``expert``'s tensor (CPU);
    ``start`` % RNG_BLOCK == 0. The draw of an element depends only on (seed, tensor, expert, element)."""
    if start % RNG_BLOCK:
        raise ValueError(f"chunk start {start} is not a multiple of RNG_BLOCK")
    parts = []
    gen = torch.Generator()
    for offset in range(0, numel, RNG_BLOCK):
        gen.manual_seed(block_seed(seed, tensor, expert, (start + offset) // RNG_BLOCK))
        parts.append(torch.rand(min(RNG_BLOCK, numel - offset), generator=gen))
    return torch.cat(parts) if parts else torch.zeros(0)


def keep_mask(seed: int, tensor: str, expert: int, start: int, numel: int, density: float) -> torch.Tensor:
    """Bernoulli(density) keep-mask for flat elements [start, start + numel); ``start`` % RNG_BLOCK == 0."""
    return uniforms(seed, tensor, expert, start, numel) < density


def _mask(inputs: ChunkInputs, i: int, delta: torch.Tensor) -> torch.Tensor:
    density = inputs.experts[i].params.density
    keep = keep_mask(inputs.seed, inputs.tensor, i, inputs.start, delta.numel(), density)
    return keep.to(delta.device).reshape(delta.shape)


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> list[float]:
    """Per expert, the L1 rescale factor ‖τᵢ‖₁ / ‖mᵢ⊙τᵢ‖₁ over the whole tensor (1.0: no rescale)."""
    first = next(chunks())
    p = first.params
    needed = [
        i for i, e in enumerate(first.experts)
        if p.rescale and p.rescale_mode == "l1" and 0 < e.params.density < 1
    ]
    factors = [1.0] * len(first.experts)
    p_shape, p_device = first.shape, first.device
    del first
    before = [GroupSums(p_shape, "all", p_device) for _ in needed]  # chunk-independent fp64 sums
    after = [GroupSums(p_shape, "all", p_device) for _ in needed]
    if needed:
        for inputs in chunks():
            for j, i in enumerate(needed):
                delta = inputs.experts[i].delta(inputs.base)
                before[j].add(inputs.start, delta.abs())
                after[j].add(inputs.start, delta.mul_(_mask(inputs, i, delta)).abs_())
    for j, i in enumerate(needed):
        b, a = float(before[j].result()[0]), float(after[j].result()[0])
        factors[i] = 1.0 if b < L1_EPS or a < L1_EPS else b / a
    return factors


def _sparsify(inputs: ChunkInputs, i: int, delta: torch.Tensor) -> torch.Tensor:
    density = inputs.experts[i].params.density
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    delta.mul_(_mask(inputs, i, delta))
    if inputs.params.rescale:
        delta *= inputs.state[i] if inputs.params.rescale_mode == "l1" else 1.0 / density
    return delta


def merge_linear(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs, _sparsify, consensus=False)


def merge_ties(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs, _sparsify, consensus=True)


LINEAR = MergeMethod("dare_linear", merge_linear, DareParams, DareModelParams, base_model="required", prepare=prepare)
TIES = MergeMethod("dare_ties", merge_ties, DareParams, DareModelParams, base_model="required", prepare=prepare)
