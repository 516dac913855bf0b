"""Seeded fuzzing of real checkpoint files (issue 3): mutated safetensors headers and index files.

A copy of the two-shard fixture ``tiny-llama-base`` is mutated one file at a time, by bytes (bit
flips, overwrites, truncation, insertion, length-field edits) or through its JSON (dtype, shape,
offsets, names, metadata, entries, weight_map values, duplicate keys, nesting). For every mutation,
opening the shard file and the folder must either

- succeed, and then every tensor reads back exactly the bytes, dtype and shape its (mutated)
  header claims, as the reference ``safetensors`` library reads them too, or
- raise ``CheckpointError`` naming the mutated file,

never another exception, never a hang (SIGALRM), never a write, never a leaked descriptor. A
sample of refused mutations then goes through ``streammerge inspect`` and ``streammerge merge``.
Deterministic: ``random.Random(SEED)``. ``pytest -s`` prints the outcome counts by kind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, snapshot
from safetensors import safe_open

from streammerge.cli import main
from streammerge.errors import CheckpointError
from streammerge.io.reader import open_checkpoint

SEED = 20240603
HEADER_MUTATIONS = 300
INDEX_MUTATIONS = 100
CLI_SAMPLE = 10  # refused header mutations, and as many index mutations, through the CLI

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
INDEX = "model.safetensors.index.json"

# The test's own view of the format, independent of streammerge's tables.
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}

# Error kinds, for the statistics: the first fragment found in the message names the kind.
KINDS = [
    "too short", "runs past the end", "-byte limit", "not UTF-8", "nested too deeply", "twice",
    "not valid JSON", "not a JSON object", "lone surrogate", "not valid Unicode", "__metadata__ must",
    "header entry is not an object", "unknown dtype", "is not a list of non-negative", "more than 2^63",
    "data_offsets", "needs", "overlaps", "leaves a hole", "data runs to byte", "not covered",
    "holds tensor", "has no such tensor", "no 'weight_map'", "not a shard file name",
    "not a relative file name", "leads to", "does not exist", "cannot be resolved", "not a weights file",
]


def kind_of(message: str) -> str:
    return next((k for k in KINDS if k in message), "other")


# ---------------------------------------------------------------------------------------------
# Mutators. Each takes the rng and the file's bytes and returns (new bytes, description).

def split_header(blob: bytes) -> tuple[int, dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_header(rng: random.Random, header: dict, data: bytes, dup: str | None = None) -> bytes:
    style = rng.choice(["compact", "spaced", "indent"])
    text = json.dumps(header, separators=(",", ":") if style == "compact" else None,
                      indent=2 if style == "indent" else None, ensure_ascii=rng.random() < 0.5)
    if dup is not None and dup in header:  # a key written twice
        text = "{" + json.dumps(dup) + ":" + json.dumps(header[dup]) + "," + text[1:]
    raw = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.7:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def odd_value(rng: random.Random) -> object:
    return rng.choice([None, -1, 1.5, "x", [], {}, True, 2**64, [1, 2, 3], "F32", 10**30])


def j_dtype(rng, h):
    name = rng.choice(tensor_names(h))
    h[name]["dtype"] = rng.choice([*ST_DTYPES, *ST_DTYPES, "F7", "", "f32", "FP8", None, 32, ["F32"]])
    return f"dtype of {name!r} -> {h[name]['dtype']!r}"


def j_shape(rng, h):
    name = rng.choice(tensor_names(h))
    shape = list(h[name]["shape"])
    variant = rng.choice(["permute", "dim", "append1", "prepend1", "drop", "empty", "odd", "zero", "huge", "float"])
    if variant == "permute":
        rng.shuffle(shape)
    elif variant == "dim" and shape:
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, 63, 64, 65, 128, 129, -1, 2**31, 2**63])
    elif variant == "append1":
        shape.append(1)
    elif variant == "prepend1":
        shape.insert(0, 1)
    elif variant == "drop" and shape:
        shape.pop(rng.randrange(len(shape)))
    elif variant == "empty":
        shape = []
    elif variant == "odd":
        shape = odd_value(rng)
    elif variant == "zero":
        shape = [0, 2**62, 4]
    elif variant == "huge":
        shape = [2**40] * rng.randint(2, 5000)
    elif variant == "float" and shape:
        shape[0] = float(shape[0])
    h[name]["shape"] = shape
    return f"shape of {name!r} ({variant}) -> {str(shape)[:60]}"


def j_offsets(rng, h):
    names = tensor_names(h)
    name = rng.choice(names)
    b, e = h[name]["data_offsets"]
    variant = rng.choice(["begin", "end", "both", "swap", "other", "short", "long", "odd", "float", "huge"])
    d = rng.choice([-4096, -64, -8, -2, -1, 1, 2, 8, 64, 4096])
    offsets = {
        "begin": [b + d, e], "end": [b, e + d], "both": [b + d, e + d], "swap": [e, b],
        "other": list(h[rng.choice(names)]["data_offsets"]), "short": [b], "long": [b, e, e],
        "odd": odd_value(rng), "float": [float(b), float(e)], "huge": [b, 2**64 + e],
    }[variant]
    h[name]["data_offsets"] = offsets
    return f"data_offsets of {name!r} ({variant}) -> {str(offsets)[:60]}"


def j_name(rng, h):
    name = rng.choice(tensor_names(h))
    new = rng.choice([name + ".x", name.upper(), "", "\ud800", "ünïcode", "a" * 5000, "__metadata__ ",
                      rng.choice(tensor_names(h)), "x\ny", "[/bold]"])
    h[new] = h.pop(name)
    return f"rename {name!r} -> {new[:40]!r}"


def j_metadata(rng, h):
    variant = rng.choice(["drop", "add", "nonstr", "odd"])
    if variant == "drop":
        h.pop("__metadata__", None)
    elif variant == "add":
        h.setdefault("__metadata__", {})["k"] = "v"
    elif variant == "nonstr":
        h["__metadata__"] = {"format": odd_value(rng)}
    else:
        h["__metadata__"] = odd_value(rng)
    return f"metadata {variant}"


def j_delete(rng, h):
    name = rng.choice(tensor_names(h))
    del h[name]
    return f"delete {name!r}"


def j_add(rng, h):
    end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
    variant = rng.choice(["empty at end", "overlap", "beyond"])
    entry = {"empty at end": {"dtype": "F32", "shape": [0, 7], "data_offsets": [end, end]},
             "overlap": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
             "beyond": {"dtype": "U8", "shape": [4], "data_offsets": [end, end + 4]}}[variant]
    h["added.tensor"] = entry
    return f"add tensor ({variant})"


def j_entry(rng, h):
    name = rng.choice(tensor_names(h))
    if rng.random() < 0.5:
        h[name]["extra_field"] = odd_value(rng)
        return f"extra field in {name!r}"
    h[name] = odd_value(rng)
    return f"entry {name!r} -> {h[name]!r}"


JSON_MUTATORS = [j_dtype, j_shape, j_offsets, j_name, j_metadata, j_delete, j_add, j_entry]


def mutate_header(rng: random.Random, blob: bytes) -> tuple[bytes, str]:
    n, header, data = split_header(blob)
    roll = rng.random()
    if roll < 0.55:
        steps = [rng.choice(JSON_MUTATORS)(rng, header) for _ in range(rng.choice([1, 1, 2]))]
        dup = rng.choice(tensor_names(header) or [None]) if rng.random() < 0.05 else None
        return join_header(rng, header, data, dup), "; ".join(steps) + (f"; duplicate {dup!r}" if dup else "")
    if roll < 0.7:
        pos = rng.randrange(8 + n)
        out = bytearray(blob)
        out[pos] ^= 1 << rng.randrange(8)
        return bytes(out), f"flip a bit of byte {pos}"
    if roll < 0.78:
        pos = rng.randrange(8, 8 + n)
        out = bytearray(blob)
        out[pos] = rng.randrange(256)
        return bytes(out), f"overwrite byte {pos}"
    if roll < 0.86:
        cut = rng.choice([rng.randrange(8), rng.randrange(8, 8 + n), rng.randrange(8 + n, len(blob))])
        return blob[:cut], f"truncate to {cut} bytes"
    if roll < 0.94:
        new = rng.choice(
            [0, 1, n - 1, n + 1, n - 8, n + 8, len(blob) - 8, len(blob), 100_000_001, 2**64 - 1, rng.randrange(2**32)]
        )
        return struct.pack("<Q", new) + blob[8:], f"header length {n} -> {new}"
    pos = rng.randrange(8, 8 + n)
    if rng.random() < 0.5:
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return blob[:pos] + junk + blob[pos:], f"insert {len(junk)} bytes at {pos}"
    return blob[:pos] + blob[pos + rng.randint(1, 16) :], f"delete bytes at {pos}"


def mutate_index(rng: random.Random, raw: bytes, folder: Path, outside: Path) -> tuple[bytes, str]:
    """A mutated index; may also create a symlink, folder or FIFO in ``folder`` for it to name."""
    roll = rng.random()
    if roll < 0.2:
        pos = rng.randrange(len(raw))
        variant = rng.choice(["flip", "truncate", "insert", "empty"])
        if variant == "flip":
            return raw[:pos] + bytes([raw[pos] ^ (1 << rng.randrange(8))]) + raw[pos + 1 :], f"flip a bit of byte {pos}"
        if variant == "truncate":
            return raw[:pos], f"truncate to {pos} bytes"
        if variant == "insert":
            return raw[:pos] + b"\xff\x00{[" + raw[pos:], f"insert garbage at {pos}"
        return b"", "empty file"
    index = json.loads(raw)
    wm = index["weight_map"]
    name = rng.choice(sorted(wm))
    variant = rng.choice(
        [
            "drop entry",
            "rename key",
            "other shard",
            "shard name",
            "shard name",
            "add entry",
            "weight_map",
            "top level",
            "metadata",
            "metadata",
            "reformat",
            "reformat",
            "duplicate key",
            "nested",
            "surrogate key",
            "filesystem",
        ]
    )
    dup = None
    if variant == "drop entry":
        del wm[name]
    elif variant == "rename key":
        wm[name + rng.choice(["", ".x", "_"]) or name] = wm.pop(name)
    elif variant == "other shard":
        wm[name] = next(s for s in SHARDS if s != wm[name])
    elif variant == "shard name":
        wm[name] = rng.choice(
            [
                "missing.safetensors",
                "../" + wm[name],
                f"../{folder.name}/{wm[name]}",
                str(outside),
                str(folder / wm[name]),
                "",
                "./" + wm[name],
                "sub/../" + wm[name],
                "a\x00b",
                "x" * 5000,
                ".",
                "/",
                7,
                None,
                [wm[name]],
                {"f": 1},
            ]
        )
    elif variant == "add entry":
        wm["not.in.any.shard"] = rng.choice(SHARDS)
    elif variant == "weight_map":
        index["weight_map"] = rng.choice([None, [], {}, "x", 1, list(wm.items())])
    elif variant == "top level":
        index = rng.choice([[], "x", 1, None, [index]])
    elif variant == "metadata":
        index["metadata"] = rng.choice([{}, {"total_size": -1}, {"total_size": "big"}, None, [1, 2]])
    elif variant == "duplicate key":
        dup = name
    elif variant == "nested":
        pass  # metadata becomes 5000 nested lists, written as text below
    elif variant == "surrogate key":
        wm["\ud800"] = wm.pop(name)
    elif variant == "filesystem":
        kind = rng.choice(["symlink out", "symlink in", "folder", "fifo"])
        target = folder / f"fs-{kind.replace(' ', '-')}.safetensors"
        if kind == "symlink out":
            target.symlink_to(outside)
        elif kind == "symlink in":
            target.symlink_to(wm[name])  # stays inside: valid if it holds exactly the listed tensors
        elif kind == "folder":
            target.mkdir()
        else:
            os.mkfifo(target)
        wm[name] = target.name
        variant = f"filesystem: {kind}"
    if variant == "nested":
        text = json.dumps({**index, "metadata": None}).replace(
            '"metadata": null', '"metadata": ' + "[" * 5000 + "]" * 5000
        )
    else:
        text = json.dumps(index, indent=rng.choice([None, 2]))
    if dup is not None:
        text = text.replace('"weight_map": {', '"weight_map": {' + json.dumps(dup) + ': "x.safetensors", ', 1)
    return text.encode("utf-8", "surrogatepass"), f"{variant} ({name!r})"


# ---------------------------------------------------------------------------------------------
# The property.


def claimed_tensors(blob: bytes) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """What a header that streammerge accepted claims: name -> (dtype, shape, bytes), parsed here."""
    n, header, _ = split_header(blob)
    out = {}
    for name, e in header.items():
        if name != "__metadata__":
            b, end = e["data_offsets"]
            out[name] = (ST_DTYPES[e["dtype"]], tuple(e["shape"]), blob[8 + n + b : 8 + n + end])
    return out


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_opens_exactly(path: Path, files: dict[str, bytes]) -> None:
    """``path`` opened: each tensor must read back as its file's header claims, and as the reference reads it."""
    ckpt = open_checkpoint(path)
    try:
        claimed = {}
        for file, blob in files.items():
            claimed.update({name: (file, *c) for name, c in claimed_tensors(blob).items()})
        assert sorted(ckpt.names()) == sorted(claimed)
        for name in ckpt.names():
            file, dtype, shape, data = claimed[name]
            meta = ckpt.meta(name)
            assert (meta.dtype, meta.shape, meta.file.name) == (dtype, shape, file), name
            assert as_bytes(ckpt.read(name)) == data, name
            with safe_open(str(meta.file), "pt") as ref:
                assert as_bytes(ref.get_tensor(name)) == data, name
    finally:
        ckpt.close()


