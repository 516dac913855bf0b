"""``merge_method: orthomerge`` end to end (files in, HF folder or PEFT adapter out) and adapters as experts.

References: PEFT's own ``merge_and_unload`` where peft is installed, and plain formulas (fp64 Cayley by
``torch.linalg.solve``, the paper's merge rule on the stored vectors) always.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, load_folder

import streammerge
from streammerge.cli import main
from streammerge.errors import ConfigError, PlanError
from streammerge.experts import AdapterExpert
from streammerge.io.peft_adapters import open_adapter
from streammerge.io.reader import open_checkpoint

ADAPTERS = FIXTURES / "adapters"
BASE = FIXTURES / "tiny-llama-fp32-base"
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(models, params=None, method="orthomerge", base=BASE):
    cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(m)} for m in models]}
    if params:
        cfg["parameters"] = params
    return cfg


def _peft_merged(adapter_folder):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_folder).merge_and_unload().state_dict()


def _exact_rotation(vec: torch.Tensor, b: int) -> torch.Tensor:
    """blockdiag of (I − Q)(I + Q)⁻¹ from PEFT's upper-triangle vectors (n, b(b−1)/2), fp64."""
    n = vec.shape[0]
    rows, cols = torch.triu_indices(b, b, 1)
    q = torch.zeros(n, b, b, dtype=torch.float64)
    q[:, rows, cols] = vec.double()
    q = q - q.transpose(1, 2)
    eye = torch.eye(b, dtype=torch.float64).expand(n, b, b)
    r = torch.linalg.solve((eye + q).transpose(1, 2), (eye - q).transpose(1, 2)).transpose(1, 2)  # (I−Q)(I+Q)⁻¹
    return torch.block_diag(*r)


@pytest.mark.parametrize("fixture", ["oft-cayley-a", "oft-neumann-a", "oft-coft", "oft-blockshare", "lora-b"])
def test_one_adapter_merged_into_the_model_equals_peft_merge_and_unload(tmp_path, fixture):
    result = streammerge.merge(_cfg([ADAPTERS / fixture], {"lambda": 1.0}), tmp_path / "out")
    theirs = _peft_merged(ADAPTERS / fixture)
    ours = load_folder(tmp_path / "out")
    tol = 2e-6 if fixture.startswith("oft") else 2e-5  # LoRA goes through Procrustes + residual
    changed = 0
    for name, t in ours.items():
        torch.testing.assert_close(t, theirs[name], atol=tol, rtol=0, msg=name)
        changed += not torch.equal(theirs[name], load_folder(BASE)[name])
    assert changed >= 14
    kind = "Lie algebra" if fixture.startswith("oft") else "Orthogonal-Residual Decoupling"
    assert kind in result.report[0]


@pytest.mark.parametrize("lam", [None, 0.5, 1.7])
def test_two_oft_adapters_follow_the_papers_rule(tmp_path, lam):
    """The paper's rule (lambda unset or 1); streammerge's lambda scales the merged generator."""
    pair = [ADAPTERS / "oft-cayley-a", ADAPTERS / "oft-cayley-b"]
    streammerge.merge(_cfg(pair, None if lam is None else {"lambda": lam}), tmp_path / "out")
    ours = load_folder(tmp_path / "out")
    base = load_folder(BASE)
    adapters = [open_adapter(p) for p in pair]
    rotated = 0
    for name, w0 in base.items():
        vecs = [a.generator(name).double() for a in adapters if name in a.modules]
        if not vecs:
            assert torch.equal(ours[name], w0), name
            continue
        # Q̄ = (c/N)·ΣQᵢ, c = Σ‖Qᵢ‖ / ‖ΣQᵢ‖ (norms of the stored vectors: the same ratio as of the matrices)
        total = sum(vecs)
        q_bar = total * (sum(float(v.norm()) for v in vecs) / len(vecs) / float(total.norm()))
        q_bar = q_bar * (1.0 if lam is None else lam)
        m = adapters[0].modules[name]
        rot = _exact_rotation(q_bar, m.block_size)
        expected = w0.double() @ (rot if m.embedding else rot.T)
        torch.testing.assert_close(ours[name].double(), expected, atol=2e-6, rtol=0, msg=name)
        rotated += 1
    assert rotated >= 15


@pytest.mark.parametrize("pair", [("oft-cayley-a", "oft-cayley-b"), ("oft-neumann-a", "oft-neumann-b")])
def test_output_adapter_loads_in_peft_and_equals_output_model(tmp_path, pair):
    models = [ADAPTERS / p for p in pair]
    streammerge.merge(_cfg(models), tmp_path / "model")
    r = CliRunner().invoke(
        main, ["merge", _yaml(tmp_path, _cfg(models, {"output": "adapter"})), str(tmp_path / "adapter")]
    )
    assert r.exit_code == 0, r.output
    assert "written as one PEFT adapter" in r.output
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "OFT"
    theirs = _peft_merged(tmp_path / "adapter")
    for name, t in load_folder(tmp_path / "model").items():
        torch.testing.assert_close(t, theirs[name], atol=2e-6, rtol=0, msg=name)


