"""slices:, modules: and passthrough on streammerge's own terms: tensors against an independent
construction from the inputs, config.json, refusals of bad input (one line, nothing written),
crash-resume and chunk-size independence of a frankenmerge, loading in transformers."""

import json
import re
import shutil
import signal
import textwrap

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import FIXTURES, load_folder, save_folder, snapshot

import streammerge
from streammerge.cli import main
from streammerge.errors import StreamMergeError

DEEP = {k: FIXTURES / f"tiny-llama40-{k}" for k in ("a", "b")}
F32 = {k: FIXTURES / f"tiny-llama-fp32-{k}" for k in ("base", "a", "b")}
LORA = FIXTURES / "adapters" / "lora-a"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def frankenmerge(ranges: list[tuple[str, int, int]], **extra) -> dict:
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(DEEP[m]), "layer_range": [s, e]}]} for m, s, e in ranges], **extra}


def test_frankenmerge_renumbers_layers_and_takes_outer_tensors_from_first_and_last_slice(tmp_path):
    ranges = [("a", 0, 3), ("b", 10, 12), ("a", 1, 2), ("b", 39, 40)]
    streammerge.merge(frankenmerge(ranges), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    src = {k: load_folder(p) for k, p in DEEP.items()}
    expected = {"model.embed_tokens.weight": src["a"]["model.embed_tokens.weight"],
                "model.norm.weight": src["b"]["model.norm.weight"], "lm_head.weight": src["b"]["lm_head.weight"]}
    k = 0
    for m, s, e in ranges:
        for layer in range(s, e):
            prefix = f"model.layers.{layer}."
            for name, t in src[m].items():
                if name.startswith(prefix):
                    expected[f"model.layers.{k}." + name[len(prefix):]] = t
            k += 1
    assert set(out) == set(expected) and k == 7
    for name, t in expected.items():
        assert torch.equal(out[name], t), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7 and cfg["hidden_size"] == 8
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text()) \
        if (tmp_path / "out" / "model.safetensors.index.json").exists() else None
    assert index is None or set(index["weight_map"]) == set(expected)


def test_frankenmerge_loads_and_runs_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    assert run("merge", _write(tmp_path, frankenmerge([("a", 0, 24), ("b", 20, 40)])), tmp_path / "out", "-q")[0] == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 44 and len(model.model.layers) == 44
    ours = load_folder(tmp_path / "out")
    sd = model.state_dict()
    assert all(torch.equal(sd[n], t) for n, t in ours.items())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()


def test_per_layer_config_lists_follow_the_layers_taken(tmp_path):
    folders = {}
    for k in ("a", "b"):
        folders[k] = shutil.copytree(DEEP[k], tmp_path / k)
        cfg = json.loads((folders[k] / "config.json").read_text())
        cfg["layer_types"] = [f"{k}{i}" for i in range(40)]
        (folders[k] / "config.json").write_text(json.dumps(cfg))
    config = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(folders["b"]), "layer_range": [5, 7]}]},
        {"sources": [{"model": str(folders["a"]), "layer_range": [38, 40]}]},
        {"sources": [{"model": str(folders["b"]), "layer_range": [0, 1]}]},
    ]}
    streammerge.merge(config, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    assert cfg["layer_types"] == ["b5", "b6", "a38", "a39", "b0"]


def test_passthrough_keeps_stored_bytes_and_dtypes(tmp_path):
    """bf16 weights and fp32 norms (no dtype: set) come out bit for bit, each in its own dtype."""
    bf16 = {k: FIXTURES / f"tiny-llama-{k}" for k in ("base", "math")}
    streammerge.merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(bf16["math"]), "layer_range": [1, 2]}]},
        {"sources": [{"model": str(bf16["base"]), "layer_range": [0, 2]}]},
    ]}, tmp_path / "out")
    out, math, base = load_folder(tmp_path / "out"), load_folder(bf16["math"]), load_folder(bf16["base"])
    assert {t.dtype for t in out.values()} == {torch.bfloat16, torch.float32}
    pairs = [("model.layers.0.", math, "model.layers.1."), ("model.layers.1.", base, "model.layers.0."),
             ("model.layers.2.", base, "model.layers.1.")]
    for out_prefix, src, src_prefix in pairs:
        for name, t in src.items():
            if name.startswith(src_prefix):
                o = out[out_prefix + name[len(src_prefix):]]
                assert o.dtype == t.dtype and torch.equal(o, t), name
    assert torch.equal(out["model.embed_tokens.weight"], math["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"])


