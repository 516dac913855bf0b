"""PEFT adapter readers and writer: key tables, config rules, folds and LoRA materialisation against
plain formulas (always) and against PEFT's own merge_and_unload (where peft is installed)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, load_folder, save_folder
from safetensors.torch import load_file, save_file

from streammerge.errors import CheckpointError
from streammerge.io.adapter_writer import AdapterWriter, merged_adapter_config, write_adapter
from streammerge.io.peft_adapters import LoraAdapter, OftAdapter, open_adapter
from streammerge.io.peft_keys import (
    AdapterKey,
    adjust_oft_parameters,
    lora_scaling,
    neumann_convention,
    oft_block_size,
    parse_key,
    parse_version,
    pattern_value,
)
from streammerge.io.reader import open_checkpoint
from streammerge.io.safetensors_format import TensorSpec
from streammerge.methods.orthomerge import fold_oft, oft_rotation_blocks

ADAPTERS = FIXTURES / "adapters"
BASE = FIXTURES / "tiny-llama-fp32-base"
OFT_FIXTURES = [
    "oft-cayley-a",
    "oft-cayley-b",
    "oft-neumann-a",
    "oft-neumann-b",
    "oft-coft",
    "oft-blockshare",
    "oft-rank",
]
LORA_FIXTURES = ["lora-a", "lora-b", "lora-c"]
pytestmark = pytest.mark.usefixtures("one_thread")


def copy_adapter(tmp_path: Path, name: str, **config_changes) -> Path:
    folder = tmp_path / name
    shutil.copytree(ADAPTERS / name, folder)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in config_changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return folder


_DELETE = object()


# --- pure key and config rules ----------------------------------------------------------------------


P = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "key, expected",
    [
        (f"{P}.oft_R.weight", AdapterKey(f"{P}.oft_R.weight", P[17:], "oft", P[17:] + ".weight")),
        (f"{P}.lora_A.weight", AdapterKey(f"{P}.lora_A.weight", P[17:], "lora_A", P[17:] + ".weight")),
        (f"{P}.lora_B.bias", AdapterKey(f"{P}.lora_B.bias", P[17:], "lora_B_bias", P[17:] + ".bias")),
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            AdapterKey(
                "base_model.model.model.embed_tokens.lora_embedding_A",
                "model.embed_tokens",
                "lora_embedding_A",
                "model.embed_tokens.weight",
            ),
        ),
        (
            "base_model.model.model.embed_tokens.oft_embedding_R.weight",
            AdapterKey(
                "base_model.model.model.embed_tokens.oft_embedding_R.weight",
                "model.embed_tokens",
                "oft_embedding",
                "model.embed_tokens.weight",
            ),
        ),
        (
            "base_model.model.model.norm.weight",
            AdapterKey("base_model.model.model.norm.weight", "model.norm", "replacement", "model.norm.weight"),
        ),
        (
            "base_model.model.model.embed_tokens.base_layer.weight",
            AdapterKey(
                "base_model.model.model.embed_tokens.base_layer.weight",
                "model.embed_tokens",
                "replacement",
                "model.embed_tokens.weight",
            ),
        ),
        (f"{P}.oft_r", "pre-0.16"),
        (f"{P}.oft_s", "0.14-0.15"),
        (f"{P}.boft_R", "BOFT"),
        (f"{P}.lora_magnitude_vector", "DoRA"),
        (f"{P}.hada_w1_a", "does not read"),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", "does not start with"),
        (f"{P}.modules_to_save.default.weight", "adapter name"),
    ],
)
def test_parse_key(key, expected):
    parsed = parse_key(key)
    if isinstance(expected, AdapterKey):
        assert parsed == expected
    else:
        assert isinstance(parsed, str) and expected in parsed


@pytest.mark.parametrize(
    "version, convention",
    [
        (None, "peft-0.16"),
        ("0.16.0", "peft-0.16"),
        ("0.17.1", "peft-0.16"),
        ("0.18.0", "peft-0.18"),
        ("0.18.0.dev0@0123abc", "peft-0.18"),
        ("0.21.2", "peft-0.18"),
        ("1.0", "peft-0.18"),
        ("garbage", "peft-0.16"),
    ],
)
def test_neumann_convention_from_peft_version(version, convention):
    assert neumann_convention(version) == convention
    assert parse_version("0.18.0.dev0@abc") == (0, 18, 0)


def test_oft_block_size_rules_match_peft():
    layer = pytest.importorskip("peft.tuners.oft.layer")
    for in_features in (12, 64, 96, 100, 128):
        for value in (1, 3, 5, 7, 8, 16, 30, 64, 200):
            assert adjust_oft_parameters(in_features, value) == layer.OFTLayer.adjust_oft_parameters(
                None, in_features, value
            )
    assert oft_block_size(64, 0, 8) == 8 and oft_block_size(128, 4, 0) == 32 and oft_block_size(100, 0, 8) == 10
    with pytest.raises(ValueError):
        oft_block_size(64, 4, 8)


def test_pattern_lookup_matches_peft():
    other = pytest.importorskip("peft.utils.other")
    patterns = {"layers.1.mlp.down_proj": 6, "q_proj": 2, r"layers\.[01]\.self_attn\.v_proj": 5}
    for module in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.0.self_attn.k_proj",
        "xq_proj",
    ):
        key = other.get_pattern_key(patterns.keys(), module)
        assert pattern_value(patterns, module, 4) == patterns.get(key, 4), module


def test_lora_scaling():
    assert lora_scaling(8, 4, False) == 2.0
    assert lora_scaling(4, 8, True) == pytest.approx(4 / math.sqrt(8))


# --- OFT: folds -------------------------------------------------------------------------------------


def formula_rotation(vec: torch.Tensor, b: int, config: dict, blocks: int, convention: str) -> torch.Tensor:
    """R = blockdiag(R_1 … R_n) straight from the formulas (inverse, powers), independent of the code."""
    rows, cols = torch.triu_indices(b, b, 1)
    eye = torch.eye(b, dtype=torch.float64)
    mats = []
    for v in vec.double():
        q = torch.zeros(b, b, dtype=torch.float64)
        q[rows, cols] = v
        q = q - q.T
        if config.get("coft"):
            radius = config["eps"] / math.sqrt(vec.shape[0])
            q = q * min(1.0, radius / float(torch.linalg.matrix_norm(q)))
        if not config["use_cayley_neumann"]:
            mats.append((eye - q) @ torch.linalg.inv(eye + q))
            continue
        k = config["num_cayley_neumann_terms"]
        if convention == "peft-0.16":
            mats.append(eye + sum(2 * torch.linalg.matrix_power(q, j) for j in range(1, k)))
        else:  # I + 2Q + … + 2Q^(k−2) + Q^(k−1) (k >= 4 here)
            mats.append(
                eye
                + sum(2 * torch.linalg.matrix_power(q, j) for j in range(1, k - 1))
                + torch.linalg.matrix_power(q, k - 1)
            )
    mats = mats * (blocks if len(mats) == 1 else 1)
    return torch.block_diag(*mats)


def our_fold(adapter: OftAdapter, name: str, w0: torch.Tensor) -> torch.Tensor:
    m, rot = adapter.modules[name], adapter.rotation
    blocks = oft_rotation_blocks(
        adapter.generator(name), m.block_size, rot.neumann_terms, rot.neumann_convention, rot.coft_eps
    )
    return fold_oft(w0, blocks, m.embedding)


@pytest.mark.parametrize("fixture", OFT_FIXTURES)
def test_oft_fold_equals_the_formula(fixture):
    base = open_checkpoint(BASE)
    adapter = open_adapter(ADAPTERS / fixture, base)
    config = json.loads((ADAPTERS / fixture / "adapter_config.json").read_text())
    assert len(adapter.modules) >= 14
    for name, m in adapter.modules.items():
        w0 = base.read(name).double()
        r = formula_rotation(adapter.generator(name), m.block_size, config, w0.shape[1] // m.block_size, "peft-0.18")
        expected = w0 @ r if m.embedding else w0 @ r.T
        assert torch.allclose(our_fold(adapter, name, base.read(name)).double(), expected, atol=1e-6), name
        assert not torch.allclose(expected, w0, atol=1e-3)


@pytest.mark.parametrize("fixture", OFT_FIXTURES + LORA_FIXTURES)
def test_fold_and_materialisation_equal_peft_merge_and_unload(fixture):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = open_checkpoint(BASE)
    adapter = open_adapter(ADAPTERS / fixture, base)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(model, ADAPTERS / fixture).merge_and_unload().state_dict()
    changed = 0
    for name in base.names():
        w0 = base.read(name)
        if isinstance(adapter, OftAdapter):
            ours = our_fold(adapter, name, w0) if name in adapter.modules else w0
        else:
            ours = adapter.expert_tensor(name, w0)
        assert torch.allclose(ours, theirs[name], atol=2e-6, rtol=0), name
        changed += not torch.equal(theirs[name], w0)
    assert changed >= 14


@pytest.mark.parametrize(
    "version, convention", [(_DELETE, "peft-0.16"), ("0.17.1", "peft-0.16"), ("0.18.0", "peft-0.18")]
)
def test_legacy_neumann_convention_follows_peft_version(tmp_path, version, convention):
    folder = copy_adapter(tmp_path, "oft-neumann-a", peft_version=version)
    base = open_checkpoint(BASE)
    adapter = open_adapter(folder, base)
    assert adapter.rotation.neumann_convention == convention
    config = json.loads(folder.joinpath("adapter_config.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    m = adapter.modules[name]
    w0 = base.read(name).double()
    r = formula_rotation(adapter.generator(name), m.block_size, config, w0.shape[1] // m.block_size, convention)
    assert torch.allclose(our_fold(adapter, name, base.read(name)).double(), w0 @ r.T, atol=1e-6)
    other = formula_rotation(
        adapter.generator(name),
        m.block_size,
        config,
        w0.shape[1] // m.block_size,
        "peft-0.18" if convention == "peft-0.16" else "peft-0.16",
    )
    assert not torch.allclose(w0 @ r.T, w0 @ other.T, atol=1e-6)  # the switch matters on these weights


# --- LoRA ---------------------------------------------------------------------------------------------

# scalings worked out by hand from the fixtures' configs (see scripts/make_adapter_fixtures.py)
LORA_SCALING = {
    ("lora-a", "q_proj", 0): 8 / 4,
    ("lora-b", "q_proj", 0): 4 / math.sqrt(8),  # use_rslora
    ("lora-b", "embed_tokens", 0): 4 / math.sqrt(8),
    ("lora-c", "q_proj", 1): 8 / 2,  # rank_pattern q_proj: 2
    ("lora-c", "down_proj", 0): 3 / 4,  # alpha_pattern down_proj: 3
    ("lora-c", "down_proj", 1): 3 / 6,  # rank_pattern layers.1.mlp.down_proj: 6
    ("lora-c", "up_proj", 1): 8 / 4,
}


@pytest.mark.parametrize("fixture, module, layer", list(LORA_SCALING))
def test_lora_materialisation_equals_the_formula(fixture, module, layer):
    base = open_checkpoint(BASE)
    adapter = open_adapter(ADAPTERS / fixture, base)
    raw = load_file(ADAPTERS / fixture / "adapter_model.safetensors")
    s = LORA_SCALING[(fixture, module, layer)]
    if module == "embed_tokens":
        name, prefix = "model.embed_tokens.weight", "base_model.model.model.embed_tokens."
        delta = (raw[prefix + "lora_embedding_B"] @ raw[prefix + "lora_embedding_A"]).T
    else:
        kind = "mlp" if module.endswith(("up_proj", "down_proj", "gate_proj")) else "self_attn"
        name = f"model.layers.{layer}.{kind}.{module}.weight"
        prefix = f"base_model.model.{name[: -len('weight')]}"
        delta = raw[prefix + "lora_B.weight"] @ raw[prefix + "lora_A.weight"]
    w0 = base.read(name)
    assert torch.allclose(adapter.expert_tensor(name, w0), w0 + s * delta, atol=1e-6)
    assert torch.allclose(adapter.delta(name), s * delta, atol=1e-6)


def test_lora_modules_to_save_replace_the_base_tensor():
    base = open_checkpoint(BASE)
    adapter = open_adapter(ADAPTERS / "lora-c", base)
    saved = load_file(ADAPTERS / "lora-c" / "adapter_model.safetensors")["base_model.model.model.norm.weight"]
    assert "model.norm.weight" in adapter.targets()
    assert torch.equal(adapter.expert_tensor("model.norm.weight", base.read("model.norm.weight")), saved)
    assert not torch.equal(saved, base.read("model.norm.weight"))
    untouched = "model.layers.0.input_layernorm.weight"
    assert torch.equal(adapter.expert_tensor(untouched, base.read(untouched)), base.read(untouched))


def test_bin_adapters_read_like_safetensors(tmp_path):
    folder = tmp_path / "lora-a-bin"
    folder.mkdir()
    shutil.copy(ADAPTERS / "lora-a" / "adapter_config.json", folder)
    torch.save(load_file(ADAPTERS / "lora-a" / "adapter_model.safetensors"), folder / "adapter_model.bin")
    base = open_checkpoint(BASE)
    a, b = open_adapter(folder, base), open_adapter(ADAPTERS / "lora-a", base)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(a.expert_tensor(name, base.read(name)), b.expert_tensor(name, base.read(name)))


def test_gpt2_conv1d_fan_in_fan_out_and_lora_bias_equal_peft(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_bias=True)
    )
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.copy_(0.2 * torch.randn(p.shape))
    peft_model.save_pretrained(tmp_path / "adapter")
    base = open_checkpoint(tmp_path / "base")
    adapter = open_adapter(tmp_path / "adapter", base)
    assert adapter.biases and all(m.fan_in_fan_out for m in adapter.modules.values())
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    theirs = PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    for name in adapter.targets():
        assert torch.allclose(adapter.expert_tensor(name, base.read(name)), theirs[name], atol=1e-6), name


# --- errors -------------------------------------------------------------------------------------------


def one_line_error(match: str):
    return pytest.raises(CheckpointError, match=match)


def test_missing_config_and_weights(tmp_path):
    (tmp_path / "only-weights").mkdir()
    shutil.copy(ADAPTERS / "lora-a" / "adapter_model.safetensors", tmp_path / "only-weights")
    with one_line_error("no adapter_config.json"):
        open_adapter(tmp_path / "only-weights")
    (tmp_path / "only-config").mkdir()
    shutil.copy(ADAPTERS / "lora-a" / "adapter_config.json", tmp_path / "only-config")
    with one_line_error("no adapter_model.safetensors or adapter_model.bin"):
        open_adapter(tmp_path / "only-config")


@pytest.mark.parametrize(
    "fixture, changes, match",
    [
        ("lora-a", {"use_dora": True}, "DoRA"),
        ("lora-a", {"init_lora_weights": "pissa_niter_4"}, "init_lora_weights 'pissa_niter_4'"),
        ("lora-a", {"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
        ("lora-a", {"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ("lora-a", {"peft_type": "BOFT"}, "BOFT adapters"),
        ("lora-c", {"rank_pattern": {"q_proj": 3}}, "has rank 2, but the config"),
        ("oft-cayley-a", {"oft_block_size": 16}, "holds 8 block\\(s\\) of size 8"),
        ("oft-cayley-a", {"oft_block_size": _DELETE}, "PEFT < 0.14"),
        ("oft-cayley-a", {"r": 8}, "exactly one of r"),
        ("oft-blockshare", {"block_share": False}, "holds 1 block"),
    ],
)
def test_bad_configs_are_refused_clearly(tmp_path, fixture, changes, match):
    folder = copy_adapter(tmp_path, fixture, **changes)
    with one_line_error(match) as info:
        open_adapter(folder, open_checkpoint(BASE))
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"q_proj.oft_r": (8, 8, 8)}, "PEFT <= 0.13 OFT format"),
        ({"q_proj.oft_r": (8, 8, 8), "q_proj.oft_s": (64, 1)}, "PEFT 0.14-0.15 OFT format"),
        (
            {"q_proj.lora_A.weight": (4, 64), "q_proj.lora_B.weight": (64, 4), "q_proj.lora_magnitude_vector": (64,)},
            "DoRA",
        ),
        ({"q_proj.lora_A.weight": (4, 64), "q_proj.hada_w1_a": (4, 4)}, "does not read"),
        ({"q_proj.lora_A.weight": (4, 64)}, "not both LoRA A and B"),
        (
            {"q_proj.lora_A.weight": (4, 48), "q_proj.lora_B.weight": (64, 4)},
            "needs base 'model.layers.0.self_attn.q_proj.weight' of shape \\(64, 48\\)",
        ),
        ({"q_prj.lora_A.weight": (4, 64), "q_prj.lora_B.weight": (64, 4)}, "which the base model .* lacks"),
        ({"q_proj.oft_R.weight": (8, 27)}, "not b\\(b-1\\)/2"),
    ],
)
def test_bad_adapter_tensors_name_file_and_tensor(tmp_path, keys, match):
    kind = "OFT" if any("oft" in k for k in keys) else "LORA"
    config = json.loads(
        (ADAPTERS / ("oft-cayley-a" if kind == "OFT" else "lora-a") / "adapter_config.json").read_text()
    )
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn."
    save_file({prefix + k: torch.zeros(shape) for k, shape in keys.items()}, folder / "adapter_model.safetensors")
    with one_line_error(match) as info:
        open_adapter(folder, open_checkpoint(BASE))
    assert "adapter_model.safetensors" in str(info.value) or "adapter_config.json" in str(info.value)


def test_base_shape_mismatch_is_reported(tmp_path):
    tensors = load_folder(BASE)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 48)
    base = open_checkpoint(save_folder(tmp_path / "other-base", tensors))
    with one_line_error("k_proj.oft_R.weight'.*holds 8 block.*needs 6 of size 8"):
        open_adapter(ADAPTERS / "oft-neumann-a", base)
    with one_line_error("k_proj.lora_A.weight'.*shape \\(32, 64\\).*has \\(32, 48\\)"):
        open_adapter(ADAPTERS / "lora-a", base)


# --- writer -------------------------------------------------------------------------------------------


def test_writer_bytes_equal_the_reference_and_config_is_written(tmp_path):
    tensors = load_file(ADAPTERS / "oft-neumann-a" / "adapter_model.safetensors")
    config = json.loads((ADAPTERS / "oft-neumann-a" / "adapter_config.json").read_text())
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with AdapterWriter(tmp_path / "out", config, specs) as w:
        for k in reversed(list(tensors)):  # any order
            w.write(k, tensors[k])
        w.finish()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == config
    write_adapter(tmp_path / "again", config, tensors)
    assert isinstance(open_adapter(tmp_path / "again", open_checkpoint(BASE)), OftAdapter)


def test_merged_adapter_config_unions_targets_and_refuses_mixtures():
    base = open_checkpoint(BASE)
    a, b = (open_adapter(ADAPTERS / n, base) for n in ("oft-cayley-a", "oft-coft"))
    with one_line_error("coft eps"):
        merged_adapter_config([a, b])
    c = open_adapter(ADAPTERS / "oft-cayley-b", base)
    config = merged_adapter_config([a, c])
    assert config["target_modules"] == sorted(set(a.config["target_modules"]))
    assert config["inference_mode"] is True and config["use_cayley_neumann"] is False
    assert isinstance(open_adapter(ADAPTERS / "lora-a"), LoraAdapter)
