"""Hostile and broken inputs (issue 3): each is refused with one line naming the file (and tensor).

Every case is checked three ways: ``open_checkpoint`` raises a ``CheckpointError`` holding the
expected fragment and the culprit's path; ``streammerge inspect`` and ``streammerge merge`` (with the
broken model as the expert) exit 1 with that one line on stderr and no traceback. The merge must fail
while planning: OUT_DIR is never created, and every file under tmp_path is byte-unchanged.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, snapshot
from safetensors.torch import save_file

from streammerge.cli import main
from streammerge.errors import CheckpointError
from streammerge.io.reader import open_checkpoint

pytestmark = pytest.mark.usefixtures("no_hang")


def cli(*args) -> tuple[int, str]:
    """Run the CLI in-process; an exception escaping it (CliRunner would map it to exit 1) fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 1, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


# ---------------------------------------------------------------------------------------------
# Broken safetensors files: each builder returns the bytes of a file ``model.safetensors``.

def st_file(header: object, data: bytes = b"", declared_len: int | None = None, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared_len is None else declared_len) + text + data


def entry(dtype: object = "U8", shape: object = (2,), offsets: object = (0, 2)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def real_shard() -> bytes:
    return (FIXTURES / "tiny-llama-base" / "model-00001-of-00002.safetensors").read_bytes()


def _header_len(blob: bytes) -> int:
    return struct.unpack("<Q", blob[:8])[0]


HUGE_SHAPE = ",".join(["1152921504606846976"] * 200_000)  # 4 MB of JSON, a 12-megabit product

# (case, bytes, expected fragment); the fragment names the tensor wherever one is at fault.
BAD_FILES: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty file", lambda: b"", "too short"),
    ("shorter than the length field", lambda: b"\x10\x00\x00", "too short"),
    ("truncated shard", lambda: real_shard()[:-100], "truncated"),
    ("truncated inside the header", lambda: real_shard()[: 8 + _header_len(real_shard()) // 2], "runs past the end"),
    ("header length past end of file", lambda: st_file({}, declared_len=4096), "runs past the end"),
    ("header over 100 MB", lambda: st_file({}, declared_len=100_000_001), "over the 100000000-byte limit"),
    ("header not JSON", lambda: st_file(None, raw=b"{nope"), "not valid JSON"),
    ("header JSON with trailing garbage", lambda: st_file(None, raw=b"{}\x00\x00"), "not valid JSON"),
    ("header not UTF-8", lambda: st_file(None, raw=b'{"\xff\xfe": 1}'), "not UTF-8"),
    ("header in UTF-16", lambda: st_file(None, raw="{}".encode("utf-16")), "not UTF-8"),
    ("header deeply nested", lambda: st_file(None, raw=b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    (
        "header object deeply nested",
        lambda: st_file(None, raw=b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        "nested too deeply",
    ),
    (
        "number of 5000 digits",
        lambda: st_file(None, raw=b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b"]}}"),
        "not valid JSON",
    ),
    ("header a JSON list", lambda: st_file([1, 2]), "not a JSON object"),
    (
        "duplicate tensor name",
        lambda: st_file(
            None,
            raw=b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
            b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
            data=b"x",
        ),
        "names 'a' twice",
    ),
    (
        "tensor name a lone surrogate",
        lambda: st_file(None, raw=b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'),
        "lone surrogate",
    ),
    ("metadata not a map", lambda: st_file({"__metadata__": ["x"]}), "__metadata__"),
    ("metadata value not a string", lambda: st_file({"__metadata__": {"format": 1}}), "__metadata__"),
    ("entry not an object", lambda: st_file({"a": [1, 2]}), "tensor 'a': header entry is not an object"),
    ("unknown dtype", lambda: st_file({"a": entry(dtype="F7")}, b"xx"), "tensor 'a': unknown dtype 'F7'"),
    ("dtype not a string", lambda: st_file({"a": entry(dtype=["F32"])}, b"xx"), "tensor 'a': unknown dtype ['F32']"),
    ("shape not a list", lambda: st_file({"a": entry(shape=2)}, b"xx"), "tensor 'a': shape 2 is not a list"),
    ("negative dimension", lambda: st_file({"a": entry(shape=[-2])}, b"xx"), "tensor 'a': shape [-2]"),
    ("float dimension", lambda: st_file({"a": entry(shape=[2.0])}, b"xx"), "tensor 'a': shape [2.0]"),
    ("bool dimension", lambda: st_file({"a": entry(shape=[True, 2])}, b"xx"), "tensor 'a': shape [True, 2]"),
    ("dimension past int64", lambda: st_file({"a": entry(shape=[0, 2**64], offsets=[0, 0])}), "64-bit"),
    (
        "shape product overflows",
        lambda: st_file({"a": entry(shape=[2**40, 2**40], offsets=[0, 2])}, b"xx"),
        "tensor 'a': shape [1099511627776, 1099511627776] holds more than 2^63 bytes",
    ),
    (
        "absurd shape of 200k big dimensions",
        lambda: st_file(
            None,
            raw=b'{"a": {"dtype": "U8", "shape": [' + HUGE_SHAPE.encode() + b'], "data_offsets": [0, 2]}}',
            data=b"xx",
        ),
        "holds more than 2^63 bytes",
    ),
    ("negative offset", lambda: st_file({"a": entry(offsets=[-2, 0])}, b"xx"), "tensor 'a': data_offsets [-2, 0]"),
    ("float offsets", lambda: st_file({"a": entry(offsets=[0.0, 2.0])}, b"xx"), "tensor 'a': data_offsets [0.0, 2.0]"),
    ("offsets reversed", lambda: st_file({"a": entry(offsets=[2, 0])}, b"xx"), "tensor 'a': data_offsets [2, 0]"),
    ("one offset", lambda: st_file({"a": entry(offsets=[2])}, b"xx"), "tensor 'a': data_offsets [2]"),
    (
        "dtype and shape disagree with byte length",
        lambda: st_file({"a": entry(dtype="F32", shape=[2], offsets=[0, 4])}, b"xxxx"),
        "tensor 'a': F32 [2] needs 8 bytes but data_offsets span 4",
    ),
    (
        "offsets overlap",
        lambda: st_file({"a": entry(), "b": entry(offsets=[1, 3])}, b"xxx"),
        "tensor 'b' overlaps the previous tensor",
    ),
    (
        "offsets leave a hole",
        lambda: st_file({"a": entry(), "b": entry(offsets=[3, 5])}, b"xxxxx"),
        "tensor 'b' leaves a hole of 1 bytes",
    ),
    ("offsets run past the file", lambda: st_file({"a": entry(shape=[8], offsets=[0, 8])}, b"xx"), "data runs to byte"),
    ("bytes after the last tensor", lambda: st_file({"a": entry()}, b"xxx"), "1 bytes after the last tensor"),
]


def _broken_file(tmp: Path, blob: bytes) -> tuple[Path, Path]:
    (tmp / "expert").mkdir()
    (tmp / "expert" / "model.safetensors").write_bytes(blob)
    return tmp / "expert", tmp / "expert" / "model.safetensors"


# ---------------------------------------------------------------------------------------------
# Broken model folders: each builder makes one in tmp and returns (model path, culprit file).


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b.weight": torch.ones(4, dtype=torch.bfloat16),
    }


def _sharded(tmp: Path, weight_map: dict | None = None, index_text: str | None = None) -> tuple[Path, Path]:
    """Two shards (a.weight in the first, b.weight in the second) and an index, optionally replaced."""
    folder = tmp / "expert"
    folder.mkdir()
    t = _tensors()
    save_file({"a.weight": t["a.weight"]}, folder / "s1.safetensors")
    save_file({"b.weight": t["b.weight"]}, folder / "s2.safetensors")
    wm = {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"} if weight_map is None else weight_map
    index = folder / "model.safetensors.index.json"
    index.write_text(
        json.dumps({"metadata": {"total_size": 32}, "weight_map": wm}) if index_text is None else index_text
    )
    return folder, index


def _outside_file(tmp: Path) -> Path:
    save_file({"a.weight": torch.zeros(2, 3)}, tmp / "secret.safetensors")
    return tmp / "secret.safetensors"


def _linked_shard(tmp: Path) -> tuple[Path, Path]:
    folder, index = _sharded(tmp, {"a.weight": "link.safetensors", "b.weight": "s2.safetensors"})
    (folder / "link.safetensors").symlink_to(_outside_file(tmp))
    return folder, index


def _single(tmp: Path, make: Callable[[Path], None], name: str = "model.safetensors") -> tuple[Path, Path]:
    folder = tmp / "expert"
    folder.mkdir()
    make(folder / name)
    return folder, folder / name


def _symlink_loop(p: Path) -> None:
    p.symlink_to(p.name)


class Evil:
    """Unpickling this runs ``open(marker, "w")``: a file appears if the pickle's code ever executes."""

    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil(tmp: Path) -> Evil:
    Evil.marker = tmp / "PWNED"
    return Evil()


def _bin(tmp: Path, obj: object, **save_kwargs) -> tuple[Path, Path]:
    return _single(tmp, lambda p: torch.save(obj, p, **save_kwargs), "pytorch_model.bin")


def _raw_pickle(tmp: Path, protocol: int) -> tuple[Path, Path]:
    obj = {"w": torch.ones(2), "x": _evil(tmp)}
    return _single(tmp, lambda p: p.write_bytes(pickle.dumps(obj, protocol=protocol)), "pytorch_model.bin")


def _truncated_zip(p: Path) -> None:
    torch.save(_tensors(), p)
    p.write_bytes(p.read_bytes()[:300])


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _empty_folder(tmp: Path) -> tuple[Path, Path]:
    (tmp / "expert").mkdir()
    return tmp / "expert", tmp / "expert"


def _shards_without_index(tmp: Path) -> tuple[Path, Path]:
    folder, index = _sharded(tmp)
    index.unlink()
    return folder, folder


def _index_escaping_by_dots(tmp: Path) -> tuple[Path, Path]:
    _outside_file(tmp)
    return _sharded(tmp, {"a.weight": "../secret.safetensors", "b.weight": "s2.safetensors"})


def _shard_with_unlisted_tensor(tmp: Path, listed_in: str | None) -> tuple[Path, Path]:
    """s1 holds a.weight and c.weight; the index maps c.weight to ``listed_in`` (None: not at all)."""
    folder, _ = _sharded(
        tmp,
        {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"} | ({"c.weight": listed_in} if listed_in else {}),
    )
    save_file({"a.weight": torch.ones(2), "c.weight": torch.ones(3)}, folder / "s1.safetensors")
    return folder, folder / "s1.safetensors"


def _huge_index(tmp: Path) -> tuple[Path, Path]:
    folder, index = _sharded(tmp)
    os.truncate(index, 100_000_001)  # sparse: costs no disk
    return folder, index


# (case, builder, expected fragment). Shards that the index does not describe exactly are refused:
# the index and the shards disagree, so one of them is wrong and a merge would drop or invent tensors.
BAD_FOLDERS: list[tuple[str, Callable[[Path], tuple[Path, Path]], str]] = [
    ("empty folder", _empty_folder, "no model weights found"),
    ("several shards, no index", _shards_without_index, "has 2 .safetensors files but no model.safetensors.index.json"),
    (
        "index names a missing shard",
        lambda tmp: _sharded(tmp, {"a.weight": "s1.safetensors", "b.weight": "gone.safetensors"}),
        "shard 'gone.safetensors' does not exist",
    ),
    (
        "index names an absolute path",
        lambda tmp: _sharded(tmp, {"a.weight": str(_outside_file(tmp)), "b.weight": "s2.safetensors"}),
        "is not a relative file name inside",
    ),
    ("index names ../", _index_escaping_by_dots, "shard '../secret.safetensors' is not a relative file name"),
    ("index names a symlink out of the folder", _linked_shard, "shard 'link.safetensors' leads to"),
    (
        "index maps a tensor to a shard that lacks it",
        lambda tmp: _sharded(tmp, {"a.weight": "s1.safetensors", "b.weight": "s1.safetensors"}),
        "lists 'b.weight' in s1.safetensors but",
    ),
    (
        "shard holds a tensor the index does not list",
        lambda tmp: _shard_with_unlisted_tensor(tmp, None),
        "holds tensor 'c.weight' but",
    ),
    (
        "shard holds a tensor the index puts elsewhere",
        lambda tmp: _shard_with_unlisted_tensor(tmp, "s2.safetensors"),
        "holds tensor 'c.weight' but",
    ),
    ("index not JSON", lambda tmp: _sharded(tmp, index_text="{'weight_map': 1"), "index is not valid JSON"),
    ("index deeply nested", lambda tmp: _sharded(tmp, index_text="[" * 100_000), "index is JSON nested too deeply"),
    (
        "index with duplicate keys",
        lambda tmp: _sharded(
            tmp, index_text='{"weight_map": {"a.weight": "s1.safetensors", "a.weight": "s2.safetensors"}}'
        ),
        "names 'a.weight' twice",
    ),
    (
        "index without weight_map",
        lambda tmp: _sharded(tmp, index_text='{"metadata": {}}'),
        "has no 'weight_map' object",
    ),
    (
        "index weight_map a list",
        lambda tmp: _sharded(tmp, index_text='{"weight_map": ["s1.safetensors"]}'),
        "has no 'weight_map' object",
    ),
    (
        "index maps to a non-string",
        lambda tmp: _sharded(tmp, {"a.weight": ["s1.safetensors"], "b.weight": "s2.safetensors"}),
        "tensor 'a.weight' maps to ['s1.safetensors'], not a shard file name",
    ),
    ("index over 100 MB", _huge_index, "over the 100000000-byte limit"),
    ("shard a symlink to outside", lambda tmp: _single(tmp, lambda p: p.symlink_to(_outside_file(tmp))), "leads to"),
    (
        "shard a symlink to a device",
        lambda tmp: _single(tmp, lambda p: p.symlink_to("/dev/zero")),
        "leads to /dev/zero",
    ),
    ("shard a symlink loop", lambda tmp: _single(tmp, _symlink_loop), "cannot be resolved"),
    ("shard a folder", lambda tmp: _single(tmp, lambda p: p.mkdir()), "is a folder, not a weights file"),
    ("shard a FIFO", lambda tmp: _single(tmp, _fifo), "is a FIFO, not a weights file"),
    (
        "bin whose pickle runs code (torch zip)",
        lambda tmp: _bin(tmp, {"w": torch.ones(2), "x": _evil(tmp)}),
        "execute code",
    ),
    (
        "bin whose pickle runs code (legacy torch)",
        lambda tmp: _bin(tmp, {"w": torch.ones(2), "x": _evil(tmp)}, _use_new_zipfile_serialization=False),
        "execute code",
    ),
    ("bin a raw pickle that runs code", lambda tmp: _raw_pickle(tmp, 2), "execute code"),
    ("bin a raw pickle (protocol 4)", lambda tmp: _raw_pickle(tmp, 4), "execute code"),
    (
        "bin neither zip nor pickle",
        lambda tmp: _single(tmp, lambda p: p.write_bytes(b"not a checkpoint" * 10), "pytorch_model.bin"),
        "neither a zip archive nor a pickle",
    ),
    (
        "bin a corrupt pickle",
        lambda tmp: _single(tmp, lambda p: p.write_bytes(b"\x80\x02not a checkpoint"), "pytorch_model.bin"),
        "not a plain pickle of tensors",
    ),
    (
        "bin truncated zip",
        lambda tmp: _single(tmp, _truncated_zip, "pytorch_model.bin"),
        "not a readable PyTorch checkpoint",
    ),
    (
        "bin empty",
        lambda tmp: _single(tmp, lambda p: p.write_bytes(b""), "pytorch_model.bin"),
        "neither a zip archive nor a pickle",
    ),
    ("bin holds a list", lambda tmp: _bin(tmp, [torch.ones(2)]), "expected a dict of name -> tensor"),
    ("bin a FIFO", lambda tmp: _single(tmp, _fifo, "pytorch_model.bin"), "is a FIFO"),
]


CASES = [
    (name, (lambda blob: lambda tmp: _broken_file(tmp, blob()))(make), needle) for name, make, needle in BAD_FILES
] + BAD_FOLDERS


def _config(tmp: Path, base: Path, expert: Path) -> Path:
    p = tmp / "cfg.yaml"
    p.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {expert}\n    parameters: {{weight: 1.0}}\n"
    )
    return p


@pytest.mark.parametrize("build,needle", [(b, n) for _, b, n in CASES], ids=[c for c, _, _ in CASES])
def test_broken_input_is_refused_in_one_line(tmp_path, build, needle):
    work = tmp_path / "in"
    work.mkdir()
    model, culprit = build(work)
    (base,) = [shutil.copytree(FIXTURES / "tiny-llama-base", work / "base")]
    cfg = _config(work, base, model)
    before = snapshot(work)

    with pytest.raises(CheckpointError) as e:
        open_checkpoint(model)
    assert needle in str(e.value) and str(culprit) in str(e.value), str(e.value)

    assert_one_line_error(*cli("inspect", model), needle, str(culprit))
    out = tmp_path / "out"
    assert_one_line_error(*cli("merge", cfg, out, "-q"), needle, str(culprit))
    assert not out.exists()
    assert snapshot(work) == before
    assert not (work / "PWNED").exists() and not Path("PWNED").exists()


# ---------------------------------------------------------------------------------------------
# Inputs that do not fit together, and configs that point at the output: refused while planning.


def _expert_with(tmp: Path, change: Callable[[dict[str, torch.Tensor]], str]) -> tuple[Path, str]:
    """A copy of the math expert whose first shard is rewritten by ``change`` (returns the tensor name)."""
    from safetensors.torch import load_file

    folder = shutil.copytree(FIXTURES / "tiny-llama-math", tmp / "expert")
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    name = change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder, name


def _reshape(tensors: dict[str, torch.Tensor]) -> str:
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    return name


def _to_int(tensors: dict[str, torch.Tensor]) -> str:
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.int16)
    return name


def _to_fp32(tensors: dict[str, torch.Tensor]) -> str:
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].float()
    return name


@pytest.mark.parametrize(
    "change,needle",
    [
        (_reshape, "has shape [64, 127], which differs from [64, 128]"),
        (_to_int, "is int16 (integer) but bfloat16 (floating-point)"),
    ],
    ids=["shape differs from base", "int tensor where the base has float"],
)
def test_expert_that_does_not_fit_the_base(tmp_path, change, needle):
    expert, name = _expert_with(tmp_path, change)
    cfg = _config(tmp_path, shutil.copytree(FIXTURES / "tiny-llama-base", tmp_path / "base"), expert)
    before = snapshot(tmp_path)
    code, err = cli("merge", cfg, tmp_path / "out", "-q")
    assert_one_line_error(code, err, needle, repr(name), str(expert / "model-00001-of-00002.safetensors"))
    assert not (tmp_path / "out").exists() and snapshot(tmp_path) == before


def test_expert_with_other_float_dtype_merges(tmp_path):
    """bf16 in the base and fp32 in an expert is the same kind: merged in fp32 as usual."""
    expert, _ = _expert_with(tmp_path, _to_fp32)
    code, err = cli("merge", _config(tmp_path, FIXTURES / "tiny-llama-base", expert), tmp_path / "out", "-q")
    assert code == 0, err


def _link_into_out(tmp: Path, out: Path) -> Path:
    """A weights file given directly, in a folder apart from OUT_DIR, that is a symlink into OUT_DIR."""
    out.mkdir(parents=True)
    shutil.copy(FIXTURES / "tiny-llama-base" / "model-00001-of-00002.safetensors", out / "x.safetensors")
    (tmp / "links").mkdir()
    (tmp / "links" / "w.safetensors").symlink_to(out / "x.safetensors")
    return tmp / "links" / "w.safetensors"


# (case, (tmp, out) -> (base, expert), fragment)
OUTPUT_OVERLAP: list[tuple[str, Callable[[Path, Path], tuple[Path, Path]], str]] = [
    (
        "expert is OUT_DIR",
        lambda tmp, out: (FIXTURES / "tiny-llama-base", shutil.copytree(FIXTURES / "tiny-llama-math", out)),
        "is inside input",
    ),
    (
        "base is OUT_DIR",
        lambda tmp, out: (shutil.copytree(FIXTURES / "tiny-llama-base", out), FIXTURES / "tiny-llama-math"),
        "is inside input",
    ),
    (
        "expert inside OUT_DIR",
        lambda tmp, out: (FIXTURES / "tiny-llama-base", shutil.copytree(FIXTURES / "tiny-llama-math", out / "e")),
        "inside the output folder",
    ),
    (
        "OUT_DIR inside an input",
        lambda tmp, out: (FIXTURES / "tiny-llama-base", shutil.copytree(FIXTURES / "tiny-llama-math", out.parent)),
        "is inside input",
    ),
    (
        "input file a symlink into OUT_DIR",
        lambda tmp, out: (_link_into_out(tmp, out), FIXTURES / "tiny-llama-math"),
        "leads to",
    ),
]


@pytest.mark.parametrize("build,needle", [(b, n) for _, b, n in OUTPUT_OVERLAP], ids=[c for c, _, _ in OUTPUT_OVERLAP])
def test_config_pointing_at_the_output_is_refused(tmp_path, build, needle):
    out = tmp_path / "o" / "out"
    base, expert = build(tmp_path, out)
    cfg = _config(tmp_path, base, expert)
    before = snapshot(tmp_path)
    code, err = cli("merge", cfg, out, "-q", "--overwrite")
    assert_one_line_error(code, err, needle, str(out))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p, outside: p.symlink_to(outside), "leads to"),
        (lambda p, outside: os.mkfifo(p), "is a FIFO, not a model file"),
        (lambda p, outside: p.symlink_to("/dev/zero"), "leads to /dev/zero"),
    ],
    ids=["symlink out of the folder", "FIFO", "symlink to a device"],
)
def test_hostile_tokenizer_file_in_the_base(tmp_path, make, needle):
    """Files copied into OUT_DIR after the merge (tokenizer, config) are checked while planning."""
    base = shutil.copytree(FIXTURES / "tiny-llama-base", tmp_path / "base")
    (tmp_path / "secret.txt").write_text("not for the output")
    make(base / "tokenizer.json", tmp_path / "secret.txt")
    cfg = _config(tmp_path, base, FIXTURES / "tiny-llama-math")
    before = snapshot(tmp_path)
    assert_one_line_error(*cli("merge", cfg, tmp_path / "out", "-q"), needle, str(base / "tokenizer.json"))
    assert not (tmp_path / "out").exists() and snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "text,needle",
    [
        ("merge_method: " + "[" * 20000, "nested too deeply"),
        ('merge_method: linear\nmodels: [{model: "x\\0y"}]\n', "does not exist"),
    ],
    ids=["deeply nested YAML", "NUL in a model path"],
)
def test_hostile_config_text(tmp_path, text, needle):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    assert_one_line_error(*cli("merge", cfg, tmp_path / "out"), needle, str(cfg))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Odd but valid inputs: read exactly, and shown without breaking the terminal.