def test_passthrough_with_models_copies_one_model(tmp_path):
    streammerge.merge({"merge_method": "passthrough", "models": [{"model": str(F32["a"]), "parameters": {"scale": 2}}],
                       "out_dtype": "bfloat16"}, tmp_path / "out")
    out, src = load_folder(tmp_path / "out"), load_folder(F32["a"])
    assert set(out) == set(src)
    assert all(torch.equal(out[n], (2 * t).to(torch.bfloat16)) for n, t in src.items())


def test_dry_run_lists_the_slices(tmp_path):
    code, text = run("merge", _write(tmp_path, frankenmerge([("a", 0, 24), ("b", 20, 40)])), tmp_path / "out",
                     "--dry-run")
    assert code == 0, text
    assert "44 layers" in text and "[20, 40] -> layers 24..43" in text
    assert not (tmp_path / "out").exists()


def _write(tmp_path, cfg: dict | str):
    p = tmp_path / "cfg.yaml"
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return p


def _narrow_model(tmp_path):
    """A 2-layer Llama whose hidden size (4) differs from the deep fixtures' (8)."""
    t = {"model.embed_tokens.weight": torch.zeros(32, 4), "model.norm.weight": torch.ones(4),
         "lm_head.weight": torch.zeros(32, 4)}
    for i in range(2):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.zeros(4, 4)
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(4)
    folder = save_folder(tmp_path / "narrow", t)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    return folder


def _model_lacking_a_tensor(tmp_path):
    t = load_folder(F32["a"])
    del t["model.layers.1.mlp.up_proj.weight"]
    return save_folder(tmp_path / "lacking", t)


def _two_stack_model(tmp_path):
    t = {f"{p}.layers.{i}.w": torch.ones(2) for p in ("text_model", "vision_model") for i in range(2)}
    return save_folder(tmp_path / "twostack", t)


def _src(model, lr, **kw):
    return {"model": str(model), "layer_range": lr, **kw}


def _cfg(method: str, *slices: list, **extra) -> dict:
    """A config of ``slices`` (each a list of sources, or a dict with more keys), plus top-level ``extra``."""
    return {"merge_method": method, "slices": [s if isinstance(s, dict) else {"sources": s} for s in slices],
            **extra}


