"""slerp, nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion: against mergekit 0.1.5's own
method code on the same tensors (edge cases included), chunk-size independence, and bad input."""

import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import FIXTURES, load_folder, save_folder, snapshot

import streammerge
from streammerge.cli import main
from streammerge.errors import ConfigError
from streammerge.methods import METHODS, group_sums
from streammerge.methods.base import ChunkInputs, ExpertInput
from streammerge.planner import chunk_ranges

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_base = pytest.importorskip("mergekit.merge_methods.base")

F32 = {k: str(FIXTURES / f"tiny-llama-fp32-{k}") for k in ("base", "a", "b")}
BF16 = {k: str(FIXTURES / f"tiny-llama-{k}") for k in ("base", "math", "code")}


def ours(name, base, experts, params=None, model_params=None, chunk=None, tensor="model.layers.0.mlp.w"):
    """Run streammerge's method on whole tensors or in ``chunk``-element chunks, as the engine does."""
    m = METHODS[name]
    p = m.params(**(params or {}))
    mp = [m.model_params(**(model_params[i] if model_params else {})) for i in range(len(experts))]
    shape = tuple(experts[0].shape)
    elementwise_chunk = (chunk or max(1, experts[0].numel())) if m.elementwise else None  # the engine's flat chunks

    def inputs(start, count, state):
        sl = (lambda t: t.reshape(-1)[start : start + count].clone()) if count is not None else (lambda t: t.clone())
        ex = [ExpertInput(lambda e=e: sl(e), q) for e, q in zip(experts, mp, strict=True)]
        return ChunkInputs(tensor, shape, start, sl(base) if base is not None else None, ex, p, 0, state)

    ranges = chunk_ranges(experts[0].numel(), elementwise_chunk) if elementwise_chunk else [(0, None)]

    def chunks(state=None):
        return (inputs(s, c, state) for s, c in ranges)

    state = m.prepare(chunks) if m.prepare else None
    return torch.cat([m.merge(x).reshape(-1) for x in chunks(state)]).reshape(shape)


def theirs(name, base, experts, parameters=None):
    """mergekit 0.1.5's method on the same tensors (base first, as its graph adapter orders them)."""
    tensors = ([base] if base is not None else []) + list(experts)
    group = mk_base.TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None, name="w")
    return mk_registry.get(name)([group], parameters=parameters or {})[0]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# (method, base, experts, our params, our per-model params, mergekit parameters)
