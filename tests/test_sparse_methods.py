"""breadcrumbs, breadcrumbs_ties, della, della_linear, sce, ram, ramplus_tl: against mergekit 0.1.5 itself
(deterministic methods), against the formula (DELLA, random), independent of --chunk-size, bad input."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, load_folder, save_folder, snapshot
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.cli import main
from streammerge.errors import ConfigError
from streammerge.methods import della
from streammerge.methods.dare import uniforms

F32 = {k: str(FIXTURES / f"tiny-llama-fp32-{k}") for k in ("base", "a", "b")}
BF16 = {k: str(FIXTURES / f"tiny-llama-{k}") for k in ("base", "math", "code")}


@pytest.fixture(scope="module")
def third_expert(tmp_path_factory):
    """A third fp32 expert (the fixture's architecture): base + a fresh task vector, some entries exactly 0."""
    folder = tmp_path_factory.mktemp("c") / "tiny-llama-fp32-c"
    shutil.copytree(F32["a"], folder)
    g = torch.Generator().manual_seed(7)
    for shard in folder.glob("*.safetensors"):
        base = load_file(f"{F32['base']}/{shard.name}")
        out = {}
        for k, v in base.items():
            tau = 2e-3 * torch.randn(v.shape, generator=g)
            out[k] = v + tau * (torch.rand(v.shape, generator=g) > 0.2)
        save_file(out, shard, metadata={"format": "pt"})
    return str(folder)


def _cfg(method, models, base, global_params=None, **extra):
    cfg = {"merge_method": method, "base_model": base, "models": models, "parameters": global_params or {}}
    cfg.update(extra)
    return cfg


def _experts(paths, per_model):
    pairs = zip(paths, per_model, strict=True)
    return [{"model": p, "parameters": dict(pm)} if pm else {"model": p} for p, pm in pairs]


F32_CASES = {
    "breadcrumbs": ("breadcrumbs", [{"weight": 0.7, "density": 0.5, "gamma": 0.1},
                                    {"weight": [0.3, 0.9],
                                     "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]}],
                    {"lambda": 0.9}),
    "breadcrumbs_gamma_past_density": ("breadcrumbs", [{"weight": 1.0, "density": 0.95, "gamma": 0.1},
                                                       {"weight": 0.5, "density": 0.01, "gamma": 0.3}],
                                       {"normalize": True}),
    "breadcrumbs_rescale": ("breadcrumbs", [{"weight": 0.6}, {"weight": 0.4}],
                            {"density": 0.6, "gamma": 0.05, "rescale": True}),
    "breadcrumbs_ties": ("breadcrumbs_ties", [{"weight": 1.0, "density": 0.3, "gamma": 0.02},
                                              {"weight": -0.5, "density": 0.7}], {}),
    "breadcrumbs_ties_rescale_normalize": ("breadcrumbs_ties", [{"weight": 1.0}, {"weight": 0.5}],
                                           {"density": 0.4, "rescale": True, "normalize": True, "lambda": 1.3}),
    "della_density_1": ("della", [{"weight": 1.0}, {"weight": 0.5}], {}),  # density 1 draws nothing: comparable
    "sce": ("sce", [None, None], {}),
    "sce_select_topk": ("sce", [None, None], {"select_topk": 0.4}),
    "ram": ("ram", [None, None], {"epsilon": 1e-3}),
    "ramplus_tl": ("ramplus_tl", [None, None], {"epsilon": 1e-3, "r": 0.5, "alpha": 0.3}),
    "ramplus_tl_defaults": ("ramplus_tl", [None, None], {}),
}


def _mergekit(cfg: dict, out):
    mergekit_config = pytest.importorskip("mergekit.config")
    mergekit_merge = pytest.importorskip("mergekit.merge")
    mergekit_options = pytest.importorskip("mergekit.options")
    config = mergekit_config.MergeConfiguration.model_validate(cfg)
    options = mergekit_options.MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True)
    mergekit_merge.run_merge(config, str(out), options=options)
    return load_folder(out)


def _both(cfg, tmp_path):
    theirs = _mergekit(cfg, tmp_path / "mergekit")
    streammerge.merge(cfg, tmp_path / "ours")
    ours = load_folder(tmp_path / "ours")
    assert set(ours) == set(theirs)
    return ours, theirs


@pytest.mark.parametrize("case", list(F32_CASES))
def test_fp32_same_tensors_as_mergekit(tmp_path, case):
    method, per_model, params = F32_CASES[case]
    cfg = _cfg(method, _experts([F32["a"], F32["b"]], per_model), F32["base"], params, dtype="float32")
    ours, theirs = _both(cfg, tmp_path)
    base = load_folder(F32["base"])
    changed = 0
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype == torch.float32, name
        torch.testing.assert_close(ours[name], t, rtol=1e-6, atol=1e-6, msg=name)
        changed += int((t != base[name]).sum())
    assert changed > 1000  # the merge did something (a case that returned the base would pass vacuously)


@pytest.mark.parametrize("method,params", [("sce", {"select_topk": 0.5}), ("ram", {"epsilon": 2e-3}),
                                           ("ramplus_tl", {"epsilon": 1e-3, "r": 1.0, "alpha": 0.5})])
def test_three_experts_fp32_same_tensors_as_mergekit(tmp_path, third_expert, method, params):
    """Three experts: overlap counts of 3 (RAM divides by 3: not a power of two) and 3-way variances."""
    paths = [F32["a"], F32["b"], third_expert]
    ours, theirs = _both(_cfg(method, _experts(paths, [None] * 3), F32["base"], params, dtype="float32"), tmp_path)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,params", [("ram", {"epsilon": 1e-3}), ("ramplus_tl", {"epsilon": 1e-3})])
def test_ram_bf16_two_experts_bit_identical(tmp_path, method, params):
    """With two experts every divisor is 1 or 2 (exact), so the bf16 result is mergekit's to the bit."""
    cfg = _cfg(method, _experts([BF16["math"], BF16["code"]], [None, None]), BF16["base"], params,
               dtype="float32", out_dtype="bfloat16")
    ours, theirs = _both(cfg, tmp_path)
    for name, t in theirs.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], t), name


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.kthvalue(x.numel() - k + 1).values


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_bf16_breadcrumbs_differs_from_mergekit_only_at_cut_ties(tmp_path, method):
    """bf16 task vectors have many equal magnitudes. mergekit orders them with an unstable sort, streammerge
    by position: every element that differs must be one where some expert's |τ| equals one of its two cut
    values (the magnitudes at positions n − bot and n − bot − keep from the top); all others identical."""
    density, gamma = 0.5, 0.05
    cfg = _cfg(method, _experts([BF16["math"], BF16["code"]], [{"weight": 1.0}, {"weight": 0.6}]), BF16["base"],
               {"density": density, "gamma": gamma}, dtype="float32")
    ours, theirs = _both(cfg, tmp_path)
    base = load_folder(BF16["base"])
    experts = [load_folder(BF16[k]) for k in ("math", "code")]
    differing = 0
    for name, t in theirs.items():
        differs = ours[name] != t
        at_tie = torch.zeros_like(differs)
        for e in experts:
            tau = (e[name].float() - base[name].float()).abs().reshape(-1)
            n = tau.numel()
            keep = int(density * n)
            bottom = max(0, n - keep - int(gamma * n))
            for k in (n - bottom, n - bottom - keep):
                if k > 0:
                    at_tie |= (tau == _kth_largest(tau, k)).reshape(differs.shape)
        assert not (differs & ~at_tie).any(), name
        differing += int(differs.sum())
    assert differing < sum(t.numel() for t in theirs.values()) * 0.2


