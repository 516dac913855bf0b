"""Numerics on the orthogonal group: skew generators, Cayley maps, Procrustes. Pure torch, no I/O.

Every function is batched over leading dimensions (blocks) and runs on the device of its inputs; none
chooses a device. Decompositions run in fp64 for matrices of size <= ``SMALL`` and in fp32 above
(``work_dtype``); callers cast results back at the end.

Conventions (Q skew-symmetric, Qᵀ = −Q; R orthogonal):

    cayley(Q)            = (I − Q)(I + Q)⁻¹                  PEFT's exact OFT map (``use_cayley_neumann: false``)
    inverse_cayley(R)    = (I + R)⁻¹(I − R)                  so that cayley(inverse_cayley(R)) = R
    cayley_neumann(Q, k) ≈ (I + Q)(I − Q)⁻¹ = cayley(−Q)      PEFT's truncated series, see below

The factors of each product commute, so the order inside them is immaterial. PEFT's Neumann series
approximates the *transpose* of its exact branch: the same stored Q gives R with one setting and ≈ Rᵀ
with the other, so a rotation is always rebuilt with the map its adapter was trained with.

Near an eigenvalue −1 of R (a rotation angle θ → π) the generator tan(θ/2) diverges and R + I is
singular: σ_min(R + I) = 2·min|cos(θ/2)| = 2 / sqrt(1 + ‖Q‖₂²). ``inverse_cayley`` measures that and, below
``min_sigma``, clamps each angle's tan(θ/2) so the generator stays finite (and reports it). A reflection
(det R = −1) always has an eigenvalue −1, so the same measurement catches it; ``procrustes_generator``
relies on that to compute det R (an LU) only where it is flagged, and then applies the Kabsch fix.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

SMALL = 512  # matrices up to this size are decomposed in fp64
EXACT_NORM = 64  # ‖Q‖₂ exactly (an SVD) up to this size, by power iteration above

# PEFT's Cayley–Neumann series, k = num_cayley_neumann_terms (exactly as PEFT's ``_cayley_batch``):
#   "peft-0.18" (PEFT >= 0.18): I + 2Q + 2Q² + 2Q³ + … + 2Q^(k−2) + Q^(k−1) for k >= 4; k = 3 gives
#                              I + 2Q + 2Q² + Q³ (the loop's last power is at least Q³), k = 2: I + 2Q
#   "peft-0.16" (PEFT 0.16–0.17): I + 2Q + 2Q² + … + 2Q^(k−1)
NeumannConvention = Literal["peft-0.18", "peft-0.16"]


def work_dtype(size: int) -> torch.dtype:
    """fp64 for small matrices (cheap, and what makes round trips exact to ~1e-12), fp32 above."""
    return torch.float64 if size <= SMALL else torch.float32


def block_size_of(n_elements: int) -> int:
    """b with b(b−1)/2 = n_elements; ValueError if there is none."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    if b * (b - 1) // 2 != n_elements or n_elements < 1:
        raise ValueError(f"{n_elements} is not b(b-1)/2 for any block size b >= 2")
    return b