def _cases():
    b = randn(24, 40, seed=1)
    x, y, z = (b + 0.05 * randn(24, 40, seed=s) for s in (2, 3, 4))
    v = randn(37, seed=5)
    t3 = randn(3, 5, 7, seed=6)
    w2 = [{"weight": 0.3}, {"weight": 0.9}]
    cases = {
        "slerp": ("slerp", b, [x], {"t": 0.3}, None, {"t": 0.3}),
        "slerp_t0": ("slerp", b, [x], {"t": 0.0}, None, {"t": 0.0}),
        "slerp_t1": ("slerp", b, [x], {"t": 1.0}, None, {"t": 1.0}),
        "slerp_orthogonal": ("slerp", torch.eye(8)[0], [torch.eye(8)[1] * 3], {"t": 0.4}, None, {"t": 0.4}),
        "slerp_colinear": ("slerp", b, [2 * b], {"t": 0.6}, None, {"t": 0.6}),
        "slerp_antipodal": ("slerp", b, [-b], {"t": 0.6}, None, {"t": 0.6}),
        "slerp_zero_base": ("slerp", torch.zeros(24, 40), [x], {"t": 0.5}, None, {"t": 0.5}),
        "slerp_1d": ("slerp", v, [v + randn(37, seed=7)], {"t": 0.25}, None, {"t": 0.25}),
        "nearswap": ("nearswap", b, [x], {"t": 0.03}, None, {"t": 0.03}),
        "nearswap_identical": ("nearswap", b, [b.clone()], {"t": 0.001}, None, {"t": 0.001}),
        "nearswap_large_t": ("nearswap", b, [x], {"t": 5.0}, None, {"t": 5.0}),
        "model_stock": ("model_stock", b, [x, y], {}, None, {}),
        "model_stock_3": ("model_stock", b, [x, y, z], {}, None, {}),
        "model_stock_filter_wise": ("model_stock", b, [x, y, z], {"filter_wise": True}, None, {"filter_wise": True}),
        "model_stock_filter_wise_1d": ("model_stock", v, [v + 0.1 * randn(37, seed=s) for s in (8, 9)],
                                       {"filter_wise": True}, None, {"filter_wise": True}),
        "model_stock_3d_filter_wise": ("model_stock", t3, [t3 + 0.1 * randn(3, 5, 7, seed=s) for s in (8, 9)],
                                       {"filter_wise": True}, None, {"filter_wise": True}),
        "model_stock_singular": ("model_stock", b, [b + (x - b), b - (x - b)], {}, None, {}),
        "arcee_fusion": ("arcee_fusion", b, [x], {}, None, {}),
        "arcee_fusion_1d": ("arcee_fusion", v, [v + 0.3 * randn(37, seed=10)], {}, None, {}),
        "arcee_fusion_3d": ("arcee_fusion", t3, [t3 + 0.3 * randn(3, 5, 7, seed=11)], {}, None, {}),
        "karcher_2": ("karcher", None, [x, y], {}, None, {}),
        "karcher_3": ("karcher", None, [randn(24, 40, seed=s) + 0.3 * b for s in (20, 21, 22)], {}, None, {}),
        "karcher_zero_model": ("karcher", None, [x, torch.zeros_like(x), y], {}, None, {}),
        "karcher_all_zero": ("karcher", None, [torch.zeros(5, 3), torch.zeros(5, 3)], {}, None, {}),
        "karcher_max_iter_0": ("karcher", None, [randn(24, 40, seed=s) for s in (23, 24)], {"max_iter": 0}, None,
                               {"max_iter": 0}),
        "karcher_tol": ("karcher", None, [x, y, z], {"tol": 1e-2}, None, {"tol": 1e-2}),
        "karcher_1": ("karcher", None, [x], {}, None, {}),
        "multislerp": ("multislerp", b, [x, y], {}, w2, {"weight": [0.3, 0.9]}),
        "multislerp_no_base": ("multislerp", None, [x, y, z], {}, [*w2, {"weight": 0.5}],
                               {"weight": [0.3, 0.9, 0.5]}),
        "multislerp_unnormalized": ("multislerp", b, [x, y], {"normalize_weights": False}, w2,
                                    {"weight": [0.3, 0.9], "normalize_weights": False}),
        "multislerp_1": ("multislerp", b, [x], {}, w2[:1], {"weight": [0.3]}),
        # exactly opposite task vectors with equal weights: mergekit's two-model linear fallback
        "multislerp_antipodal_two": ("multislerp", torch.zeros(24, 40), [x, -x], {}, [{"weight": 1.0}] * 2,
                                     {"weight": [1.0, 1.0]}),
        "multislerp_1d": ("multislerp", v, [v + randn(37, seed=s) for s in (12, 13)], {}, w2, {"weight": [0.3, 0.9]}),
    }
    for flatten in (True, False):
        for row_wise in (True, False):
            p = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
            for label, base, ex in (("2d", b, [x, y]), ("3d", t3, [t3 + randn(3, 5, 7, seed=s) for s in (14, 15)]),
                                    ("1d", v, [v + randn(37, seed=s) for s in (16, 17)]), ("no_base", None, [x, y])):
                cases[f"nuslerp_{label}_flatten{flatten}_rowwise{row_wise}"] = (
                    "nuslerp", base, ex, p, w2, {**p, "weight": [0.3, 0.9]})
    colinear = x.clone()
    colinear[3] = b[3] + 2.5 * (y[3] - b[3])  # one row colinear with expert y's row: the linear branch
    cases["nuslerp_colinear_row"] = ("nuslerp", b, [colinear, y], {"nuslerp_flatten": False}, w2,
                                     {"nuslerp_flatten": False, "weight": [0.3, 0.9]})
    cases["nuslerp_zero_weights"] = ("nuslerp", b, [x, y], {}, [{"weight": 0.5}, {"weight": -0.5}],
                                     {"weight": [0.5, -0.5]})
    cases["nuslerp_extrapolate"] = ("nuslerp", b, [x, y], {}, [{"weight": -0.5}, {"weight": 1.5}],
                                    {"weight": [-0.5, 1.5]})
    return cases


