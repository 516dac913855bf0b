"""How Orthogonal-Residual Decoupling merges the residuals ρᵢ (or task vectors τᵢ) of N experts.

Each merger takes the residuals one at a time (``add``) and returns the merged residual (``result``),
before the λ scaling, in the residuals' dtype. Memory: a few accumulators of one tensor, whatever N.

- ``task_arithmetic``: Σ ρᵢ (the paper scales it with λ = 1/N for 5 experts).
- ``ties``: per expert keep the k = max(1, int(density·numel)) entries of largest |ρᵢ| of this tensor
  (every entry ≥ the k-th largest magnitude is kept, so ties at the threshold may keep a few more; fp32
  residuals almost never tie); elect the sign of Σ kept (0 counts as +); average the agreeing nonzero
  entries (disjoint mean: divide by how many agree, unweighted). As the OrthoMerge code, except that
  its top-k runs over the whole flattened model at once, which cannot stream; here it is per tensor
  (mergekit's TIES granularity). One pass: positive and negative sums and counts are accumulated side
  by side and the elected side is picked at the end (Σ kept = positive + negative sum).
- ``tsvm`` (TSV-Merge, Gargiulo et al. 2025, as in the OrthoMerge code): for a 2-D tensor, each ρᵢ's
  top k = max(1, int(min(d_out, d_in)/N)) singular triplets (Uᵢ, Sᵢ, Vᵢ) are kept; the concatenated
  U = [U₁ … U_N] (d_out × Σk) and V = [V₁ … V_N] (d_in × Σk) are replaced by their polar factors (closest
  matrices with orthonormal columns, from one SVD each), and the merge is Û·diag(S)·V̂ᵀ — a sum of the
  experts' decorrelated top components, not a mean. Other tensors: the mean of the ρᵢ.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

ResidualMethod = Literal["task_arithmetic", "ties", "tsvm"]


class ResidualMerge(Protocol):
    def add(self, residual: torch.Tensor) -> None: ...

    def result(self) -> torch.Tensor: ...


class TaskArithmeticResiduals:
    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None

    def add(self, residual: torch.Tensor) -> None:
        if self._sum is None:
            self._sum = residual.clone()
        else:
            self._sum += residual

    def result(self) -> torch.Tensor:
        return self._sum


def top_k_mask(residual: torch.Tensor, density: float) -> torch.Tensor | None:
    """Keep-mask of the k = max(1, int(density·numel)) largest |ρ| (all entries >= the k-th largest);
    None when density >= 1 (keep everything)."""
    n = residual.numel()
    if density >= 1 or n == 0:
        return None
    magnitude = residual.abs().reshape(-1)
    k = max(1, int(density * n))
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # k-th largest
    return (magnitude >= threshold).reshape(residual.shape)


class TiesResiduals:
    def __init__(self, density: float) -> None:
        self.density = density
        self._pos: torch.Tensor | None = None  # Σ of kept positive entries
        self._neg: torch.Tensor | None = None
        self._pos_count: torch.Tensor | None = None  # int16: how many experts' kept entries are > 0
        self._neg_count: torch.Tensor | None = None

    def add(self, residual: torch.Tensor) -> None:
        keep = top_k_mask(residual, self.density)
        kept = residual if keep is None else residual * keep
        if self._pos is None:
            self._pos, self._neg = torch.zeros_like(kept), torch.zeros_like(kept)
            self._pos_count = torch.zeros(kept.shape, dtype=torch.int16, device=kept.device)
            self._neg_count = torch.zeros_like(self._pos_count)
        self._pos += kept.clamp(min=0)
        self._neg += kept.clamp(max=0)
        self._pos_count += kept > 0
        self._neg_count += kept < 0

    def result(self) -> torch.Tensor:
        elect = (self._pos + self._neg) >= 0  # sign of Σ kept; zero counts as +
        total = torch.where(elect, self._pos, self._neg)
        count = torch.where(elect, self._pos_count, self._neg_count).clamp_(min=1)
        return total / count.to(total.dtype)


def _orthonormal_columns(x: torch.Tensor) -> torch.Tensor:
    """Polar factor P·Qᵀ of X = P·D·Qᵀ: the matrix with orthonormal columns nearest to X."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


class TsvmResiduals:
    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts
        self._u: list[torch.Tensor] = []  # (d_out, kᵢ)
        self._s: list[torch.Tensor] = []  # (kᵢ,)
        self._v: list[torch.Tensor] = []  # (d_in, kᵢ)
        self._mean = TaskArithmeticResiduals()  # non-matrix tensors
        self._seen = 0

    def add(self, residual: torch.Tensor) -> None:
        self._seen += 1
        if residual.ndim != 2:
            self._mean.add(residual)
            return
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        k = max(1, int(s.shape[0] / self.n_experts))
        self._u.append(u[:, :k].clone())
        self._s.append(s[:k].clone())
        self._v.append(vh[:k].transpose(0, 1).clone())

    def result(self) -> torch.Tensor:
        if not self._u:
            return self._mean.result() / self._seen
        u = _orthonormal_columns(torch.cat(self._u, dim=1))  # (d_out, Σk)
        v = _orthonormal_columns(torch.cat(self._v, dim=1))  # (d_in, Σk)
        return (u * torch.cat(self._s)) @ v.transpose(0, 1)


def residual_merge(method: ResidualMethod, n_experts: int, density: float = 1.0) -> ResidualMerge:
    if method == "task_arithmetic":
        return TaskArithmeticResiduals()
    if method == "ties":
        return TiesResiduals(density)
    if method == "tsvm":
        return TsvmResiduals(n_experts)
    raise ValueError(f"unknown residual_method {method!r}")