def test_legacy_bin_loads_with_weights_only(tmp_path):
    ref = _tensors()
    torch.save(ref, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(tmp_path / "pytorch_model.bin")
    for name, t in ref.items():
        assert torch.equal(ckpt.read(name), t)


def test_hub_cache_symlinks_to_blobs_are_followed(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>, which is not an escape."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    save_file(_tensors(), repo / "blobs" / "0123abcd")
    (repo / "snapshots" / "abc" / "model.safetensors").symlink_to("../../blobs/0123abcd")
    ckpt = open_checkpoint(repo / "snapshots" / "abc")
    assert torch.equal(ckpt.read("a.weight"), _tensors()["a.weight"])
    # ... but a blob that is itself a link to elsewhere is not in blobs/ once resolved.
    (repo / "blobs" / "0123abcd").unlink()
    (repo / "blobs" / "0123abcd").symlink_to(_outside_file(tmp_path))
    with pytest.raises(CheckpointError, match="leads to"):
        open_checkpoint(repo / "snapshots" / "abc")


def test_names_with_markup_and_control_characters_are_listed(tmp_path):
    names = ["x[/x]", "[bold]y", "z\nw", "ünï\u2028code"]
    save_file({n: torch.ones(1) for n in names}, tmp_path / "m.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0 and result.exception is None, result.output
    for shown in ["x[/x]", "[bold]y", "z\\nw", "ünï\\u2028code"]:
        assert shown in result.stdout, shown


def test_error_naming_a_file_with_a_newline_stays_one_line(tmp_path):
    folder = tmp_path / "bad\nname"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00")
    assert_one_line_error(*cli("inspect", folder), "too short", "bad\\nname")


def test_refusal_in_a_real_process_is_one_line(tmp_path):
    """As a user sees it: torch's loader warns on stderr about pickle protocols; none of it may leak."""
    import subprocess
    import sys

    model, culprit = _raw_pickle(tmp_path, 4)
    cfg = _config(tmp_path, FIXTURES / "tiny-llama-base", model)
    r = subprocess.run(
        [sys.executable, "-m", "streammerge.cli", "merge", str(cfg), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(r.returncode, r.stderr, "execute code", str(culprit))
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