CASES = _cases()


# Vectors of 3 elements (dim 0 of a (3, 5, 7) tensor) at small angles: sin Ω divides, so fp32 rounding of
# the dot products is amplified past 1e-6 in both tools. There the test asks that streammerge be at least
# as close as mergekit to mergekit's own code run in fp64.
ILL_CONDITIONED = {"nuslerp_3d_flattenFalse_rowwiseTrue"}


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensor_as_mergekit_fp32(case):
    name, base, experts, params, model_params, mk_params = CASES[case]
    expected = theirs(name, base, experts, mk_params)
    got = ours(name, base, experts, params, model_params)
    if case in ILL_CONDITIONED:
        exact = theirs(name, base.double(), [e.double() for e in experts], mk_params)
        assert (got.double() - exact).abs().max() <= (expected.double() - exact).abs().max()
        return
    close(got, expected)


@pytest.mark.parametrize("case", [c for c in CASES if METHODS[CASES[c][0]].elementwise])
def test_result_does_not_depend_on_chunking(case, monkeypatch):
    """Whole-tensor statistics are summed in fixed units: any chunk size gives the same bits (units shrunk
    to 64 elements so chunks end inside units and rows)."""
    monkeypatch.setattr(group_sums, "UNIT", 64)
    name, base, experts, params, model_params, _ = CASES[case]
    whole = ours(name, base, experts, params, model_params)
    for chunk in (1, 100, 777):
        assert torch.equal(ours(name, base, experts, params, model_params, chunk=chunk), whole), chunk