def _yaml(tmp_path, cfg) -> str:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("variant", ["G", "C"])
def test_decoupling_one_full_expert_with_lambda_1_reproduces_it(tmp_path, variant):
    expert = FIXTURES / "tiny-llama-fp32-a"
    result = streammerge.merge(_cfg([expert], {"variant": variant, "lambda": 1.0}), tmp_path / "out")
    assert f"variant {variant}, of 1 full fine-tune(s)" in result.report[0]
    assert any("matrices decoupled" in line for line in result.report)
    ref = load_folder(expert)
    for name, t in load_folder(tmp_path / "out").items():
        torch.testing.assert_close(t, ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_mixed_experts_take_the_decoupling_path_and_say_so(tmp_path):
    models = [FIXTURES / "tiny-llama-fp32-a", ADAPTERS / "lora-a", ADAPTERS / "oft-cayley-b"]
    r = CliRunner().invoke(main, ["merge", _yaml(tmp_path, _cfg(models, {"lambda": 0.33})), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "1 full fine-tune(s), 1 LoRA adapter(s), 1 OFT adapter(s), folded" in r.output
    merged = load_folder(tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_task_arithmetic_on_a_lora_adapter_is_peft_merge(tmp_path):
    cfg = _cfg([ADAPTERS / "lora-a"], method="task_arithmetic")
    cfg["models"][0]["parameters"] = {"weight": 1.0}
    streammerge.merge(cfg, tmp_path / "out")
    theirs = _peft_merged(ADAPTERS / "lora-a")
    for name, t in load_folder(tmp_path / "out").items():
        torch.testing.assert_close(t, theirs[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("fixture", ["lora-a", "lora-b", "lora-c", "oft-cayley-a", "oft-blockshare"])
def test_adapter_expert_reads_ranges_like_the_whole_tensor(fixture):
    base = open_checkpoint(BASE)
    view = AdapterExpert(base, open_adapter(ADAPTERS / fixture, base))
    g = torch.Generator().manual_seed(0)
    for name in view.names():
        whole = view.read(name).reshape(-1).to(torch.float32)
        for _ in range(3):
            start = int(torch.randint(0, whole.numel(), (1,), generator=g))
            count = int(torch.randint(1, whole.numel() - start + 1, (1,), generator=g))
            assert torch.equal(view.read(name, start, count).to(torch.float32), whole[start : start + count]), name


def test_adapters_need_a_base_model_and_cannot_be_one(tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(ADAPTERS / "lora-a"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(PlanError, match="is a PEFT adapter; set base_model"):
        streammerge.merge(cfg, tmp_path / "a")
    with pytest.raises(PlanError, match="base_model must be the full model"):
        streammerge.merge(_cfg([FIXTURES / "tiny-llama-fp32-a"], base=ADAPTERS / "lora-a"), tmp_path / "b")


def test_output_adapter_needs_oft_adapters(tmp_path):
    with pytest.raises(ConfigError, match="output: adapter needs every model to be an OFT adapter"):
        streammerge.merge(_cfg([ADAPTERS / "lora-a"], {"output": "adapter"}), tmp_path / "out")


def test_output_adapter_lambda_scales_the_stored_generators(tmp_path):
    from safetensors.torch import load_file

    pair = [ADAPTERS / "oft-cayley-a", ADAPTERS / "oft-cayley-b"]
    streammerge.merge(_cfg(pair, {"output": "adapter"}), tmp_path / "one")
    streammerge.merge(_cfg(pair, {"output": "adapter", "lambda": 0.5}), tmp_path / "half")
    one, half = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "half"))
    assert one.keys() == half.keys()
    for key, t in one.items():
        assert torch.equal(half[key], t * 0.5), key  # a power of two: exact


UNUSED = [
    (["oft-cayley-a", "oft-cayley-b"], {"density": 0.3}, "density is not used by orthomerge"),
    (["oft-cayley-a", "oft-cayley-b"], {"variant": "C", "residual_method": "ties"}, "residual_method, variant are"),
    (["lora-a", "lora-b"], {"density": 0.3}, "density is not used"),  # ORD without ties: no density
]


@pytest.mark.parametrize("models,params,needle", UNUSED)
def test_parameters_a_path_does_not_use_are_refused(tmp_path, models, params, needle):
    with pytest.raises(ConfigError, match=needle):
        streammerge.merge(_cfg([ADAPTERS / m for m in models], params), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_density_is_used_by_ord_with_ties(tmp_path):
    result = streammerge.merge(
        _cfg([ADAPTERS / "lora-a", ADAPTERS / "lora-b"], {"residual_method": "ties", "density": 0.3}), tmp_path / "o"
    )
    assert "residuals by ties (lambda 1.0, density 0.3)" in result.report[0]
