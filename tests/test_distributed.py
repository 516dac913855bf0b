"""One merge across torchrun ranks (``streammerge.distributed``): gloo on the CPU, real ``torchrun`` launches.

Every distributed output is compared byte for byte with a single-process merge of the same config, made in
this process: every method of the registry with 2 and 3 ranks; a merge whose rank 1 is SIGKILLed half-way,
then resumed by 3 ranks and by one process; two "machines" (two torchrun launches, --nnodes 2) writing into
one OUT_DIR. Each launch starts 2-3 Python processes, so the configs of one world size share one launch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FIXTURES, ROOT, load_folder, snapshot
from safetensors.torch import save_file

import streammerge
from streammerge.distributed import assign, tensor_cost
from streammerge.io.journal import journal_path, rank_journal_paths, read_journal

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")

BASE, A, B = (FIXTURES / f"tiny-llama-fp32-{k}" for k in ("base", "a", "b"))
ADAPTERS = FIXTURES / "adapters"
SHARD = "100KB"  # the fixtures' 440 KB in several shards, so that ranks share shard files


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nproc: int, args: list[str], timeout: int = 300, extra: list[str] | None = None) -> subprocess.Popen:
    cmd = ["torchrun", *(extra or ["--standalone"]), "--nproc-per-node", str(nproc), *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(nproc: int, args: list[str], extra: list[str] | None = None) -> subprocess.CompletedProcess:
    proc = _torchrun(nproc, args, extra=extra)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(out: Path, ref: dict[str, bytes]) -> bool:
    mine = snapshot(out)
    return {os.path.basename(k): v for k, v in mine.items()} == {os.path.basename(k): v for k, v in ref.items()}


@pytest.fixture(scope="module")
def sidecars(tmp_path_factory):
    """Name-keyed exp_avg_sq files for experts a and b (log-normal, as Adam's v looks)."""
    root = tmp_path_factory.mktemp("v")
    base = load_folder(BASE)
    out = []
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        v = {n: torch.exp(torch.randn(t.shape, generator=g) * 2 - 20) for n, t in base.items() if t.is_floating_point()}
        save_file(v, root / f"v{i}.safetensors")
        out.append(root / f"v{i}.safetensors")
    return out


def _configs(root: Path, sidecars) -> dict[str, Path]:
    """One config per method of the registry (OTA with FFG calibration, ORD on full and LoRA experts)."""
    def models(params):
        return [{"model": str(m), "parameters": p} for m, p in zip((A, B), params, strict=True)]

    cfgs = {
        "linear": {"merge_method": "linear", "models": models([{"weight": 0.3}, {"weight": 0.9}])},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(BASE),
                            "models": models([{"weight": 0.7}, {"weight": 0.5}])},
        "ties": {"merge_method": "ties", "base_model": str(BASE),
                 "models": models([{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}])},
        "dare_linear": {"merge_method": "dare_linear", "base_model": str(BASE), "seed": 3,
                        "models": models([{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}])},
        "dare_ties": {"merge_method": "dare_ties", "base_model": str(BASE), "seed": 4,
                      "models": models([{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}])},
        "ota_ffg": {"merge_method": "ota", "base_model": str(BASE),
                    "models": [{"model": str(m), "sidecar": str(s), "parameters": {"density": d}}
                               for m, s, d in zip((A, B), sidecars, (0.3, 0.6), strict=True)]},
        "orthomerge_ord": {"merge_method": "orthomerge", "base_model": str(BASE),
                           "models": [{"model": str(A)}, {"model": str(ADAPTERS / "lora-a")}],
                           "parameters": {"residual_method": "ties", "density": 0.5}},
        "orthomerge_oft": {"merge_method": "orthomerge", "base_model": str(BASE),
                           "models": [{"model": str(ADAPTERS / "oft-cayley-a")},
                                      {"model": str(ADAPTERS / "oft-cayley-b")}]},
        "orthomerge_adapter": {"merge_method": "orthomerge", "base_model": str(BASE),
                               "models": [{"model": str(ADAPTERS / "oft-cayley-a")},
                                          {"model": str(ADAPTERS / "oft-cayley-b")}],
                               "parameters": {"output": "adapter"}},
    }
    paths = {}
    for name, cfg in cfgs.items():
        cfg.setdefault("dtype", "float32")
        cfg["out_dtype"] = "bfloat16" if name != "linear" else "float32"
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def _merge(config, out, **kw):
    return streammerge.merge(config, out, device="cpu", out_shard_size=SHARD, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sidecars):
    """Single-process merges of every config (bytes and the method's report)."""
    root = tmp_path_factory.mktemp("reference")
    configs = _configs(root, sidecars)
    results = {name: _merge(cfg, root / name) for name, cfg in configs.items()}  # torch's default threads
    return configs, {name: snapshot(root / name) for name in configs}, {n: r.report for n, r in results.items()}


