import pytest
import torch
from conftest import FIXTURES, load_folder, save_folder, snapshot

import streammerge
from streammerge.engine import resolve_device
from streammerge.errors import StreamMergeError

BASE, A, B = (str(FIXTURES / f"tiny-llama-fp32-{k}") for k in ("base", "a", "b"))


def _cfg(method, **params):
    return {"merge_method": method, "base_model": BASE, "seed": 3,
            "models": [{"model": A, "parameters": {"weight": 0.7, "density": 0.4}},
                       {"model": B, "parameters": {"weight": 0.5, "density": 0.6}}],
            "parameters": params}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """base + 2 experts with a 3 M-element tensor: 3 chunks of 2^20 elements, or 1 of 2^22."""
    root = tmp_path_factory.mktemp("wide")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(1500, 2048, generator=g), "b": torch.randn(7, generator=g)}
    paths = [save_folder(root / "base", base)]
    for i in range(2):
        paths.append(
            save_folder(root / f"e{i}", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        )
    return [str(p) for p in paths]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic"])
def test_output_bytes_do_not_depend_on_chunk_size(tmp_path, wide_models, method):
    base, e0, e1 = wide_models
    cfg = {
        "merge_method": method,
        "base_model": base,
        "seed": 3,
        "out_dtype": "bfloat16",
        "models": [{"model": e0, "parameters": {"weight": 0.7}}, {"model": e1, "parameters": {"weight": 0.5}}],
        "parameters": {"density": 0.4} if method != "task_arithmetic" else {},
    }
    streammerge.merge(cfg, tmp_path / "a", chunk_elements=1 << 22)
    streammerge.merge(cfg, tmp_path / "b", chunk_elements=1 << 20)
    assert snapshot(tmp_path / "a") == {
        k.replace(f"{tmp_path}/b", f"{tmp_path}/a"): v for k, v in snapshot(tmp_path / "b").items()
    }


def test_same_config_and_seed_give_same_bytes_other_seed_differs(tmp_path):
    streammerge.merge(_cfg("dare_ties"), tmp_path / "a")
    streammerge.merge(_cfg("dare_ties"), tmp_path / "b")
    other = dict(_cfg("dare_ties"), seed=4)
    streammerge.merge(other, tmp_path / "c")
    a, b, c = ((tmp_path / x / "model.safetensors").read_bytes() for x in "abc")
    assert a == b and a != c


def test_plan_reports_output_bytes_and_shards(tmp_path):
    plan = streammerge.plan(_cfg("ties"), tmp_path / "out", out_shard_size="150KB")
    try:
        ref = load_folder(FIXTURES / "tiny-llama-fp32-base")
        assert plan.output_bytes == sum(t.numel() * t.element_size() for t in ref.values())
        assert len(plan.shards) == 3 and all(s.data_bytes <= 150_000 for s in plan.shards)
        assert [t.out.name for t in plan.tensors][0] == "model.embed_tokens.weight"
        assert [t.out.name for t in plan.tensors][-1] in ("lm_head.weight", "model.norm.weight")
    finally:
        plan.close()
    assert not (tmp_path / "out").exists()


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(StreamMergeError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(StreamMergeError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_same_tensors_as_cpu(tmp_path):
    streammerge.merge(_cfg("ties"), tmp_path / "cpu", device="cpu")
    streammerge.merge(_cfg("ties"), tmp_path / "cuda", device="cuda")
    cpu, gpu = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "cuda")
    for name, t in cpu.items():
        torch.testing.assert_close(gpu[name], t, rtol=1e-6, atol=1e-6)


def test_integer_buffers_missing_from_an_expert_come_from_the_base_and_are_reported(tmp_path):
    """transformers 5 no longer saves BERT's int64 ``embeddings.position_ids``: an expert without it merges,
    the output keeps the base's copy, and the report says so; a missing float weight is still an error."""
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(40, dtype=torch.int64).reshape(1, 40)
    mask = torch.ones(3, dtype=torch.bool)
    base = {"embeddings.position_ids": ids, "w": torch.randn(6, 5, generator=g), "mask": mask}
    save_folder(tmp_path / "base", base)
    expert = {"w": base["w"] + 0.1}
    save_folder(tmp_path / "expert", expert)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / "expert"), "parameters": {"weight": 1.0}}]}
    result = streammerge.merge(cfg, tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert torch.equal(out["embeddings.position_ids"], ids) and torch.equal(out["mask"], base["mask"])
    torch.testing.assert_close(out["w"], expert["w"])
    assert any("lacks 2 integer/bool buffer(s)" in line and "embeddings.position_ids" in line for line in result.report)
    save_folder(tmp_path / "no-w", {"embeddings.position_ids": ids, "mask": base["mask"]})
    cfg["models"][0]["model"] = str(tmp_path / "no-w")
    with pytest.raises(StreamMergeError, match=r"no-w has no tensor 'w'"):
        streammerge.merge(cfg, tmp_path / "out2")
