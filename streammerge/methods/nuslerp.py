"""NuSLERP (mergekit ``nuslerp``): SLERP between two models (or their task vectors) with weights.

    t = w₁ / (w₀ + w₁)   (0.5 where |w₀ + w₁| < 1e-6)
    vᵢ = θᵢ − θ₀ with a base_model, else θᵢ;  ûᵢ = vᵢ / max(‖vᵢ‖, 1e-7)
    cos Ω = ⟨û₀, û₁⟩ clamped to [−1, 1]
    v = (sin((1−t)Ω)·v₀ + sin(tΩ)·v₁) / sin Ω,   or (1−t)·v₀ + t·v₁ where 1 − cos²Ω ≤ 1e-16
    θ = θ₀ + v (with a base), else v

The vectors are (mergekit's options): the whole tensor (``nuslerp_flatten: true``, the default); else
rows of the last dimension (``nuslerp_row_wise: false``) or vectors along dimension 0
(``nuslerp_row_wise: true``), one Ω per vector. ``prepare`` gathers ‖v₀‖², ‖v₁‖², ⟨v₀, v₁⟩ per vector
in one pass (``GroupSums``: fp32 units, fp64 across); Ω and the coefficients use mergekit's fp32
expressions; the merge is elementwise. Unlike ``slerp`` the weights may give any t (mergekit
extrapolates for t outside [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod
from .group_sums import Grouping, GroupSums, expand, group_index

EPS = 1e-8  # mergekit's nuslerp(): colinear where 1 − cos² ≤ EPS²
NORM_EPS = 1e-7  # mergekit's _normalize(): norms clamped to at least this


@dataclass(frozen=True)
class NuslerpParams:
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True


@dataclass(frozen=True)
class NuslerpModelParams:
    weight: float


def grouping(p: NuslerpParams, shape: tuple[int, ...]) -> Grouping:
    if p.nuslerp_flatten or len(shape) <= 1:
        return "all"
    return "cols" if p.nuslerp_row_wise else "rows"


def interpolation_t(inputs: ChunkInputs) -> float:
    w0, w1 = (e.params.weight for e in inputs.experts)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _vectors(inputs: ChunkInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.base is None:
        return inputs.experts[0].load(), inputs.experts[1].load()
    return inputs.experts[0].delta(inputs.base), inputs.experts[1].delta(inputs.base)


@dataclass(frozen=True)
class _Coefficients:
    c0: torch.Tensor  # (groups,) fp32: sin((1−t)Ω), or 1 − t where colinear
    c1: torch.Tensor  # (groups,) fp32: sin(tΩ), or t where colinear
    divisor: torch.Tensor  # (groups,) fp32: sin Ω, or 1 where colinear
    colinear: torch.Tensor  # (groups,) bool


def coefficients(t: float, sq0: torch.Tensor, sq1: torch.Tensor, dot: torch.Tensor) -> _Coefficients:
    """Per-vector coefficients from fp64 sums, with mergekit's fp32 expressions."""
    n0 = sq0.sqrt().float().clamp(min=NORM_EPS)
    n1 = sq1.sqrt().float().clamp(min=NORM_EPS)
    cos = (dot / (n0.double() * n1.double())).float().clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    ones = torch.ones_like(theta)
    return _Coefficients(
        torch.where(colinear, (1 - t) * ones, torch.sin((1 - t) * theta)),
        torch.where(colinear, t * ones, torch.sin(t * theta)),
        torch.where(colinear, ones, sin_theta),
        colinear,
    )


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> _Coefficients:
    sums: list[GroupSums] | None = None
    for inputs in chunks():
        if sums is None:
            sums = [GroupSums(inputs.shape, grouping(inputs.params, inputs.shape), inputs.device) for _ in range(3)]
        v0, v1 = _vectors(inputs)
        sums[0].add(inputs.start, v0 * v0)
        sums[1].add(inputs.start, v1 * v1)
        sums[2].add(inputs.start, v0 * v1)
        del v0, v1
    return coefficients(interpolation_t(inputs), *(s.result() for s in sums))


def merge(inputs: ChunkInputs) -> torch.Tensor:
    co: _Coefficients = inputs.state
    v0, v1 = _vectors(inputs)
    index = group_index(inputs.shape, grouping(inputs.params, inputs.shape), inputs.start, v0.numel(), inputs.device)
    out = v0.mul_(expand(co.c0.to(inputs.device), index))
    out += v1.mul_(expand(co.c1.to(inputs.device), index))
    if not bool(co.colinear.all()):  # x / 1 is x: skip the pass when every vector is colinear
        out /= expand(co.divisor.to(inputs.device), index)
    if inputs.base is not None:
        out += inputs.base
    return out


METHOD = MergeMethod("nuslerp", merge, NuslerpParams, NuslerpModelParams, base_model="optional", prepare=prepare,
                     expert_count=(2, 2))