A2, W1 = _src(DEEP["a"], [0, 2]), {"parameters": {"weight": 1}}
BAD = [  # (config builder, needle in the one-line error)
    (lambda tp: frankenmerge([("a", 0, 24), ("b", 20, 44)]),
     r"slices\[1\]\.sources\[0\]\.layer_range \[20, 44\]: .*tiny-llama40-b has 40 layers \(0\.\.39\)"),
    (lambda tp: _cfg("linear", [_src(DEEP["a"], [0, 4]), _src(DEEP["b"], [0, 3])], **W1),
     r"slices\[0\]\.sources: layer ranges \[0, 4\], \[0, 3\] hold different numbers of layers"),
    (lambda tp: _cfg("passthrough", [A2], [_src(_narrow_model(tp), [0, 2])]),
     r"slices\[1\]: tensor 'model\.layers\.0\..*narrow is \[4.*must be \[8.*cannot stack"),
    (lambda tp: _cfg("passthrough", {"sources": [A2], "residual_weight": 0.5}),
     r"slices\[0\]: unknown key 'residual_weight' \(mergekit 0\.1\.5 reads it but never uses it\)"),
    (lambda tp: _cfg("passthrough", [_src(DEEP["a"], [0, 2], layers=3)]),
     r"slices\[0\]\.sources\[0\]: unknown key 'layers'"),
    (lambda tp: {"merge_method": "passthrough", "modules": {"decoder": {"slices": [{"sources": [A2]}]}}},
     r"modules: unknown module 'decoder'"),
    (lambda tp: {"merge_method": "passthrough", "modules": {"default": {"slices": [{"sources": [A2]}], "weights": 1}}},
     r"modules\.default: unknown key 'weights'"),
    (lambda tp: _cfg("passthrough", [A2], models=[{"model": str(DEEP["a"])}]),
     r"give exactly one of models:, slices: or modules:"),
    (lambda tp: _cfg("passthrough", [_src(DEEP["a"], [3, 3])]),
     r"layer_range must be \[start, end\] with 0 <= start < end"),
    (lambda tp: _cfg("passthrough", [A2, _src(DEEP["b"], [0, 2])]),
     r"slices\[0\]: merge_method passthrough takes at most 1 model\(s\) per slice, this one lists 2"),
    (lambda tp: {"merge_method": "passthrough", "models": [{"model": str(DEEP["a"])}, {"model": str(DEEP["b"])}]},
     r"passthrough takes at most 1 model\(s\) under models:, got 2"),
    (lambda tp: _cfg("ties", [_src(F32["a"], [0, 2]), _src(F32["b"], [0, 2])], base_model=str(F32["base"]), **W1),
     r"slices\[0\]: base model .*tiny-llama-fp32-base is not among the sources"),
    (lambda tp: _cfg("linear", [_src(F32["a"], [0, 2]), _src(F32["a"], [0, 2])], **W1),
     r"slices\[0\]\.sources\[1\]: model .*fp32-a is already a source of this slice"),
    (lambda tp: _cfg("linear", [_src(F32["a"], [0, 2], parameters={"weight": 1}), _src(F32["b"], [0, 2])]),
     r"missing required parameter 'weight'"),
    (lambda tp: _cfg("linear", [_src(F32["a"], [0, 2], parameters={"normalize": 1})]),
     r"slices\[0\]\.sources\[0\]\.parameters: unknown per-model parameter 'normalize'"),
    (lambda tp: _cfg("ties", {"sources": [_src(F32["base"], [0, 2]), _src(F32["a"], [0, 2])],
                              "parameters": {"dens": 1}}, base_model=str(F32["base"])),
     r"slices\[0\]\.parameters: unknown parameter 'dens' for ties"),
    (lambda tp: _cfg("ota", [_src(F32["a"], [0, 2])]),
     r"merge_method ota works on models: only"),
    (lambda tp: _cfg("linear", [_src(LORA, [0, 2])], base_model=str(F32["base"]), **W1),
     r"lora-a: is a PEFT adapter; slices: takes full models"),
    (lambda tp: _cfg("passthrough", [_src(_two_stack_model(tp), [0, 2])]),
     r"holds more than one layer stack \(text_model\.layers\., vision_model\.layers\.\)"),
    (lambda tp: _cfg("passthrough", [{"model": str(DEEP["a"]), "layer_range": "0-2"}]),
     r"layer_range must be \[start, end\]"),
    (lambda tp: _cfg("linear", [_src(F32["a"], [0, 2]), _src(_model_lacking_a_tensor(tp), [0, 2])], **W1),
     r"slices\[0\]\.sources\[1\]: layer 1 of .*fp32-a has tensor …\.mlp\.up_proj\.weight that the matching "
     r"layer of .*lacking lacks"),
    (lambda tp: {"merge_method": "passthrough",
                 "modules": {"default": {"slices": [{"sources": [_src(DEEP["a"], [0, 50])]}]}}},
     r"modules\.default\.slices\[0\]\.sources\[0\]\.layer_range \[0, 50\]: .* has 40 layers"),
]


