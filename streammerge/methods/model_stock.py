"""Model Stock (mergekit ``model_stock``, Jang et al. 2024): move from the base toward the experts'
average by a ratio set by how aligned their task vectors are.

    τᵢ = θᵢ − θ₀ (n ≥ 2 experts);  cos = mean over pairs i < j of clamp(⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6), −1, 1)
    t = n·cos / (1 + (n − 1)·cos)   (t = 0 where |1 + (n − 1)·cos| < 1e-6: keep the base)
    θ = t · (Σ θᵢ / n) + (1 − t) · θ₀

per tensor, or with ``filter_wise: true`` per row of the last dimension (a 1-D tensor is one row), as
mergekit 0.1.5. ``prepare`` gathers the Gram matrix of the τᵢ in one pass of chunks (``gram``:
chunk-size independent; every expert read once per chunk where the engine gives flat range reads, else
two experts in memory at a time); t uses mergekit's fp32 expressions; the merge is elementwise. For a
tensor that is one chunk, ``prepare`` also keeps Σ θᵢ (the same fp32 adds, in the same order, as the
merge would do), so the merge reads no expert again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams
from .gram import BLOCK, gram
from .group_sums import Grouping, expand, group_index


@dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False


def grouping(p: ModelStockParams, shape: tuple[int, ...]) -> Grouping:
    return "rows" if p.filter_wise and len(shape) > 1 else "all"


def ratio(g: torch.Tensor) -> torch.Tensor:
    """t per group (fp32) from the (n, n, groups) fp64 Gram matrix of the task vectors."""
    n = g.shape[0]
    norms = g.diagonal().T.sqrt().float()  # (n, groups), as mergekit's fp32 norms
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norm_product = norms[i] * norms[j]
            cos.append((g[i, j] / norm_product.clamp(min=1e-6).double()).float().clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)


@dataclass(frozen=True)
class ModelStockState:
    t: torch.Tensor  # (groups,) fp32, ``ratio``
    total: torch.Tensor | None  # Σ θᵢ (fp32, flat) of a tensor that is one chunk; None otherwise


def _blocks(inputs: ChunkInputs, total: torch.Tensor | None) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(offset, [τᵢ over the block]) for blocks of the chunk, adding θᵢ into ``total`` (if given) on the way."""
    base = inputs.base.reshape(-1)
    for lo in range(0, base.numel(), BLOCK):
        b = base[lo : lo + BLOCK]
        xs = []
        for i, expert in enumerate(inputs.experts):
            x = torch.empty_like(b).copy_(expert.load_stored_range(lo, b.numel()))  # θᵢ, widened exactly
            if total is not None:
                part = total[lo : lo + b.numel()]
                part.copy_(x) if i == 0 else part.add_(x)
            xs.append(x.sub_(b))  # τᵢ: the same bits as ``delta``
        yield lo, xs


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> ModelStockState:
    kept: list[torch.Tensor] = []

    def blocks(inputs: ChunkInputs) -> Iterator[tuple[int, list[torch.Tensor]]] | None:
        if inputs.base is None or any(e.load_stored_range is None for e in inputs.experts):
            return None
        whole = inputs.start == 0 and inputs.base.numel() == math.prod(inputs.shape)
        total = torch.empty(inputs.base.numel(), dtype=torch.float32, device=inputs.base.device) if whole else None
        if total is not None:
            kept.append(total)
        return _blocks(inputs, total)

    g = gram(chunks, lambda inputs, i: inputs.experts[i].delta(inputs.base),
             lambda inputs: grouping(inputs.params, inputs.shape), blocks)
    return ModelStockState(ratio(g), kept[0] if kept else None)


def merge(inputs: ChunkInputs) -> torch.Tensor:
    n = len(inputs.experts)
    index = group_index(inputs.shape, grouping(inputs.params, inputs.shape), inputs.start, inputs.base.numel(),
                        inputs.device)
    state: ModelStockState = inputs.state
    t = expand(state.t.to(inputs.device), index)
    if state.total is not None and inputs.start == 0 and state.total.numel() == inputs.base.numel():
        average = (state.total / n).view_as(inputs.base)  # Σ θᵢ from ``prepare``: no expert read again
    else:
        average = inputs.experts[0].load()
        for expert in inputs.experts[1:]:
            average += expert.load()
        average /= n
    out = average.mul_(t)
    out += (1 - t) * inputs.base
    return out


METHOD = MergeMethod("model_stock", merge, ModelStockParams, NoParams, base_model="required", prepare=prepare,
                     expert_count=(2, None))
