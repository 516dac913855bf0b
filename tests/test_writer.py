import json
import zlib

import pytest
import torch
from safetensors.torch import save_file

from streammerge.io.writer import INDEX_NAME, OutputTensor, ShardWriter, check_records, partial_name, plan_shards


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
        # tensors in any order, each in consecutive flat chunks, as the engine may write them
        for name in reversed(list(tensors)):
            flat = tensors[name].reshape(-1)
            for start in range(0, flat.numel(), 5):
                w.write(name, flat[start : start + 5], start)
            rec = w.finish_tensor(name)
            assert rec.length == flat.numel() * flat.element_size()
            assert rec.crc32 == zlib.crc32(flat.contiguous().view(torch.uint8).numpy().tobytes())
        w.finalize()
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


def _shards(tensors, max_bytes=10**9):
    return plan_shards([OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_bytes)


def test_no_final_names_or_index_until_finalize(tmp_path):
    tensors = _tensors()
    shards = _shards(tensors, 300)
    with ShardWriter(tmp_path, shards) as w:
        for name, t in tensors.items():
            w.write(name, t)
            w.finish_tensor(name)
        # every tensor written, every shard full: still nothing that looks like a model
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(partial_name(s.file_name) for s in shards)
        w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_NAME] + [s.file_name for s in shards])


def test_chunks_out_of_order_are_an_internal_error(tmp_path):
    tensors = _tensors()
    with ShardWriter(tmp_path, _shards(tensors)) as w:
        flat = tensors["model.layers.0.w"].reshape(-1)
        with pytest.raises(ValueError, match="out of order"):
            w.write("model.layers.0.w", flat[8:], 8)
        with pytest.raises(ValueError, match="finalize with"):
            w.finalize()


def test_resume_keeps_records_whose_bytes_match_and_redoes_the_rest(tmp_path):
    tensors = _tensors()
    shards = _shards(tensors, 300)
    names = list(tensors)
    records = {}
    w = ShardWriter(tmp_path, shards)
    for name in names[:4]:
        w.write(name, tensors[name])
        records[name] = w.finish_tensor(name)
    w.close()  # interrupted here
    # one record's bytes are damaged on disk: not durable, so its CRC is re-checked and it is dropped
    victim = records[names[1]]
    path = tmp_path / partial_name(victim.shard)
    data = bytearray(path.read_bytes())
    data[victim.offset] ^= 0xFF
    path.write_bytes(bytes(data))
    kept = check_records(tmp_path, shards, records, durable=set())
    assert set(kept) == set(names[:4]) - {names[1]}
    # a record trusted as durable is not re-read
    assert set(check_records(tmp_path, shards, records, durable=set(records))) == set(names[:4])
    with ShardWriter(tmp_path, shards, kept) as w:
        for name in names:
            if name not in kept:
                w.write(name, tensors[name])
                w.finish_tensor(name)
        w.finalize()
    for s in shards:
        ref = tmp_path / f"ref-{s.file_name}"
        save_file({t.name: tensors[t.name] for t in s.tensors}, ref, metadata={"format": "pt"})
        assert (tmp_path / s.file_name).read_bytes() == ref.read_bytes()
