"""OTA in the authors' configuration language (methods/ota_authors.py, preconditioners.py).

The authors' 8 OTA configs (fixtures/configs/ota-authors/hf_*.yml, hub ids replaced by the local
fixtures/ota-authors/ folders) and extra cases (x_*.yml) are merged by streammerge and compared with
``reference_merge``: the authors' per-tensor algorithm (pmahdavi/ota-merge, mergekit/merge_methods/ota.py)
transcribed as plain whole-tensor torch. scripts/compare_ota_authors.py runs the same configs against
the fork itself.
"""

from __future__ import annotations

import math
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.config import parse_config
from streammerge.errors import CheckpointError, StreamMergeError
from streammerge.io import second_moment_factors
from streammerge.methods import group_sums
from streammerge.methods.ota_authors import hybrid_norm, rescale_factor
from streammerge.preconditioners import BlockBuffer, Preconditioner, is_embedding
from streammerge.sidecar import RawSecondMoments, convert

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "fixtures" / "configs" / "ota-authors"
AUTHORS_CONFIGS = sorted(CONFIGS.glob("hf_*.yml"))
EXTRA_CONFIGS = sorted(CONFIGS.glob("x_*.yml"))


def config_of(path: Path, **override) -> streammerge.config.MergeConfig:
    """The config as written, minus ``tokenizer_source: union`` (the tokenizer work accepts it; the
    fixtures share one vocabulary, so it changes no tensor)."""
    raw = yaml.safe_load(path.read_text())
    raw.pop("tokenizer_source", None)
    raw.update(override)
    return parse_config(yaml.safe_dump(raw), path.parent, str(path))


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- the authors' algorithm, transcribed (whole tensors, fp32, as their OTAMergeTask) -------------------


def _preconditioner(path: Path, name: str) -> torch.Tensor:
    table = load_file(path) if path.suffix == ".safetensors" else {
        k: s["exp_avg_sq"] for k, s in torch.load(path, weights_only=True)["state"].items()}
    for key in (name, f"{name}.exp_avg_sq", name.replace("weight", "weight.exp_avg_sq")):
        if key in table:
            return table[key].to(torch.float32)
    raise KeyError(name)


def _spectral(w: torch.Tensor, approximate: bool, seed: int) -> torch.Tensor:
    if not approximate:
        return torch.linalg.norm(w, ord=2)
    v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(seed))  # their start, seeded as ours
    v = v / torch.linalg.norm(v)
    for _ in range(10):
        v = w.T @ (w @ v)
        if torch.linalg.norm(v) == 0:
            return torch.tensor(0.0)
        v = v / torch.linalg.norm(v)
    return torch.linalg.norm(w @ v)


def _hybrid(t: torch.Tensor, name: str, approximate: bool, seed: int) -> float:
    if name in ("lm_head.weight", "model.embed_tokens.weight"):
        return float(torch.linalg.norm(t, ord=2, dim=0).max() / math.sqrt(t.shape[0]))
    if t.ndim == 2:
        return float(math.sqrt(t.shape[1] / t.shape[0]) * _spectral(t, approximate, seed))
    return float(torch.sqrt(torch.mean(t.pow(2)))) if t.ndim == 1 else float("nan")


