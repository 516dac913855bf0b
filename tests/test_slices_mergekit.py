"""slices:, modules: and passthrough against mergekit 0.1.5 itself: same config, same tensors, same layer count.

mergekit's own example configs (examples/*.yml of its repository, copied verbatim below) run with their
model ids replaced by local fixtures of the same architecture (40-layer tiny Llamas,
scripts/make_deep_fixtures.py). Skipped where mergekit is not installed.
"""

import json

import pytest
import torch
import yaml
from conftest import FIXTURES, load_folder

import streammerge
from streammerge.methods import METHODS

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
mergekit_options = pytest.importorskip("mergekit.options")

F32 = {k: str(FIXTURES / f"tiny-llama-fp32-{k}") for k in ("base", "a", "b")}
BF16 = {k: str(FIXTURES / f"tiny-llama-{k}") for k in ("base", "math", "code")}
DEEP = {k: str(FIXTURES / f"tiny-llama40-{k}") for k in ("a", "b")}

# mergekit/examples/*.yml at a6e4028 (arcee-ai/mergekit), verbatim
EXAMPLES = {
    "orcamini-platy-44layer": """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "gradient-slerp": """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
}
LOCAL_IDS = {"psmathur/orca_mini_v3_13b": DEEP["a"], "garage-bAInd/Platypus2-13B": DEEP["b"]}

CASES = {
    "passthrough_scaled_repeated_layers": {  # layers repeated and reordered, per-source scale, a single-layer slice
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": DEEP["a"], "layer_range": [0, 3], "parameters": {"scale": 0.5}}]},
            {"sources": [{"model": DEEP["b"], "layer_range": [1, 2]}]},
            {"sources": [{"model": DEEP["a"], "layer_range": [2, 5],
                          "parameters": {"scale": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]}}]},
            {"sources": [{"model": DEEP["b"], "layer_range": [38, 40]}]},
        ],
        "dtype": "float32",
    },
    "linear_gradients_per_slice": {  # t runs 0..1 inside each slice; slice and source parameters take precedence
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": DEEP["a"], "layer_range": [0, 20], "parameters": {"weight": [0.0, 1.0]}},
                         {"model": DEEP["b"], "layer_range": [20, 40]}],
             "parameters": {"weight": [1.0, 0.2, 0.7]}},
            {"sources": [{"model": DEEP["b"], "layer_range": [5, 6], "parameters": {"weight": [0.1, 0.9]}},
                         {"model": DEEP["a"], "layer_range": [7, 8]}]},
            {"sources": [{"model": DEEP["a"], "layer_range": [30, 35]},
                         {"model": DEEP["b"], "layer_range": [0, 5],
                          "parameters": {"weight": [{"filter": "layers.3.", "value": 3.0}, {"value": [2.0, 0.5]}]}}],
             "parameters": {"normalize": False}},
        ],
        "parameters": {"weight": 0.4},
        "dtype": "float32",
    },
    "ties_base_per_slice": {
        "merge_method": "ties",
        "base_model": F32["base"],
        "slices": [
            {"sources": [{"model": F32["base"], "layer_range": [0, 2]},
                         {"model": F32["a"], "layer_range": [0, 2], "parameters": {"weight": [0.5, 1.0]}},
                         {"model": F32["b"], "layer_range": [0, 2], "parameters": {"weight": 0.8}}],
             "parameters": {"density": [0.3, 0.9]}},
            {"sources": [{"model": F32["b"], "layer_range": [1, 2], "parameters": {"weight": 0.6}},
                         {"model": F32["a"], "layer_range": [0, 1], "parameters": {"weight": 0.9, "density": 0.4}},
                         {"model": F32["base"], "layer_range": [1, 2], "parameters": {"weight": 0.3}}],
             "base_model": F32["b"]},
        ],
        "parameters": {"density": 0.6, "lambda": 0.9},
        "dtype": "float32",
    },
    "task_arithmetic_post_sources_truncated": {  # mergekit merges norm/lm_head from the last slice's first 2 sources
        "merge_method": "task_arithmetic",
        "base_model": F32["base"],
        "slices": [
            {"sources": [{"model": F32["base"], "layer_range": [0, 1]},
                         {"model": F32["a"], "layer_range": [1, 2]}]},
            {"sources": [{"model": F32["base"], "layer_range": [0, 2]},
                         {"model": F32["b"], "layer_range": [0, 2]},
                         {"model": F32["a"], "layer_range": [0, 2]}]},
        ],
        "parameters": {"weight": 0.7},
        "dtype": "float32",
    },
    "modules_models_ties": {  # modules: {default: {models:}}; the base is added to the sources as mergekit does
        "merge_method": "ties",
        "base_model": F32["base"],
        "modules": {"default": {
            "models": [{"model": F32["a"], "parameters": {"weight": 1.0}},
                       {"model": F32["b"], "parameters": {"weight": [0.2, 0.8]}}],
            "parameters": {"density": 0.5},
        }},
        "parameters": {"density": 0.9, "normalize": False},
        "dtype": "float32",
    },
    "modules_slices_bf16_in_fp32_out": {
        "merge_method": "task_arithmetic",
        "base_model": BF16["base"],
        "modules": {"default": {
            "slices": [
                {"sources": [{"model": BF16["base"], "layer_range": [0, 2]},
                             {"model": BF16["math"], "layer_range": [0, 2], "parameters": {"weight": 0.6}},
                             {"model": BF16["code"], "layer_range": [0, 2], "parameters": {"weight": 0.4}}]},
                {"sources": [{"model": BF16["base"], "layer_range": [1, 2]},
                             {"model": BF16["code"], "layer_range": [0, 1], "parameters": {"weight": 1.0}}]},
            ],
            "parameters": {"lambda": 0.5},
        }},
        "dtype": "float32",
    },
}


