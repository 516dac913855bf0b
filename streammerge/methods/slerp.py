"""SLERP (mergekit ``slerp``): spherical interpolation from the base θ₀ to the one other model θ₁.

    cos Ω = ⟨θ₀, θ₁⟩ / (‖θ₀‖ ‖θ₁‖)            (whole tensor; a norm ≤ 1e-8 counts as 1)
    θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁,   or (1−t)θ₀ + tθ₁ where |cos Ω| > 0.9995

``t`` (required, in [0, 1]; a gradient over layers or filters as usual) is the fraction of the way to
θ₁. mergekit 0.1.5 interpolates each tensor as one flat vector (its leading "batch" axis packs
different tensors, never rows of one). ``prepare`` gathers ‖θ₀‖², ‖θ₁‖² and ⟨θ₀, θ₁⟩ in one pass of
chunks (``GroupSums``: fp32 units added in fp64, the same bits for any chunk size); the coefficients are then computed
with mergekit's own fp32 expressions, and the merge is elementwise. mergekit does not check ``t``;
streammerge refuses a value outside [0, 1] instead of extrapolating.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams
from .group_sums import GroupSums

DOT_THRESHOLD = 0.9995  # mergekit's slerp(): |cos Ω| above this interpolates linearly
EPS = 1e-8  # mergekit's slerp(): norms at or below this count as 1


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class SlerpParams:
    t: float

    def __post_init__(self):
        check_fraction("t", self.t)


def coefficients(t: float, sq0: float, sq1: float, dot: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₀, c₁), fp32 0-d, from ‖θ₀‖², ‖θ₁‖², ⟨θ₀, θ₁⟩ (fp64), with mergekit's fp32 expressions."""
    f32 = torch.float32
    tt = torch.tensor(t, dtype=f32)
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    n0 = n0 if torch.tensor(n0, dtype=f32) > EPS else 1.0
    n1 = n1 if torch.tensor(n1, dtype=f32) > EPS else 1.0
    cos = torch.tensor(dot / (n0 * n1), dtype=f32).clamp(-1, 1)
    linear = cos.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, cos))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    c1 = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return c0, c1


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> tuple[torch.Tensor, torch.Tensor]:
    sums: list[GroupSums] | None = None
    for inputs in chunks():
        if sums is None:
            sums = [GroupSums(inputs.shape, "all", inputs.device) for _ in range(3)]
        a = inputs.base
        b = inputs.experts[0].load()
        sums[0].add(inputs.start, a * a)
        sums[1].add(inputs.start, b * b)
        sums[2].add(inputs.start, a * b)
        del a, b
    sq0, sq1, dot = (float(s.result()[0]) for s in sums)
    return coefficients(inputs.params.t, sq0, sq1, dot)


def merge(inputs: ChunkInputs) -> torch.Tensor:
    c0, c1 = (c.to(inputs.device) for c in inputs.state)
    out = inputs.base * c0
    out += inputs.experts[0].load() * c1
    return out


METHOD = MergeMethod("slerp", merge, SlerpParams, NoParams, base_model="required", prepare=prepare,
                     expert_count=(1, 1))
