"""Linear merge: θ = Σ wᵢθᵢ / Σ wᵢ (mergekit ``linear``; ``normalize`` default true)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import ChunkInputs, MergeMethod


@dataclass(frozen=True)
class LinearParams:
    normalize: bool = True


@dataclass(frozen=True)
class LinearModelParams:
    weight: float


def merge(inputs: ChunkInputs) -> torch.Tensor:
    out = None
    for expert in inputs.experts:
        x = expert.load()
        x *= expert.params.weight
        out = x if out is None else out.add_(x)
    if inputs.params.normalize:
        total = sum(e.params.weight for e in inputs.experts)
        if total == 0:
            raise ConfigError(
                f"linear: the weights for tensor {inputs.tensor!r} sum to 0; set normalize: false or change them"
            )
        out /= total
    return out


METHOD = MergeMethod("linear", merge, LinearParams, LinearModelParams, base_model="unused")