def _reference_sce(taus: torch.Tensor, topk: float) -> torch.Tensor:
    """SCE's merged task vector as mergekit writes it, whole tensor, with top-k ties taken by position."""
    if topk < 1:
        var = torch.var(taus, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        mask = torch.zeros(var.numel())
        mask[torch.sort(-var.reshape(-1), stable=True).indices[:k]] = 1
        taus = taus * mask.reshape(var.shape)
    sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    erase = (taus.sign() == sign).float()
    w = taus.square().reshape(len(taus), -1).mean(1)
    w = w / w.sum() if w.sum() >= 1e-6 else torch.full_like(w, 1 / len(w))
    w = (w.reshape(-1, *[1] * (taus.dim() - 1)) * erase)
    return (taus * w).sum(0) / w.sum(0).clamp(min=1e-6)


def test_bf16_sce_matches_formula_and_differs_from_mergekit_only_through_variance_ties(tmp_path):
    """SCE on bf16: many variances equal the top-k threshold. streammerge keeps those in row-major order
    and equals the formula with that rule (fp32 output, 1e-6); mergekit's topk picks among them
    arbitrarily, so the kept sets differ only at tied elements, and the weights wᵢ (sums of τᵢ² over
    the kept set) move a little: values kept by both are weighted means of the same τᵢ, within 5 % of
    their spread, not equal to the bit."""
    cfg = _cfg("sce", _experts([BF16["math"], BF16["code"]], [None, None]), BF16["base"], {"select_topk": 0.4},
               dtype="float32")
    ours, theirs = _both(cfg, tmp_path)
    base = load_folder(BF16["base"])
    experts = [load_folder(BF16[k]) for k in ("math", "code")]
    ties = 0
    for name, t in theirs.items():
        b = base[name].float()
        taus = torch.stack([e[name].float() - b for e in experts])
        torch.testing.assert_close(ours[name], b + _reference_sce(taus, 0.4), rtol=1e-6, atol=1e-6, msg=name)
        var = torch.var(taus, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * 0.4)
        at_tie = var == _kth_largest(var.reshape(-1), k)
        ties += int(at_tie.sum())
        ours_kept, theirs_kept = ours[name] != b, t != b
        assert not ((ours_kept != theirs_kept) & ~at_tie).any(), name
        # both are weighted means of the same agreeing τᵢ: only the weights differ, by a few percent
        both = ours_kept & theirs_kept
        spread = (taus.max(0).values - taus.min(0).values)[both]
        assert ((ours[name][both] - t[both]).abs() <= 0.05 * spread + 1e-6).all(), name
    assert ties > 1000


def test_sce_without_selection_matches_formula(tmp_path, third_expert):
    cfg = _cfg("sce", _experts([F32["a"], F32["b"], third_expert], [None] * 3), F32["base"], out_dtype="float32")
    streammerge.merge(cfg, tmp_path / "out")
    out, base = load_folder(tmp_path / "out"), load_folder(F32["base"])
    experts = [load_folder(p) for p in (F32["a"], F32["b"], third_expert)]
    for name, merged in out.items():
        taus = torch.stack([e[name] - base[name] for e in experts])
        torch.testing.assert_close(merged, base[name] + _reference_sce(taus, 1.0), rtol=1e-6, atol=1e-6, msg=name)


# --- DELLA: random, tested against its formula -------------------------------------------------


def _reference_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """mergekit's della_magprune probabilities, written as there (double argsort, ranks 1..C); equal
    magnitudes ranked by column (stable sorts; mergekit's are unstable: its order among ties is arbitrary)."""
    rows = tau if tau.dim() == 2 else tau.unsqueeze(0)
    magnitudes = rows.abs()
    ranks = torch.argsort(torch.argsort(magnitudes, dim=1, stable=True), dim=1, stable=True).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(tau.shape)


@pytest.fixture(scope="module")
def straddling_models(tmp_path_factory):
    """base + 2 fp32 experts whose rows (1500 wide) cross the 2^20-element chunk boundary (2 chunks)."""
    root = tmp_path_factory.mktemp("straddle")
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(800, 1500, generator=g), "v": torch.randn(3000, generator=g)}
    paths = [save_folder(root / "base", base)]
    for i in range(2):
        tensors = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(save_folder(root / f"e{i}", tensors))
    return [str(p) for p in paths]


