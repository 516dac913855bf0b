"""Multi-SLERP (mergekit ``multislerp``): barycentric interpolation of n models on the hypersphere.

mergekit's steps, per tensor (vᵢ = θᵢ − θ₀ with a base_model, else θᵢ; wᵢ normalized to sum 1 when
``normalize_weights``, the default):

    uᵢ = vᵢ / (‖vᵢ‖ + eps);   m = Σ wᵢuᵢ;   m̂ = m / ‖m‖
    project to the tangent space at m̂, average there, map back with the exponential map:
    τ = Σ wᵢ (uᵢ − ⟨uᵢ, m̂⟩ m̂);   r = m̂ cos‖τ‖ + τ sin‖τ‖/‖τ‖
    θ = θ₀ + (Σ wᵢ‖vᵢ‖) · r

The tangent average vanishes identically: Σ wᵢ⟨uᵢ, m̂⟩ = ⟨m, m̂⟩ = ‖m‖, so τ = m − ‖m‖m̂ = 0, and
mergekit's ``‖τ‖ + eps`` makes cos = 1 and sin(x)/x = 1 in fp32: r = m̂ up to fp32 rounding noise
of mergekit's τ (≈ 1e-7 relative). So here

    θ = θ₀ + (Σ wᵢ‖vᵢ‖ / ‖m‖) · Σ (wᵢ / (‖vᵢ‖ + eps)) vᵢ

with three passes over chunks: ‖vᵢ‖ (per expert, one loaded at a time), ‖m‖ (m accumulated expert by
expert), then the merge. Sums by ``GroupSums`` (fp32 units, fp64 across units). A single model is returned as it is. If
‖m‖ < eps (antipodal models that cancel) two models fall back to w₀v₀ + w₁v₁ as in mergekit, more
are refused (mergekit raises too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import ChunkInputs, MergeMethod
from .group_sums import GroupSums


@dataclass(frozen=True)
class MultislerpParams:
    normalize_weights: bool = True
    eps: float = 1e-8


@dataclass(frozen=True)
class MultislerpModelParams:
    weight: float


def weights(inputs: ChunkInputs) -> torch.Tensor:
    """fp32 weights, normalized as mergekit does (``weights / weights.sum()`` in fp32)."""
    w = torch.tensor([e.params.weight for e in inputs.experts], dtype=torch.float32)
    if inputs.params.normalize_weights:
        if float(w.sum()) == 0:
            raise ConfigError(
                f"multislerp: the weights for tensor {inputs.tensor!r} sum to 0 and normalize_weights is true; "
                f"change the weights or set normalize_weights: false"
            )
        w = w / w.sum()
    return w


def _vector(inputs: ChunkInputs, i: int) -> torch.Tensor:
    expert = inputs.experts[i]
    return expert.load() if inputs.base is None else expert.delta(inputs.base)


@dataclass(frozen=True)
class _State:
    coef: list[float]  # per expert: the factor of vᵢ in θ − θ₀
    linear: bool  # the two-model fallback: coef are the weights themselves


def _combine(inputs: ChunkInputs, coef: list[float]) -> torch.Tensor:
    """Σ coefᵢ·vᵢ, fp32, experts in order (one loaded at a time)."""
    out = None
    for i, c in enumerate(coef):
        v = _vector(inputs, i).mul_(c)
        out = v if out is None else out.add_(v)
    return out


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> _State | None:
    first = next(chunks())
    n, eps, device, shape = len(first.experts), first.params.eps, first.device, first.shape
    if n == 1:
        return None
    w = weights(first)
    del first
    sq = [GroupSums(shape, "all", device) for _ in range(n)]
    for inputs in chunks():
        for i in range(n):
            v = _vector(inputs, i)
            sq[i].add(inputs.start, v * v)
            del v
    norms = torch.tensor([float(s.result()[0]) for s in sq]).sqrt().float()  # ‖vᵢ‖, as mergekit's fp32 norm
    coef = (w / (norms + eps)).tolist()  # uᵢ = vᵢ/(‖vᵢ‖ + eps), weighted
    mean_sq = GroupSums(shape, "all", device)
    for inputs in chunks():
        m = _combine(inputs, coef)
        mean_sq.add(inputs.start, m * m)
        del m
    mean_norm = float(mean_sq.result()[0]) ** 0.5
    if inputs.base is not None and not bool(norms.any()):
        # every model equals the base here (e.g. a layer no expert trained): the base, unchanged. mergekit
        # 0.1.5 raises "nearly antipodal" for this; there is nothing to interpolate, so nothing to refuse
        return _State([0.0] * n, True)
    if mean_norm < eps:
        if n == 2:
            return _State(w.tolist(), True)
        raise ConfigError(
            f"multislerp: the weighted mean of the normalized models is zero for tensor {inputs.tensor!r} "
            f"(antipodal models whose weights cancel); use different weights"
        )
    avg_norm = float((norms * w).sum())
    return _State([c * avg_norm / mean_norm for c in coef], False)


def merge(inputs: ChunkInputs) -> torch.Tensor:
    state: _State | None = inputs.state
    if state is None:  # one model: mergekit returns it unchanged
        return inputs.experts[0].load()
    out = _combine(inputs, state.coef)
    if inputs.base is not None:
        out += inputs.base
    return out


METHOD = MergeMethod("multislerp", merge, MultislerpParams, MultislerpModelParams, base_model="optional",
                     prepare=prepare, expert_count=(1, None))