def skew_from_vector(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """Skew matrices Q = U − Uᵀ from strict upper triangles stored row-major (PEFT's ``oft_R`` layout).

    vec: (..., b(b−1)/2) -> (..., b, b), same dtype and device.
    """
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    q = vec.new_zeros(*vec.shape[:-1], block_size, block_size)
    q[..., rows, cols] = vec
    return q - q.transpose(-2, -1)


def vector_from_skew(q: torch.Tensor) -> torch.Tensor:
    """Strict upper triangle, row-major: (..., b, b) -> (..., b(b−1)/2). Inverse of ``skew_from_vector``
    on skew matrices (the lower triangle is ignored; skew-symmetrise first if Q is only nearly skew)."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return q[..., rows, cols]


def skew_part(q: torch.Tensor) -> torch.Tensor:
    """½(Q − Qᵀ), batched."""
    return 0.5 * (q - q.transpose(-2, -1))


def _eye_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley map (I − Q)(I + Q)⁻¹ of skew Q: (..., b, b) -> (..., b, b), in Q's dtype.

    I + Q is invertible for every real skew Q (its eigenvalues are 1 ± i·t). One LU solve.
    """
    eye = _eye_like(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def cayley_neumann(q: torch.Tensor, terms: int, convention: NeumannConvention = "peft-0.18") -> torch.Tensor:
    """PEFT's truncated Neumann series for the Cayley map (see ``NeumannConvention``), term by term as
    PEFT sums it. q: (..., b, b) skew -> (..., b, b), not exactly orthogonal."""
    if terms < 1:
        raise ValueError(f"num_cayley_neumann_terms must be >= 1, got {terms}")
    r = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q).clone()
    if terms > 1:
        r.add_(q, alpha=2.0)
    if terms > 2:
        power = q @ q
        r.add_(power, alpha=2.0)
        if convention == "peft-0.16":
            for _ in range(3, terms):
                power = power @ q
                r.add_(power, alpha=2.0)
        elif convention == "peft-0.18":
            for _ in range(3, terms - 1):
                power = power @ q
                r.add_(power, alpha=2.0)
            r.add_(power @ q)
        else:
            raise ValueError(f"unknown Neumann convention {convention!r}")
    return r


def spectral_norm(q: torch.Tensor, iterations: int = 16) -> torch.Tensor:
    """‖Q‖₂ per matrix, (..., m, b) -> (...). Exact (SVD values) up to ``EXACT_NORM``, else power iteration
    on QᵀQ from a fixed start (O(b²) per step; a lower bound that converges from below)."""
    if q.shape[-1] <= EXACT_NORM:
        return torch.linalg.matrix_norm(q, ord=2)
    x = torch.ones(*q.shape[:-1], 1, dtype=q.dtype, device=q.device)
    x[..., ::2, :] = -0.5  # not an eigenvector of anything structured
    for _ in range(iterations):
        x = q.transpose(-2, -1) @ (q @ x)
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    return torch.linalg.vector_norm(q @ x, dim=(-2, -1))


def max_tan_half_angle(min_sigma: float) -> float:
    """The generator bound t with σ_min(R + I) = 2/sqrt(1 + t²) = min_sigma."""
    if not 0 < min_sigma < 2:
        raise ValueError(f"min_sigma must be in (0, 2), got {min_sigma}")
    return math.sqrt(4.0 / min_sigma**2 - 1.0)


def clamped_generator(r: torch.Tensor, max_tan: float) -> torch.Tensor:
    """Generator of orthogonal R with every |tan(θ/2)| clamped to ``max_tan``; finite even at θ = π.

    With S = ½(R + Rᵀ) (eigenvalues cos θ) and K = ½(R − Rᵀ) (±i·sin θ), which commute for orthogonal
    R, the generator is Q = −K·(I + S)⁻¹ (eigenvalues −i·sin θ/(1 + cos θ) = −i·tan(θ/2)). Here (I + S)⁻¹
    is replaced by g(S), g(c) = min(1/(1 + c), max_tan/sqrt(1 − c²)), through one real symmetric
    ``eigh`` (robust for clustered angles; as costly as a decomposition, so only used where needed).
    An angle of exactly π (K = 0 in its plane, no preferred direction) gets a generator near 0 there.
    """
    r64 = r.to(torch.float64)  # rare path: fp64 even for large R, so angles near π stay resolvable
    s = 0.5 * (r64 + r64.transpose(-2, -1))
    k = 0.5 * (r64 - r64.transpose(-2, -1))
    c, v = torch.linalg.eigh(s)
    c = c.clamp(-1.0, 1.0)
    # sin θ below sqrt(eps) is rounding noise of K: there the generator fades to 0 instead of
    # amplifying that noise (and its leakage from other planes) by max_tan / sin θ
    floor = math.sqrt(torch.finfo(torch.float64).eps)
    g = torch.minimum(1.0 / (1.0 + c).clamp_min(floor), max_tan / torch.sqrt(1.0 - c.square()).clamp_min(floor))
    q = skew_part(-(k @ ((v * g.unsqueeze(-2)) @ v.transpose(-2, -1))))
    # R is orthogonal only to its dtype's rounding: near θ = π that can beat the per-angle clamp, so
    # the bound is enforced on the whole generator as well
    norm = spectral_norm(q)
    q = q * (max_tan / norm.clamp_min(max_tan)).unsqueeze(-1).unsqueeze(-1)
    return q.to(r.dtype)


def _generator(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unguarded (Q, σ_min(R + I)): one LU solve X = (I + R)⁻¹(I − R), Q = ½(X − Xᵀ).

    σ comes from ‖X‖₂ *before* skew-symmetrising: for a rotation X is skew already, but for a reflection
    (eigenvalue −1 along v) X blows up as a symmetric (2/δ)·vvᵀ that ½(X − Xᵀ) would silently remove.
    """
    eye = _eye_like(r)
    x = torch.linalg.solve(eye + r, eye - r)
    finite = torch.isfinite(x).flatten(-2).all(-1)
    if bool(finite.all()):
        norm = spectral_norm(x)
    else:  # an exactly singular R + I: no finite generator at all
        x = torch.where(finite[..., None, None], x, 0)
        norm = torch.where(finite, spectral_norm(x), math.inf)
    return skew_part(x), 2.0 / torch.sqrt(1.0 + norm.square())


def _clamp_where(q: torch.Tensor, sigma: torch.Tensor, r: torch.Tensor, min_sigma: float) -> torch.Tensor:
    bad = sigma < min_sigma
    if bool(bad.any()):
        q = torch.where(bad[..., None, None], clamped_generator(r, max_tan_half_angle(min_sigma)), q)
    return q


def inverse_cayley(r: torch.Tensor, min_sigma: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Generator Q = (I + R)⁻¹(I − R) of orthogonal R (skew-symmetrised), guarded near eigenvalue −1.

    r: (..., b, b) orthogonal with det +1. Returns (Q, sigma) with sigma = σ_min(R + I) per matrix,
    measured as 2/sqrt(1 + ‖Q‖₂²) (exact for orthogonal R). Where sigma < ``min_sigma`` (or the solve is
    not finite) Q is regularised by ``clamped_generator``: each angle's tan(θ/2) is clamped to the bound
    that ``min_sigma`` sets, so cayley(Q) is then a rotation close to R, not R itself. Callers that need
    the exact pair recompute R = cayley(Q) where sigma < min_sigma.
    """
    q, sigma = _generator(r)
    return _clamp_where(q, sigma, r, min_sigma), sigma


def regularised_gram(w0: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """M = W₀ᵀT + ε·I, ε = eps·‖W₀ᵀT‖_F/sqrt(d_in), in ``work_dtype(d_in)``: (..., d_in, d_in)."""
    dtype = work_dtype(w0.shape[-1])
    m = w0.to(dtype).transpose(-2, -1) @ target.to(dtype)  # (..., d_in, d_in)
    scale = torch.linalg.matrix_norm(m) * (eps / math.sqrt(m.shape[-1]))  # (...)
    m.diagonal(dim1=-2, dim2=-1).add_(scale.unsqueeze(-1))
    return m


def _polar_svd(w0: torch.Tensor, target: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U, Vᵀ of M = W₀ᵀT + ε·I (``regularised_gram``)."""
    u, _, vh = torch.linalg.svd(regularised_gram(w0, target, eps), full_matrices=False)
    return u, vh


def _kabsch(r: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, reflected: torch.Tensor) -> torch.Tensor:
    """R − 2·u_min·v_minᵀ = U·diag(1, …, 1, −1)·Vᵀ where ``reflected`` (singular values descend, so the
    last column is the smallest's): the best rotation when the best orthogonal matrix is a reflection."""
    flip = (u[..., :, -1:] @ vh[..., -1:, :]) * (2.0 * reflected.to(r.dtype))[..., None, None]
    return r - flip


def procrustes_rotation(w0: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """argmin over SO(d_in) of ‖W₀R − T‖_F, regularised: the polar factor of M = W₀ᵀT + ε·I.

    w0, target: (..., d_out, d_in) -> R: (..., d_in, d_in), in ``work_dtype(d_in)``.
    ε = eps·‖M‖_F/sqrt(d_in) (eps relative to M's RMS singular value). Without it a wide or rank-deficient
    M (d_out < d_in: k/v projections, down_proj) has an arbitrary polar factor on its null space — often a
    reflection or angles near π; with it, R ≈ I there. One SVD M = UΣVᵀ gives R = UVᵀ; where det R = −1
    the column of U for the smallest singular value is negated (Kabsch), so det R = +1 and R stays the
    best rotation.
    """
    u, vh = _polar_svd(w0, target, eps)
    r = u @ vh
    reflected = torch.linalg.slogdet(r).sign < 0  # (...)
    return _kabsch(r, u, vh, reflected) if bool(reflected.any()) else r


def procrustes_generator(
    w0: torch.Tensor, target: torch.Tensor, eps: float = 1e-3, min_sigma: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``procrustes_rotation`` then ``inverse_cayley``, fused to save a decomposition: (R, Q, sigma).

    The determinant (an LU) is only computed where the generator solve flags σ_min(R + I) < min_sigma: a
    reflection (det R = −1) always has an eigenvalue −1, so it is always flagged; there the Kabsch fix is
    applied and Q recomputed. Angles near π that remain are clamped as in ``inverse_cayley`` (R itself is
    returned unclamped; rebuild it as cayley(Q) where sigma < min_sigma).
    """
    r, q, sigma, _, _ = polar_generator(regularised_gram(w0, target, eps), min_sigma)
    return r, q, sigma


def polar_generator(
    m: torch.Tensor, min_sigma: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The core of ``procrustes_generator`` on an already regularised M: (R, Q, sigma, s_min, reflected).

    R: the polar factor of M, Kabsch-fixed where it is a reflection; Q, sigma: its guarded generator;
    s_min: M's smallest singular value; reflected: where the Kabsch fix was applied.
    """
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    del m  # the caller's reference may be the last one: free it before the solve
    r = u @ vh
    u, vh = u[..., :, -1:].clone(), vh[..., -1:, :].clone()  # all that Kabsch needs: the smallest pair
    q, sigma = _generator(r)
    bad = sigma < min_sigma
    reflected = torch.zeros_like(bad)
    if bool(bad.any()):
        reflected = bad & (torch.linalg.slogdet(r).sign < 0)
        if bool(reflected.any()):
            r = _kabsch(r, u, vh, reflected)
            q2, sigma2 = _generator(r)
            q = torch.where(reflected[..., None, None], q2, q)
            sigma = torch.where(reflected, sigma2, sigma)
        q = _clamp_where(q, sigma, r, min_sigma)
    return r, q, sigma, s[..., -1], reflected