def test_keep_probabilities_match_mergekit_formula():
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 33), (1, 5), (40, 2)]:
        tau = torch.randn(shape, generator=g)
        ours = della.keep_probabilities(tau.abs(), 0.4, 0.15)
        torch.testing.assert_close(ours, _reference_probabilities(tau, 0.4, 0.15), rtol=0, atol=0)
        assert ours.min() == pytest.approx(0.25) and ours.max() == pytest.approx(0.55)


def test_packed_mask_gives_back_every_range_it_was_filled_with():
    g = torch.Generator().manual_seed(1)
    for numel, pieces in [(1, [1]), (13, [5, 3, 5]), (1000, [7, 1, 500, 492]), (64, [64])]:
        mask = torch.rand(numel, generator=g) < 0.5
        packed = della.PackedMask(numel, torch.device("cpu"))
        at = 0
        for n in pieces:  # appended in pieces that start and end anywhere inside a byte
            packed.append(mask[at : at + n])
            at += n
        packed.finish()
        assert packed.bytes.numel() == (numel + 7) // 8
        for start in range(0, numel, max(1, numel // 7)):
            for count in (1, 9, numel - start):
                count = min(count, numel - start)
                assert torch.equal(packed.get(start, count), mask[start : start + count]), (numel, start, count)


def test_della_masks_follow_rank_probabilities_across_chunks(tmp_path, straddling_models):
    """One expert, weight 1, no rescale, λ 1: θ − θ₀ = m ⊙ τ, so the mask is read back from the output. It
    must equal [u < p] with u the documented seeded draws and p mergekit's rank formula, row by row, also
    for rows that cross a chunk boundary; and the keep rate per rank decile must follow p."""
    base, e0, _ = straddling_models
    density, epsilon = 0.5, 0.3
    cfg = _cfg("della_linear", [{"model": e0, "parameters": {"weight": 1.0}}], base,
               {"density": density, "epsilon": epsilon, "rescale": False}, seed=11)
    streammerge.merge(cfg, tmp_path / "out", chunk_elements=1 << 20)
    out, b, e = (load_folder(p) for p in (tmp_path / "out", base, e0))
    for name in ("w", "v"):
        tau = e[name] - b[name]
        kept = out[name] != b[name]
        p = _reference_probabilities(tau, density, epsilon)
        u = uniforms(11, name, 0, 0, tau.numel()).reshape(tau.shape)
        nonzero = tau != 0  # a kept τ of 0 leaves the base unchanged: unreadable
        assert torch.equal(kept[nonzero], (u < p)[nonzero]), name
        torch.testing.assert_close(out[name][kept], (b[name] + tau)[kept], rtol=0, atol=0)
    tau = (e["w"] - b["w"]).reshape(-1)
    kept = (out["w"] != b["w"]).reshape(-1)
    p = _reference_probabilities(e["w"] - b["w"], density, epsilon).reshape(-1)
    for lo in torch.arange(0.2, 0.6, 0.05):
        band = (p >= lo) & (p < lo + 0.05)
        assert kept[band].float().mean().item() == pytest.approx(p[band].mean().item(), abs=0.01)
    assert kept.float().mean().item() == pytest.approx(density, abs=0.005)
    assert tau.numel() % (1 << 20) and (1 << 20) % 1500  # the rows really cross chunk boundaries


def test_della_rescale_restores_l1_norm(tmp_path, straddling_models):
    base, e0, _ = straddling_models
    cfg = _cfg("della_linear", [{"model": e0, "parameters": {"weight": 1.0, "density": 0.3, "epsilon": 0.1}}], base)
    streammerge.merge(cfg, tmp_path / "out")
    out, b, e = (load_folder(p) for p in (tmp_path / "out", base, e0))
    for name in ("w", "v"):
        merged, tau = (out[name] - b[name]).double(), (e[name] - b[name]).double()
        assert merged.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
        assert (merged != 0).double().mean().item() == pytest.approx(0.3, abs=0.02)


def test_della_epsilon_0_is_dare(tmp_path):
    """ε = 0 makes every keep probability the density: DELLA's draws are DARE's, so the bytes are too."""
    models = _experts([F32["a"], F32["b"]], [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}])
    streammerge.merge(_cfg("della_linear", models, F32["base"], {"epsilon": 0.0}, seed=2), tmp_path / "della")
    streammerge.merge(_cfg("dare_linear", models, F32["base"], seed=2), tmp_path / "dare")
    della_out, dare_out = load_folder(tmp_path / "della"), load_folder(tmp_path / "dare")
    assert all(torch.equal(della_out[k], dare_out[k]) for k in dare_out)


def test_della_consensus_matches_reference_merge(tmp_path):
    """della = the per-expert masks (recomputed here from the formula and the seeded draws), L1 rescale,
    then TIES' sign consensus with normalize, as mergekit's generalized task arithmetic."""
    params = [{"weight": 0.8, "density": 0.5, "epsilon": 0.2}, {"weight": 0.6, "density": 0.7, "epsilon": 0.1}]
    cfg = _cfg("della", _experts([F32["a"], F32["b"]], params), F32["base"], {"lambda": 1.2}, seed=4)
    streammerge.merge(cfg, tmp_path / "out")
    out, b = load_folder(tmp_path / "out"), load_folder(F32["base"])
    experts = [load_folder(F32[k]) for k in ("a", "b")]
    for name, merged in out.items():
        deltas = []
        for i, (e, pm) in enumerate(zip(experts, params, strict=True)):
            tau = e[name] - b[name]
            keep = uniforms(4, name, i, 0, tau.numel()).reshape(tau.shape) < _reference_probabilities(
                tau, pm["density"], pm["epsilon"])
            masked = tau * keep
            deltas.append(masked * (tau.abs().sum() / masked.abs().sum()) * pm["weight"])
        d = torch.stack(deltas)
        sign = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = d.sign() == sign
        w = torch.tensor([pm["weight"] for pm in params]).reshape(2, *[1] * merged.dim())
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        ref = b[name] + 1.2 * (d * agree).sum(0) / divisor
        torch.testing.assert_close(merged, ref, rtol=1e-5, atol=1e-6, msg=name)


def test_della_refuses_3d_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = save_folder(tmp_path / "b", {"x": torch.randn(2, 3, 4, generator=g)})
    e = save_folder(tmp_path / "e", {"x": torch.randn(2, 3, 4, generator=g)})
    cfg = _cfg("della", [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}}], str(base))
    with pytest.raises(streammerge.errors.StreamMergeError, match="'x' has shape .2, 3, 4.: DELLA ranks"):
        streammerge.merge(cfg, tmp_path / "out")