@pytest.mark.parametrize("build,needle", BAD)
def test_bad_slices_are_refused_in_one_line_and_nothing_is_written(tmp_path, build, needle):
    out = tmp_path / "out"
    before = snapshot(*DEEP.values(), *F32.values())
    code, text = run("merge", _write(tmp_path, build(tmp_path)), out, "-q")
    assert code == 1, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert re.search(needle, lines[0]), lines[0]
    assert not out.exists()
    assert snapshot(*DEEP.values(), *F32.values()) == before
    with pytest.raises(StreamMergeError):
        streammerge.plan(_write(tmp_path, build(tmp_path)), out)


# ---------------------------------------------------------------- resume and chunk size


CHUNK = 1 << 20


@pytest.fixture(scope="module")
def stacked_models(tmp_path_factory):
    """base + 2 experts with 3 layers and a 3-chunk embedding (chunks of 2^20), for resume and chunking checks."""
    root = tmp_path_factory.mktemp("models")
    g = torch.Generator().manual_seed(3)
    base = {"model.embed_tokens.weight": torch.randn(2100, 1024, generator=g), "lm_head.weight": torch.randn(64, 256)}
    for i in range(3):
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(128, 256, generator=g)
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(256, generator=g)
    paths = [save_folder(root / "base", base, shards=2)]
    for e in range(2):
        paths.append(save_folder(root / f"e{e}", {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                    for k, v in base.items()}, shards=2))
    for p in paths:
        (p / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "model_type": "llama"}))
    return paths


def _frankenmerge(tmp_path, models, method="task_arithmetic") -> str:
    base, e0, e1 = models
    d1, d2, d3 = (", density: 0.4", ", density: [0.2, 0.9]", ", density: 0.5") if method == "ties" else ("", "", "")
    path = tmp_path / "franken.yaml"
    path.write_text(textwrap.dedent(f"""\
        merge_method: {method}
        base_model: {base}
        slices:
          - sources:
              - {{model: {base}, layer_range: [0, 3]}}
              - {{model: {e0}, layer_range: [0, 3], parameters: {{weight: 0.7{d1}}}}}
              - {{model: {e1}, layer_range: [0, 3], parameters: {{weight: 0.5{d2}}}}}
          - sources:
              - {{model: {base}, layer_range: [1, 3]}}
              - {{model: {e1}, layer_range: [0, 2], parameters: {{weight: 1.0{d3}}}}}
        out_dtype: bfloat16
        """))
    return str(path)


def _model_files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_frankenmerge_bytes_do_not_depend_on_chunk_size(tmp_path, stacked_models):
    config = _frankenmerge(tmp_path, stacked_models, "ties")
    streammerge.merge(config, tmp_path / "a", chunk_elements=CHUNK, device="cpu")
    streammerge.merge(config, tmp_path / "b", chunk_elements=4 * CHUNK, device="cpu")
    a = _model_files(tmp_path / "a")
    assert a == _model_files(tmp_path / "b")
    assert json.loads(a["config.json"])["num_hidden_layers"] == 5


@pytest.mark.parametrize("point,k", [("after_record", 4), ("mid_tensor", 1)])
def test_killed_frankenmerge_resumes_to_the_same_bytes(tmp_path, stacked_models, point, k):
    from test_resume import _run_driver

    config = _frankenmerge(tmp_path, stacked_models)
    ref = tmp_path / "ref"
    streammerge.merge(config, ref, chunk_elements=CHUNK, out_shard_size="5MB", device="cpu")
    out = tmp_path / "out"
    proc = _run_driver(tmp_path, config, out, point, k)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    result = streammerge.merge(config, out, chunk_elements=CHUNK, out_shard_size="5MB", device="cpu")
    assert result.resumed_tensors == (k if point == "after_record" else 0)
    assert _model_files(out) == _model_files(ref)
    assert run("verify", out)[0] == 0
