"""Crash-safe resume: kill -9 at chosen points and at a random time, re-run, compare bytes.

Each interrupted merge runs in its own process, which a small driver script patches to SIGKILL
itself at one point of the engine (after the k-th journal record, between two chunks of a tensor,
between a tensor's last write and its record, half-way through a journal line, between shard
renames, before the journal's last line). The re-run happens in this process through the public
API; its output folder must equal, byte for byte, that of a merge that was never interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner
from conftest import save_folder, snapshot

import streammerge
from streammerge.cli import main
from streammerge.errors import CheckpointError, OutputError
from streammerge.io.journal import OutputLock, journal_path, read_journal
from streammerge.io.writer import INDEX_NAME

CHUNK = 1 << 20
SHARD = "5MB"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base + 2 experts: 11 tensors in 4 output shards; the 12 MB embedding is 3 chunks."""
    root = tmp_path_factory.mktemp("models")
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(3000, 1024, generator=g)}
    for i in range(3):
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(256, 512, generator=g)
        base[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(512, 512, generator=g)
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(512, generator=g)
    base["lm_head.weight"] = torch.randn(1000, 512, generator=g)
    paths = [save_folder(root / "base", base, shards=2)]
    for e in range(2):
        expert = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(save_folder(root / f"expert{e}", expert, shards=2))
    return paths


def _config(tmp_path, models, method="ties") -> str:
    base, e0, e1 = models
    path = tmp_path / f"{method}.yaml"
    path.write_text(textwrap.dedent(f"""\
        merge_method: {method}
        base_model: {base}
        models:
          - model: {e0}
            parameters: {{weight: 0.7, density: 0.4}}
          - model: {e1}
            parameters: {{weight: 0.5, density: 0.6}}
        seed: 7
        out_dtype: bfloat16
        """))
    return str(path)


def _merge(config, out, **kw):
    return streammerge.merge(config, out, chunk_elements=CHUNK, out_shard_size=SHARD, device="cpu", **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models):
    """Uninterrupted merges to compare against, per method."""
    root = tmp_path_factory.mktemp("reference")
    done = {}

    def get(method):
        if method not in done:
            out = root / method
            _merge(_config(root, models, method), out)
            done[method] = snapshot(out)
        return done[method]

    return get


def _same(out, ref) -> bool:
    mine = snapshot(out)
    return sorted(os.path.basename(k) for k in mine) == sorted(os.path.basename(k) for k in ref) and \
        sorted(mine.values()) == sorted(ref.values())


DRIVER = """
import os, signal, sys
import streammerge
from streammerge.io import journal, writer
point, k = sys.argv[3], int(sys.argv[4])
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def tick():
    calls["n"] += 1
    return calls["n"] == k

if point == "after_record":
    orig = journal.Journal.record
    def record(self, rec):
        orig(self, rec)
        if tick(): die()
    journal.Journal.record = record
elif point == "torn_record":
    orig_append = journal.Journal._append
    def append(self, obj):
        if obj.get("kind") == "tensor" and tick():
            line = journal._encode(obj)
            os.write(self._fd, line[: len(line) // 2])
            die()
        orig_append(self, obj)
    journal.Journal._append = append
elif point == "before_record":
    orig_finish = writer.ShardWriter.finish_tensor
    def finish_tensor(self, name):
        if tick(): die()
        return orig_finish(self, name)
    writer.ShardWriter.finish_tensor = finish_tensor
elif point == "mid_tensor":
    orig_write = writer.ShardWriter.write
    def write(self, name, data, start=0):
        orig_write(self, name, data, start)
        if name == "model.embed_tokens.weight" and start > 0 and tick(): die()
    writer.ShardWriter.write = write
elif point == "mid_finalize":
    orig_replace = os.replace
    def replace(src, dst):
        orig_replace(src, dst)
        if str(dst).endswith(".safetensors") and tick(): die()
    os.replace = replace
elif point == "before_complete":
    def complete(self):
        die()
    journal.Journal.complete = complete
elif point == "slow":  # for kills from outside at a random time
    import time
    from streammerge import engine
    orig_merge = engine.merge_tensor
    def merge_tensor(*a, **kw):
        time.sleep(0.05)
        return orig_merge(*a, **kw)
    engine.merge_tensor = merge_tensor
streammerge.merge(sys.argv[1], sys.argv[2], chunk_elements=%d, out_shard_size=%r, device="cpu")
sys.exit(3)  # not killed: the kill point was never reached
""" % (CHUNK, SHARD)


def _run_driver(tmp_path, config, out, point, k):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(script), config, str(out), point, str(k)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _looks_complete(out) -> bool:
    return (out / INDEX_NAME).exists() or any(p.name.startswith("model-") for p in out.iterdir())


# (kill point, k, tensors an earlier run finished that the re-run must not recompute)
KILL_POINTS = [
    ("after_record", 1, 1),
    ("after_record", 6, 6),
    ("torn_record", 4, 3),
    ("before_record", 5, 4),
    ("mid_tensor", 1, 0),
    ("mid_finalize", 2, 11),
    ("before_complete", 1, 11),
]


@pytest.mark.parametrize("point,k,finished", KILL_POINTS)
def test_kill_then_rerun_gives_the_same_bytes_without_recomputing(tmp_path, models, reference, point, k, finished):
    config = _config(tmp_path, models)
    out = tmp_path / "out"
    proc = _run_driver(tmp_path, config, out, point, k)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    if point not in ("mid_finalize", "before_complete"):
        assert not _looks_complete(out), "an interrupted merge must not look complete"
    result = _merge(config, out)
    assert result.resumed_tensors == finished
    assert result.computed_tensors == 11 - finished
    assert _same(out, reference("ties"))
    assert not list(out.glob(".*partial"))


def test_kill_at_a_random_time_then_rerun_gives_the_same_bytes(tmp_path, models, reference):
    seed = int.from_bytes(os.urandom(4), "little")
    delay = random.Random(seed).uniform(0.0, 1.5)
    config = _config(tmp_path, models, "dare_ties")
    out = tmp_path / "out"
    proc = _run_driver(tmp_path, config, out, "slow", 0)
    time.sleep(1.5 + delay)  # ~1.5 s to import torch, then ~11 x 50 ms of merging
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    _merge(config, out)
    assert _same(out, reference("dare_ties")), f"seed {seed}, killed after {delay:.3f} s"


def test_second_merge_into_the_same_folder_is_locked_out(tmp_path, models):
    config = _config(tmp_path, models)
    out = tmp_path / "out"
    out.mkdir()
    lock = OutputLock(out).acquire()
    try:
        with pytest.raises(OutputError, match="another merge .*pid %d" % os.getpid()):
            _merge(config, out)
    finally:
        lock.release()


def test_stale_lock_of_a_dead_merge_is_taken_over(tmp_path, models, reference):
    config = _config(tmp_path, models)
    out = tmp_path / "out"
    proc = _run_driver(tmp_path, config, out, "after_record", 3)
    proc.communicate(timeout=120)
    assert "pid" in (out / ".streammerge" / "lock").read_text()  # left behind by the killed process
    result = _merge(config, out)
    assert result.resumed_tensors == 3 and _same(out, reference("ties"))


def _interrupted(tmp_path, models, k=4):
    config = _config(tmp_path, models)
    out = tmp_path / "out"
    proc = _run_driver(tmp_path, config, out, "after_record", k)
    proc.communicate(timeout=120)
    return config, out


def test_changed_config_option_or_input_refuses_to_resume(tmp_path, models):
    config, out = _interrupted(tmp_path, models)
    with pytest.raises(OutputError, match="option out_shard_size changed from 5000000 to 6000000.*--restart"):
        streammerge.merge(config, out, chunk_elements=CHUNK, out_shard_size="6MB", device="cpu")
    text = open(config).read()
    with open(config, "w") as f:
        f.write(text.replace("density: 0.4", "density: 0.5"))
    with pytest.raises(OutputError, match="the config changed"):
        _merge(config, out)
    with open(config, "w") as f:
        f.write(text)
    shard = models[1] / "model-00002-of-00002.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        with pytest.raises(OutputError, match=f"input {shard.resolve()} changed \\(modification time\\)"):
            _merge(config, out)
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _merge(config, out).resumed_tensors == 4


def test_restart_discards_earlier_work(tmp_path, models, reference):
    config, out = _interrupted(tmp_path, models)
    result = _merge(config, out, restart=True)
    assert result.resumed_tensors == 0 and result.computed_tensors == 11
    assert _same(out, reference("ties"))


def test_rerun_of_a_finished_merge_does_nothing(tmp_path, models):
    config = _config(tmp_path, models)
    out = tmp_path / "out"
    _merge(config, out)
    before = snapshot(out)
    result = _merge(config, out)
    assert result.already_complete and snapshot(out) == before
    args = ["merge", config, str(out), "--chunk-size", str(CHUNK), "--out-shard-size", SHARD, "--device", "cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "already holds this merge" in r.output


def test_cli_says_how_much_was_already_done(tmp_path, models):
    config, out = _interrupted(tmp_path, models, k=5)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "streammerge.cli",
            "merge",
            config,
            str(out),
            "--chunk-size",
            str(CHUNK),
            "--out-shard-size",
            SHARD,
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "(5 resumed from an earlier run)" in r.stdout


def test_disk_full_mid_merge_is_clear_corrupts_nothing_and_resumes(tmp_path, models, reference, monkeypatch):
    config = _config(tmp_path, models)
    out = tmp_path / "out"
    from streammerge.io import writer

    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    with pytest.raises(
        OutputError, match=r"disk full.*bytes of output still to write.*re-run the same command to resume"
    ):
        _merge(config, out)
    monkeypatch.setattr(writer.os, "pwrite", real)
    assert not _looks_complete(out)
    done = len(read_journal(out).records)
    result = _merge(config, out)
    assert result.resumed_tensors == done > 0
    assert _same(out, reference("ties"))


def test_free_space_is_checked_before_starting(tmp_path, models, monkeypatch):
    from streammerge import output_dir

    class Usage:
        free = 10_000

    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda _: Usage)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"not enough disk space: the merge still needs .* 10.00 KB is free"):
        _merge(_config(tmp_path, models), out)
    assert not any(p.name.endswith("partial") for p in out.iterdir())


