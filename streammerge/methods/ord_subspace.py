"""Orthogonal-Residual Decoupling in the subspace that moves: exact Procrustes without d_in × d_in matrices.

For W₀ (d_out, d_in) and a target T, the dense path takes the polar factor of M + εI, M = W₀ᵀT. M's column
space lies in row(W₀) and its row space in row(T) ⊂ row(W₀) + row(T − W₀). With Q an orthonormal basis
(d_in × k) of a space holding both, M = Q·B·Qᵀ with B = QᵀMQ (k × k), and for ε > 0 exactly

    M + εI = Q(B + εI_k)Qᵀ + ε(I − QQᵀ)   so   polar(M + εI) = I + Q(polar(B + εI_k) − I)Qᵀ,

and the Cayley generator of that rotation is Q·C⁻¹(polar(B + εI_k))·Qᵀ (zero off the subspace), clamped
exactly as the dense one (its eigen-decomposition is the k × k one padded with angle 0). ε is the dense
path's: eps·‖M‖_F/sqrt(d_in), and ‖M‖_F = ‖B‖_F.

**Basis.** One Householder QR per matrix, W₀ᵀ = H₀[R₀; 0] (``RowBasis``; m = min(d_out, d_in)
reflectors, H₀ never formed): in the coordinates x ↦ x·H₀, row(W₀) lies in the first m coordinates and
W₀·H₀ = [R₀ᵀ, 0]. Per expert, Y = (T − W₀)·H₀ (one ``ormqr``); the rows of its last d_in − m columns,
Y₂ = U·S·Vᵀ (thin SVD, singular values above max(shape)·eps·S₁ kept: r of them), add V. So
Q = H₀·diag(I_m, V), k = m + r ≤ min(d_in, d_out + rank(T − W₀)), and

    T·Q = [R₀ᵀ + Y₁, U·S],   B = [R₀·T·Q ; 0]   (the last r rows are zero: W₀Q = [R₀ᵀ, 0]).

A LoRA expert of rank r adds at most r directions. **Reflections**: the polar factor, the Kabsch fix and
the σ_min(R + I) guard run on B + εI_k exactly as on the dense M (``polar_generator``); det and the
singular values off the subspace (all ε) are the dense path's. One case differs: a reflection whose
smallest singular value is ε itself, off the subspace (σ_min(B + εI_k) > ε) — there the dense path flips an
arbitrary direction of that ε-eigenspace, and ``expert_rotation`` returns None so that the caller takes
the dense path for the matrix.

**Merge.** Each expert's generator lives in H₀·diag(I_m, Vᵢ). ``JointGenerators`` keeps one orthonormal
basis P of the complement directions of all experts seen (Vᵢ's new directions appended after two passes
of Gram–Schmidt and a rank check) and the merge rule's direction Σwᵢuᵢ in J = H₀·diag(I_m, P)
coordinates, K = m + rank(P) ≤ min(d_in, (N + 1)·d_out). The merged generator J·Ḡ·Jᵀ goes back through

    cayley(J·Ḡ·Jᵀ) = I + J(cayley(Ḡ) − I)Jᵀ     (the Woodbury form of (I − JḠJᵀ)(I + JḠJᵀ)⁻¹)

and W₀·R = W₀ + [R₀ᵀ(R_K − I)₁₁, R₀ᵀ(R_K − I)₁₂·Pᵀ]·H₀ᵀ (``rotation_delta``; the same for each Rᵢ in
the residuals ρᵢ = Wᵢ − W₀Rᵢ). Nothing of size d_in × d_in is formed unless the experts' directions fill
the whole space (K = d_in), where the merged rotation is full rank anyway.

Precision: the d_in-sized steps in ``work_dtype(d_in)``, the dense path's dtype; the k × k polar factor
and the K × K Cayley map in ``work_dtype(k)`` (fp64 up to 512, as the dense rule by decomposition size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from .orthogonal import cayley, polar_generator, work_dtype

# Subspace path when d_out <= this · d_in: k <= 2·d_out <= d_in, so its SVD is never larger than the dense
# one (k/v projections, down_proj: 1/4 and 2/7 in Llama-3-8B; LoRA experts: k <= d_out + rank)
SUBSPACE_MAX_RATIO = 0.5
OrdPath = Literal["auto", "dense", "subspace"]


def choose_path(shape: tuple[int, ...], eps: float, path: OrdPath = "auto") -> Literal["dense", "subspace"]:
    """Which path ORD takes for a (d_out, d_in) matrix. ``auto``: subspace for wide matrices
    (d_out <= SUBSPACE_MAX_RATIO·d_in) when eps > 0 (with eps = 0 the dense polar factor is not unique
    off the subspace and the two paths may differ); dense otherwise. ``dense`` / ``subspace`` force it
    (subspace needs eps > 0)."""
    if path == "dense":
        return "dense"
    if path == "subspace":
        if not eps > 0:
            raise ValueError("the subspace path needs procrustes_eps > 0")
        return "subspace"
    d_out, d_in = shape
    return "subspace" if eps > 0 and d_out <= SUBSPACE_MAX_RATIO * d_in else "dense"


def working_set_elements(d_out: int, d_in: int, n_experts: int, path: Literal["dense", "subspace"]) -> int:
    """Peak elements ORD holds for one matrix (an estimate for the plan): the dense path about seven
    d_in × d_in matrices (M, U, Vᵀ, R, the solve's X and Q, ΣRᵢ or R̄) plus four d_out × d_in ones; the
    subspace path five k × k (k <= 2·d_out: B, the SVD's factors, R, the generator solve), three K × K
    (K <= (N + 1)·d_out, at most d_in: the merged direction, its growth, the final LU), the basis P
    ((d_in − m) × (K − m)) and five d_out × d_in ones (Householder factors, the expert, Y and its SVD,
    the residual sum)."""
    if path == "dense":
        return 7 * d_in * d_in + 4 * d_out * d_in
    m = min(d_out, d_in)
    k = min(d_in, m + d_out)
    big_k = min(d_in, m + n_experts * d_out)
    return 5 * k * k + 3 * big_k * big_k + (d_in - m) * (big_k - m) + 5 * d_out * d_in


def cost_units(d_out: int, d_in: int, path: Literal["dense", "subspace"]) -> int:
    """Work for one expert of one matrix, in the dense path's d³ units (its d_in × d_in SVD ≈ d_in³, the
    product W₀ᵀT ≈ d_out·d_in²): the subspace path's k × k SVD k³, its k-column products d_out·k², and its
    thin QR and Householder products d_out·d_in·k/2, k = min(d_in, 2·d_out). Against
    ``scripts/bench_ortho.py --compare`` (one thread): ratios 4.0 and 3.5 predicted at 1024 × 3584 and
    2048 × 7168 where 3.3 and 3.9 were measured. The rank assignment (``distributed.tensor_cost``) uses it."""
    if path == "dense":
        return d_in**3 + d_out * d_in**2
    k = min(d_in, min(d_out, d_in) + d_out)
    return k**3 + d_out * k**2 + d_out * d_in * k // 2


class RowBasis:
    """W₀ᵀ = H₀·[R₀; 0] by Householder QR: the coordinates x ↦ x·H₀ in which row(W₀) is the first m axes."""

    def __init__(self, base: torch.Tensor):
        self.d_out, self.d_in = base.shape
        self.factors, self.tau = torch.geqrf(base.transpose(0, 1))  # (d_in, d_out), (m,)
        self.m = self.tau.shape[0]
        self.r0 = torch.triu(self.factors[: self.m])  # (m, d_out): W₀·H₀ = [R₀ᵀ, 0]

    def coords(self, x: torch.Tensor) -> torch.Tensor:
        """x·H₀ for rows x (n, d_in)."""
        return torch.ormqr(self.factors, self.tau, x.transpose(0, 1), left=True, transpose=True).transpose(0, 1)

    def from_coords(self, y: torch.Tensor) -> torch.Tensor:
        """y·H₀ᵀ for rows y (n, d_in): back to the original axes."""
        return torch.ormqr(self.factors, self.tau, y.transpose(0, 1), left=True, transpose=False).transpose(0, 1)


@dataclass
class SubspaceRotation:
    """One expert's rotation in the basis H₀·diag(I_m, v): R = I + Q(r − I)Qᵀ, generator Q·q·Qᵀ."""

    r: torch.Tensor  # (k, k): the polar factor (Kabsch-fixed), or cayley(q) where the guard clamped q
    q: torch.Tensor  # (k, k): its guarded Cayley generator
    sigma: float  # σ_min(R + I), as the dense path measures it
    v: torch.Tensor  # (d_in − m, r): the complement directions of this expert's subspace

    @property
    def k(self) -> int:
        return self.r.shape[0]


def _norm2(x: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """A lower bound of ‖x‖₂ (power iteration on xᵀx from a fixed start), 0-d."""
    v = torch.ones(x.shape[1], 1, dtype=x.dtype, device=x.device)
    v[::2] = -0.5
    for _ in range(iterations):
        v = x.transpose(0, 1) @ (x @ v)
        v = v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.linalg.vector_norm(x @ v)


def _row_space(
    x: torch.Tensor, tol: Callable[[float], float], limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(V, X·V, r): an orthonormal basis V (n × r) of x's row space (x: d × n), the directions of singular
    values above ``tol(σ_max)``, at most ``limit`` of them, without an SVD of x itself.

    xᵀ = V₀R by a thin QR; R (p × d, p = min(n, d)) has x's singular values, and with R = U_R·S·W_Rᵀ x's
    right singular vectors are V₀U_R, so X·V₀U_R = W_R·S. Where R is square and its smallest singular value
    is clearly above the tolerance (a full fine-tune's Δ), V₀ itself spans the space and X·V₀ = Rᵀ: no SVD
    at all. That test (``_sigma_min_estimate`` > 2·tol; the estimate is an upper bound, usually within a few
    per cent) can keep a direction at the edge of the tolerance that an SVD would drop; Q then has an axis
    more than needed, which changes nothing but its size (any orthonormal Q spanning row(W₀) and row(T)
    gives the same polar factor). One thread, x of 1024 × 2560: the thin QR 0.14 s, the SVD of x 1.07 s.
    """
    v0, rf = torch.linalg.qr(x.transpose(0, 1))  # (n, p), (p, d)
    p = rf.shape[0]
    if (limit is None or limit >= p) and p == rf.shape[1] and _sigma_min_estimate(rf) > 2.0 * tol(float(_norm2(rf))):
        return v0, rf.transpose(0, 1), p
    u_r, s, w_rh = torch.linalg.svd(rf, full_matrices=False)
    r = int((s > tol(float(s[0]) if s.numel() else 0.0)).sum())
    if limit is not None:
        r = min(r, limit)
    return v0 @ u_r[:, :r], w_rh[:r].transpose(0, 1) * s[:r], r


def _sigma_min_estimate(rf: torch.Tensor, iterations: int = 6) -> float:
    """An estimate of the square upper-triangular rf's smallest singular value, never below it: power
    iteration on (RᵀR)⁻¹ by triangular solves from a fixed start gives a lower bound of ‖R⁻¹‖₂. A singular
    rf gives 0."""
    v = torch.ones(rf.shape[0], 1, dtype=rf.dtype, device=rf.device)
    v[::2] = -0.5
    growth = torch.zeros((), dtype=rf.dtype, device=rf.device)
    for _ in range(iterations):
        w = torch.linalg.solve_triangular(rf.transpose(0, 1), v, upper=False)
        v = torch.linalg.solve_triangular(rf, w, upper=True)
        growth = torch.linalg.vector_norm(v)
        v = v / growth
    g = float(growth.sqrt())
    return 1.0 / g if g > 0 else 0.0  # inf/inf gives nan: 0, and the caller takes the SVD


def expert_rotation(
    basis: RowBasis, target_delta: torch.Tensor, eps: float, min_sigma: float
) -> SubspaceRotation | None:
    """The regularised Procrustes rotation of W₀ onto W₀ + target_delta, in its subspace.

    Returns None where the dense path would flip a direction off the subspace (see the module docstring):
    the caller then takes the dense path. The returned r is unclamped (rebuild it as cayley(q) where
    sigma < min_sigma, as ``procrustes_generator``'s callers do).
    """
    m, d_in = basis.m, basis.d_in
    y = basis.coords(target_delta)  # (d_out, d_in)
    y2 = y[:, m:]
    if y2.shape[1]:
        # noise relative to the whole Δ, not to Y₂ (which is pure rounding noise when Δ lies in row(W₀))
        whole, rel = float(_norm2(y)), max(y.shape) * torch.finfo(y.dtype).eps  # numpy's matrix_rank rule
        v, moving, r = _row_space(y2, lambda s_max: max(s_max, whole) * rel)
    else:
        r, v, moving = 0, y.new_zeros(0, 0), y.new_zeros(y.shape[0], 0)
    tq = torch.cat([y[:, :m].add_(basis.r0.transpose(0, 1)), moving], dim=1)  # T·Q (d_out, k)
    del y, y2, moving
    scale = [0.0]
    rot, gen, sigma, s_min, reflected = polar_generator(_regularised_b(basis.r0, tq, eps, d_in, scale), min_sigma)
    k = m + r
    if bool(reflected) and k < d_in and float(s_min) > scale[0]:
        return None
    return SubspaceRotation(rot.to(v.dtype), gen.to(v.dtype), float(sigma), v)


def _regularised_b(r0: torch.Tensor, tq: torch.Tensor, eps: float, d_in: int, scale: list[float]) -> torch.Tensor:
    """B + εI_k in ``work_dtype(k)``, B = [R₀·T·Q; 0]; ε (the dense path's) goes to scale[0]. Built here
    so that ``polar_generator`` holds its only reference and can free it."""
    m, k = r0.shape[0], tq.shape[1]
    b = tq.new_zeros(k, k, dtype=work_dtype(k))
    b[:m] = (r0 @ tq).to(b.dtype)
    scale[0] = float(torch.linalg.matrix_norm(b)) * (eps / math.sqrt(d_in))
    b.diagonal().add_(scale[0])
    return b


def merged_rotation(q_bar: torch.Tensor) -> torch.Tensor:
    """cayley(Ḡ) of the merged K × K generator, decomposed in ``work_dtype(K)``, in Ḡ's dtype."""
    return cayley(q_bar.to(work_dtype(q_bar.shape[-1]))).to(q_bar.dtype)


def merged_rotation_top(q_bar: torch.Tensor, m: int) -> torch.Tensor:
    """The first m rows of cayley(Ḡ) − I = −2Ḡ(I + Ḡ)⁻¹ (all that W₀·R̄ needs: W₀J = [R₀ᵀ, 0]): one LU
    of I + Ḡ and m right-hand rows instead of K, in ``work_dtype(K)``, returned in Ḡ's dtype."""
    g = q_bar.to(work_dtype(q_bar.shape[-1]))
    top = g[:m].clone()
    g.diagonal().add_(1.0)
    return torch.linalg.solve(g, top, left=False).mul_(-2.0).to(q_bar.dtype)


def rotation_delta(basis: RowBasis, r: torch.Tensor, v: torch.Tensor, minus_identity: bool = False) -> torch.Tensor:
    """W₀·R − W₀ (d_out, d_in) for R = I + J(r − I)Jᵀ, J = H₀·diag(I_m, v): [R₀ᵀ(r − I)₁₁, R₀ᵀ(r − I)₁₂·vᵀ]·H₀ᵀ.
    r: the k × k rotation, or (``minus_identity``) the first m rows of r − I."""
    m = basis.m
    if minus_identity:
        top = r
    else:
        top = r[:m].clone()
        top.diagonal().sub_(1.0)
    e = basis.r0.transpose(0, 1) @ top  # (d_out, k)
    del top
    f = torch.cat([e[:, :m], e[:, m:] @ v.transpose(0, 1)], dim=1) if v.numel() else e
    if f.shape[1] < basis.d_in:  # no complement direction moved: zero-pad to d_in
        f = torch.cat([f, f.new_zeros(f.shape[0], basis.d_in - f.shape[1])], dim=1)
    return basis.from_coords(f)


class _Merge(Protocol):  # orthomerge.GeneratorMerge
    def add(self, q: torch.Tensor) -> None: ...

    def grow(self, size: int) -> None: ...

    def result(self) -> tuple[torch.Tensor, bool]: ...


class JointGenerators:
    """The merge rule over subspace generators, kept in one joint basis J = H₀·diag(I_m, P).

    ``merge`` is the rule (orthomerge's ``GeneratorMerge``), fed K × K matrices in J coordinates; its
    θᵢ = ‖Gᵢ‖_F and its direction Σwᵢuᵢ are the dense path's (J has orthonormal columns).
    """

    def __init__(self, basis: RowBasis, merge: _Merge):
        self.basis = basis
        self.merge = merge
        self.p: torch.Tensor | None = None  # (d_in − m, K − m) orthonormal

    @property
    def size(self) -> int:
        return self.basis.m + (0 if self.p is None else self.p.shape[1])

    def _extend(self, v: torch.Tensor) -> torch.Tensor:
        """Append v's new directions to P; return v's coordinates Pᵀv (K − m, r)."""
        if self.p is None:
            self.p = v.clone()
            return torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
        p = self.p
        z = v - p @ (p.transpose(0, 1) @ v)
        z -= p @ (p.transpose(0, 1) @ z)  # twice is enough
        tol = max(p.shape[0], v.shape[1]) * torch.finfo(z.dtype).eps  # v's columns have norm 1
        n, _, new = _row_space(z.transpose(0, 1), lambda _: tol, limit=p.shape[0] - p.shape[1])  # col(z)
        del z
        if new:
            n = n - p @ (p.transpose(0, 1) @ n)
            n = torch.linalg.qr(n).Q
            self.p = torch.cat([p, n], dim=1)
        return self.p.transpose(0, 1) @ v

    def add(self, rot: SubspaceRotation) -> None:
        m = self.basis.m
        q = rot.q
        if rot.v.numel():
            coords = self._extend(rot.v)  # (K − m, r)
        else:
            coords = q.new_zeros(self.size - m, 0)
        size = self.size
        g = q.new_zeros(size, size)
        g[:m, :m] = q[:m, :m]
        if coords.shape[1]:
            g[:m, m:] = q[:m, m:] @ coords.transpose(0, 1)
            g[m:, :m] = coords @ q[m:, :m]
            g[m:, m:] = coords @ q[m:, m:] @ coords.transpose(0, 1)
        self.merge.grow(size)
        self.merge.add(g)

    def complement(self) -> torch.Tensor:
        """P (d_in − m, K − m), empty if no expert moved off row(W₀)."""
        if self.p is None:
            return self.basis.r0.new_zeros(0, 0)
        return self.p
