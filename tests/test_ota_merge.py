"""``merge_method: ota`` end to end: sidecars on files, the CLI, against the formula on whole tensors."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, load_folder, snapshot
from safetensors.torch import save_file

import streammerge
from streammerge.cli import main
from streammerge.errors import ConfigError, PlanError
from streammerge.io import journal

BASE, A, B = (FIXTURES / f"tiny-llama-fp32-{k}" for k in ("base", "a", "b"))
MODELS = {"a": A, "b": B}


@pytest.fixture(scope="module")
def second_moments(tmp_path_factory):
    """Name-keyed exp_avg_sq safetensors for experts a and b (log-normal, as Adam's v looks)."""
    root = tmp_path_factory.mktemp("v")
    base = load_folder(BASE)
    out = {}
    for i, key in enumerate(MODELS):
        g = torch.Generator().manual_seed(10 + i)
        v = {n: torch.exp(torch.randn(t.shape, generator=g) * 2 - 20) for n, t in base.items() if t.is_floating_point()}
        save_file(v, root / f"{key}.safetensors")
        out[key] = (root / f"{key}.safetensors", v)
    return out


def _config(tmp_path, sidecars, model_params=None, params="", name="ota.yaml"):
    model_params = model_params or {}
    lines = ["merge_method: ota", f"base_model: {BASE}", "models:"]
    for key, path in MODELS.items():
        lines += [f"  - model: {path}", f"    sidecar: {sidecars[key]}"]
        if key in model_params:
            lines.append(f"    parameters: {model_params[key]}")
    lines += [params, "dtype: float32"]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def _reference(v: dict, thresholds=None, power=0.5, eps=1e-26, scales=None) -> dict[str, torch.Tensor]:
    """θ₀ + Σ wᵢmᵢτᵢ / Σ wᵢmᵢ on whole tensors, float64, all-masked -> θ₀."""
    base = load_folder(BASE)
    experts = {k: load_folder(p) for k, p in MODELS.items()}
    scales = scales or {k: 1.0 for k in MODELS}
    out = {}
    for name, b in base.items():
        b64 = b.double()
        num = torch.zeros_like(b64)
        den = torch.zeros_like(b64)
        for k in MODELS:
            tau = experts[k][name].double() - b64
            vi = v[k][name].double()
            w = scales[k] * vi**power + eps
            if thresholds and thresholds.get(k) is not None:
                w = w * (vi * tau**2 >= thresholds[k])
            num += w * tau
            den += w
        merged = torch.where(den > 0, b64 + num / den.clamp_min(1e-300), b64)
        out[name] = merged.float()
    return out


def test_ota_with_exact_second_moments_matches_the_formula(tmp_path, second_moments):
    sidecars = {k: p for k, (p, _) in second_moments.items()}
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main, ["merge", str(_config(tmp_path, sidecars, params="parameters: {epsilon: 1e-26}")), str(out), "-q"]
    )
    assert r.exit_code == 0, r.output
    ref = _reference({k: v for k, (_, v) in second_moments.items()})
    merged = load_folder(out)
    for name, t in ref.items():
        torch.testing.assert_close(merged[name], t, rtol=2e-6, atol=1e-7)
    # OTA is not plain averaging: the curvature weights matter on these inputs
    plain = (
        load_folder(A)["model.layers.0.mlp.up_proj.weight"] * 0.5
        + load_folder(B)["model.layers.0.mlp.up_proj.weight"] * 0.5
    )
    assert not torch.allclose(merged["model.layers.0.mlp.up_proj.weight"], plain, atol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "power 1, scaling, FFG threshold"])
