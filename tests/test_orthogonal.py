"""Orthogonal-group numerics against plain formulas, PEFT's own functions (when installed) and the
properties they must have (orthogonal, det +1, exact inverses)."""

from __future__ import annotations

import math

import pytest
import torch

from streammerge.methods.orthogonal import (
    SMALL,
    block_size_of,
    cayley,
    cayley_neumann,
    inverse_cayley,
    max_tan_half_angle,
    procrustes_generator,
    procrustes_rotation,
    skew_from_vector,
    spectral_norm,
    vector_from_skew,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("one_thread")


def random_skew(*shape: int, scale: float = 0.3, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Skew matrices of shape (*shape[:-1], b, b), b = shape[-1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, shape[-1], generator=g, dtype=dtype) * scale
    return x - x.transpose(-2, -1)


def orthogonality_error(r: torch.Tensor) -> float:
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    return float((r @ r.transpose(-2, -1) - eye).abs().max())


def plane_rotation(d: int, angle: float, i: int = 0, j: int = 1, dtype=torch.float64) -> torch.Tensor:
    r = torch.eye(d, dtype=dtype)
    r[i, i] = r[j, j] = math.cos(angle)
    r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
    return r


def test_vector_layout_is_strict_upper_triangle_row_major():
    vec = torch.tensor([[1.0, 2.0, 3.0]])
    expected = torch.tensor([[[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]])
    assert torch.equal(skew_from_vector(vec, 3), expected)
    assert torch.equal(vector_from_skew(expected), vec)
    assert block_size_of(3) == 3 and block_size_of(28) == 8 and block_size_of(496) == 32
    with pytest.raises(ValueError):
        block_size_of(27)


def test_skew_vector_round_trip_batched():
    q = random_skew(2, 5, 8)
    assert torch.equal(skew_from_vector(vector_from_skew(q), 8), q)


def test_cayley_is_the_exact_formula_and_a_rotation():
    q = random_skew(6, 8)
    r = cayley(q)
    eye = torch.eye(8, dtype=q.dtype)
    assert torch.allclose(r, (eye - q) @ torch.linalg.inv(eye + q), atol=1e-13)
    assert torch.allclose(r, torch.linalg.inv(eye + q) @ (eye - q), atol=1e-13)  # the factors commute
    assert orthogonality_error(r) < 1e-13
    assert torch.allclose(torch.linalg.det(r), torch.ones(6, dtype=q.dtype))


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6, 8])
def test_neumann_legacy_convention_is_the_plain_series(terms):
    q = random_skew(3, 6, scale=0.05)
    expected = torch.eye(6, dtype=q.dtype) + sum(2 * torch.linalg.matrix_power(q, j) for j in range(1, terms))
    assert torch.allclose(cayley_neumann(q, terms, "peft-0.16"), expected, atol=1e-14)


@pytest.mark.parametrize("terms, last_power", [(4, 3), (5, 4), (7, 6)])
def test_neumann_current_convention_ends_with_a_single_power(terms, last_power):
    q = random_skew(3, 6, scale=0.05)
    powers = [torch.linalg.matrix_power(q, j) for j in range(1, last_power + 1)]
    expected = torch.eye(6, dtype=q.dtype) + 2 * sum(powers[:-1]) + powers[-1]
    assert torch.allclose(cayley_neumann(q, terms, "peft-0.18"), expected, atol=1e-14)


def test_neumann_approximates_the_transpose_of_the_exact_map():
    q = random_skew(4, 8, scale=0.01)
    approx = cayley_neumann(q, 12, "peft-0.18")
    assert torch.allclose(approx, cayley(-q), atol=1e-12)
    assert torch.allclose(approx, cayley(q).transpose(-2, -1), atol=1e-12)
    assert not torch.allclose(approx, cayley(q), atol=1e-3)


def test_cayley_maps_match_peft():
    oft_layer = pytest.importorskip("peft.tuners.oft.layer")
    for terms in (1, 2, 3, 4, 5, 7):
        for neumann in (False, True):
            module = oft_layer.OFTRotationModule(r=4, n_elements=28, block_size=8, in_features=32,
                                                 use_cayley_neumann=neumann, num_cayley_neumann_terms=terms)
            vec = vector_from_skew(random_skew(4, 8, scale=0.1, seed=terms, dtype=torch.float32))
            theirs = module._cayley_batch(vec, 8, neumann, terms)
            assert torch.equal(module._pytorch_skew_symmetric(vec, 8), skew_from_vector(vec, 8))
            q = skew_from_vector(vec.double(), 8)
            ours = cayley_neumann(q, terms, "peft-0.18") if neumann else cayley(q)
            assert torch.allclose(ours.float(), theirs, atol=2e-6), (terms, neumann)


def test_inverse_cayley_round_trip_and_sigma():
    q = random_skew(5, 8, scale=0.4)
    r = cayley(q)
    back, sigma = inverse_cayley(r)
    assert torch.allclose(back, q, atol=1e-12)
    exact_sigma = torch.linalg.svdvals(r + torch.eye(8, dtype=r.dtype)).min(-1).values
    assert torch.allclose(sigma, exact_sigma, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gap", [1e-5, 1e-3, 0.0])
def test_inverse_cayley_clamps_angles_near_pi(dtype, gap):
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    r = basis @ plane_rotation(6, math.pi - gap) @ plane_rotation(6, 0.3, 2, 3) @ basis.T
    q, sigma = inverse_cayley(r.to(dtype), min_sigma=1e-2)
    assert torch.isfinite(q).all()
    assert float(sigma) < 1e-2 + 1e-6  # reported
    bound = max_tan_half_angle(1e-2)
    assert float(spectral_norm(q)) <= bound * (1 + 1e-4)
    angles = torch.linalg.eigvals(q.double()).imag.abs().sort().values  # tan(θ/2) per plane, twice each
    assert int(torch.isclose(angles, torch.tensor(math.tan(0.15), dtype=torch.float64), rtol=1e-2).sum()) == 2
    rebuilt = cayley(q)
    assert orthogonality_error(rebuilt) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert float(torch.linalg.det(rebuilt.double())) == pytest.approx(1.0, abs=1e-4)
    if gap > 0 and dtype == torch.float64:
        assert float((rebuilt - r).abs().max()) < 0.02  # a nearby rotation


def test_spectral_norm_power_iteration_branch():
    # block-diagonal skew matrix with known 2x2 planes: ‖Q‖₂ is the largest plane's value
    g = torch.Generator().manual_seed(11)
    values = torch.rand((SMALL + 40) // 2, generator=g) * 3.0
    q = torch.zeros(SMALL + 40, SMALL + 40)
    idx = torch.arange(0, SMALL + 40, 2)
    q[idx, idx + 1], q[idx + 1, idx] = values, -values
    estimate = float(spectral_norm(q))
    assert 0.9 * float(values.max()) <= estimate <= float(values.max()) * (1 + 1e-5)  # enough to flag σ_min(R+I)


def test_procrustes_recovers_a_known_rotation():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(48, 32, generator=g, dtype=torch.float64)
    truth = cayley(random_skew(32, scale=0.05, seed=3))
    assert torch.allclose(procrustes_rotation(w0, w0 @ truth, eps=0.0), truth, atol=1e-10)
    assert torch.allclose(procrustes_rotation(w0, w0 @ truth, eps=1e-3), truth, atol=1e-2)


def test_procrustes_fixes_reflections_kabsch():
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(40, 24, generator=g, dtype=torch.float64)
    flip = torch.eye(24, dtype=torch.float64)
    flip[5, 5] = -1.0
    target = w0 @ cayley(random_skew(24, scale=0.05, seed=5)) @ flip
    r = procrustes_rotation(w0, target, eps=0.0)
    assert orthogonality_error(r) < 1e-12
    assert float(torch.linalg.det(r)) == pytest.approx(1.0)
    # independent reference: U·diag(1, …, 1, det(UVᵀ))·Vᵀ from numpy's SVD
    u, _, vh = (torch.from_numpy(x) for x in __import__("numpy").linalg.svd((w0.T @ target).numpy()))
    d = torch.ones(24, dtype=torch.float64)
    d[-1] = torch.sign(torch.linalg.det(u @ vh))
    assert torch.allclose(r, (u * d) @ vh, atol=1e-10)
    # and it is the best rotation: no random rotation fits better
    best = torch.linalg.matrix_norm(w0 @ r - target)
    for seed in range(5):
        other = cayley(random_skew(24, scale=0.3, seed=10 + seed))
        assert best <= torch.linalg.matrix_norm(w0 @ (r @ other) - target)


def test_procrustes_wide_matrix_is_identity_off_the_data_subspace():
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(16, 64, generator=g, dtype=torch.float64)  # d_out < d_in: W₀ᵀW rank 16
    w = w0 + 0.05 * torch.randn(16, 64, generator=g, dtype=torch.float64)
    # inputs neither W₀ nor W sees: M = W₀ᵀW + εI is ε·I there, both ways, so its polar factor is I there
    null = torch.linalg.svd(torch.cat([w0, w])).Vh[32:].T  # (64, 32)
    r = procrustes_rotation(w0, w, eps=1e-3)
    assert torch.isfinite(r).all() and orthogonality_error(r) < 1e-12
    assert float(torch.linalg.det(r)) == pytest.approx(1.0)
    assert float(torch.linalg.matrix_norm((r - torch.eye(64, dtype=r.dtype)) @ null, ord=2)) < 1e-9
    _, sigma = inverse_cayley(r)
    assert float(sigma) > 1.0  # no angle anywhere near π
    # unregularised, the null space gets an arbitrary rotation (this is what the ε·I is for)
    plain = procrustes_rotation(w0, w, eps=0.0)
    assert float(torch.linalg.matrix_norm((plain - torch.eye(64, dtype=r.dtype)) @ null, ord=2)) > 0.5


def test_procrustes_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(3, 12, 8, generator=g, dtype=torch.float64)
    t = w0 + 0.1 * torch.randn(3, 12, 8, generator=g, dtype=torch.float64)
    t[1] = t[1] @ torch.diag(torch.tensor([-1.0] + [1.0] * 7, dtype=torch.float64))  # one reflected target
    batched = procrustes_rotation(w0, t)
    for i in range(3):
        assert torch.allclose(batched[i], procrustes_rotation(w0[i], t[i]), atol=1e-12)
    assert torch.allclose(torch.linalg.det(batched), torch.ones(3, dtype=torch.float64))


def test_fused_generator_equals_rotation_then_inverse_cayley():
    g = torch.Generator().manual_seed(14)
    w0 = torch.randn(3, 20, 12, generator=g, dtype=torch.float64)
    t = w0 + 0.05 * torch.randn(3, 20, 12, generator=g, dtype=torch.float64)
    t[2] = w0[2] @ torch.diag(torch.tensor([-1.0] + [1.0] * 11, dtype=torch.float64))  # reflected target
    r, q, sigma = procrustes_generator(w0, t)
    assert torch.allclose(r, procrustes_rotation(w0, t), atol=1e-12)
    q2, sigma2 = inverse_cayley(r)
    assert torch.allclose(q, q2, atol=1e-10) and torch.allclose(sigma, sigma2)
    assert torch.allclose(torch.linalg.det(r), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(cayley(q), r, atol=1e-10)  # the Kabsch-fixed rotation has a finite generator
    # an angle near π stays flagged and is clamped, as in inverse_cayley
    near_pi = w0[0] @ plane_rotation(12, math.pi - 1e-7, 3, 7)
    r, q, sigma = procrustes_generator(w0[0], near_pi)
    assert float(sigma) < 1e-2 and torch.allclose(q, inverse_cayley(r)[0], atol=1e-8)


def test_large_matrices_are_decomposed_in_fp32():
    g = torch.Generator().manual_seed(8)
    w0 = torch.randn(8, SMALL + 8, generator=g)
    assert procrustes_rotation(w0, w0).dtype == torch.float32
    assert procrustes_rotation(w0[:, :16].double(), w0[:, :16]).dtype == torch.float64


@cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(9)
    w0 = torch.randn(64, 96, generator=g)
    w = w0 + 0.05 * torch.randn(64, 96, generator=g)
    r_cpu = procrustes_rotation(w0, w)
    r_gpu = procrustes_rotation(w0.cuda(), w.cuda())
    assert r_gpu.is_cuda
    assert torch.allclose(r_gpu.cpu(), r_cpu, atol=1e-8)
    q_gpu, _ = inverse_cayley(r_gpu)
    assert torch.allclose(cayley(q_gpu).cpu(), r_cpu, atol=1e-8)
