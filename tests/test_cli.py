"""End to end through the console script, as a user runs it: outputs, and one-line errors for bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, load_folder, snapshot

from streammerge.cli import main

CLI = [sys.executable, "-m", "streammerge.cli"]


def run_process(*args):
    """The real console entry point in its own process (exit code, stderr as a user sees them)."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)


def run(*args):
    """In-process, for speed; same exit codes and streams."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    result.returncode = result.exit_code
    return result


def _config(tmp_path, base, experts, method="ties", extra=""):
    models = "\n".join(f"  - model: {e}\n    parameters: {{weight: 1.0, density: 0.5}}" for e in experts)
    p = tmp_path / "cfg.yaml"
    p.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}\n{extra}")
    return p


def test_fixture_config_merges_into_a_loadable_hf_folder(tmp_path):
    out = tmp_path / "out"
    r = run_process("merge", FIXTURES / "configs" / "ties.yaml", out, "--out-shard-size", "100KB", "--quiet")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    merged = load_folder(out)
    base = load_folder(FIXTURES / "tiny-llama-base")
    assert set(merged) == set(base) and all(t.dtype == torch.bfloat16 for t in merged.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 2
    assert (out / "generation_config.json").exists() and "merge_method: ties" in (out / "README.md").read_text()
    assert not list(out.glob(".*partial"))


def test_output_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    assert run("merge", FIXTURES / "configs" / "task_arithmetic.yaml", out, "-q").returncode == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ours = load_folder(out)
    sd = model.state_dict()
    for name, t in ours.items():
        assert torch.equal(sd[name], t.to(sd[name].dtype)), name
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()


def test_dry_run_writes_nothing(tmp_path):
    r = run("merge", FIXTURES / "configs" / "ties.yaml", tmp_path / "out", "--dry-run")
    assert r.returncode == 0 and "peak RAM" in r.stdout and "model.safetensors" in r.stdout
    assert not (tmp_path / "out").exists()


def test_inspect_lists_tensors():
    r = run("inspect", FIXTURES / "tiny-llama-base")
    assert (
        r.returncode == 0
        and "model.layers.1.mlp.down_proj.weight" in r.stdout
        and "21 tensors in 2 file(s)" in r.stdout
    )


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _mismatched_expert(tmp_path):
    (bad,) = [shutil.copytree(FIXTURES / "tiny-llama-math", tmp_path / "bad")]
    from safetensors.torch import load_file, save_file

    shard = bad / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    return bad, name


BAD_INPUTS = {
    "missing config": lambda tmp: ([tmp / "nope.yaml"], "cannot read config"),
    "missing model": lambda tmp: ([_config(tmp, FIXTURES / "tiny-llama-base", [tmp / "ghost"])], "does not exist"),
    "folder without weights": lambda tmp: (
        [_config(tmp, FIXTURES / "tiny-llama-base", [_empty(tmp)])],
        "no model weights",
    ),
    "unknown method": lambda tmp: (
        [_config(tmp, FIXTURES / "tiny-llama-base", [FIXTURES / "tiny-llama-math"], method="magic")],
        "unknown merge_method",
    ),
    "unknown parameter": lambda tmp: (
        [_config(tmp, FIXTURES / "tiny-llama-base", [FIXTURES / "tiny-llama-math"], extra="parameters: {gamma: 1}")],
        "unknown parameter 'gamma'",
    ),
    "bad yaml": lambda tmp: ([(tmp / "c.yaml", (tmp / "c.yaml").write_text("merge_method: [\n"))[0]], "invalid YAML"),
    "shape mismatch": lambda tmp: (
        [_config(tmp, FIXTURES / "tiny-llama-base", [_mismatched_expert(tmp)[0]])],
        "differs from",
    ),
    "linear base not in models": lambda tmp: (
        [_linear_config(tmp, FIXTURES / "tiny-llama-base", [FIXTURES / "tiny-llama-math"])],
        "does not use a base model",
    ),
}


def _linear_config(tmp_path, base, models):
    entries = "\n".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}" for m in models)
    p = tmp_path / "linear.yaml"
    p.write_text(f"merge_method: linear\nbase_model: {base}\nmodels:\n{entries}\n")
    return p


def test_linear_with_its_base_listed_under_models_merges_it(tmp_path):
    # mergekit's usual form: the base_model is also one of the weighted models, and is averaged in
    cfg = _linear_config(
        tmp_path, FIXTURES / "tiny-llama-base", [FIXTURES / "tiny-llama-base", FIXTURES / "tiny-llama-math"]
    )
    assert run("merge", cfg, tmp_path / "out", "-q").returncode == 0
    got = load_folder(tmp_path / "out")
    a, b = load_folder(FIXTURES / "tiny-llama-base"), load_folder(FIXTURES / "tiny-llama-math")
    name = "model.layers.0.mlp.down_proj.weight"
    want = ((a[name].float() + b[name].float()) / 2).to(a[name].dtype)
    assert torch.equal(got[name], want)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_no_traceback_nothing_written(tmp_path, case):
    args, needle = BAD_INPUTS[case](tmp_path)
    before = snapshot(FIXTURES)
    out = tmp_path / "out"
    r = (run_process if case == "shape mismatch" else run)("merge", *args, out)
    assert r.returncode == 1
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() or not any(out.iterdir())
    assert snapshot(FIXTURES) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_folder_overlapping_an_input_is_refused(tmp_path, fixture_copy, where):
    base, expert = fixture_copy("tiny-llama-base", "tiny-llama-math")
    before = snapshot(base, expert)
    cfg = _config(tmp_path, base, [expert])
    out = expert if where == "same" else expert / "merged"
    r = run("merge", cfg, out)
    assert r.returncode == 1 and "inside input" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(base, expert) == before and not (expert / "merged").exists()


def test_expert_inside_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(FIXTURES / "tiny-llama-math", out / "expert")
    cfg = _config(tmp_path, FIXTURES / "tiny-llama-base", [out / "expert"])
    r = run("merge", cfg, out)
    assert r.returncode == 1 and "inside the output folder" in r.stderr


def test_non_empty_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = run("merge", FIXTURES / "configs" / "linear.yaml", out, "-q")
    assert r.returncode == 1 and "--overwrite" in r.stderr
    assert run("merge", FIXTURES / "configs" / "linear.yaml", out, "-q", "--overwrite").returncode == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.safetensors").exists()
