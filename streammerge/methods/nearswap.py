"""NearSwap (mergekit ``nearswap``): take the other model's value where it is already near the base.

    w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1),    θ = w·θ₁ + (1 − w)·θ₀        (elementwise)

θ₀ is the base, θ₁ the one other model; ``t`` (required) is a distance in weight units: where the
two differ by less than t the result is θ₁, farther away it moves toward θ₀ as t/|θ₀ − θ₁|. The same
fp32 expressions as mergekit, so fp32 results are bit-identical. mergekit accepts any t; a negative t
(which would silently return the base everywhere) is refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams


@dataclass(frozen=True)
class NearswapParams:
    t: float

    def __post_init__(self):
        if not self.t >= 0:
            raise ValueError(f"t must be a distance >= 0, got {self.t}")


def merge(inputs: ChunkInputs) -> torch.Tensor:
    a, b = inputs.base, inputs.experts[0].load()
    weight = (inputs.params.t / (a - b).abs_().clamp_(min=1e-6)).clamp_(min=0, max=1)
    out = weight * b
    out += (1 - weight).mul_(a)
    return out


METHOD = MergeMethod("nearswap", merge, NearswapParams, NoParams, base_model="required", expert_count=(1, 1))