def test_ota_reads_rank1_sidecars_converted_by_the_cli(tmp_path, second_moments, variant):
    sidecars = {}
    for k, (raw, _) in second_moments.items():
        sidecars[k] = tmp_path / f"{k}.sidecar"
        r = CliRunner().invoke(main, ["sidecar", "convert", str(raw), str(sidecars[k]), "--rank", "1"])
        assert r.exit_code == 0, r.output
    # reference: the rank-1 reconstruction r·cᵀ/Σv of each 2-D v (1-D stays exact)
    v1 = {}
    for k, (_, v) in second_moments.items():
        v1[k] = {
            n: (t.double().sum(1, keepdim=True) * t.double().sum(0, keepdim=True) / t.double().sum()).float()
            if t.dim() == 2
            else t
            for n, t in v.items()
        }
    out = tmp_path / "out"
    if variant == "plain":
        streammerge.merge(_config(tmp_path, sidecars), out)
        ref = _reference(v1)
    else:  # the factored weight path: (c·r ⊗ c')^p + ε, with a saliency mask from the same v̂
        base, b = load_folder(BASE), load_folder(B)
        name = "model.layers.0.mlp.up_proj.weight"
        t = float(
            torch.quantile((v1["b"][name].double() * (b[name].double() - base[name].double()) ** 2).flatten(), 0.6)
        )
        cfg = _config(
            tmp_path,
            sidecars,
            {"a": "{scaling_factor: 2.5}", "b": f"{{threshold: {t!r}}}"},
            params="parameters: {power: 1.0, epsilon: 1e-26}",
        )
        streammerge.merge(cfg, out)
        ref = _reference(v1, thresholds={"b": t}, power=1.0, scales={"a": 2.5, "b": 1.0})
    merged = load_folder(out)
    for name, t in ref.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_ffg_density_is_calibrated_over_the_whole_model_and_reported(tmp_path, second_moments, density):
    sidecars = {k: p for k, (p, _) in second_moments.items()}
    cfg = _config(tmp_path, sidecars, {"a": f"{{density: {density}}}", "b": f"{{density: {density}}}"})
    result = streammerge.merge(cfg, tmp_path / "out")
    found = {
        int(m.group(1)): (float(m.group(2)) / 100, float(m.group(3)))
        for line in result.report
        if (m := re.search(r"expert #(\d): .*kept ([\d.]+)% of .* at threshold (\S+)", line))
    }
    assert sorted(found) == [0, 1], result.report
    base = load_folder(BASE)
    thresholds = {}
    for i, k in enumerate(MODELS):
        kept_reported, t = found[i]
        thresholds[k] = t
        expert, v = load_folder(MODELS[k]), second_moments[k][1]
        s = torch.cat([(v[n] * (expert[n] - base[n]) ** 2).reshape(-1) for n in v])
        achieved = float((s >= t).double().mean())  # counted independently of the engine
        assert abs(achieved - density) <= 0.005
        assert abs(kept_reported - achieved) < 1e-4
    ref = _reference({k: v for k, (_, v) in second_moments.items()}, thresholds)
    merged = load_folder(tmp_path / "out")
    for name, t in ref.items():
        torch.testing.assert_close(merged[name], t, rtol=2e-6, atol=1e-7)


def test_a_tensor_missing_from_a_sidecar_is_merged_linearly_and_reported(tmp_path, second_moments):
    _, v = second_moments["a"]
    partial = {n: t for n, t in v.items() if n != "lm_head.weight"}
    save_file(partial, tmp_path / "a-partial.safetensors")
    sidecars = {"a": tmp_path / "a-partial.safetensors", "b": second_moments["b"][0]}
    result = streammerge.merge(_config(tmp_path, sidecars), tmp_path / "out")
    assert any("merged linearly" in line and "lm_head.weight" in line for line in result.report)
    merged = load_folder(tmp_path / "out")["lm_head.weight"]
    b0, a, b = (load_folder(p)["lm_head.weight"] for p in (BASE, A, B))
    torch.testing.assert_close(merged, b0 + ((a - b0) + (b - b0)) / 2, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="no second moment for lm_head.weight"):
        streammerge.merge(
            _config(tmp_path, sidecars, params="parameters: {missing_second_moment: error}", name="e.yaml"),
            tmp_path / "out2",
        )


