"""OTA + FFG against the plain stacked formulas of REFERENCE §3, whole and in chunks; the global density
calibration; the rule for tensors without second moments; wiring to real sidecars."""

import math

import pytest
import torch
from conftest import FIXTURES

import streammerge.sidecar as sidecar
from streammerge.errors import ConfigError, StreamMergeError
from streammerge.methods.base import ChunkInputs, ExpertInput
from streammerge.methods.ota import (
    BIAS_CORRECTION,
    SECOND_MOMENT,
    OtaModelParams,
    OtaParams,
    OtaRun,
    SaliencyHistogram,
    bias_correction_factor,
    ffg_mask,
    merge,
    ota_weight,
    saliency,
)
from streammerge.planner import chunk_ranges


def _problem(n=3, shape=(40, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]
    vs = [torch.exp(torch.randn(shape, generator=g) * 2 - 18) for _ in range(n)]
    return base, experts, vs


def _chunks(name, base, experts, vs, model_params, params, chunk=None, state=None, corrections=None):
    """ChunkInputs as the engine builds them: loaders per chunk, aux second moments (absent for v=None)."""
    shape = tuple(experts[0].shape)
    ranges = chunk_ranges(experts[0].numel(), chunk) if chunk else [(0, None)]
    for start, count in ranges:
        sl = (lambda t: t.reshape(-1)[start : start + count].clone()) if count is not None else (lambda t: t.clone())
        ex = []
        for i, (e, mp) in enumerate(zip(experts, model_params, strict=False)):
            aux = {}
            if vs[i] is not None:
                aux[SECOND_MOMENT] = lambda v=vs[i], sl=sl: sl(v)
            if corrections is not None:
                aux[BIAS_CORRECTION] = lambda c=corrections[i]: None if c is None else torch.tensor(c)
            ex.append(ExpertInput(lambda e=e, sl=sl: sl(e), mp, aux))
        yield ChunkInputs(name, shape, start, sl(base) if base is not None else None, ex, params, 0, run=state)


def _merge(base, experts, vs, model_params, params=None, chunk=None, state=None, name="model.layers.0.mlp.w", **kw):
    params = params or OtaParams()
    parts = [merge(x).reshape(-1) for x in _chunks(name, base, experts, vs, model_params, params, chunk, state, **kw)]
    return torch.cat(parts).reshape(experts[0].shape)


def _reference(base, experts, vs, cs, p=0.5, eps=1e-26, thresholds=None, fallback_to_base=True, corrections=None):
    """REFERENCE §3 on stacked tensors (N copies in memory: fine for a test)."""
    theta, v = torch.stack(experts).double(), torch.stack(vs).double()
    corr = torch.tensor(corrections or [1.0] * len(vs), dtype=torch.float64).reshape(-1, *[1] * experts[0].dim())
    w = torch.tensor(cs, dtype=torch.float64).reshape(corr.shape) * (v * corr) ** p + eps
    if base is None:
        return ((w * theta).sum(0) / w.sum(0)).float()
    tau = theta - base.double()
    m = torch.ones_like(tau, dtype=torch.bool)
    if thresholds is not None:
        for i, t in enumerate(thresholds):
            if t is not None:
                m[i] = v[i] * tau[i] ** 2 >= t
    wm = w * m
    merged = base.double() + (wm * tau).sum(0) / wm.sum(0)
    none_kept = ~m.any(0)
    fallback = base.double() if fallback_to_base else theta.mean(0)
    return torch.where(none_kept, fallback, merged).float(), m


def _between(base, expert, v, q):
    """A threshold at quantile q of the saliency, halfway between two neighbouring values (no entry sits on it,
    so fp32 and fp64 agree on every mask bit)."""
    s = (v.double() * (expert.double() - base.double()) ** 2).reshape(-1).sort().values
    k = int(q * (s.numel() - 1))
    return float((s[k] + s[k + 1]) / 2)


def test_weight_saliency_and_mask_formulas():
    g = torch.Generator().manual_seed(3)
    v, d = torch.rand(100, generator=g) * 1e-6, torch.randn(100, generator=g)
    for p in (0.5, 0.25, 1.0):
        torch.testing.assert_close(ota_weight(v, 2.5, p, 1e-9), 2.5 * v**p + 1e-9, rtol=1e-6, atol=0)
    torch.testing.assert_close(saliency(v, d), v * d * d, rtol=1e-6, atol=0)
    s = saliency(v, d)
    t = float(s.sort().values[70])
    assert torch.equal(ffg_mask(s, t), s >= t) and int(ffg_mask(s, t).sum()) == 30  # ties at T are kept
    assert bias_correction_factor(10, 0.9) == pytest.approx(1 / (1 - 0.9**10))


@pytest.mark.parametrize("chunk", [None, 256])
def test_ota_without_masks_matches_the_formula(chunk):
    base, experts, vs = _problem()
    cs = [1.0, 0.5, 2.0]
    got = _merge(base, experts, vs, [OtaModelParams(scaling_factor=c) for c in cs], chunk=chunk)
    want, _ = _reference(base, experts, vs, cs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the curvature weighting is not a plain mean
    assert (got - torch.stack(experts).mean(0)).abs().max() > 1e-3


def test_ota_power_and_epsilon():
    base, experts, vs = _problem(n=2)
    got = _merge(base, experts, vs, [OtaModelParams(), OtaModelParams()], OtaParams(power=0.25, epsilon=1e-8))
    want, _ = _reference(base, experts, vs, [1, 1], p=0.25, eps=1e-8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_base_is_the_weighted_mean_of_experts():
    _, experts, vs = _problem()
    got = _merge(None, experts, vs, [OtaModelParams(), OtaModelParams(scaling_factor=3.0), OtaModelParams()])
    torch.testing.assert_close(got, _reference(None, experts, vs, [1, 3, 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fallback_to_base", [True, False])
@pytest.mark.parametrize("chunk", [None, 128])
def test_ffg_masks_and_the_all_masked_fallback(fallback_to_base, chunk):
    base, experts, vs = _problem()
    thresholds = [_between(base, experts[i], vs[i], q) for i, q in enumerate([0.6, 0.3, 0.8])]
    mps = [OtaModelParams(threshold=t) for t in thresholds]
    run = OtaRun(3)
    params = OtaParams(fallback_to_base=fallback_to_base)
    got = _merge(base, experts, vs, mps, params, chunk=chunk, state=run)
    want, m = _reference(base, experts, vs, [1, 1, 1], thresholds=thresholds, fallback_to_base=fallback_to_base)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    none_kept = ~m.any(0)
    assert 0 < int(none_kept.sum()) == run.all_masked
    assert run.kept == [int(m[i].sum()) for i in range(3)] and run.seen == [base.numel()] * 3
    if fallback_to_base:
        assert torch.equal(got[none_kept], base[none_kept])
    lines = run.report()
    assert any(f"kept {int(m[0].sum()) / base.numel():.4%}" in line for line in lines)


def test_bias_correction_scales_weights_not_saliency():
    base, experts, vs = _problem(n=2)
    steps, beta2 = [234, 2611], 0.999
    factors = [bias_correction_factor(s, beta2) for s in steps]
    t = _between(base, experts[0], vs[0], 0.5)
    mps = [OtaModelParams(threshold=t), OtaModelParams()]
    got = _merge(base, experts, vs, mps, OtaParams(bias_correction=True), corrections=factors)
    want, _ = _reference(base, experts, vs, [1, 1], thresholds=[t, None], corrections=factors)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = _merge(base, experts, vs, mps, OtaParams(bias_correction=False), corrections=factors)
    assert not torch.allclose(got, plain)
    with pytest.raises(ConfigError, match="expert #1 has no step count or beta2"):
        _merge(base, experts, vs, mps, OtaParams(bias_correction=True), corrections=[factors[0], None])


def test_tensor_without_second_moment_falls_back_to_linear_and_is_reported():
    base, experts, vs = _problem()
    vs[1] = None
    cs = [1.0, 2.0, 0.5]
    run = OtaRun(3)
    params = [OtaModelParams(scaling_factor=c) for c in cs]
    got = _merge(base, experts, vs, params, chunk=200, state=run, name="lm_head.weight")
    want = base + sum(c * (e - base) for c, e in zip(cs, experts, strict=False)) / sum(cs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert run.missing == {"lm_head.weight": [1]}
    assert any("merged linearly: lm_head.weight" in line for line in run.report())
    with pytest.raises(ConfigError, match=r"no second moment for lm_head.weight .* #1"):
        _merge(
            base, experts, vs, [OtaModelParams()] * 3, OtaParams(missing_second_moment="error"), name="lm_head.weight"
        )


def test_bad_inputs_are_refused():
    base, experts, vs = _problem(n=2)
    with pytest.raises(ConfigError, match="no calibration ran"):
        _merge(base, experts, vs, [OtaModelParams(density=0.5), OtaModelParams()])
    with pytest.raises(ConfigError, match="need a base_model"):
        _merge(None, experts, vs, [OtaModelParams(threshold=1e-20), OtaModelParams()])
    with pytest.raises(StreamMergeError, match="shape"):
        _merge(base, experts, [vs[0], vs[1][:10]], [OtaModelParams()] * 2)
    bad = vs[0].clone()
    bad[3, 4] = float("nan")
    with pytest.raises(StreamMergeError, match="expert #0's second moment has negative, NaN"):
        _merge(base, experts, [bad, vs[1]], [OtaModelParams()] * 2)


PARAM_ERRORS = [
    (lambda: OtaModelParams(density=0.5, threshold=1e-20), "either density or threshold"),
    (lambda: OtaModelParams(density=0.0), "density must be a number in"),
    (lambda: OtaModelParams(density=1.5), "density must be a number in"),
    (lambda: OtaModelParams(threshold=-1.0), "threshold must be"),
    (lambda: OtaModelParams(scaling_factor=-1.0), "scaling_factor must be"),
    (lambda: OtaParams(epsilon=0.0), "epsilon must be"),
    (lambda: OtaParams(power=-0.5), "power must be"),
    (lambda: OtaParams(missing_second_moment="guess"), "missing_second_moment"),
]


@pytest.mark.parametrize("make, needle", PARAM_ERRORS)
def test_parameter_validation(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


# --- global density calibration ------------------------------------------------------------------------


def _model(seed=0, kind="lognormal"):
    """Several tensors of two experts with realistic (continuous, many-decade) saliency distributions."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t, shape in enumerate([(96, 64), (64, 200), (300,), (128, 128), (50, 70)]):
        base = torch.randn(shape, generator=g) * 0.02
        scale = 10.0 ** (t - 2)  # tensors differ in scale, so the threshold is truly global
        if kind == "lognormal":
            experts = [base + 1e-3 * scale * torch.randn(shape, generator=g) for _ in range(2)]
            vs = [torch.exp(torch.randn(shape, generator=g) * 1.5 - 22) * scale for _ in range(2)]
        else:  # narrow: saliency uniform within one octave, the hardest case for a histogram
            experts = [base + 1.0 for _ in range(2)]
            vs = [1 + torch.rand(shape, generator=g) for _ in range(2)]
        tensors[f"t{t}"] = (base, experts, vs)
    return tensors


@pytest.mark.parametrize("kind", ["lognormal", "narrow"])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_ffg_density_is_achieved_within_half_a_percent(kind, density):
    tensors = _model(kind=kind)
    mps = [OtaModelParams(density=density), OtaModelParams(density=1 - density / 2)]
    run = OtaRun(2)
    for name, (base, experts, vs) in tensors.items():
        for inputs in _chunks(name, base, experts, vs, mps, OtaParams(), chunk=1000):
            run.observe(inputs)
    thresholds = run.calibrate()
    for name, (base, experts, vs) in tensors.items():
        _merge(base, experts, vs, mps, chunk=1000, state=run, name=name)
    total = sum(b.numel() for b, _, _ in tensors.values())
    for i, want in enumerate([density, 1 - density / 2]):
        kept = sum(int((vs[i] * (ex[i] - b) ** 2 >= thresholds[i]).sum()) for b, ex, vs in tensors.values())
        assert run.kept[i] == kept and run.seen[i] == total  # the merge pass counts exactly
        assert abs(kept / total - want) <= 0.005, (i, kept / total, want)
    assert any(f"density {density:.4g} requested" in line for line in run.report())


def test_histogram_threshold_against_the_exact_quantile():
    g = torch.Generator().manual_seed(5)
    s = torch.exp(torch.randn(200_000, generator=g) * 4 - 40)
    h = SaliencyHistogram()
    for part in s.split(30_000):
        h.add(part)
    assert h.total == s.numel()
    for d in (0.01, 0.25, 0.5, 0.99):
        t = h.threshold(d)
        exact = float(s.sort(descending=True).values[int(d * s.numel()) - 1])
        assert abs(float((s >= t).float().mean()) - d) < 0.001
        assert math.isclose(t, exact, rel_tol=2e-3)  # within a few bins of 1/1024 octave
    assert h.threshold(1.0) is None


def test_density_must_be_one_value_for_the_whole_model():
    tensors = _model()
    run = OtaRun(2)
    for j, (name, (base, experts, vs)) in enumerate(tensors.items()):
        mps = [OtaModelParams(density=0.5 if j == 0 else 0.4), OtaModelParams()]
        inputs = next(_chunks(name, base, experts, vs, mps, OtaParams()))
        if j == 0:
            run.observe(inputs)
        else:
            with pytest.raises(ConfigError, match="one value for every tensor"):
                run.observe(inputs)
            break


def test_calibration_skips_tensors_merged_linearly():
    tensors = _model()
    mps = [OtaModelParams(density=0.5), OtaModelParams()]
    run = OtaRun(2)
    sizes = 0
    for name, (base, experts, vs) in tensors.items():
        if name == "t2":
            vs = [vs[0], None]  # expert 1 lacks v here: the tensor is merged linearly, outside the density
        else:
            sizes += base.numel()
        for inputs in _chunks(name, base, experts, vs, mps, OtaParams(), chunk=999):
            run.observe(inputs)
    assert run.histograms[0].total == sizes and run.histograms[1].total == 0


# --- with real sidecars ------------------------------------------------------------------------------


def test_merge_reads_second_moments_through_sidecar_get_flat(tmp_path):
    """The engine wiring: aux loaders are ``Sidecar.get_flat`` over chunk ranges; rank-1 and exact."""
    from safetensors.torch import load_file

    weights = load_file(FIXTURES / "tiny-trainer-checkpoint" / "model.safetensors")
    src = FIXTURES / "tiny-exp-avg-sq.safetensors"
    sidecar.convert(src, tmp_path / "exact.sc", rank="exact")
    sidecar.convert(src, tmp_path / "r1.sc", rank=1)
    g = torch.Generator().manual_seed(0)
    with sidecar.load(tmp_path / "exact.sc") as a, sidecar.load(tmp_path / "r1.sc") as b:
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
            base = weights[name]
            experts = [base + 1e-2 * torch.randn(base.shape, generator=g) for _ in range(2)]
            numel = base.numel()
            got = []
            for start, count in chunk_ranges(numel, 1000):
                ex = [
                    ExpertInput(
                        lambda e=e: e.reshape(-1)[start : start + count].clone(),
                        OtaModelParams(),
                        {SECOND_MOMENT: lambda sc=sc: sc.get_flat(name, start, count)},
                    )
                    for e, sc in zip(experts, (a, b), strict=False)
                ]
                chunk_base = base.reshape(-1)[start : start + count].clone()
                got.append(merge(ChunkInputs(name, tuple(base.shape), start, chunk_base, ex, OtaParams(), 0)))
            want, _ = _reference(base, experts, [a.get(name), b.get(name)], [1, 1])
            torch.testing.assert_close(torch.cat(got).reshape(base.shape), want, rtol=1e-5, atol=1e-6)
