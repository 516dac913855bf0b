"""Model names beyond local folders: hub ids through huggingface_hub's cache, and mergekit's MODEL+ADAPTER."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, load_folder

import streammerge
from streammerge.cli import main
from streammerge.config import parse_config
from streammerge.errors import ConfigError
from streammerge.io import hub

huggingface_hub = pytest.importorskip("huggingface_hub")
repo_folder_name = pytest.importorskip("huggingface_hub.file_download").repo_folder_name

BASE, A, B = (FIXTURES / f"tiny-llama-fp32-{k}" for k in ("base", "a", "b"))
LORA_A, LORA_B, OFT = (FIXTURES / "adapters" / k for k in ("lora-a", "lora-b", "oft-cayley-a"))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, refs=("main",)) -> Path:
    """huggingface_hub's documented cache layout: models--org--name/{blobs/<sha256>, refs/<ref> (the commit),
    snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(f"../../blobs/{blob}")
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_hub_cache(cache, "tiny-org/expert-a", A, refs=("main", "v1"))
    make_hub_cache(cache, "tiny-org/base", BASE)
    # huggingface_hub itself reads this as a cache of two repositories (an independent check of the layout)
    info = huggingface_hub.scan_cache_dir(cache)
    assert sorted(r.repo_id for r in info.repos) == ["tiny-org/base", "tiny-org/expert-a"]
    assert not info.warnings
    return cache


def _cfg(base: str, expert: str) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
            f"models:\n  - model: {expert}\n    parameters: {{weight: 0.6}}\n")


def _bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("expert", ["tiny-org/expert-a", "tiny-org/expert-a@v1", f"tiny-org/expert-a@{COMMIT}"])
def test_hub_ids_resolve_from_the_cache_offline(tmp_path, hub_cache, expert):
    streammerge.merge(_cfg(str(BASE), str(A)), tmp_path / "local")
    streammerge.merge(_cfg("tiny-org/base", expert), tmp_path / "hub")
    assert _bytes(tmp_path / "hub") == _bytes(tmp_path / "local")
    cfg = parse_config(_cfg("tiny-org/base", expert))
    assert cfg.models[0].path == hub_cache / "models--tiny-org--expert-a" / "snapshots" / COMMIT


def test_hub_id_not_cached_offline_is_one_line_naming_the_repo_and_the_fetch(tmp_path, hub_cache):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_cfg("tiny-org/base", "tiny-org/missing@v2"))
    result = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in ("tiny-org/missing@v2", "HF_HUB_OFFLINE", "hf download tiny-org/missing --revision v2"):
        assert needle in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_local_folder_of_the_same_name_wins_over_the_hub(tmp_path, hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(B, tmp_path / "tiny-org" / "expert-a")  # a local folder named like the cached repo
    streammerge.merge(_cfg("tiny-org/base", "tiny-org/expert-a"), tmp_path / "out")
    streammerge.merge(_cfg(str(BASE), str(B)), tmp_path / "ref")
    assert _bytes(tmp_path / "out") == _bytes(tmp_path / "ref")


def test_a_cached_snapshot_without_weights_is_not_enough_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(BASE / "config.json", only_config / "config.json")
    make_hub_cache(cache, "tiny-org/partial", only_config)
    with pytest.raises(ConfigError, match="tiny-org/partial is not in the local cache"):
        parse_config(_cfg(str(BASE), "tiny-org/partial"))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("org/name:exp_avg_sq/model.safetensors", ("org/name", None, "exp_avg_sq/model.safetensors")),
        ("org/name/exp_avg_sq/model.safetensors", ("org/name", None, "exp_avg_sq/model.safetensors")),
        ("org/name@v1:x.safetensors", ("org/name", "v1", "x.safetensors")),
        ("org/name", None),
        ("org/name:", None),
        ("org/name/../x", None),
    ],
)
def test_hub_file_forms(value, expected):
    assert hub.split_repo_file(value) == expected


def test_hub_file_resolves_from_the_cache(hub_cache):
    path = hub.resolve_repo_file("tiny-org/base", "config.json")
    assert path.read_bytes() == (BASE / "config.json").read_bytes()
    with pytest.raises(streammerge.StreamMergeError, match="file 'nope.json' of hub repository tiny-org/base"):
        hub.resolve_repo_file("tiny-org/base", "nope.json")


# --- mergekit's MODEL+ADAPTER ------------------------------------------------------------------


def _lora_cfg(base: str) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": f"{A}+{LORA_A}", "parameters": {"weight": 0.5}},  # an adapter on another model
            {"model": f"{BASE}+{LORA_B}", "parameters": {"weight": 0.7}},
        ],
        "dtype": "float32",
    }


def _peft_merged(model: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The reference: PEFT's own merge_and_unload of the adapter into that model."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    m = peft.PeftModel.from_pretrained(m, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_model_plus_adapter_is_the_adapter_merged_into_that_model(tmp_path):
    streammerge.merge(_lora_cfg(str(BASE)), tmp_path / "out")
    ours = load_folder(tmp_path / "out")
    base = load_folder(BASE)
    a, b = _peft_merged(A, LORA_A), _peft_merged(BASE, LORA_B)
    for name, t in ours.items():
        expected = base[name] + 0.5 * (a[name] - base[name]) + 0.7 * (b[name] - base[name])
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_model_plus_adapter_matches_mergekit(tmp_path, monkeypatch):
    pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _lora_cfg(str(BASE))
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True, write_model_card=False,
                                   lora_merge_cache=str(tmp_path / "lora-cache")))
    streammerge.merge(cfg, tmp_path / "ours")
    theirs, ours = load_folder(tmp_path / "mk"), load_folder(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=1e-6, atol=1e-6, msg=name)


def test_base_model_plus_adapter(tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": f"{BASE}+{LORA_A}", "dtype": "float32",
           "models": [{"model": str(B), "parameters": {"weight": 0.5}},
                      {"model": f"{BASE}+{LORA_A}", "parameters": {"weight": 1.0}}]}  # the base itself: skipped
    streammerge.merge(cfg, tmp_path / "out")
    ours, base, b = load_folder(tmp_path / "out"), _peft_merged(BASE, LORA_A), load_folder(B)
    for name, t in ours.items():
        torch.testing.assert_close(t, base[name] + 0.5 * (b[name] - base[name]), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "model, needle",
    [
        (f"{BASE}+{LORA_A}+{LORA_B}", "exactly one '+'"),
        (f"{BASE}+{A}", "is not a PEFT adapter folder"),
        (f"{BASE}+/nonexistent-adapter", "does not exist"),
    ],
)
def test_model_plus_adapter_refusals(tmp_path, model, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_cfg(str(BASE), model))
    result = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_local_path_with_a_plus_is_a_path(tmp_path):
    shutil.copytree(A, tmp_path / "a+b")
    cfg = parse_config(_cfg(str(BASE), str(tmp_path / "a+b")))
    assert cfg.models[0].path == tmp_path / "a+b" and cfg.models[0].lora is None
