import pytest
from conftest import FIXTURES

from streammerge.config import evaluate, layer_position, parse_config, resolve_parameters
from streammerge.errors import ConfigError

BASE = str(FIXTURES / "tiny-llama-base")
MATH = str(FIXTURES / "tiny-llama-math")


@pytest.mark.parametrize("setting,tensor,t,expected", [
    (0.5, "x", 0.0, 0.5),
    ([0.0, 1.0], "x", 0.25, 0.25),
    ([0.0, 1.0, 0.0], "x", 0.75, 0.5),
    ([{"filter": "mlp", "value": 0.1}, {"value": 0.9}], "model.layers.0.mlp.up_proj.weight", 0.0, 0.1),
    ([{"filter": "mlp", "value": 0.1}, {"value": 0.9}], "model.layers.0.self_attn.q_proj.weight", 0.0, 0.9),
    ([{"filter": "mlp", "value": [0.0, 1.0]}], "model.layers.1.mlp.w", 1.0, 1.0),
    ([{"filter": "attn", "value": 2}], "mlp", 0.0, None),
    ({"filter": "*", "value": 3}, "anything", 0.0, 3),
    (["a", "b"], "x", 0.9, "a"),
])
def test_evaluate_follows_mergekit(setting, tensor, t, expected):
    assert (
        evaluate(setting, tensor, t) == pytest.approx(expected)
        if expected is not None
        else evaluate(setting, tensor, t) is None
    )


def test_layer_position():
    assert layer_position("model.layers.0.mlp.w", 5) == 0.0
    assert layer_position("model.layers.4.mlp.w", 5) == 1.0
    assert layer_position("model.layers.2.mlp.w", 5) == 0.5
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("model.layers.0.x", 1) == 1.0


def _cfg(**over):
    text = f"""
merge_method: {over.get("method", "ties")}
base_model: {BASE}
models:
  - model: {MATH}
    parameters: {over.get("model_params", "{weight: 1.0}")}
parameters: {over.get("params", "{}")}
"""
    return parse_config(text)


def test_resolution_order_model_then_global_then_default():
    cfg = _cfg(model_params="{weight: 0.5}", params="{density: 0.3, lambda: 2}")
    glob, (mp,) = resolve_parameters(cfg, "model.layers.0.mlp.w", 0.0)
    assert (mp.weight, mp.density, glob.lambda_, glob.normalize) == (0.5, 0.3, 2.0, True)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"method": "nope"}, "unknown merge_method 'nope'"),
        ({"params": "{bogus: 1}"}, "unknown parameter 'bogus'"),
        ({"model_params": "{weight: 1, normalize: true}"}, "unknown per-model parameter 'normalize'"),
        ({"model_params": "{density: 0.5}"}, "missing required parameter 'weight'"),
        ({"model_params": "{weight: yes_please}"}, "weight must be a number"),
        ({"params": "{normalize: 3}"}, "normalize must be true or false"),
    ],
)
def test_bad_configs_name_the_problem(over, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(**over)


def test_bad_yaml_and_unsupported_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id that is in no cache: one line, no network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="invalid YAML.*line"):
        parse_config("merge_method: [ties\nmodels: x")
    with pytest.raises(ConfigError, match="slices"):
        parse_config(f"merge_method: ties\nslices: []\nbase_model: {BASE}")
    with pytest.raises(ConfigError, match="org/some-hub-model is not in the local cache.*hf download"):
        parse_config("merge_method: linear\nmodels:\n  - model: org/some-hub-model\n    parameters: {weight: 1}")
    with pytest.raises(ConfigError, match="needs base_model"):
        parse_config(f"merge_method: ties\nmodels:\n  - model: {MATH}\n    parameters: {{weight: 1}}")
