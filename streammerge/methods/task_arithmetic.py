"""Task arithmetic: θ = θ₀ + λ·Σ wᵢ(θᵢ − θ₀) (mergekit ``task_arithmetic``; normalize default false)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod
from .task_vectors import merge_task_vectors


@dataclass(frozen=True)
class TaskArithmeticParams:
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = False  # accepted for mergekit compatibility; no sparsification to rescale
    int8_mask: bool = False  # accepted for mergekit compatibility; masks are exact here anyway


@dataclass(frozen=True)
class TaskArithmeticModelParams:
    weight: float


def merge(inputs: ChunkInputs) -> torch.Tensor:
    return merge_task_vectors(inputs)


METHOD = MergeMethod("task_arithmetic", merge, TaskArithmeticParams, TaskArithmeticModelParams, base_model="required")