# --- engine guarantees ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,per_model,params", [
    ("breadcrumbs", {"weight": 0.7, "density": 0.4, "gamma": 0.05}, {"rescale": True}),
    ("breadcrumbs_ties", {"weight": 0.7, "density": 0.4}, {}),
    ("della", {"weight": 0.7, "density": 0.4}, {}),
    ("della_linear", {"weight": 0.7, "density": 0.6, "epsilon": 0.3}, {}),
    ("sce", None, {"select_topk": 0.3}),
    ("ram", None, {"epsilon": 0.005}),
    ("ramplus_tl", None, {"epsilon": 0.005}),
])
def test_output_bytes_do_not_depend_on_chunk_size(tmp_path, straddling_models, method, per_model, params):
    base, e0, e1 = straddling_models
    cfg = _cfg(method, _experts([e0, e1], [per_model, per_model]), base, params, seed=3, out_dtype="bfloat16")
    streammerge.merge(cfg, tmp_path / "a", chunk_elements=1 << 20)
    streammerge.merge(cfg, tmp_path / "b", chunk_elements=1 << 23)
    a, b = (tmp_path / x / "model.safetensors" for x in "ab")
    assert a.read_bytes() == b.read_bytes()
    base_w = load_file(f"{base}/model.safetensors")["w"].to(torch.bfloat16)
    assert not torch.equal(load_file(a)["w"], base_w)


