"""Each method against a plain stacked-tensor formula (REFERENCE §2), whole and in chunks."""

import pytest
import torch

from streammerge.methods import METHODS
from streammerge.methods.base import ChunkInputs, ExpertInput
from streammerge.methods.dare import RNG_BLOCK, keep_mask
from streammerge.planner import chunk_ranges


def _experts(n=3, shape=(64, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def _run(method_name, base, experts, weights, densities=None, chunk=None, seed=0, **params):
    m = METHODS[method_name]
    p = m.params(**params)
    fields = m.model_params.__dataclass_fields__  # sce, ram: no per-model weight
    mp = [
        m.model_params(**({"weight": w} if "weight" in fields else {}), **({"density": d} if densities else {}))
        for w, d in zip(weights, densities or weights, strict=False)
    ]
    shape = tuple(experts[0].shape)

    def inputs(start, count, state):
        sl = (lambda t: t.reshape(-1)[start : start + count].clone()) if count is not None else (lambda t: t.clone())
        ex = [ExpertInput(lambda e=e: sl(e), q) for e, q in zip(experts, mp, strict=False)]
        return ChunkInputs(
            "model.layers.0.mlp.w", shape, start, sl(base) if base is not None else None, ex, p, seed, state
        )

    ranges = chunk_ranges(experts[0].numel(), chunk) if chunk else [(0, None)]

    def chunks(state=None):
        return (inputs(s, c, state) for s, c in ranges)

    state = m.prepare(chunks) if m.prepare else None
    return torch.cat([m.merge(x).reshape(-1) for x in chunks(state)]).reshape(shape)


def test_linear_formula():
    _, ex = _experts()
    w = [0.5, 0.3, 0.7]
    ref = sum(wi * e for wi, e in zip(w, ex, strict=False)) / sum(w)
    torch.testing.assert_close(_run("linear", None, ex, w), ref, rtol=1e-6, atol=1e-6)
    ref_unnorm = sum(wi * e for wi, e in zip(w, ex, strict=False))
    torch.testing.assert_close(_run("linear", None, ex, w, normalize=False), ref_unnorm, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_formula():
    base, ex = _experts()
    w = [1.0, -0.5, 0.25]
    ref = base + 0.7 * sum(wi * (e - base) for wi, e in zip(w, ex, strict=False))
    torch.testing.assert_close(_run("task_arithmetic", base, ex, w, lambda_=0.7), ref, rtol=1e-6, atol=1e-6)


def _topk_mask(tau, density):
    flat = tau.abs().reshape(-1)
    k = max(1, int(density * flat.numel()))
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, k).indices] = 1
    return mask.reshape(tau.shape)


def _ties_reference(base, experts, weights, densities, lam=1.0, normalize=True):
    taus = torch.stack([_topk_mask(e - base, d) * (e - base) for e, d in zip(experts, densities, strict=False)])
    w = torch.tensor(weights).reshape(-1, 1, 1)
    wt = taus * w
    majority = torch.where(wt.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(wt) == majority).float()
    delta = (wt * agree).sum(0)
    div = (w * agree).sum(0)
    div[div == 0] = 1
    if normalize:
        delta = delta / div
    return base + lam * delta


@pytest.mark.parametrize("chunk", [None, 1000])
def test_ties_formula(chunk):
    base, ex = _experts()
    w, d = [1.0, 0.6, 0.8], [0.2, 0.5, 0.9]
    ref = _ties_reference(base, ex, w, d, lam=0.9)
    got = _run("ties", base, ex, w, d, chunk=chunk, lambda_=0.9)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_ties_keeps_exactly_k_with_tied_magnitudes_in_row_major_order():
    base = torch.zeros(40)
    expert = torch.tensor([0.5, -0.5, 0.25, 0.5, -0.5] * 8)  # 16 entries of |0.5|, ties everywhere
    out = _run("ties", base, [expert], [1.0], [0.3], chunk=None)  # k = 12 of 16 tied maxima
    kept = (out != 0).nonzero().reshape(-1)
    top = (expert.abs() == 0.5).nonzero().reshape(-1)
    assert kept.tolist() == top[:12].tolist()
    # chunking (here 7-element chunks) must not change which ties are kept
    assert torch.equal(_run("ties", base, [expert], [1.0], [0.3], chunk=7), out)


def test_ties_l1_rescale_matches_formula():
    base, ex = _experts(n=2)
    d = [0.3, 0.6]
    got = _run("ties", base, ex, [1.0, 1.0], d, rescale=True)
    scaled = []
    for e, di in zip(ex, d, strict=False):
        tau = e - base
        kept = _topk_mask(tau, di) * tau
        scaled.append(base + kept * (tau.abs().sum() / kept.abs().sum()))
    ref = _ties_reference(base, scaled, [1.0, 1.0], [1.0, 1.0])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("mode", ["l1", "density"])
def test_dare_formula_with_its_seeded_masks(method, mode):
    shape = (3, RNG_BLOCK // 2 + 17)  # spans two RNG blocks
    base, ex = _experts(n=2, shape=shape)
    w, d = [1.0, 0.5], [0.4, 0.7]
    taus = []
    for i, (e, di) in enumerate(zip(ex, d, strict=False)):
        tau = e - base
        mask = keep_mask(7, "model.layers.0.mlp.w", i, 0, tau.numel(), di).reshape(shape)
        kept = tau * mask
        taus.append(kept * (tau.abs().sum() / kept.abs().sum()) if mode == "l1" else kept / di)
        assert abs(mask.float().mean().item() - di) < 0.01
    if method == "dare_linear":
        ref = base + sum(wi * t for wi, t in zip(w, taus, strict=False))
    else:
        ref = _ties_reference(base, [base + t for t in taus], w, [1.0, 1.0], normalize=False)
    got = _run(method, base, ex, w, d, seed=7, rescale_mode=mode)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    chunked = _run(method, base, ex, w, d, seed=7, rescale_mode=mode, chunk=RNG_BLOCK)
    assert torch.equal(chunked, got)


def test_dare_masks_depend_on_seed_and_tensor_not_order():
    a = keep_mask(1, "x", 0, 0, 5000, 0.5)
    assert torch.equal(a, keep_mask(1, "x", 0, 0, 5000, 0.5))
    assert not torch.equal(a, keep_mask(2, "x", 0, 0, 5000, 0.5))
    assert not torch.equal(a, keep_mask(1, "y", 0, 0, 5000, 0.5))
    assert not torch.equal(a, keep_mask(1, "x", 1, 0, 5000, 0.5))


def test_all_methods_are_chunk_invariant():
    base, ex = _experts(shape=(32, 33))
    for name, m in METHODS.items():
        if not m.elementwise or name.startswith("dare") or name in ("ota", "passthrough"):
            continue  # DARE: RNG blocks (test above); OTA needs second moments (tests/test_ota.py); passthrough below
        if name in ("slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap"):
            continue  # own parameters and model counts: tests/test_geometric_methods.py
        if name.startswith("della"):
            continue  # DELLA: RNG blocks and row ranks, tests/test_sparse_methods.py
        kw = {"densities": [0.5, 0.3, 0.8]} if "density" in m.model_params.__dataclass_fields__ else {}
        b = None if m.base_model == "unused" else base
        whole = _run(name, b, ex, [1.0, 0.5, 0.7], **kw)
        chunked = _run(name, b, ex, [1.0, 0.5, 0.7], chunk=100, **kw)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_largest_equals_kthvalue(dtype):
    from streammerge.methods.ties import kth_largest

    g = torch.Generator().manual_seed(3)
    x = (
        (torch.randn(100_003, generator=g) * 10.0 ** torch.randint(-20, 20, (100_003,), generator=g))
        .to(dtype)
        .float()
        .abs()
    )
    x[:50] = 0.0
    for k in [1, 2, 77, 50_000, 100_002, 100_003]:
        assert kth_largest(x, k) == float(x.kthvalue(x.numel() - k + 1).values), k


@pytest.mark.parametrize("scale", [None, 0.5, -2.0])
@pytest.mark.parametrize("chunk", [None, 100])
def test_passthrough_formula(scale, chunk):
    """mergekit's passthrough: the one model's tensor, times ``scale`` when it is set; the same in chunks."""
    from streammerge.methods.passthrough import PassthroughModelParams

    _, (x,) = _experts(n=1, shape=(32, 33))
    m, params = METHODS["passthrough"], PassthroughModelParams(scale)
    ranges = chunk_ranges(x.numel(), chunk) if chunk else [(0, None)]
    out = []
    for start, count in ranges:
        part = x.reshape(-1)[start : start + count] if count is not None else x
        stored = part.to(torch.bfloat16)  # the stored-dtype path: bits as stored, cast once by the engine
        ex = ExpertInput(lambda p=part: p.clone(), params, load_stored=lambda s=stored: s.clone())
        got = m.merge(ChunkInputs("model.layers.0.mlp.w", (32, 33), start, None, [ex], m.params(), 0))
        want = stored if scale is None else part * scale
        assert torch.equal(got, want)
        out.append(got.reshape(-1).float())
    whole = torch.cat(out).reshape(x.shape)
    ref = x.to(torch.bfloat16).float() if scale is None else x * scale
    torch.testing.assert_close(whole, ref, rtol=0, atol=0)
