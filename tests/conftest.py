"""Shared test helpers: fixture paths and tiny real-format checkpoints built in tmp_path."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, read with the reference safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def save_folder(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Write ``tensors`` as an HF folder with the reference writer (sharded with an index if shards > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    names = list(tensors)
    step = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        group = names[i * step : (i + 1) * step]
        save_file({n: tensors[n] for n in group}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def fixture_copy(tmp_path):
    """Copy fixture folders into tmp_path so tests may assert inputs stay byte-unchanged."""

    def copy(*names: str) -> list[Path]:
        out = []
        for n in names:
            shutil.copytree(FIXTURES / n, tmp_path / n)
            out.append(tmp_path / n)
        return out

    return copy


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file's bytes, by path; streammerge's own state folder (journal, lock) left out."""
    return {
        str(p): p.read_bytes()
        for f in folders
        for p in sorted(Path(f).rglob("*"))
        if p.is_file() and ".streammerge" not in p.relative_to(f).parts
    }


@pytest.fixture
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and on a loaded machine (shared cores) far faster
    than several spinning OpenMP threads. Restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_hang():
    """Fail instead of hanging: a FIFO opened for reading blocks until a writer comes. The limit is generous
    (a loaded CI machine is slow); a blocked open never returns at all."""

    def timeout(signum, frame):
        raise TimeoutError("an input check blocked (a FIFO opened for reading?)")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(180)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