def test_ties_in_breadcrumbs_cut_are_kept_by_position_across_chunks(tmp_path):
    """Many equal magnitudes at both cut values, spread over 3 chunks: exactly int(density·n) entries kept,
    the band (n − bot − keep, n − bot] in the order (|τ| descending, position ascending)."""
    n = 3 * (1 << 20)
    g = torch.Generator().manual_seed(5)
    tau = torch.randint(1, 9, (n,), generator=g).float() * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    base = save_folder(tmp_path / "b", {"t": torch.zeros(n)})
    e = save_folder(tmp_path / "e", {"t": tau})
    density, gamma = 0.5, 0.1
    cfg = _cfg("breadcrumbs", [{"model": str(e), "parameters": {"weight": 1.0}}], str(base),
               {"density": density, "gamma": gamma})
    streammerge.merge(cfg, tmp_path / "out", chunk_elements=1 << 20)
    out = load_folder(tmp_path / "out")["t"]
    # reference without a Python sort: stable sort of -|τ| gives (|τ| desc, position asc)
    order = torch.sort(-tau.abs(), stable=True).indices
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    ref = torch.zeros(n)
    band = order[n - bottom - keep : n - bottom]
    ref[band] = tau[band]
    assert torch.equal(out, ref)


# --- bad input -------------------------------------------------------------------------------------


