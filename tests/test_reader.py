import json
import os

import pytest
import torch
from conftest import FIXTURES, load_folder, save_folder
from safetensors.torch import save_file

from streammerge.errors import CheckpointError
from streammerge.io.reader import open_checkpoint


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, generator=g),
        "c.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.half": torch.randn(4, 4, generator=g).half(),
    }


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_folder_reads_like_reference(tmp_path, shards):
    ref = _tensors()
    ckpt = open_checkpoint(save_folder(tmp_path / "m", ref, shards=shards))
    assert sorted(ckpt.names()) == sorted(ref)
    for name, t in ref.items():
        assert ckpt.meta(name).shape == tuple(t.shape) and ckpt.meta(name).dtype == t.dtype
        assert torch.equal(ckpt.read(name), t)
        flat = t.reshape(-1)
        assert torch.equal(ckpt.read(name, 1, flat.numel() - 2), flat[1:-1])


def test_fixture_two_shards_match_reference_loader():
    ckpt = open_checkpoint(FIXTURES / "tiny-llama-base")
    assert len(ckpt.files) == 2
    for name, t in load_folder(FIXTURES / "tiny-llama-base").items():
        assert torch.equal(ckpt.read(name), t)


def _single_files(tmp_path) -> tuple[dict, tuple]:
    """The same tensors as one safetensors file and as a torch .bin: (tensors, (paths))."""
    ref = _tensors()
    save_file(ref, tmp_path / "w.safetensors")
    torch.save(ref, tmp_path / "pytorch_model.bin")
    return ref, (tmp_path / "w.safetensors", tmp_path / "pytorch_model.bin")


def test_single_file_and_bin(tmp_path):
    ref, paths = _single_files(tmp_path)
    for path in paths:
        ckpt = open_checkpoint(path)
        for name, t in ref.items():
            assert torch.equal(ckpt.read(name), t), (path, name)
            assert torch.equal(ckpt.read(name, 1, 2), t.reshape(-1)[1:3])
    (tmp_path / "folder").mkdir()
    torch.save(ref, tmp_path / "folder" / "pytorch_model.bin")
    assert sorted(open_checkpoint(tmp_path / "folder").names()) == sorted(ref)


def test_read_into_gives_the_bytes_read_gives(tmp_path):
    ref, paths = _single_files(tmp_path)
    for path in paths:
        ckpt = open_checkpoint(path)
        for name, t in ref.items():
            flat = t.reshape(-1)
            out = torch.full((flat.numel() - 1,), 7, dtype=t.dtype)
            ckpt.read_into(name, 1, out)
            assert torch.equal(out.view(-1), flat[1:]), (path, name)
        name = next(iter(ref))
        with pytest.raises(ValueError):  # not the stored dtype
            ckpt.read_into(name, 0, torch.empty(1, dtype=torch.float64))
        with pytest.raises(ValueError):  # past the end
            ckpt.read_into(name, ref[name].numel(), torch.empty(1, dtype=ref[name].dtype))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_bin_that_would_execute_code_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "x": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="execute code"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


@pytest.mark.parametrize(
    "shard_name", ["../outside.safetensors", "/etc/passwd", "missing.safetensors", "link.safetensors"]
)
def test_index_shard_names_are_confined(tmp_path, shard_name):
    folder = save_folder(tmp_path / "m", _tensors(), shards=1)
    save_file({"z": torch.ones(1)}, tmp_path / "outside.safetensors")
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"z": shard_name}}))
    with pytest.raises(CheckpointError, match="index.json"):
        open_checkpoint(folder)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no model weights"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_pages_read_do_not_stay_resident(tmp_path):
    # 8 tensors of 8 MB: a reader that kept its pages mapped would grow RSS by 64 MB.
    tensors = {f"t{i}": torch.full((2 << 20,), float(i)) for i in range(8)}
    save_file(tensors, tmp_path / "big.safetensors")
    del tensors
    ckpt = open_checkpoint(tmp_path / "big.safetensors")
    before = _rss_bytes()
    for name in ckpt.names():
        t = ckpt.read(name)
        assert float(t[0]) == float(name[1:])
        del t
    grown = _rss_bytes() - before
    assert grown < 24 << 20, f"RSS grew {grown / 2**20:.1f} MiB after reading 64 MiB"


def test_read_after_close_reopens_only_the_same_file(tmp_path):
    ref = _tensors()
    save_file(ref, tmp_path / "w.safetensors")
    ckpt = open_checkpoint(tmp_path / "w.safetensors")
    ckpt.close()
    assert torch.equal(ckpt.read("b.weight"), ref["b.weight"])
    ckpt.close()
    save_file({n: t + 1 if t.is_floating_point() else t for n, t in ref.items()}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="changed since its header was read"):
        ckpt.read("b.weight")
