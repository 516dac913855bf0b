"""Karcher mean (mergekit ``karcher``): the weighted Riemannian mean of the models on the unit sphere.

mergekit's algorithm, per tensor (θᵢ the models, every ``models:`` entry, the base included when it is
listed; αᵢ = 1/n):

    uᵢ = θᵢ/‖θᵢ‖ (0 if ‖θᵢ‖ = 0);  valid models: ‖θᵢ‖ > tol, their αᵢ renormalized to α̂ᵢ
    μ = Σ α̂ᵢuᵢ / ‖·‖   (u of the first valid model if ‖Σ α̂ᵢuᵢ‖ < tol)
    repeat max_iter times:
        τ = Σ α̂ᵢ (Ωᵢ / sin Ωᵢ)(uᵢ − cos Ωᵢ·μ) over models with Ωᵢ = arccos⟨μ, uᵢ⟩ ≥ tol
        stop if ‖τ‖ < tol;   μ ← cos‖τ‖·μ + sin‖τ‖·τ/‖τ‖, renormalized
    θ = (Σ αᵢ‖θᵢ‖) · μ

Every μ and τ is a combination Σ aᵢuᵢ of the unit models, so the iteration runs on the coefficients
aᵢ and the Gram matrix Gᵢⱼ = ⟨θᵢ, θⱼ⟩ (``gram``: one pass of chunks): ⟨μ, uⱼ⟩ = (aᵀG)ⱼ/‖θⱼ‖,
‖μ‖² = aᵀGa. The merge is then one elementwise combination of the models. mergekit iterates on
full fp32 tensors (rounding μ to fp32 each step); here the iteration is fp64, so results agree to
fp32 rounding (≈ 1e-7 relative) unless a stopping test (``tol``) lands on the other side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams
from .gram import gram


@dataclass(frozen=True)
class KarcherParams:
    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self):
        if self.max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {self.max_iter}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """cᵢ with θ = Σ cᵢθᵢ, from the Gram matrix ``g`` (n, n) fp64 of the models."""
    n = g.shape[0]
    alphas = [1.0 / n] * n
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    total = sum(alphas[i] for i in valid)
    alpha = torch.tensor([alphas[i] / total for i in valid], dtype=torch.float64)
    inv = torch.tensor([1.0 / norms[i] for i in valid], dtype=torch.float64)
    u = g[valid][:, valid] * inv[:, None] * inv[None, :]  # ⟨uᵢ, uⱼ⟩ of the valid models

    def norm(a: torch.Tensor) -> float:
        return math.sqrt(max(float(a @ u @ a), 0.0))

    a = alpha.clone()
    mean_norm = norm(a)
    if mean_norm < tol:
        a = torch.zeros_like(alpha)
        a[0] = 1.0
    else:
        a /= mean_norm
    for _ in range(max_iter):
        dots = (a @ u).clamp(-1.0, 1.0)  # ⟨μ, uⱼ⟩
        tangent = torch.zeros_like(a)
        for j in range(len(valid)):
            theta = math.acos(float(dots[j]))
            if theta < tol:
                continue
            step = float(alpha[j]) * theta / math.sin(theta)
            tangent -= step * float(dots[j]) * a
            tangent[j] += step
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        a = math.cos(tangent_norm) * a + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(a)
        if unit_norm > tol:
            a /= unit_norm
    scale = sum(al * nm for al, nm in zip(alphas, norms, strict=True))
    coef = [0.0] * n
    for k, i in enumerate(valid):
        coef[i] = scale * float(a[k]) / norms[i]
    return coef


def prepare(chunks: Callable[[], Iterator[ChunkInputs]]) -> list[float] | None:
    first = next(chunks())
    n, p = len(first.experts), first.params
    del first
    if n == 1:
        return None
    g = gram(chunks, lambda inputs, i: inputs.experts[i].load(), lambda _: "all")[:, :, 0]
    return karcher_coefficients(g, p.max_iter, p.tol)


def merge(inputs: ChunkInputs) -> torch.Tensor:
    if inputs.state is None:  # one model: mergekit returns it unchanged
        return inputs.experts[0].load()
    out = None
    for expert, c in zip(inputs.experts, inputs.state, strict=True):
        x = expert.load().mul_(c)
        out = x if out is None else out.add_(x)
    return out


METHOD = MergeMethod("karcher", merge, KarcherParams, NoParams, base_model="unused", prepare=prepare)