def test_nonfinite_input_is_refused_unless_allowed(tmp_path, models):
    base, e0, _ = models
    tensors = {}
    from safetensors.torch import load_file

    for f in sorted(e0.glob("*.safetensors")):
        tensors.update(load_file(f))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    bad = save_folder(tmp_path / "bad", tensors)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(bad), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds 1 NaN/Inf "
        r".*element 1541.*--allow-nonfinite",
    ):
        streammerge.merge(cfg, tmp_path / "out")
    streammerge.merge(cfg, tmp_path / "out2", allow_nonfinite=True)
    from conftest import load_folder

    merged = load_folder(tmp_path / "out2")["model.layers.1.mlp.up_proj.weight"]
    assert torch.isnan(merged[3, 5]) and torch.isfinite(merged).sum() == merged.numel() - 1


def test_sync_policy_marks_durable_records(tmp_path, models):
    config = _config(tmp_path, models)
    out = tmp_path / "out"
    proc = _run_driver(tmp_path, config, out, "after_record", 6)
    proc.communicate(timeout=120)
    state = read_journal(out)
    assert len(state.records) == 6 and not state.durable  # default: a durable point every 1 GB
    # every tensor: everything recorded is durable
    out2 = tmp_path / "out2"
    _merge(config, out2, sync_bytes=0)
    lines = journal_path(out2).read_text().splitlines()
    kinds = [json.loads(line.rsplit("\t", 1)[0])["kind"] for line in lines]
    assert kinds == ["begin"] + ["tensor", "sync"] * 11 + ["complete"]


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_nonfinite_is_traced_to_its_input_for_every_method(tmp_path, models, method):
    base, e0, e1 = models
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(e1.glob("*.safetensors")):
        tensors.update(load_file(f))
    tensors["model.embed_tokens.weight"].view(-1)[2_500_000] = float("-inf")  # in the third 1M chunk
    bad = save_folder(tmp_path / "bad", tensors)
    extra = {} if method == "linear" else {"density": 0.5}
    cfg = {
        "merge_method": method,
        **({} if method == "linear" else {"base_model": str(base)}),
        "models": [
            {"model": str(e0), "parameters": {"weight": 0.5, **extra}},
            {"model": str(bad), "parameters": {"weight": 0.5, **extra}},
        ],
    }
    with pytest.raises(
        CheckpointError,
        match=r"bad/model.safetensors: tensor 'model.embed_tokens.weight' holds 1 NaN/Inf .*element 2500000",
    ):
        streammerge.merge(cfg, tmp_path / "out", chunk_elements=CHUNK)


def test_overflow_of_the_merge_is_reported_as_such(tmp_path, models):
    base, e0, e1 = models
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(e0), "parameters": {"weight": 3e38}},
            {"model": str(e1), "parameters": {"weight": 3e38}},
        ],
        "parameters": {"normalize": False},
    }
    from streammerge.errors import StreamMergeError

    with pytest.raises(StreamMergeError, match="although its inputs are finite: an overflow"):
        streammerge.merge(cfg, tmp_path / "out", chunk_elements=CHUNK)