def check(path: Path, culprit: Path, files: dict[str, bytes], root: Path) -> str:
    """Open ``path`` once; return "valid" or the error kind; fail on anything else."""
    before = snapshot(root)
    listing = sorted(os.listdir(root))
    signal.alarm(10)
    try:
        check_opens_exactly(path, files)
        outcome = "valid"
    except CheckpointError as e:
        assert str(culprit) in str(e), str(e)
        outcome = kind_of(str(e))
    finally:
        signal.alarm(0)
    assert snapshot(root) == before and sorted(os.listdir(root)) == listing
    return outcome


@pytest.fixture
def alarm():
    def timeout(signum, frame):
        raise TimeoutError("opening a mutated checkpoint hung")

    old = signal.signal(signal.SIGALRM, timeout)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr


def cli_refuses(model: Path, culprit: Path, base: Path, tmp: Path, what: str) -> None:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {model}\n    parameters: {{weight: 1.0}}\n"
    )
    before = snapshot(tmp)
    out = tmp / "out"
    for args in (("inspect", model), ("merge", cfg, out, "-q")):
        code, err = run_cli(*args)
        assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (what, args[0], err)
        assert str(culprit) in err, (what, err)
    assert not out.exists() and snapshot(tmp) == before, what


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_fuzzed_headers_and_indexes(tmp_path, alarm):
    rng = random.Random(SEED)
    root = tmp_path / "in"
    folder = shutil.copytree(FIXTURES / "tiny-llama-base", root / "model")
    base = shutil.copytree(FIXTURES / "tiny-llama-base", root / "base")
    outside = Path(shutil.copy(folder / SHARDS[0], root / "outside.safetensors"))
    original = {p.name: p.read_bytes() for p in folder.iterdir()}
    shards = {s: original[s] for s in SHARDS}
    fds = open_fds()
    stats: dict[str, Counter] = {"header, file": Counter(), "header, folder": Counter(), "index": Counter()}
    refused: dict[str, list[tuple[str, bytes, str]]] = {"header": [], "index": []}

    for i in range(HEADER_MUTATIONS):
        target = rng.choice(SHARDS)
        blob, what = mutate_header(rng, shards[target])
        (folder / target).write_bytes(blob)
        files = {**shards, target: blob}
        try:
            as_file = check(folder / target, folder / target, {target: blob}, root)
            as_folder = check(folder, folder / target, files, root)
        except AssertionError as e:
            raise AssertionError(f"header mutation {i} of {target} ({what}): {e}") from e
        stats["header, file"][as_file] += 1
        stats["header, folder"][as_folder] += 1
        if as_folder != "valid":
            refused["header"].append((target, blob, what))
        (folder / target).write_bytes(original[target])

    for i in range(INDEX_MUTATIONS):
        raw, what = mutate_index(rng, original[INDEX], folder, outside)
        (folder / INDEX).write_bytes(raw)
        try:
            outcome = check(folder, folder / INDEX, shards, root)
        except AssertionError as e:
            raise AssertionError(f"index mutation {i} ({what}): {e}") from e
        stats["index"][outcome] += 1
        if outcome != "valid" and not what.startswith("filesystem"):
            refused["index"].append((INDEX, raw, what))
        for extra in set(os.listdir(folder)) - set(original):  # what a "filesystem" mutation made
            path = folder / extra
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        (folder / INDEX).write_bytes(original[INDEX])

    assert open_fds() == fds, "a refused checkpoint leaked file descriptors"
    for name, counts in stats.items():
        print(
            f"\n{name}: {sum(counts.values())} mutations, {counts['valid']} valid; refused by kind:",
            dict(sorted(((k, v) for k, v in counts.items() if k != "valid"), key=lambda kv: -kv[1])),
        )
    # The mutator must exercise both outcomes and many distinct checks, or it tests little.
    assert (
        stats["header, file"]["valid"] >= 20
        and sum(stats["header, file"].values()) - stats["header, file"]["valid"] >= 150
    )
    assert stats["index"]["valid"] >= 5 and sum(stats["index"].values()) - stats["index"]["valid"] >= 40
    assert len(stats["header, file"]) >= 12 and len(stats["index"]) >= 6
    assert (
        "other" not in stats["header, file"]
        and "other" not in stats["header, folder"]
        and "other" not in stats["index"]
    )

    # A sample of the refused mutations through the real CLI: inspect, and merge as an expert.
    sample_rng = random.Random(SEED + 1)
    for kind, cases in refused.items():
        for file, data, what in sample_rng.sample(cases, CLI_SAMPLE):
            (folder / file).write_bytes(data)
            cli_refuses(folder, folder / file, base, root, f"{kind} mutation: {what}")
            (folder / file).write_bytes(original[file])
