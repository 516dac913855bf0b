import json

import pytest
import torch
from safetensors.torch import save_file

from streammerge.io.writer import INDEX_NAME, OutputTensor, ShardWriter, partial_name, plan_shards


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.w": torch.randn(8, 8, generator=g),
        "model.layers.0.norm": torch.randn(8, generator=g).to(torch.bfloat16),
        "model.layers.1.w": torch.randn(8, 8, generator=g),
        "count": torch.arange(3),
        "lm_head.weight": torch.randn(16, 8, generator=g).half(),
    }


@pytest.mark.parametrize("max_bytes", [10**9, 300])
def test_shards_equal_reference_save_file(tmp_path, max_bytes):
    tensors = _tensors()
    outs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(outs, max_bytes)
    with ShardWriter(tmp_path, shards) as w:
        # out of order and in flat chunks, as the engine may write them
        for name in reversed(list(tensors)):
            flat = tensors[name].reshape(-1)
            for start in range(0, flat.numel(), 5):
                w.write(name, flat[start : start + 5], start)
        w.finish()
    for s in shards:
        ref = tmp_path / f"ref-{s.file_name}"
        save_file({t.name: tensors[t.name] for t in s.tensors}, ref, metadata={"format": "pt"})
        assert (tmp_path / s.file_name).read_bytes() == ref.read_bytes()
    if len(shards) > 1:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert index["weight_map"] == {t.name: s.file_name for s in shards for t in s.tensors}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert all(s.data_bytes <= max_bytes or len(s.tensors) == 1 for s in shards)
    else:
        assert not (tmp_path / INDEX_NAME).exists()


def test_shard_keeps_partial_name_until_complete(tmp_path):
    tensors = _tensors()
    shards = plan_shards([OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], 10**9)
    w = ShardWriter(tmp_path, shards)
    names = list(tensors)
    for name in names[:-1]:
        w.write(name, tensors[name])
    assert (tmp_path / partial_name("model.safetensors")).exists()
    assert not (tmp_path / "model.safetensors").exists()
    w.write(names[-1], tensors[names[-1]])
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / partial_name("model.safetensors")).exists()
    w.close()