def reference_merge(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = yaml.safe_load(path.read_text())
    g = cfg.get("parameters") or {}
    eps, power = float(g.get("epsilon", 1e-8)), float(g.get("power", 0.5))
    normalise, fallback = str(g.get("normalise", "none")).lower(), g.get("fallback_to_base", False)
    rescale, approximate = g.get("rescale", False), g.get("approximate_norm", False)
    relative = float(g.get("rescale_relative_threshold", 1e-6))
    mode = g.get("masked_task_vector_merge_method", "precond")
    base = load_dir(path.parent / cfg["base_model"]) if cfg.get("base_model") else None
    models = [(load_dir(path.parent / m["model"]), m.get("parameters") or {}) for m in cfg["models"]]
    active = g.get("precond_threshold") is not None or any("precond_threshold" in mp for _, mp in models)
    out = {}
    for name in models[0][0]:
        b = base[name].to(torch.bfloat16).float() if base is not None else None
        xs = [m[name].to(torch.bfloat16).float() for m, _ in models]
        weights, masks = [], []
        for x, (_, mp) in zip(xs, models, strict=True):
            pc = _preconditioner(path.parent / mp["preconditioner_path"], name)
            if mp.get("rank1_approx") and pc.ndim == 2:
                total = pc.sum()
                pc = pc.sum(1, keepdim=True) @ (pc.sum(0, keepdim=True) / total) if total != 0 else torch.zeros_like(pc)
            elif mp.get("rank") and pc.ndim == 2 and not is_embedding(name):
                u, s, vh = torch.linalg.svd(pc, full_matrices=False)
                k = int(mp["rank"])
                pc = torch.relu(u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
            t = mp.get("precond_threshold", g.get("precond_threshold"))
            mask = None
            if t is not None:
                mask = pc * (x - b) ** 2 >= float(t) if b is not None else pc >= float(t)
            pre = pc.pow(power)
            if float(mp.get("scaling_factor", 1.0)) != 1.0:
                pre = pre * float(mp["scaling_factor"])
            if normalise == "global":
                pre = pre / (pre.mean() + eps)
            w = pre + eps
            weights.append(w * mask if mask is not None else w)
            masks.append(mask if mask is not None else torch.ones_like(w, dtype=torch.bool))
        den = torch.stack(weights).sum(0)
        if b is not None:
            tvs = [x - b for x in xs]
            if rescale:
                s32 = zlib.crc32(f"{seed}:{name}".encode())
                for i, m in enumerate(masks):
                    orig = _hybrid(tvs[i], name, approximate, s32)
                    if math.isnan(orig):
                        tvs[i] = tvs[i] * m
                        continue
                    masked = _hybrid(tvs[i] * m, name, approximate, s32)
                    ok = not math.isnan(masked) and masked > orig * relative
                    tvs[i] = tvs[i] * m * (orig / masked) if ok else torch.zeros_like(tvs[i])
            stack = torch.stack(tvs)
            if mode == "linear":
                avg = stack.mean(0)
            elif mode == "ties":
                sign = torch.sign(stack.sum(0))
                sign[sign == 0] = 1
                avg = (stack * (torch.sign(stack) == sign)).mean(0)
            else:
                avg = (torch.stack(weights) * stack).sum(0) / den
            merged = b + avg
        else:
            merged = (torch.stack(weights) * torch.stack(xs)).sum(0) / den
        if active:
            fully = den <= len(xs) * eps * 1.1
            merged = torch.where(fully, b if fallback and b is not None else torch.stack(xs).mean(0), merged)
        out[name] = merged.to(torch.bfloat16)
    return out


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def ordered(t):
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def assert_close_bf16(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    d = torch.cat([ulps(ours[n], ref[n]).reshape(-1) for n in ref])
    within = float((d <= 1).double().mean())
    assert within >= 0.999, f"only {within:.4%} of entries within 1 bf16 ulp (max {int(d.max())})"


@pytest.mark.parametrize("path", AUTHORS_CONFIGS + EXTRA_CONFIGS, ids=lambda p: p.stem)
def test_config_matches_the_authors_algorithm(path, tmp_path):
    streammerge.merge(config_of(path), tmp_path / "out")
    ours = load_dir(tmp_path / "out")
    assert_close_bf16(ours, reference_merge(path))
    assert all(t.dtype == torch.bfloat16 for t in ours.values())


def test_all_eight_authors_configs_are_present():
    assert [p.stem for p in AUTHORS_CONFIGS] == [
        "hf_ota", "hf_ota_ffg", "hf_ota_ffg_fisher", "hf_ota_ffg_global_thresh", "hf_ota_ffg_linear_merge",
        "hf_ota_ffg_per_model_thresh", "hf_ota_ffg_rank16", "hf_ota_ffg_rank1lemma",
    ]


def test_masks_are_active_and_fall_back(tmp_path):
    """The fixtures are sized so that the configs' absolute thresholds mask part of the entries."""
    ours = streammerge.merge(config_of(CONFIGS / "hf_ota_ffg_per_model_thresh.yml"), tmp_path / "o")
    kept = [float(line.split("kept ")[1].split("%")[0]) for line in ours.report if "kept" in line]
    assert len(kept) == 5 and all(1 < k < 99 for k in kept)
    assert any("took the fallback" in line for line in ours.report)


@pytest.mark.parametrize("name", ["hf_ota_ffg_rank16.yml", "x_no_base_threshold.yml", "x_rescale_exact_norm.yml",
                                  "x_ablation_global.yml"])
def test_bytes_do_not_depend_on_chunking(name, tmp_path, monkeypatch):
    monkeypatch.setattr(second_moment_factors, "BLOCK_ELEMENTS", 96)  # several rank-K row blocks per tensor
    monkeypatch.setattr(group_sums, "UNIT", 64)  # several summation units of the global mean per tensor
    outs = []
    for chunk in (1 << 22, 100, 64):
        streammerge.merge(config_of(CONFIGS / name), tmp_path / str(chunk), chunk_elements=chunk)
        outs.append({n: t.view(torch.int16) for n, t in load_dir(tmp_path / str(chunk)).items()})
    for other in outs[1:]:
        assert all(torch.equal(outs[0][n], other[n]) for n in outs[0])


@pytest.mark.parametrize("name", ["hf_ota_ffg_rank1lemma.yml", "hf_ota_ffg_global_thresh.yml"])
def test_tile_by_tile_across_experts_gives_the_same_bytes(name, tmp_path, monkeypatch):
    """rank1_approx with a base merges each tile across all experts (``_merge_by_tile``, weights read a
    tile at a time); expert by expert over whole chunks gives the same bytes, at any chunk size."""
    from streammerge.methods import ota_authors

    monkeypatch.setattr("streammerge.preconditioners.RANK1_BLOCK_ELEMENTS", 96)  # several row blocks
    monkeypatch.setattr(ota_authors, "TILE_ELEMENTS", 50)  # several tiles per chunk
    calls = []
    by_tile = ota_authors._merge_by_tile
    monkeypatch.setattr(ota_authors, "_merge_by_tile", lambda *a: calls.append(1) or by_tile(*a))
    outs = []
    for chunk in (1 << 22, 100):
        streammerge.merge(config_of(CONFIGS / name), tmp_path / str(chunk), chunk_elements=chunk)
        outs.append(load_dir(tmp_path / str(chunk)))
    assert calls
    monkeypatch.setattr(ota_authors, "_by_tile_moments", lambda *a: None)  # expert by expert
    streammerge.merge(config_of(CONFIGS / name), tmp_path / "experts", chunk_elements=100)
    outs.append(load_dir(tmp_path / "experts"))
    for other in outs[1:]:
        assert all(torch.equal(outs[0][n].view(torch.int16), other[n].view(torch.int16)) for n in outs[0])


def test_preconditioner_formats_agree(tmp_path):
    """Raw safetensors, a name-keyed optimizer state and an exact sidecar give the same merge."""
    src = ROOT / "fixtures" / "ota-authors" / "math-reasoning" / "export"
    convert(src / "exp_avg_sq.safetensors", tmp_path / "math.sidecar", rank="exact")
    results = []
    for pc in (src / "exp_avg_sq.safetensors", src / "exp_avg_sq_optimizer.pt", tmp_path / "math.sidecar"):
        text = (CONFIGS / "hf_ota_ffg_per_model_thresh.yml").read_text().replace(
            "../../ota-authors/math-reasoning/export/exp_avg_sq.safetensors", str(pc))
        raw = yaml.safe_load(text)
        raw.pop("tokenizer_source")
        out = tmp_path / pc.name.replace(".", "_")
        streammerge.merge(parse_config(yaml.safe_dump(raw), CONFIGS), out)
        results.append(load_dir(out))
    for other in results[1:]:
        assert all(torch.equal(results[0][n], other[n]) for n in results[0])


def test_keys_with_the_authors_fallback_names(tmp_path):
    src = load_file(ROOT / "fixtures" / "ota-authors" / "coding" / "export" / "exp_avg_sq.safetensors")
    save_file({f"{k}.exp_avg_sq": v for k, v in src.items()}, tmp_path / "suffixed.safetensors")
    text = (CONFIGS / "hf_ota_ffg_rank16.yml").read_text().replace(
        "../../ota-authors/coding/export/exp_avg_sq.safetensors", str(tmp_path / "suffixed.safetensors"))
    raw = yaml.safe_load(text)
    raw.pop("tokenizer_source")
    streammerge.merge(parse_config(yaml.safe_dump(raw), CONFIGS), tmp_path / "a")
    streammerge.merge(config_of(CONFIGS / "hf_ota_ffg_rank16.yml"), tmp_path / "b")
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


# --- the pieces, against their formulas -------------------------------------------------------------------


def test_rank1_at_merge_time_is_their_lemma(monkeypatch):
    monkeypatch.setattr("streammerge.preconditioners.RANK1_BLOCK_ELEMENTS", 40)  # several row blocks
    path = ROOT / "fixtures" / "ota-authors" / "general" / "export" / "exp_avg_sq.safetensors"
    name = "model.layers.0.mlp.gate_proj.weight"
    inner = RawSecondMoments(path)
    pc = Preconditioner(inner, {name: name}, lambda n: (True, None))
    v = load_file(path)[name].double()
    expected = v.sum(1, keepdim=True) @ (v.sum(0, keepdim=True) / v.sum())
    got = pc.get(name).double()
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    rows, cols, offset = pc.rank1_chunk(name, 50, 300)
    assert torch.equal(torch.outer(rows, cols).reshape(-1)[offset:offset + 300], pc.get_flat(name, 50, 300))
    pc.close()


def test_experts_share_one_block_buffer(monkeypatch):
    """Every expert's rank-1 pass reads into one buffer (read_into): the factors are those of the formula
    and the same bits as with a buffer of its own, tensors and experts interleaved."""
    monkeypatch.setattr("streammerge.preconditioners.RANK1_BLOCK_ELEMENTS", 40)  # several row blocks
    paths = [ROOT / "fixtures" / "ota-authors" / e / "export" / "exp_avg_sq.safetensors" for e in ("general", "coding")]
    names = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    shared = BlockBuffer()
    pcs = [Preconditioner(RawSecondMoments(p), {n: n for n in names}, lambda n: (True, None), shared) for p in paths]
    alone = [Preconditioner(RawSecondMoments(p), {n: n for n in names}, lambda n: (True, None)) for p in paths]
    for name in names:
        for path, pc, own in zip(paths, pcs, alone, strict=True):
            v = load_file(path)[name].double()
            n = v.shape[1]
            rows, cols, _ = pc.rank1_chunk(name, 0, v.numel())
            assert torch.allclose(rows.double(), v.sum(1), rtol=1e-6, atol=0)
            assert torch.allclose(cols.double() * v.sum(), v.sum(0), rtol=1e-6, atol=0)
            own_rows, own_cols, _ = own.rank1_chunk(name, 0, v.numel())
            assert torch.equal(rows, own_rows) and torch.equal(cols, own_cols) and cols.numel() == n
    for pc in pcs + alone:
        pc.close()


def test_rank1_pass_refuses_a_bad_value_in_any_tile(tmp_path, monkeypatch):
    """The factor pass checks values tile by tile: a NaN, negative or infinite entry past the first tile of
    a block is refused like one in the first (the tiles' extremes are combined so that a NaN survives)."""
    monkeypatch.setattr("streammerge.preconditioners.RANK1_TILE_ELEMENTS", 40)  # 5 rows of 8 per tile
    v = torch.rand(20, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    for bad in (float("nan"), -1.0, float("inf")):
        w = v.clone()
        w[15, 3] = bad  # the fourth tile
        save_file({"w": w}, tmp_path / "v.safetensors")
        pc = Preconditioner(RawSecondMoments(tmp_path / "v.safetensors"), {"w": "w"}, lambda n: (True, None))
        with pytest.raises(CheckpointError, match="'w' has negative, NaN or infinite values"):
            pc.rank1_chunk("w", 0, w.numel())
        pc.close()


def test_rank_k_reconstruction_is_chunk_independent_and_close_to_svd(monkeypatch):
    monkeypatch.setattr(second_moment_factors, "BLOCK_ELEMENTS", 48)
    path = ROOT / "fixtures" / "ota-authors" / "coding" / "export" / "exp_avg_sq.safetensors"
    name, emb = "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"
    pc = Preconditioner(RawSecondMoments(path), {name: name, emb: emb}, lambda n: (False, 4))
    whole = pc.get(name).reshape(-1)
    pieces = torch.cat([pc.get_flat(name, s, min(37, whole.numel() - s)) for s in range(0, whole.numel(), 37)])
    assert torch.equal(whole, pieces)
    v = load_file(path)[name].double()
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    best = torch.relu(u[:, :4] @ torch.diag(s[:4]) @ vh[:4])
    assert torch.allclose(whole.double().reshape(v.shape), best, rtol=1e-4, atol=1e-6 * float(v.max()))
    assert torch.equal(pc.get(emb), load_file(path)[emb])  # rank-K skips embeddings, as theirs
    pc.close()


def test_hybrid_norms():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g)
    assert hybrid_norm(w, "x.weight") == pytest.approx(math.sqrt(40 / 24) * float(torch.linalg.svdvals(w)[0]),
                                                       rel=1e-5)
    approx = hybrid_norm(w, "x.weight", approximate=True, seed=7)
    assert approx == hybrid_norm(w, "x.weight", approximate=True, seed=7)  # seeded: repeatable
    assert approx <= hybrid_norm(w, "x.weight") * (1 + 1e-5) and approx > 0.9 * hybrid_norm(w, "x.weight")
    assert hybrid_norm(w, "lm_head.weight") == pytest.approx(float(w.norm(dim=0).max()) / math.sqrt(24), rel=1e-6)
    v = torch.randn(17, generator=g)
    assert hybrid_norm(v, "n.weight") == pytest.approx(float(v.pow(2).mean().sqrt()), rel=1e-6)
    assert math.isnan(hybrid_norm(torch.randn(2, 3, 4), "conv.weight"))
    assert rescale_factor(2.0, 1.0, 1e-6) == 2.0
    assert rescale_factor(2.0, 1e-9, 1e-6) == 0.0 and rescale_factor(2.0, float("nan"), 1e-6) == 0.0
    assert rescale_factor(float("nan"), 1.0, 1e-6) is None


# --- bad input: one line naming the file and key, nothing written ---------------------------------------


def _refused(tmp_path: Path, text: str, needle: str) -> None:
    raw = yaml.safe_load(text)
    raw.pop("tokenizer_source", None)
    out = tmp_path / "out"
    with pytest.raises(StreamMergeError, match=needle) as e:
        streammerge.merge(parse_config(yaml.safe_dump(raw), CONFIGS, "cfg.yml"), out)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_threshold_not_a_number(tmp_path):
    text = (CONFIGS / "hf_ota_ffg_per_model_thresh.yml").read_text().replace("1.1152e-18", "lots")
    _refused(tmp_path, text, "precond_threshold must be a number, got 'lots'")


def test_missing_preconditioner_file(tmp_path):
    text = (CONFIGS / "hf_ota.yml").read_text().replace("general/export/exp_avg_sq", "general/export/nope")
    _refused(tmp_path, text, r"models\[3\]\.parameters\.preconditioner_path .*nope.safetensors' does not exist")


def test_preconditioner_of_wrong_shapes(tmp_path):
    other = ROOT / "fixtures" / "tiny-exp-avg-sq.safetensors"
    text = (CONFIGS / "hf_ota.yml").read_text().replace("../../ota-authors/general/export/exp_avg_sq.safetensors",
                                                        str(other))
    _refused(tmp_path, text, "tiny-exp-avg-sq.safetensors: key 'model.embed_tokens.weight' has shape")


def test_preconditioner_lacking_a_tensor(tmp_path):
    src = load_file(ROOT / "fixtures" / "ota-authors" / "general" / "export" / "exp_avg_sq.safetensors")
    del src["model.norm.weight"]
    save_file(src, tmp_path / "partial.safetensors")
    text = (CONFIGS / "hf_ota.yml").read_text().replace("../../ota-authors/general/export/exp_avg_sq.safetensors",
                                                        str(tmp_path / "partial.safetensors"))
    _refused(tmp_path, text, "partial.safetensors: has no second moment for tensor 'model.norm.weight'")


@pytest.mark.parametrize("form", ["org/name:path", "org/name/path"])
def test_hub_forms_resolve_through_the_cache(tmp_path, monkeypatch, form):
    """The authors' hub forms name a file in a hub repository: found in huggingface_hub's cache (offline, no
    network), they merge exactly as the same file given locally; not cached, one line says how to fetch it."""
    pytest.importorskip("huggingface_hub")
    from test_model_paths import make_hub_cache

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = "../../ota-authors/general/export/exp_avg_sq.safetensors"
    source = tmp_path / "repo"
    (source / "export").mkdir(parents=True)
    (source / "export" / "exp_avg_sq.safetensors").write_bytes((CONFIGS / local).read_bytes())
    snap = make_hub_cache(cache, "pmahdavi/Llama-3.1-8B-general", source / "export")
    (snap / "export").mkdir()
    (snap / "exp_avg_sq.safetensors").rename(snap / "export" / "exp_avg_sq.safetensors")
    (snap / "export" / "exp_avg_sq.safetensors").unlink()
    blob = next((cache / "models--pmahdavi--Llama-3.1-8B-general" / "blobs").iterdir())
    (snap / "export" / "exp_avg_sq.safetensors").symlink_to(f"../../../blobs/{blob.name}")
    name = "pmahdavi/Llama-3.1-8B-general" + (":" if form == "org/name:path" else "/") + "export/exp_avg_sq.safetensors"
    text = (CONFIGS / "hf_ota.yml").read_text()
    raw_local, raw_hub = yaml.safe_load(text), yaml.safe_load(text.replace(local, name))
    for raw in (raw_local, raw_hub):
        raw.pop("tokenizer_source", None)
    streammerge.merge(parse_config(yaml.safe_dump(raw_local), CONFIGS, "cfg.yml"), tmp_path / "local")
    streammerge.merge(parse_config(yaml.safe_dump(raw_hub), CONFIGS, "cfg.yml"), tmp_path / "hub")
    for f in (tmp_path / "local").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "hub" / f.name).read_bytes()
    missing = text.replace(local, "pmahdavi/Llama-3.1-8B-general:export/other.safetensors")
    _refused(tmp_path, missing, "file 'export/other.safetensors' of hub repository pmahdavi/Llama-3.1-8B-general "
                                "is not in the local cache")


@pytest.mark.parametrize("extra, needle", [
    ("normalise: global", "normalise belongs to the OTA authors' language"),
    ("rescale: true", "rescale belongs to the OTA authors' language"),
])
def test_authors_keys_need_preconditioner_path(tmp_path, extra, needle):
    fx = ROOT / "fixtures"
    text = f"""merge_method: ota
base_model: {fx}/tiny-llama-base
models:
  - model: {fx}/tiny-llama-math
    sidecar: {fx}/tiny-exp-avg-sq.safetensors
parameters: {{{extra}}}
"""
    with pytest.raises(StreamMergeError, match=needle):
        parse_config(text)


def test_ties_density_refused():
    text = (CONFIGS / "x_ties.yml").read_text().replace("fallback_to_base: true", "ties_density: 0.5")
    raw = yaml.safe_load(text)
    raw.pop("tokenizer_source")
    with pytest.raises(StreamMergeError, match="ties_density .* not supported yet"):
        parse_config(yaml.safe_dump(raw), CONFIGS)


def test_cli_one_line_and_exit_code(tmp_path):
    raw = yaml.safe_load((CONFIGS / "hf_ota_ffg_rank1lemma.yml").read_text().replace("2.626e-19", "'x'"))
    raw.pop("tokenizer_source")
    cfg = CONFIGS / "_bad_cli_test.yml"
    cfg.write_text(yaml.safe_dump(raw))
    try:
        r = subprocess.run([sys.executable, "-c", "from streammerge.cli import main; main()", "merge", str(cfg),
                            str(tmp_path / "out")], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)})
    finally:
        cfg.unlink()
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "precond_threshold" in r.stderr
    assert not (tmp_path / "out").exists()
