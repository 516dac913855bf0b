"""Lazy checkpoint readers: names, dtypes and shapes from headers; one tensor's bytes on demand.

``open_checkpoint(path)`` accepts a Hugging Face model folder (sharded safetensors with
``model.safetensors.index.json``, a single ``model.safetensors``, or ``pytorch_model.bin`` with or
without its index) or a single ``.safetensors`` / ``.bin`` file.

Safetensors data is read with positioned reads (``os.preadv``) straight into a fresh tensor, not
through a memory map: an mmap keeps every page it touched resident (and counted in RSS) until it is
unmapped, so a reader that maps whole shards grows to the model's size. With ``pread`` the page
cache holds the file and our RSS holds only the tensors alive right now. ``prefetch`` asks the kernel
to read ahead (``posix_fadvise(WILLNEED)``) without holding anything.

``.bin`` files are zip archives of pickles; they are opened with
``torch.load(weights_only=True, mmap=True)``, which never executes pickled code, and re-opened
after every ``BIN_REMAP_BYTES`` read so that their mapped pages are released.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_format import TORCH_TO_ST, TensorEntry, TensorSpec, parse_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_REMAP_BYTES = 1 << 30


@dataclass(frozen=True)
class TensorMeta(TensorSpec):
    """What the planner needs to know about one input tensor, from headers alone."""

    file: Path


class Checkpoint:
    """A read-only view of one model's tensors. Subclasses implement ``_read``."""

    def __init__(self, path: Path, metas: dict[str, TensorMeta], files: list[Path], metadata: dict[str, str]):
        self.path = path
        self.folder = path if path.is_dir() else path.parent
        self._metas = metas
        self.files = files
        self.metadata = metadata
        self.index_files: list[Path] = []  # the index naming the shards, if any

    def __contains__(self, name: str) -> bool:
        return name in self._metas

    def names(self) -> list[str]:
        return list(self._metas)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._metas[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, in memory this call owns.

        With ``count`` given, return only flat elements ``[start, start + count)`` as a 1-D tensor
        (row-major order); otherwise the whole tensor in its shape.
        """
        meta = self.meta(name)
        if count is None:
            return self._read(meta, 0, meta.numel).reshape(meta.shape)
        if start < 0 or start + count > meta.numel:
            raise ValueError(f"range [{start}, {start + count}) outside {name} of {meta.numel} elements")
        return self._read(meta, start, count)

    def prefetch(self, name: str) -> None:
        """Hint that ``name`` is read soon. Never blocks, never holds memory."""

    def close(self) -> None:
        pass

    def _read(self, meta: TensorMeta, start: int, count: int) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path, shard_paths: list[Path], weight_map: dict[str, str] | None):
        metas: dict[str, TensorMeta] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._fds: dict[Path, int] = {}
        metadata: dict[str, str] = {}
        for shard in shard_paths:
            entries, meta = _read_safetensors_header(shard)
            metadata.update(meta)
            for name, entry in entries.items():
                if weight_map is not None and weight_map.get(name) != shard.name:
                    continue  # the index is authoritative when present
                if name in metas:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in both {metas[name].file.name} and {shard.name}")
                metas[name] = TensorMeta(name, entry.torch_dtype, entry.shape, shard)
                self._entries[name] = entry
        if weight_map is not None:
            missing = [n for n in weight_map if n not in metas]
            if missing:
                raise CheckpointError(
                    f"{path}: index lists {missing[0]!r} in {weight_map[missing[0]]} but that shard has no such tensor"
                    f" ({len(missing)} missing); the checkpoint is incomplete"
                )
        super().__init__(path, metas, shard_paths, metadata)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _read(self, meta: TensorMeta, start: int, count: int) -> torch.Tensor:
        entry = self._entries[meta.name]
        size = torch.empty((), dtype=meta.dtype).element_size()
        out = torch.empty(count * size, dtype=torch.uint8)
        _pread_into(self._fd(meta.file), out, entry.begin + start * size, meta.file)
        return out.view(meta.dtype)

    def byte_range(self, name: str) -> tuple[int, int]:
        """Absolute ``(begin, end)`` byte offsets of tensor ``name`` in its shard file."""
        entry = self._entries[self.meta(name).name]
        return entry.begin, entry.end

    def prefetch(self, name: str) -> None:
        if hasattr(os, "posix_fadvise"):
            entry = self._entries[name]
            os.posix_fadvise(self._fd(self._metas[name].file), entry.begin, entry.nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_into(fd: int, out: torch.Tensor, offset: int, file: Path) -> None:
    view = memoryview(out.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{file}: unexpected end of file at byte {offset + done} (file changed or truncated?)")
        done += n


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return parse_header(f.read(8), f.read, size, str(path))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e


class BinCheckpoint(Checkpoint):
    """``pytorch_model.bin`` shards, read with ``torch.load(weights_only=True)``: no pickle code runs."""

    def __init__(self, path: Path, shard_paths: list[Path], weight_map: dict[str, str] | None):
        metas: dict[str, TensorMeta] = {}
        for shard in shard_paths:
            for name, t in _load_bin(shard).items():
                if weight_map is not None and weight_map.get(name) != shard.name:
                    continue
                if name in metas:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in both {metas[name].file.name} and {shard.name}")
                metas[name] = TensorMeta(name, t.dtype, tuple(t.shape), shard)
        self._open: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._read_since_open = 0
        super().__init__(path, metas, shard_paths, {})

    def _read(self, meta: TensorMeta, start: int, count: int) -> torch.Tensor:
        if self._open is None or self._open[0] != meta.file or self._read_since_open > BIN_REMAP_BYTES:
            self._open = None  # drop the old mapping before making the next
            self._open = (meta.file, _load_bin(meta.file))
            self._read_since_open = 0
        flat = self._open[1][meta.name].reshape(-1)[start : start + count].clone()
        self._read_since_open += flat.numel() * flat.element_size()
        return flat

    def close(self) -> None:
        self._open = None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the pickle holds more than tensors and would execute code "
            f"({str(e).splitlines()[0][:200]}); convert it to safetensors with a tool you trust"
        ) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, found {type(sd).__name__}")
    for name, t in sd.items():
        if t.dtype not in TORCH_TO_ST:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
    return sd


def _confined(folder: Path, name: object, index: Path) -> Path:
    """Resolve a shard name from an index, refusing anything that leaves ``folder``."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
        raise CheckpointError(f"{index}: shard name {name!r} is not a relative file name; fix the index")
    root = folder.resolve()
    target = (folder / name).resolve()
    if root not in target.parents:
        raise CheckpointError(f"{index}: shard name {name!r} points outside {folder}; refusing to read it")
    if not target.is_file():
        raise CheckpointError(f"{index}: lists shard {name!r}, which does not exist in {folder}")
    return folder / name


def _read_index(index: Path) -> tuple[dict[str, str], list[Path]]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not a readable JSON index ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' object mapping tensor names to shard files")
    shards: list[Path] = []
    for shard_name in dict.fromkeys(weight_map.values()):
        shards.append(_confined(index.parent, shard_name, index))
    return weight_map, shards


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a model folder or weights file lazily: only headers are read here."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsCheckpoint(p, [p], None)
        if p.suffix in (".bin", ".pt", ".pth"):
            return BinCheckpoint(p, [p], None)
        raise CheckpointError(f"{p}: not a .safetensors or .bin weights file")
    if (p / SAFETENSORS_INDEX).is_file():
        weight_map, shards = _read_index(p / SAFETENSORS_INDEX)
        ckpt: Checkpoint = SafetensorsCheckpoint(p, shards, weight_map)
        ckpt.index_files = [p / SAFETENSORS_INDEX]
        return ckpt
    singles = sorted(p.glob("*.safetensors"))
    if (p / "model.safetensors").is_file():
        return SafetensorsCheckpoint(p, [p / "model.safetensors"], None)
    if len(singles) == 1:
        return SafetensorsCheckpoint(p, singles, None)
    if (p / BIN_INDEX).is_file():
        weight_map, shards = _read_index(p / BIN_INDEX)
        ckpt = BinCheckpoint(p, shards, weight_map)
        ckpt.index_files = [p / BIN_INDEX]
        return ckpt
    if (p / "pytorch_model.bin").is_file():
        return BinCheckpoint(p, [p / "pytorch_model.bin"], None)
    if singles:
        raise CheckpointError(
            f"{p}: has {len(singles)} .safetensors files but no {SAFETENSORS_INDEX}; add the index or pass one file"
        )
    raise CheckpointError(
        f"{p}: no model weights found (expected {SAFETENSORS_INDEX}, model.safetensors or pytorch_model.bin)"
    )