def _mergekit(cfg: dict, out):
    config = mergekit_config.MergeConfiguration.model_validate(cfg)
    options = mergekit_options.MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True)
    mergekit_merge.run_merge(config, str(out), options=options)
    return load_folder(out)


def _compare(tmp_path, cfg_or_text):
    cfg = yaml.safe_load(cfg_or_text) if isinstance(cfg_or_text, str) else cfg_or_text
    theirs = _mergekit(cfg, tmp_path / "mergekit")
    streammerge.merge(cfg_or_text, tmp_path / "ours")
    ours = load_folder(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype, name
        # fp16/bf16 outputs: mergekit does the math in that dtype (its rounding errors scale with the tensor's
        # norm), streammerge in fp32 and rounds once: within one unit in the last place of the tensor's
        # largest value (README "Slices and frankenmerges")
        low = t.dtype in (torch.float16, torch.bfloat16)
        atol = float(torch.finfo(t.dtype).eps * t.float().abs().max()) if low else 1e-6
        torch.testing.assert_close(ours[name], t, rtol=0 if low else 1e-6, atol=atol, msg=name)
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"]
    return ours, ours_cfg


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(tmp_path, case):
    _compare(tmp_path, CASES[case])


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_mergekit_example_runs_unchanged(tmp_path, name):
    method = yaml.safe_load(EXAMPLES[name])["merge_method"]
    if method not in METHODS:
        pytest.skip(f"merge_method {method} is not in this build")
    text = EXAMPLES[name]
    for model_id, local in LOCAL_IDS.items():
        text = text.replace(model_id, local)
    ours, cfg = _compare(tmp_path, text)
    if name == "orcamini-platy-44layer":
        assert cfg["num_hidden_layers"] == 44
        a, b = load_folder(DEEP["a"]), load_folder(DEEP["b"])
        # an independent check of the renumbering: output layer 24 + i is Platypus' layer 20 + i
        for i in range(20):
            for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
                assert torch.equal(ours[f"model.layers.{24 + i}.{suffix}"], b[f"model.layers.{20 + i}.{suffix}"].half())
        assert torch.equal(ours["model.embed_tokens.weight"], a["model.embed_tokens.weight"].half())
        assert torch.equal(ours["lm_head.weight"], b["lm_head.weight"].half())


def test_pre_and_post_tensors_sorted_as_mergekit_architectures_do():
    """Every single-stack architecture in mergekit's tables: pre_weights are "pre", post_weights are not."""
    import importlib.resources

    from streammerge.slice_plan import is_pre_weight

    checked = 0
    for f in importlib.resources.files("mergekit._data.architectures").iterdir():
        if not f.name.endswith(".json"):
            continue
        arch = json.loads(f.read_text())
        if arch.get("kind", "module") != "module":
            continue  # multi-module (vision-language, encoder-decoder): refused by slices:
        for w in arch.get("pre_weights", []):
            assert is_pre_weight(w["name"]), (f.name, w["name"])
        for w in arch.get("post_weights", []):
            assert not is_pre_weight(w["name"]), (f.name, w["name"])
        checked += 1
    assert checked > 30