# the same merges through the API on every rank of one launch; rank 0 saves the results
API_DRIVER = """
import json, sys
import streammerge
configs, out_root, results = json.loads(sys.argv[1]), sys.argv[2], {}
for name, cfg in configs.items():
    events = []
    r = streammerge.merge(cfg, f"{out_root}/{name}", device="cpu", out_shard_size="100KB", progress=events.append)
    count = lambda kind: [sum(e.kind == kind for e in events), sum(e.nbytes for e in events if e.kind == kind)]
    results[name] = {"report": r.report, "computed": r.computed_tensors, "tensors": r.tensors, "bytes":
                     r.bytes_written, "progress": count("tensor"), "calibration": count("calibrate")}
from streammerge import distributed
if distributed.current().rank == 0:
    json.dump(results, open(f"{out_root}/results.json", "w"))
distributed.leave()
"""


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_method_gives_the_single_process_bytes(tmp_path, reference, ranks):
    configs, ref, reports = reference
    driver = tmp_path / "driver.py"
    driver.write_text(API_DRIVER)
    r = _run(ranks, [str(driver), json.dumps({k: str(v) for k, v in configs.items()}), str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for name in configs:
        assert _same(tmp_path / name, ref[name]), name
        assert results[name]["computed"] == results[name]["tensors"], name
        assert results[name]["report"] == reports[name], name  # e.g. FFG density achieved: counts summed over ranks
        if name == "orthomerge_adapter":  # a few MB, written by rank 0 alone, without a journal
            continue
        # rank 0's progress saw the whole merge, every rank's tensors
        assert results[name]["progress"] == [results[name]["tensors"], results[name]["bytes"]], name
        assert not rank_journal_paths(tmp_path / name)  # joined into the main journal
        state = read_journal(tmp_path / name)
        assert state.complete and len(state.records) == results[name]["tensors"]
    plan = streammerge.plan(configs["ota_ffg"], tmp_path / "unused")
    merged = [t for t in plan.tensors if t.merged]
    plan.close()
    assert results["ota_ffg"]["calibration"] == [len(merged), sum(t.out.nbytes for t in merged)]
    assert any("kept" in line for line in reports["ota_ffg"])  # the report compared is not empty


def test_cli_merge_with_two_ranks_writes_one_summary(tmp_path, reference):
    configs, ref, _ = reference
    out = tmp_path / "out"
    r = _run(2, ["-m", "streammerge", "merge", str(configs["ties"]), str(out), "--device", "cpu",
                 "--out-shard-size", SHARD])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _same(out, ref["ties"])
    assert r.stdout.count("wrote ") == 1 and "on 2 ranks" in r.stdout, r.stdout


KILL_DRIVER = """
import os, signal, sys
from streammerge.io import journal
k = int(sys.argv.pop(1))
if os.environ["RANK"] == "1":
    orig, calls = journal.Journal.record, [0]
    def record(self, rec):
        orig(self, rec)
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    journal.Journal.record = record
from streammerge.cli import main
sys.argv[0] = "streammerge"
main()
"""


def test_rank_killed_then_resumed_by_other_world_sizes(tmp_path, reference):
    configs, ref, _ = reference
    driver = tmp_path / "kill.py"
    driver.write_text(KILL_DRIVER)
    out = tmp_path / "out"
    args = ["merge", str(configs["ties"]), str(out), "--device", "cpu", "--out-shard-size", SHARD, "-q"]
    r = _run(2, [str(driver), "3", *args])
    assert r.returncode != 0  # rank 1 died: torchrun stopped rank 0 too
    state = read_journal(out)
    rank1 = read_journal(out, rank_journal_paths(out)[0])
    assert len(rank1.records) == 3 and not state.complete
    done = set(state.records) | set(rank1.records)
    plan = streammerge.plan(configs["ties"], tmp_path / "unused")
    total = len(plan.tensors)
    plan.close()
    assert 3 <= len(done) < total
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    # by three ranks
    r = _run(3, ["-m", "streammerge", *args[:2], str(out), *args[3:-1]])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"({len(done)} resumed from an earlier run)" in r.stdout, r.stdout
    assert _same(out, ref["ties"])
    _each_tensor_recorded_once(out, total)

    # by one process
    result = _merge(configs["ties"], copy)
    assert result.resumed_tensors == len(done) and result.computed_tensors == total - len(done)
    assert _same(copy, ref["ties"])
    _each_tensor_recorded_once(copy, total)


def _each_tensor_recorded_once(out: Path, total: int) -> None:
    """No finished tensor was computed again: every tensor has exactly one record in the main journal."""
    names = [json.loads(line.rsplit(b"\t", 1)[0])["name"] for line in journal_path(out).read_bytes().splitlines()
             if b'"kind":"tensor"' in line]
    assert len(names) == len(set(names)) == total
    assert not rank_journal_paths(out)


def test_two_machines_share_one_output_folder(tmp_path, reference):
    configs, ref, _ = reference
    out = tmp_path / "out"
    port = _free_port()
    procs = [
        _torchrun(1, ["-m", "streammerge", "merge", str(configs["orthomerge_ord"]), str(out), "--device", "cpu",
                      "--out-shard-size", SHARD, "-q"],
                  extra=["--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                         "--master-port", str(port)])
        for node in (0, 1)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert _same(out, ref["orthomerge_ord"])


ERROR_DRIVER = """
import os, sys
mode = sys.argv.pop(1)
if os.environ["RANK"] == "1":
    if mode == "mismatch":  # rank 1 plans with another chunk size
        sys.argv += ["--chunk-size", "2097152"]
    elif mode == "remote":
        from streammerge import engine
        from streammerge.errors import OutputError
        def merge_tensor(plan, tensor, *a, **k):
            raise OutputError(f"boom: cannot write {tensor.out.name}")
        engine.merge_tensor = merge_tensor
from streammerge.cli import main
sys.argv[0] = "streammerge"
main()
"""


@pytest.mark.parametrize("mode", ["mismatch", "remote", "rank0"])
def test_an_error_on_any_rank_is_one_line(tmp_path, reference, mode):
    configs, _, _ = reference
    driver = tmp_path / "err.py"
    driver.write_text(ERROR_DRIVER)
    out = tmp_path / "out"
    if mode == "rank0":  # rank 0 refuses the output folder: it holds something else
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    r = _run(2, [str(driver), mode, "merge", str(configs["task_arithmetic"]), str(out), "--device", "cpu", "-q"])
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    if mode == "mismatch":
        assert "rank 1" in lines[0] and "option chunk_elements changed from 4194304 to 2097152" in lines[0]
    elif mode == "remote":
        assert lines[0].startswith("error: rank 1 (") and "boom: cannot write" in lines[0]
    else:
        assert lines[0] == f"error: {out}: is not empty; choose a new folder or pass --overwrite to replace its " \
            "model files"
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert "[rank" not in r.stderr  # no rank printed a traceback (torchrun prints its own summary)


# --- no launch: the assignment -------------------------------------------------------------------------


def test_assignment_is_deterministic_and_balances_cost():
    costs = [5.0, 1.0, 1.0, 4.0, 3.0, 3.0, 2.0, 1.0]
    owner = assign(costs, 3)
    assert owner == assign(costs, 3)
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(3)]
    assert sorted(loads) == [6.0, 7.0, 7.0]  # LPT: 5+1, 4+2+1, 3+3+1
    assert assign([1.0, 1.0], 1) == [0, 0]


def test_ord_cost_follows_the_cube_of_each_paths_decomposition(tmp_path):
    from streammerge.io.writer import OutputTensor
    from streammerge.planner import PlannedTensor

    cfg = {"merge_method": "orthomerge", "base_model": str(BASE), "models": [{"model": str(A)}, {"model": str(B)}]}
    plan = streammerge.plan(cfg, tmp_path / "o")
    try:
        def cost(name, shape):
            return tensor_cost(plan, PlannedTensor(OutputTensor(name, torch.float32, shape), True))

        wide = cost("model.layers.0.mlp.down_proj.weight", (1024, 4096))
        square = cost("model.layers.0.self_attn.q_proj.weight", (1024, 1024))
        tall = cost("model.layers.0.mlp.up_proj.weight", (4096, 1024))
        # dense path (square, tall): d_in³ + d_out·d_in² per expert; the wide matrix takes the subspace path,
        # k = 2048: k³ + d_out·k² + d_out·d_in·k/2 = (8 + 4 + 4)·1024³ against 2·1024³ for the square one;
        # the reads are small beside both
        assert 7.6 < wide / square < 8
        assert 2.5 < tall / square < 2.6  # (1024³ + 4096·1024²) / (2·1024³) = 2.5, plus 4× the reads
        assert cost("model.layers.0.input_layernorm.weight", (64,)) == 64 * 3  # not rotated: base + 2 experts read
        expert = {"model": str(A), "parameters": {"weight": 1.0, "density": 0.5}}
        ties = {**cfg, "merge_method": "ties", "models": [expert]}
        plan_ties = streammerge.plan(ties, tmp_path / "o")
        t = PlannedTensor(OutputTensor("model.layers.0.mlp.up_proj.weight", torch.float32, (256, 64)), True)
        assert tensor_cost(plan_ties, t) == 256 * 64 * 2 * 3  # base + 1 expert, 3 passes
        plan_ties.close()
    finally:
        plan.close()



# --- --gpu-memory -----------------------------------------------------------------------------------------


def test_gpu_memory_budget_sends_tensors_that_do_not_fit_to_the_cpu(tmp_path):
    from streammerge.device_budget import gpu_memory_report, tensor_options
    from streammerge.engine import MergeOptions

    cfg = {"merge_method": "orthomerge", "base_model": str(BASE), "models": [{"model": str(A)}, {"model": str(B)}]}
    plan = streammerge.plan(cfg, tmp_path / "o")
    try:
        def working_set(t):  # six copies of the tensor and six d_in × d_in matrices, fp32
            return 4 * (6 * t.out.numel + (6 * t.out.shape[1] ** 2 if len(t.out.shape) == 2 else 0))

        sizes = sorted({working_set(t) for t in plan.tensors})
        budget = sizes[len(sizes) // 2]
        options = MergeOptions(device=torch.device("cuda"), gpu_memory=budget)
        on_cpu = [t.out.name for t in plan.tensors if tensor_options(plan, t, options).device.type == "cpu"]
        assert on_cpu == [t.out.name for t in plan.tensors if working_set(t) > budget] and on_cpu
        assert all(tensor_options(plan, t, options) is options for t in plan.tensors if t.out.name not in on_cpu)
        (line,) = gpu_memory_report(plan, options)
        assert line.startswith(f"{len(on_cpu)} tensor(s) ran on the CPU") and on_cpu[0] in line
        assert gpu_memory_report(plan, MergeOptions()) == []  # CPU merges: no budget
    finally:
        plan.close()


def test_gpu_memory_is_refused_on_the_cpu(tmp_path):
    from click.testing import CliRunner

    from streammerge.cli import main

    r = CliRunner().invoke(main, ["merge", str(FIXTURES / "configs" / "ties.yaml"), str(tmp_path / "o"), "--device",
                                  "cpu", "--gpu-memory", "8GB"])
    assert r.exit_code == 1 and "applies to --device cuda only" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_with_a_tiny_budget_runs_every_tensor_on_the_cpu(tmp_path, reference):
    configs, ref, _ = reference
    r = streammerge.merge(configs["ties"], tmp_path / "o", device="cuda", out_shard_size=SHARD, gpu_memory=1)
    assert any("ran on the CPU" in line for line in r.report)
    assert _same(tmp_path / "o", ref["ties"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_ranks_on_two_gpus_with_nccl(tmp_path, reference):
    configs, ref, _ = reference
    cuda = tmp_path / "cuda-1p"
    streammerge.merge(configs["orthomerge_ord"], cuda, device="cuda", out_shard_size=SHARD)
    r = _run(2, ["-m", "streammerge", "merge", str(configs["orthomerge_ord"]), str(tmp_path / "o"), "--device", "cuda",
                 "--out-shard-size", SHARD, "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _same(tmp_path / "o", snapshot(cuda))