def test_sidecars_that_do_not_fit_the_model_are_refused_while_planning(tmp_path, second_moments):
    _, v = second_moments["a"]
    save_file({"module." + n: t for n, t in v.items()}, tmp_path / "prefixed.safetensors")
    save_file({**v, "lm_head.weight": torch.ones(3, 3)}, tmp_path / "wrong-shape.safetensors")
    for bad, needle in [
        ("prefixed", "none of its 21 tensor names is a tensor of"),
        ("wrong-shape", "tensor 'lm_head.weight' has shape [3, 3]"),
    ]:
        sidecars = {"a": tmp_path / f"{bad}.safetensors", "b": second_moments["b"][0]}
        with pytest.raises(PlanError, match=re.escape(needle)):
            streammerge.merge(_config(tmp_path, sidecars), tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_sidecar_key_is_only_for_methods_that_use_it(tmp_path, second_moments):
    cfg = _config(tmp_path, {k: p for k, (p, _) in second_moments.items()})
    cfg.write_text(cfg.read_text().replace("merge_method: ota", "merge_method: task_arithmetic"))
    r = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out")])
    assert r.exit_code == 1 and "unknown key 'sidecar' for task_arithmetic" in r.output


def test_interrupted_ffg_merge_resumes_to_the_same_bytes(tmp_path, second_moments, monkeypatch):
    sidecars = {k: p for k, (p, _) in second_moments.items()}
    cfg = _config(tmp_path, sidecars, {"a": "{density: 0.4}", "b": "{density: 0.2}"})
    streammerge.merge(cfg, tmp_path / "ref")
    real, calls = journal.Journal.record, {"n": 0}

    def record(self, rec):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        real(self, rec)

    monkeypatch.setattr(journal.Journal, "record", record)
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge(cfg, tmp_path / "out")
    monkeypatch.setattr(journal.Journal, "record", real)
    result = streammerge.merge(cfg, tmp_path / "out")
    assert result.resumed_tensors == 8
    ref = snapshot(tmp_path / "ref")
    assert snapshot(tmp_path / "out") == {k.replace("/ref/", "/out/"): v for k, v in ref.items()}


def test_without_a_base_model_experts_are_averaged_by_curvature(tmp_path, second_moments):
    cfg = _config(tmp_path, {k: p for k, (p, _) in second_moments.items()})
    cfg.write_text(cfg.read_text().replace(f"base_model: {BASE}\n", ""))
    r = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out"), "--dry-run"])
    assert r.exit_code == 0 and "sidecar     " in r.output and "(21 tensors)" in r.output
    streammerge.merge(cfg, tmp_path / "out")
    merged = load_folder(tmp_path / "out")
    experts = {k: load_folder(p) for k, p in MODELS.items()}
    for name, t in merged.items():
        w = {k: second_moments[k][1][name].double().sqrt() + 1e-26 for k in MODELS}
        ref = sum(w[k] * experts[k][name].double() for k in MODELS) / sum(w.values())
        torch.testing.assert_close(t, ref.float(), rtol=2e-6, atol=1e-7)


def test_bias_correction_uses_each_exported_sidecars_step_and_beta2(tmp_path):
    """Two experts trained for different numbers of Adam steps, exported live with sidecar.export."""
    from streammerge import sidecar

    torch.manual_seed(0)
    src = tmp_path / "in"
    src.mkdir()
    base = {"w": torch.randn(8, 6), "b": torch.randn(6)}
    save_file(base, src / "base.safetensors")
    cfg = ["merge_method: ota", f"base_model: {src / 'base.safetensors'}", "models:"]
    vs, corrections, experts = {}, {}, {}
    for key, steps, beta2 in (("e1", 3, 0.95), ("e2", 40, 0.9)):
        model = torch.nn.Module()
        model.w, model.b = torch.nn.Parameter(base["w"].clone()), torch.nn.Parameter(base["b"].clone())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, beta2))
        for _ in range(steps):
            opt.zero_grad()
            ((model.w @ torch.randn(6, 3)).square().sum() + model.b.sum()).backward()
            opt.step()
        sidecar.export(model, opt, src / f"{key}.sidecar", rank="exact")
        experts[key] = {"w": model.w.detach().clone(), "b": model.b.detach().clone()}
        save_file(experts[key], src / f"{key}.safetensors")
        vs[key] = {n: opt.state[p]["exp_avg_sq"].clone() for n, p in (("w", model.w), ("b", model.b))}
        corrections[key] = 1 / (1 - beta2**steps)
        cfg += [f"  - model: {src / f'{key}.safetensors'}", f"    sidecar: {src / f'{key}.sidecar'}"]
    cfg += ["parameters: {bias_correction: true}"]
    (tmp_path / "cfg.yaml").write_text("\n".join(cfg) + "\n")
    streammerge.merge(tmp_path / "cfg.yaml", tmp_path / "out")
    merged = load_folder(tmp_path / "out")
    for name, b0 in base.items():
        w = {k: (vs[k][name].double() * corrections[k]).sqrt() + 1e-26 for k in vs}
        ref = b0.double() + sum(w[k] * (experts[k][name].double() - b0) for k in vs) / sum(w.values())
        torch.testing.assert_close(merged[name], ref.float(), rtol=2e-6, atol=1e-7)
    # without the correction the result differs (the two experts' steps differ a lot)
    (tmp_path / "cfg.yaml").write_text("\n".join(cfg[:-1]) + "\n")
    streammerge.merge(tmp_path / "cfg.yaml", tmp_path / "plain")
    assert not torch.allclose(load_folder(tmp_path / "plain")["w"], merged["w"], atol=1e-6)