def test_group_sums_equal_plain_sums_for_any_chunking(monkeypatch):
    monkeypatch.setattr(group_sums, "UNIT", 64)
    for shape in [(7,), (300,), (5, 30), (5, 100), (3, 4, 50), (1, 1000), (10, 7)]:
        x = randn(*shape).double()
        for grouping in ("all", "rows", "cols"):
            r, w = group_sums.group_layout(shape, grouping)
            plain = {"all": x.sum().reshape(1), "rows": x.reshape(r, w).sum(1), "cols": x.reshape(r, w).sum(0)}
            first = None
            for chunk in (1, 13, 64, 100, 10**6):
                s = group_sums.GroupSums(shape, grouping, torch.device("cpu"))
                for start in range(0, x.numel(), chunk):
                    s.add(start, x.reshape(-1)[start : start + chunk])
                first = s.result() if first is None else first
                assert torch.equal(s.result(), first), (shape, grouping, chunk)
            torch.testing.assert_close(first, plain[grouping], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_torch_row_sums_do_not_depend_on_the_batch_of_rows(threads):
    """GroupSums relies on this: a row of at most UNIT elements summed with ``view(m, L).sum(1)`` has the
    same bits whatever m (how many units a chunk holds) and the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for length in (group_sums.UNIT, 1100, 7, 4097):
            x = randn(300 * length, seed=length)
            alone = torch.stack([x[i * length : (i + 1) * length].view(1, -1).sum(1)[0] for i in range(300)])
            for m in (1, 2, 3, 17, 300):
                for first in sorted({0, min(1, 300 - m), 300 - m}):
                    rows = x[first * length : (first + m) * length].view(m, length).sum(1)
                    assert torch.equal(rows, alone[first : first + m]), (length, m, first)
    finally:
        torch.set_num_threads(before)


def test_bf16_slerp_within_one_bf16_ulp_of_mergekit():
    """bf16 inputs: both compute in fp32 and round once; the fp64 dot here can move a coefficient by an
    fp32 ulp, which flips a bf16 rounding at a few elements: at most one bf16 ulp apart."""
    b = randn(64, 48, seed=1).bfloat16()
    x = (b.float() + 0.05 * randn(64, 48, seed=2)).bfloat16()
    expected = theirs("slerp", b, [x], {"t": 0.35})
    got = ours("slerp", b.float(), [x.float()], {"t": 0.35}).bfloat16()
    diff = (got.float() - expected.float()).abs()
    ulp = expected.float().abs().clamp(min=1e-30) * 2**-7
    assert bool((diff <= ulp).all()) and (diff > 0).float().mean() < 0.01


def test_multislerp_cancelling_models_are_refused():
    b = randn(6, 5)
    d = randn(6, 5, seed=3)
    experts = [b + d, b - d, b + d]
    with pytest.raises(ConfigError, match="multislerp.*zero"):
        ours("multislerp", b, experts, {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])


def test_multislerp_tensor_no_expert_changed_is_the_base():
    """Every task vector exactly zero (a layer no expert trained): the base's bytes, where mergekit 0.1.5
    raises "nearly antipodal"; a tensor that did change still merges, and cancelling ones are still refused."""
    b = randn(6, 5)
    got = ours("multislerp", b, [b.clone(), b.clone(), b.clone()], {}, [{"weight": 1.0}] * 3)
    assert torch.equal(got, b)
    with pytest.raises(ValueError, match="antipodal"):
        theirs("multislerp", b, [b.clone(), b.clone(), b.clone()], {"weight": [1.0, 1.0, 1.0]})
    moved = b.clone()
    moved[0, 0] += 1.0  # one element changed in one expert: a real merge again, mergekit's result
    close(ours("multislerp", b, [moved, b.clone(), b.clone()], {}, [{"weight": 1.0}] * 3),
          theirs("multislerp", b, [moved, b.clone(), b.clone()], {"weight": [1.0, 1.0, 1.0]}))


def test_arcee_fusion_quantiles_are_exact_sorted_elements():
    from streammerge.methods.arcee_fusion import kth_smallest

    x = torch.cat([randn(5000), -randn(3000).abs(), torch.zeros(10), torch.full((50,), 0.5)])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    ks = [0, 1, 2500, 4000, 8059, x.numel() - 1]
    assert kth_smallest(x, ks) == [float(torch.sort(x).values[k]) for k in ks]
    for y in (-randn(4000).abs() - 1, torch.full((300,), -2.5), x[:1]):  # all negative, all equal, one element
        ks = sorted({0, y.numel() // 4, y.numel() // 2, y.numel() - 1})
        assert kth_smallest(y, ks) == [float(torch.sort(y).values[k]) for k in ks]


# --- through the engine, against mergekit's own merge of the fixtures -----------------------------------


def _mergekit(cfg, out):
    config = pytest.importorskip("mergekit.config").MergeConfiguration.model_validate(cfg)
    options = pytest.importorskip("mergekit.options").MergeOptions(copy_tokenizer=False, lazy_unpickle=False,
                                                                   quiet=True)
    pytest.importorskip("mergekit.merge").run_merge(config, str(out), options=options)
    return load_folder(out)


def _pair(method, params, base=F32["base"], other=F32["a"], dtype="float32"):
    return {"merge_method": method, "base_model": base, "models": [{"model": base}, {"model": other}],
            "parameters": params, "dtype": dtype}


def _two(method, params, base=F32["base"]):
    weights = [{"parameters": {"weight": w}} if method != "model_stock" else {} for w in (0.3, 0.6)]
    cfg = {"merge_method": method, "models": [{"model": F32["a"], **weights[0]}, {"model": F32["b"], **weights[1]}],
           "parameters": params, "dtype": "float32"}
    if base:
        cfg["base_model"] = base
    return cfg


CONFIGS = {
    "slerp_t_gradient": _pair("slerp", {"t": [0.1, 0.9]}),
    "slerp_t_filters": _pair("slerp", {"t": [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": 0.8},
                                             {"value": 0.5}]}),
    "nearswap": _pair("nearswap", {"t": 0.01}),
    "nuslerp": _two("nuslerp", {}),
    "nuslerp_rows_no_base": _two("nuslerp", {"nuslerp_flatten": False}, base=None),
    "nuslerp_row_wise": _two("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": _two("multislerp", {}),
    "model_stock": _two("model_stock", {}),
    "model_stock_filter_wise": _two("model_stock", {"filter_wise": True}),
    "karcher": {"merge_method": "karcher", "models": [{"model": F32[k]} for k in ("a", "b", "base")],
                "dtype": "float32"},
    "arcee_fusion": _pair("arcee_fusion", {}),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_same_model_as_mergekit(tmp_path, case):
    cfg = CONFIGS[case]
    expected = _mergekit(cfg, tmp_path / "mergekit")
    streammerge.merge(cfg, tmp_path / "ours", device="cpu")
    got = load_folder(tmp_path / "ours")
    assert set(got) == set(expected)
    for name, t in expected.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-6, msg=name)
        if cfg["merge_method"] in ("slerp", "nearswap", "arcee_fusion"):  # same fp32 expressions, same sums
            assert torch.equal(got[name], t), name


def test_bf16_model_slerp_one_ulp_from_mergekit(tmp_path):
    """bf16 checkpoints in, bf16 out (math in fp32 in both; ``dtype: bfloat16`` would make mergekit round
    the fixture's fp32-stored tensors to bf16 before the math, which streammerge never does)."""
    cfg = {**_pair("slerp", {"t": 0.4}, base=BF16["base"], other=BF16["math"]), "out_dtype": "bfloat16"}
    expected = _mergekit(cfg, tmp_path / "mergekit")
    streammerge.merge(cfg, tmp_path / "ours", device="cpu")
    got = load_folder(tmp_path / "ours")
    for name, t in expected.items():
        assert got[name].dtype == t.dtype == torch.bfloat16
        diff = (got[name].float() - t.float()).abs()
        assert bool((diff <= t.float().abs() * 2**-7).all()) and (diff > 0).float().mean() < 0.01, name


def _big_model(folder, seed):
    """A tensor of 1,130,000 elements (two chunks at --chunk-size 1048576, one at 8388608), rows of 1,100."""
    g = torch.Generator().manual_seed(seed)
    return save_folder(folder, {
        "model.layers.0.mlp.up_proj.weight": torch.randn(1030, 1100, generator=g) * 0.02,
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(1100, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(1030, 1100, generator=g) * 0.02,
    })


@pytest.mark.parametrize("method,params", [
    ("slerp", {"t": 0.3}),
    ("nuslerp", {"nuslerp_flatten": False}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("model_stock", {"filter_wise": True}),
    pytest.param("multislerp", {}, marks=pytest.mark.slow),
    pytest.param("karcher", {}, marks=pytest.mark.slow),
    pytest.param("model_stock", {}, marks=pytest.mark.slow),
    pytest.param("nearswap", {"t": 0.01}, marks=pytest.mark.slow),
])
def test_output_bytes_do_not_depend_on_chunk_size(tmp_path, method, params):
    base, a, b = (_big_model(tmp_path / n, s) for n, s in (("base", 0), ("a", 1), ("b", 2)))
    for m in (a, b):  # experts near the base
        t = load_folder(m)
        t = {k: load_folder(base)[k] + 0.1 * v for k, v in t.items()}
        save_folder(m, t)
    if method in ("slerp", "nearswap"):
        cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(base)}, {"model": str(a)}]}
    else:
        cfg = {"merge_method": method, "models": [{"model": str(a), "parameters": {"weight": 0.4}},
                                                  {"model": str(b), "parameters": {"weight": 0.6}}]}
        if method in ("karcher", "model_stock"):
            cfg["models"] = [{"model": str(a)}, {"model": str(b)}]
        if method != "karcher":
            cfg["base_model"] = str(base)
    cfg["parameters"] = params
    outs = []
    for chunk in (1 << 20, 1 << 23):
        out = tmp_path / f"out-{chunk}"
        streammerge.merge(cfg, out, device="cpu", chunk_elements=chunk)
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
    assert outs[0] == outs[1]


# --- bad input: one line naming the key, nothing written ------------------------------------------------

BAD = {
    "t_above_1": (_pair("slerp", {"t": 1.5}), "t must be in [0, 1], got 1.5"),
    "t_below_0": (_pair("slerp", {"t": -0.1}), "t must be in [0, 1]"),
    "t_gradient_past_1": (_pair("slerp", {"t": [0.0, 1.2]}), "t must be in [0, 1]"),
    "t_filter_past_1": (_pair("slerp", {"t": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]}),
                        "t must be in [0, 1], got 2.0"),
    "t_missing": (_pair("slerp", {}), "missing required parameter 't'"),
    "slerp_two_others": ({**_pair("slerp", {"t": 0.5}), "models": [{"model": F32["a"]}, {"model": F32["b"]}]},
                         "slerp merges exactly 1 model(s) besides base_model, got 2"),
    "slerp_no_base": ({"merge_method": "slerp", "models": [{"model": F32["a"]}, {"model": F32["b"]}],
                       "parameters": {"t": 0.5}}, "merge_method slerp needs base_model:"),
    "nearswap_two_others": ({**_pair("nearswap", {"t": 0.1}), "models": [{"model": F32["a"]}, {"model": F32["b"]}]},
                            "nearswap merges exactly 1 model(s)"),
    "nearswap_negative_t": (_pair("nearswap", {"t": -1.0}), "t must be a distance >= 0"),
    "arcee_fusion_two_others": ({**_pair("arcee_fusion", {}), "models": [{"model": F32["a"]}, {"model": F32["b"]}]},
                                "arcee_fusion merges exactly 1 model(s)"),
    "arcee_fusion_no_base": ({"merge_method": "arcee_fusion", "models": [{"model": F32["a"]}]},
                             "merge_method arcee_fusion needs base_model:"),
    "nuslerp_three": ({**_two("nuslerp", {}), "models": [{"model": F32[k], "parameters": {"weight": 1.0}}
                                                          for k in ("a", "b", "base")], "base_model": None},
                      "nuslerp merges exactly 2 model(s), got 3"),
    "nuslerp_weight_missing": ({**_two("nuslerp", {}), "models": [{"model": F32["a"]}, {"model": F32["b"]}]},
                               "missing required parameter 'weight'"),
    "model_stock_one": ({**_two("model_stock", {}), "models": [{"model": F32["a"]}]},
                        "model_stock merges at least 2 model(s) besides base_model, got 1"),
    "model_stock_no_base": ({**_two("model_stock", {}), "base_model": None},
                            "merge_method model_stock needs base_model:"),
    "karcher_unknown_parameter": ({"merge_method": "karcher", "models": [{"model": F32["a"]}],
                                   "parameters": {"t": 0.5}}, "unknown parameter 't' for karcher"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_key_and_writes_nothing(tmp_path, case):
    """Through the CLI (in-process; one case as its own process, as a user runs it)."""
    cfg, message = BAD[case]
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    before = snapshot(FIXTURES)
    if case == "t_gradient_past_1":
        r = subprocess.run([sys.executable, "-m", "streammerge.cli", "merge", str(path), str(out)],
                           capture_output=True, text=True)
        code = r.returncode
    else:
        r = CliRunner().invoke(main, ["merge", str(path), str(out)])
        code = r.exit_code
    assert code == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    assert snapshot(FIXTURES) == before
