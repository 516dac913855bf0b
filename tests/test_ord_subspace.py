"""ORD's subspace path (``methods/ord_subspace.py``) against the dense path it replaces.

Reference: today's dense Procrustes (``procrustes_generator`` on the d_in × d_in matrix W₀ᵀT + εI, the
Cayley map of the merged generator on d_in × d_in), and the identity polar(M + εI) = I + Q(polar(QᵀMQ +
εI_k) − I)Qᵀ checked on explicitly formed matrices. fp64 below 513 columns (both paths' working dtype):
≤ 1e-10; fp32 above: ≤ 1e-5 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FIXTURES, load_folder

import streammerge
from streammerge.methods import ord_subspace
from streammerge.methods.orthogonal import cayley, procrustes_generator
from streammerge.methods.orthomerge import (
    METHOD,
    DecoupleReport,
    GeneratorMerge,
    OrthoMergeParams,
    decouple_merge,
)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _base(d_out, d_in, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(d_out, d_in, generator=g, dtype=F64) / math.sqrt(d_in)
    a = torch.randn(d_out, rank, generator=g, dtype=F64)
    return a @ torch.randn(rank, d_in, generator=g, dtype=F64) / math.sqrt(d_in * rank)


def _experts(w0, n, seed, kind="full", scale=0.1):
    """n experts W₀ + Δᵢ, Δᵢ = ±D + Eᵢ (signs alternate, so that variant C finds conflicting rows):
    dense (full fine-tunes) or D, Eᵢ of rank 3 each (LoRA, s·B·A)."""
    g = torch.Generator().manual_seed(seed + 1000)
    d_out, d_in = w0.shape

    def delta():
        if kind == "lora":
            b = torch.randn(d_out, 3, generator=g, dtype=F64)
            return b @ torch.randn(3, d_in, generator=g, dtype=F64) / math.sqrt(3 * d_in)
        return torch.randn(d_out, d_in, generator=g, dtype=F64) / math.sqrt(d_in)

    shared = delta()
    return [w0 + scale * ((-1) ** i * shared + 0.5 * delta()) for i in range(n)]


def _both(w0, experts, params, dtype=F64):
    reports = DecoupleReport(), DecoupleReport()
    dense = decouple_merge(w0, experts, params, path="dense", report=reports[0], out_dtype=dtype)
    sub = decouple_merge(w0, experts, params, path="subspace", report=reports[1], out_dtype=dtype)
    return dense, sub, reports


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a))


def test_the_subspace_identity_on_formed_matrices():
    """R and its generator from the k × k problem, lifted by Q = H₀·diag(I, V), are the dense ones."""
    w0 = _base(10, 40, 0)
    target = _experts(w0, 1, 0)[0]
    basis = ord_subspace.RowBasis(w0)
    rot = ord_subspace.expert_rotation(basis, target - w0, 1e-3, 1e-2)
    assert rot.k == 20  # row(W₀) + row(T − W₀): 10 + 10 of 40
    h0 = basis.from_coords(torch.eye(40, dtype=F64)).transpose(0, 1)  # x·H₀ = x @ h0
    embed = torch.zeros(40, rot.k, dtype=F64)
    embed[:10, :10] = torch.eye(10, dtype=F64)
    embed[10:, 10:] = rot.v
    q = h0 @ embed  # (d_in, k), orthonormal
    torch.testing.assert_close(q.T @ q, torch.eye(rot.k, dtype=F64), atol=1e-13, rtol=0)
    r_dense, gen_dense, sigma = procrustes_generator(w0, target, 1e-3, 1e-2)
    eye = torch.eye(40, dtype=F64)
    torch.testing.assert_close(eye + q @ (rot.r - torch.eye(rot.k, dtype=F64)) @ q.T, r_dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(q @ rot.q @ q.T, gen_dense, atol=1e-12, rtol=0)
    assert rot.sigma == pytest.approx(float(sigma), rel=1e-9)
    # W₀R − W₀ without forming R
    torch.testing.assert_close(ord_subspace.rotation_delta(basis, rot.r, rot.v), w0 @ r_dense - w0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["G", "C"])
@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize(
    "shape, rank",
    [((12, 48), None), ((20, 30), None), ((40, 16), None), ((24, 24), None), ((12, 48), 5), ((30, 30), 7)],
    ids=["wide", "wide-0.67", "tall", "square", "wide-rank-deficient", "square-rank-deficient"],
)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_subspace_equals_dense_fp64(variant, kind, shape, rank, n):
    w0 = _base(*shape, seed=n, rank=rank)
    experts = _experts(w0, n, seed=n, kind=kind)
    params = OrthoMergeParams(variant=variant, lambda_=0.5)
    dense, sub, (rd, rs) = _both(w0, experts, params)
    assert (rs.subspace, rd.subspace) == (1, 0)
    assert _rel(dense, sub) <= 1e-10
    ta = w0 + 0.5 * sum(e - w0 for e in experts)
    if variant == "C" and n == 1:  # one expert never conflicts with the mean: no rotation
        torch.testing.assert_close(dense, ta, atol=1e-12, rtol=0)
    elif variant == "G" or n >= 3:  # (C with two experts ±D + Eᵢ may find no conflicting row)
        assert _rel(dense, ta) > 1e-6  # not task arithmetic: W₀ rotates
    assert rs.min_sigma == pytest.approx(rd.min_sigma, rel=1e-6)


@pytest.mark.parametrize("residual", ["task_arithmetic", "ties", "tsvm"])
@pytest.mark.parametrize("norm, direction", [("mean", "theta"), ("median", "uniform"), ("max", "theta")])
def test_residual_methods_and_merge_rules_agree(residual, norm, direction):
    w0 = _base(16, 56, 3)
    experts = _experts(w0, 3, 3) + _experts(w0, 1, 9, kind="lora", scale=0.3)
    params = OrthoMergeParams(residual_method=residual, norm_aggregate=norm, direction_weighting=direction, lambda_=0.5)
    dense, sub, _ = _both(w0, experts, params)
    assert _rel(dense, sub) <= 1e-10


def test_lora_experts_keep_the_basis_small_and_the_merge_low_rank():
    w0 = _base(8, 64, 4)
    experts = _experts(w0, 4, 4, kind="lora")
    dense, sub, (_, rs) = _both(w0, experts, OrthoMergeParams(lambda_=0.25))
    assert _rel(dense, sub) <= 1e-10
    assert rs.largest_k == (8 + 6, 64)  # row(W₀) plus the adapter's rank (±D + Eᵢ: 3 + 3)


def test_joint_basis_grows_to_the_union_of_the_experts_directions():
    w0 = _base(8, 64, 5)
    g = torch.Generator().manual_seed(5)
    lora = [torch.randn(8, 3, generator=g, dtype=F64) @ torch.randn(3, 64, generator=g, dtype=F64) / 30
            for _ in range(3)]
    basis = ord_subspace.RowBasis(w0)
    joint = ord_subspace.JointGenerators(basis, GeneratorMerge())
    for i, delta in enumerate([*lora, lora[1], 0.5 * lora[0] - lora[2]]):
        joint.add(ord_subspace.expert_rotation(basis, delta, 1e-3, 1e-2))
        assert joint.size == 8 + 3 * min(i + 1, 3)  # the same directions again add none
    p = joint.complement()
    torch.testing.assert_close(p.T @ p, torch.eye(9, dtype=F64), atol=1e-13, rtol=0)


@pytest.mark.parametrize("shape", [(12, 48), (24, 24), (40, 16)], ids=["wide", "square", "tall"])
@pytest.mark.parametrize("variant", ["G", "C"])
def test_reflections_are_kabsch_fixed_alike(shape, variant):
    """Expert 1 is W₀·H, H a reflection along W₀'s weakest row direction (singular value shrunk below
    the regulariser, so the Kabsch flip lands on it): both paths flip it back to a rotation near I."""
    d_out, d_in = shape
    w0 = _base(d_out, d_in, 7)
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    s[-1] = 1e-3 * s[-1]
    w0 = (u * s) @ vh
    h = torch.eye(d_in, dtype=F64) - 2 * torch.outer(vh[-1], vh[-1])
    experts = [w0 @ h, *_experts(w0, 2, 7)]
    dense, sub, (rd, rs) = _both(w0, experts, OrthoMergeParams(variant=variant, lambda_=1 / 3))
    assert _rel(dense, sub) <= 1e-10
    assert rs.fallback == [] and rs.subspace == 1
    r, _, sigma = procrustes_generator(w0, experts[0], 1e-3, 1e-2)
    assert torch.linalg.det(r) > 0 and float(sigma) > 1.9


def test_a_flip_off_the_subspace_takes_the_dense_path_and_says_so():
    """W₀ = [A, 0], expert W₀·H with H reflecting A's strongest direction: the smallest singular value of
    W₀ᵀT + εI is ε itself, off the subspace, where the dense path flips an arbitrary axis. The subspace
    path gives way to the dense one for the matrix (same bytes) and the report names it."""
    a = _base(6, 10, 8)
    w0 = torch.cat([a, torch.zeros(6, 14, dtype=F64)], dim=1)
    _, _, vh = torch.linalg.svd(w0, full_matrices=False)
    h = torch.eye(24, dtype=F64) - 2 * torch.outer(vh[0], vh[0])
    experts = [w0 @ h, w0 + 0.01]
    report = DecoupleReport()
    dense = decouple_merge(w0, experts, OrthoMergeParams(), path="dense", out_dtype=F64)
    auto = decouple_merge(w0, experts, OrthoMergeParams(), name="x.weight", report=report, out_dtype=F64)
    assert torch.equal(dense, auto)
    assert report.fallback == ["x.weight"] and report.subspace == 0 and report.clamped


def test_cancelling_generators_give_the_identity_on_both_paths():
    """W₀ with orthonormal rows; experts W₀·R and W₀·Rᵀ (R rotating inside row(W₀)): generators ±Q."""
    g = torch.Generator().manual_seed(9)
    o = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64)).Q
    w0 = o[:10]
    a = torch.randn(10, 10, generator=g, dtype=F64)
    rot_small = cayley(0.2 * (a - a.T))
    r = o.T @ torch.block_diag(rot_small, torch.eye(30, dtype=F64)) @ o
    experts = [w0 @ r, w0 @ r.T]
    params = OrthoMergeParams(lambda_=0.5)
    dense, sub, (rd, rs) = _both(w0, experts, params)
    assert rd.cancelled == rs.cancelled == [""]
    assert _rel(dense, sub) <= 1e-10
    # identity rotation: W = W₀ + λ·Σρᵢ, ρᵢ = Wᵢ − W₀Rᵢ with each expert's own rotation
    rotations = [procrustes_generator(w0, e, 1e-3, 1e-2)[0] for e in experts]
    expected = w0 + 0.5 * sum(e - w0 @ ri for e, ri in zip(experts, rotations, strict=True))
    torch.testing.assert_close(sub, expected, atol=1e-10, rtol=0)
    assert _rel(w0 @ rotations[0], w0) > 1e-2  # each expert alone does rotate


@pytest.mark.parametrize(
    "shape, kind, variant",
    [((300, 1200), "full", "G"), ((96, 600), "full", "C"), ((96, 600), "lora", "G"), ((96, 600), "lora", "C")],
)
def test_subspace_fp32_is_within_1e_5_of_the_exact_result(monkeypatch, shape, kind, variant):
    """d_in > 512: both paths work in fp32 (the 300 × 1200 case's k × k polar factor too: k = 600). The
    reference is the dense path in fp64 throughout. Today's dense fp32 result is itself 1e-6 … 2e-4 from
    it (ε = 1e-3 makes W₀ᵀT + εI ill-conditioned); the subspace path is no further, and within 1e-5."""
    w0 = _base(*shape, 10).float()
    experts = [e.float() for e in _experts(w0.double(), 2, 10, kind=kind, scale=0.05)]
    params = OrthoMergeParams(variant=variant, lambda_=0.5)
    dense, sub, (_, rs) = _both(w0, experts, params, dtype=torch.float32)
    assert rs.subspace == 1 and sub.dtype == torch.float32
    from streammerge.methods import orthogonal, orthomerge

    for module in (orthogonal, orthomerge, ord_subspace):
        monkeypatch.setattr(module, "work_dtype", lambda n: F64)
    exact = decouple_merge(w0.double(), [e.double() for e in experts], params, path="dense", out_dtype=F64)
    assert _rel(exact, sub.double()) <= 1e-5
    assert _rel(exact, sub.double()) <= _rel(exact, dense.double())


def test_auto_chooses_by_shape_and_eps():
    choose = ord_subspace.choose_path
    assert choose((1024, 4096), 1e-3) == choose((4096, 14336), 1e-3) == choose((64, 128), 1e-3) == "subspace"
    assert choose((4096, 4096), 1e-3) == choose((14336, 4096), 1e-3) == choose((65, 128), 1e-3) == "dense"
    assert choose((1024, 4096), 0.0) == "dense"  # ε = 0: the dense polar factor is not unique off the subspace
    with pytest.raises(ValueError, match="procrustes_eps > 0"):
        choose((8, 64), 0.0, "subspace")


def test_plan_working_set_uses_the_subspace_path():
    """down_proj of Llama-3-8B (4096 × 14336): the dense path's d_in² matrices vs the subspace path's."""
    dense = ord_subspace.working_set_elements(4096, 14336, 2, "dense")
    sub = ord_subspace.working_set_elements(4096, 14336, 2, "subspace")
    assert dense == 7 * 14336**2 + 4 * 4096 * 14336
    # k = 8192, K = 12288: 5k² + 3K² + (d_in − m)(K − m) + 5·d_out·d_in
    assert sub == 5 * 8192**2 + 3 * 12288**2 + 10240 * 8192 + 5 * 4096 * 14336
    # a very wide matrix: a few d_out × d_in, nothing of order d_in²
    assert ord_subspace.working_set_elements(256, 8192, 2, "subspace") < 9 * 256 * 8192
    assert ord_subspace.working_set_elements(256, 8192, 2, "dense") > 7 * 32 * 256 * 8192
    ws = METHOD.working_set("model.layers.0.mlp.down_proj.weight", (4096, 14336), 2)
    assert ws == 4 * sub + 2 * 4 * 4096 * 14336
    # a residual-only tensor: six copies plus the writer's queue
    assert METHOD.working_set("model.embed_tokens.weight", (256, 64), 2) == 8 * 4 * 256 * 64


def test_end_to_end_merge_reports_the_path_and_matches_dense(tmp_path):
    """Tiny Llama: k/v projections (32 × 64) and down_proj (64 × 128) take the subspace path, q/o/gate/up
    the dense one; the merged tensors equal ``decouple_merge`` by the dense path."""
    experts = [FIXTURES / "tiny-llama-fp32-a", FIXTURES / "tiny-llama-fp32-b"]
    cfg = {"merge_method": "orthomerge", "base_model": str(FIXTURES / "tiny-llama-fp32-base"),
           "models": [{"model": str(m)} for m in experts], "parameters": {"lambda": 0.5}}
    result = streammerge.merge(cfg, tmp_path / "out")
    line = next(x for x in result.report if x.startswith("ORD Procrustes path"))
    # 2 layers × (k, v, down) by the subspace path; 2 × (q, o, gate, up) dense
    assert line == "ORD Procrustes path: 6 matrices by the subspace path (largest basis k = 128 of d_in = 128), " \
                   "8 by the dense path"
    base = load_folder(FIXTURES / "tiny-llama-fp32-base")
    loaded = [load_folder(e) for e in experts]
    out = load_folder(tmp_path / "out")
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        ref = decouple_merge(base[name], [x[name] for x in loaded], OrthoMergeParams(lambda_=0.5), path="dense")
        torch.testing.assert_close(out[name], ref, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("d, n, rank", [(12, 40, 12), (12, 40, 5), (12, 8, 8), (12, 8, 3), (6, 40, 0)])
def test_row_space_spans_the_rows_and_reveals_the_rank(d, n, rank):
    """_row_space (thin QR, triangular rank test, SVD of the small factor only when short of rank) against
    the SVD's answer: an orthonormal V of rank(x) columns with x·V·Vᵀ = x, and X·V returned with it."""
    g = torch.Generator().manual_seed(d * n + rank)
    x = torch.randn(d, rank, generator=g, dtype=F64) @ torch.randn(rank, n, generator=g, dtype=F64)
    s = torch.linalg.svdvals(x)
    tol = (float(s[0]) if rank else 1.0) * max(x.shape) * torch.finfo(F64).eps
    v, xv, r = ord_subspace._row_space(x, lambda s_max: tol)
    assert r == rank == int((s > tol).sum())
    assert v.shape == (n, rank) and xv.shape == (d, rank)
    torch.testing.assert_close(v.T @ v, torch.eye(rank, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(x @ v @ v.T, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(xv, x @ v, atol=1e-12, rtol=0)
    v2, _, r2 = ord_subspace._row_space(x, lambda s_max: tol, limit=2)  # the 2 strongest directions
    top = torch.linalg.svd(x).Vh[: min(2, rank)].T
    assert r2 == min(2, rank)
    torch.testing.assert_close(v2 @ v2.T, top @ top.T, atol=1e-10, rtol=0)


def test_sigma_min_estimate_is_an_upper_bound_and_zero_for_singular_factors():
    g = torch.Generator().manual_seed(5)
    r = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=F64)).R
    s_min = float(torch.linalg.svdvals(r)[-1])
    est = ord_subspace._sigma_min_estimate(r)
    assert s_min * (1 - 1e-9) <= est < 2 * s_min
    r[7, 7] = 0.0
    assert not ord_subspace._sigma_min_estimate(r) > 0  # 0 or nan: the rank test then takes the SVD