BAD = [
    ("breadcrumbs", {"weight": 1.0, "density": 1.5}, {}, "density must be in (0, 1]"),
    ("breadcrumbs_ties", {"weight": 1.0, "density": 0.0}, {}, "density must be in (0, 1]"),
    ("breadcrumbs", {"weight": 1.0, "density": 0.5, "gamma": -0.1}, {}, "gamma must be in [0, 1]"),
    ("della", {"weight": 1.0, "density": 0.9}, {}, "epsilon 0.15 with density 0.9: density ± epsilon"),
    ("della_linear", {"weight": 1.0, "density": 0.1, "epsilon": 0.1}, {}, "density ± epsilon must lie in (0, 1)"),
    ("della", {"weight": 1.0, "density": [0.5, 0.95]}, {}, "epsilon 0.15 with density 0.95"),
    ("sce", None, {"select_topk": 0}, "select_topk must be in (0, 1]"),
    ("sce", {"weight": 1.0}, {}, "unknown per-model parameter 'weight'"),
    ("ram", None, {"epsilon": -1}, "epsilon must be a finite number >= 0"),
    ("ramplus_tl", None, {"alpha": -0.2}, "alpha must be a finite number >= 0"),
    ("ram", None, {"r": 0.1}, "unknown parameter 'r' for ram"),
]


@pytest.mark.parametrize("method,per_model,params,message", BAD)
def test_bad_parameters_one_line_nothing_written(tmp_path, method, per_model, params, message):
    models = _experts([F32["a"], F32["b"]], [per_model, per_model])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg(method, models, F32["base"], params)))
    before = snapshot(FIXTURES / "tiny-llama-fp32-a")
    r = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    assert snapshot(FIXTURES / "tiny-llama-fp32-a") == before


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram",
                                    "ramplus_tl"])
def test_missing_base_model_is_refused(method):
    with pytest.raises(ConfigError, match=f"merge_method {method} needs base_model:"):
        streammerge.merge({"merge_method": method, "models": [{"model": F32["a"]}]}, "/nonexistent-out")


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_streamed_variance_has_torch_var_bits(n):
    """SCE's top-k set depends on σ² to the bit: the expert-by-expert fp64 Welford must equal torch.var."""
    from streammerge.methods.base import ChunkInputs, ExpertInput
    from streammerge.methods.sce import variance

    g = torch.Generator().manual_seed(n)
    base = torch.randn(200_003, generator=g)
    thetas = [(base + torch.randn(200_003, generator=g) * (i + 1) * 1e-2).to(torch.bfloat16).float() for i in range(n)]
    experts = [ExpertInput(load=lambda t=t: t.clone(), params=None) for t in thetas]
    ours = variance(ChunkInputs("t", (200_003,), 0, base, experts, None, 0))
    assert torch.equal(ours, torch.var(torch.stack([t - base for t in thetas]), dim=0, unbiased=False))
