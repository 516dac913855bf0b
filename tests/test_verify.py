"""``streammerge verify`` and the journal format: damaged outputs are found and named."""

from __future__ import annotations

import zlib

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

import streammerge
from streammerge.cli import main
from streammerge.errors import OutputError
from streammerge.io.journal import JOURNAL_VERSION, Journal, TensorRecord, _encode, journal_path, read_journal
from streammerge.io.reader import open_checkpoint

CONFIG = FIXTURES / "configs" / "ties.yaml"


def verify(out):
    return CliRunner().invoke(main, ["verify", str(out)])


@pytest.fixture
def merged(tmp_path):
    out = tmp_path / "out"
    streammerge.merge(CONFIG, out, out_shard_size="100KB")
    return out


def test_a_good_output_verifies(merged):
    r = verify(merged)
    assert r.exit_code == 0 and "21 tensors verified against the merge journal" in r.output


def test_a_flipped_byte_is_reported_by_tensor_name(merged):
    ckpt = open_checkpoint(merged)
    name = "model.layers.1.mlp.down_proj.weight"
    begin, _ = ckpt.byte_range(name)
    path = ckpt.meta(name).file
    ckpt.close()
    data = bytearray(path.read_bytes())
    data[begin + 10] ^= 0x01
    path.write_bytes(bytes(data))
    r = verify(merged)
    assert r.exit_code == 1
    assert f"BAD {name}: bytes in {path.name} do not match the recorded checksum" in r.output
    assert "1 problem(s) found; 21 tensors checked" in r.output


def test_a_truncated_shard_is_reported(merged):
    shard = sorted(merged.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    r = verify(merged)
    assert r.exit_code == 1 and shard.name in r.output and "truncated" in r.output


def test_a_missing_tensor_is_reported(merged, tmp_path):
    # rewrite one shard without its last tensor, keeping the journal
    from safetensors.torch import load_file, save_file

    shard = sorted(merged.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    dropped = sorted(tensors)[-1]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    r = verify(merged)
    assert r.exit_code == 1 and f"BAD {dropped}: recorded in the journal but missing from the output" in r.output


def test_without_a_journal_only_headers_are_checked(merged):
    journal_path(merged).unlink()
    r = verify(merged)
    assert r.exit_code == 0 and "no streammerge journal; checked headers only" in r.output


def test_an_unfinished_merge_is_not_verified(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    journal = Journal.create(out, {"tensors": 21})
    journal.close()
    r = verify(out)
    assert r.exit_code == 1 and "not finished (0 of 21 tensors done)" in r.output


def _lines(out):
    return journal_path(out).read_bytes().splitlines(keepends=True)


def test_journal_reading_stops_at_a_torn_or_damaged_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    j = Journal.create(out, {"x": 1})
    for i in range(4):
        j.record(TensorRecord(f"t{i}", "model.safetensors", 100 * i, 100, zlib.crc32(b"%d" % i)))
        if i == 1:
            j.durable_point()
    j.close()
    state = read_journal(out)
    assert list(state.records) == ["t0", "t1", "t2", "t3"] and state.durable == {"t0", "t1"}
    lines = _lines(out)
    # damage t2's line: reading stops there, t3 is not trusted either
    damaged = lines[:4] + [lines[4].replace(b'"t2"', b'"tX"')] + lines[5:]
    journal_path(out).write_bytes(b"".join(damaged))
    state = read_journal(out)
    assert list(state.records) == ["t0", "t1"] and state.valid_bytes == sum(map(len, lines[:4]))
    # a torn last line (no newline) is ignored and cut off when the journal is reopened
    journal_path(out).write_bytes(b"".join(lines[:4]) + lines[4][:-7])
    state = read_journal(out)
    assert list(state.records) == ["t0", "t1"]
    Journal.reopen(out, state).close()
    assert journal_path(out).read_bytes() == b"".join(lines[:4])


def test_journal_of_another_version_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / ".streammerge").mkdir(parents=True)
    journal_path(out).write_bytes(
        _encode({"kind": "begin", "format": "streammerge-journal", "version": JOURNAL_VERSION + 1})
    )
    with pytest.raises(OutputError, match="journal version 2 is not 1; re-run with --restart"):
        read_journal(out)
