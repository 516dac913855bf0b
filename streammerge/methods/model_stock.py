"""Model Stock (mergekit ``model_stock``, Jang et al. 2024): move from the base toward the experts'
average by a ratio set by how aligned their task vectors are.

    τᵢ = θᵢ − θ₀ (n ≥ 2 experts);  cos = mean over pairs i < j of clamp(⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6), −1, 1)
    t = n·cos / (1 + (n − 1)·cos)   (t = 0 where |1 + (n − 1)·cos| < 1e-6: keep the base)
    θ = t · (Σ θᵢ / n) + (1 − t) · θ₀

per tensor, or with ``filter_wise: true`` per row of the last dimension (a 1-D tensor is one row), as
mergekit 0.1.5. ``prepare`` gathers the Gram matrix of the τᵢ in one pass of chunks (``gram``:
chunk-size independent, two experts in memory at a time); t uses mergekit's fp32 expressions; the
merge is elementwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams
from .gram import gram
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


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> torch.Tensor:
    g = gram(chunks, lambda inputs, i: inputs.experts[i].delta(inputs.base),
             lambda inputs: grouping(inputs.params, inputs.shape))
    return ratio(g)


def merge(inputs: ChunkInputs) -> torch.Tensor:
    n = len(inputs.experts)
    index = group_index(inputs.shape, grouping(inputs.params, inputs.shape), inputs.start, inputs.base.numel(),
                        inputs.device)
    t = expand(inputs.state.to(inputs.device), index)
    average = inputs.experts[0].load()
    for expert in inputs.experts[1:]:
        average += expert.load()
    average /= n
    out = average.mul_(t)
    out += (1 - t) * inputs.base
    return out


METHOD = MergeMethod("model_stock", merge, ModelStockParams, NoParams, base_model="required", prepare=prepare,
                     expert_count=(2, None))
