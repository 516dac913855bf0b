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
after every ``BIN_REMAP_BYTES`` read so that their mapped pages are released. Legacy (pre-zip,
torch < 1.6) ``.bin`` files cannot be mapped; they are loaded whole, still with ``weights_only``.

Every input is untrusted. Only regular files are opened (a FIFO or device is refused, never
waited on), and a shard must lie inside its model folder: a name from an index with ``..`` or an
absolute path, or a symlink whose target is outside the folder, is refused. The one exception is
the Hugging Face hub cache, where ``snapshots/<rev>/NAME`` is a symlink to ``../../blobs/<hash>``:
a target directly in that repository's ``blobs/`` folder is accepted. With an index, the index and
the shards must agree exactly: a tensor the index lists but its shard lacks, or a tensor a shard
holds that the index does not list (or lists in another shard), is an error, since either way one
of the two files is wrong and a merge would silently drop or invent a tensor.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .paths import FILE_KINDS
from .safetensors_format import (
    MAX_HEADER_BYTES,
    TORCH_TO_ST,
    TensorEntry,
    TensorSpec,
    decode_json,
    is_utf8,
    parse_header,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_REMAP_BYTES = 1 << 30


@dataclass(frozen=True)
class TensorMeta(TensorSpec):
    """What the planner needs to know about one input tensor, from headers alone."""

    file: Path


def _check_range(name: str, meta: TensorMeta, start: int, count: int) -> None:
    if start < 0 or start + count > meta.numel:
        raise ValueError(f"range [{start}, {start + count}) outside {name} of {meta.numel} elements")


class Checkpoint:
    """A read-only view of one model's tensors. Subclasses implement ``_read``.

    ``kind`` and ``aux`` let views that are not plain checkpoints (an adapter applied to a base model)
    tell a merge method what they are and hand it extra per-tensor inputs."""

    kind = "model"
    # a read of a small flat range costs about its size (False: a range read computes more, e.g. whole rows)
    cheap_ranges = True

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
        _check_range(name, meta, start, count)
        return self._read(meta, start, count)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Flat elements ``[start, start + out.numel())`` of ``name`` into ``out`` (1-D, contiguous, the
        stored dtype): the bytes ``read`` returns, into memory the caller keeps and reuses."""
        meta = self.meta(name)
        if out.dtype != meta.dtype or not out.is_contiguous():
            raise ValueError(f"read_into {name}: needs a contiguous {meta.dtype} tensor, got {out.dtype}")
        self._read_into(name, meta, start, out)

    def _read_into(self, name: str, meta: TensorMeta, start: int, out: torch.Tensor) -> None:
        out.copy_(self.read(name, start, out.numel()))  # a format without direct reads: one copy more

    def prefetch(self, name: str) -> None:
        """Hint that ``name`` is read soon. Never blocks, never holds memory."""

    def aux(self, name: str) -> dict:
        """Extra inputs for tensor ``name`` (key -> loader); none for a plain checkpoint."""
        return {}

    def close(self) -> None:
        pass

    def _read(self, meta: TensorMeta, start: int, count: int) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsCheckpoint(Checkpoint):
    def __init__(
        self, path: Path, shard_paths: list[Path], weight_map: dict[str, Path] | None, index: Path | None = None
    ):
        metas: dict[str, TensorMeta] = {}
        self._entries: dict[str, TensorEntry] = {}
        # One descriptor per shard, opened when its header is validated and kept until close(): the
        # bytes later read are those of the file that was checked, even if its name is replaced.
        self._fds: dict[Path, int] = {}
        self._identities: dict[Path, tuple[int, ...]] = {}
        metadata: dict[str, str] = {}
        try:
            for shard in shard_paths:
                fd, entries, meta = _read_safetensors_header(shard)
                self._fds[shard] = fd
                self._identities[shard] = _identity(fd)
                metadata.update(meta)
                for name, entry in entries.items():
                    _check_listed(name, shard, weight_map, index, metas)
                    metas[name] = TensorMeta(name, entry.torch_dtype, entry.shape, shard)
                    self._entries[name] = entry
            _check_complete(metas, weight_map, index)
        except BaseException:
            self.close()
            raise
        super().__init__(path, metas, shard_paths, metadata)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:  # read again after close(): only if it is still the file that was checked
            fd = _open_regular(file)
            if _identity(fd) != self._identities[file]:
                os.close(fd)
                raise CheckpointError(f"{file}: changed since its header was read; open the checkpoint again")
            self._fds[file] = fd
        return fd

    def _read(self, meta: TensorMeta, start: int, count: int) -> torch.Tensor:
        out = torch.empty(count, dtype=meta.dtype)
        self._pread(meta, start, out)
        return out

    def _read_into(self, name: str, meta: TensorMeta, start: int, out: torch.Tensor) -> None:
        _check_range(name, meta, start, out.numel())
        self._pread(meta, start, out)

    def _pread(self, meta: TensorMeta, start: int, out: torch.Tensor) -> None:
        """Flat elements ``[start, start + out.numel())`` straight from the file into ``out`` (contiguous,
        the stored dtype)."""
        entry = self._entries[meta.name]
        _pread_into(self._fd(meta.file), out.view(torch.uint8), entry.begin + start * out.element_size(), meta.file)

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


def _check_listed(
    name: str, shard: Path, weight_map: dict[str, Path] | None, index: Path | None, seen: dict[str, TensorMeta]
) -> None:
    """Refuse a tensor that the index does not assign to ``shard``, or that another shard also holds."""
    if weight_map is not None and weight_map.get(name) != shard:
        listed = weight_map.get(name)
        where = f"maps it to {listed.name}" if listed is not None else "does not list it"
        raise CheckpointError(
            f"{shard}: holds tensor {name!r} but {index} {where}; the index and the shards disagree "
            f"(fix the index, or re-download the checkpoint)"
        )
    if name in seen:
        raise CheckpointError(f"{shard}: tensor {name!r} is also in {seen[name].file}; keep one copy")


def _check_complete(metas: dict[str, TensorMeta], weight_map: dict[str, Path] | None, index: Path | None) -> None:
    if weight_map is None:
        return
    missing = [n for n in weight_map if n not in metas]
    if missing:
        shard = weight_map[missing[0]]
        raise CheckpointError(
            f"{index}: lists {missing[0]!r} in {shard.name} but {shard} has no such tensor"
            f" ({len(missing)} missing); the checkpoint is incomplete or the index is stale"
        )


def _pread_into(fd: int, out: torch.Tensor, offset: int, file: Path) -> None:
    view = memoryview(out.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(
                f"{file}: unexpected end of file at byte {offset + done} (file changed or truncated?)"
            )
        done += n


_FILE_KINDS = FILE_KINDS


def _open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer (it has no
    effect on regular files); anything that is not a regular file is then refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror}); check the path and its permissions") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a weights file; point the config at a model folder or file")
    return fd


def _identity(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _pread_all(fd: int, size: int, offset: int, file: Path) -> bytes:
    parts, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            raise CheckpointError(
                f"{file}: unexpected end of file at byte {offset + done} (file changed or truncated?)"
            )
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _read_safetensors_header(path: Path) -> tuple[int, dict[str, TensorEntry], dict[str, str]]:
    """An open descriptor of ``path`` and its validated header (the descriptor is closed on error)."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        raw_len = os.pread(fd, 8, 0)
        entries, metadata = parse_header(raw_len, lambda n: _pread_all(fd, n, 8, path), size, str(path))
    except OSError as e:
        os.close(fd)
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    except BaseException:
        os.close(fd)
        raise
    return fd, entries, metadata


class BinCheckpoint(Checkpoint):
    """``pytorch_model.bin`` shards, read with ``torch.load(weights_only=True)``: no pickle code runs."""

    def __init__(
        self, path: Path, shard_paths: list[Path], weight_map: dict[str, Path] | None, index: Path | None = None
    ):
        metas: dict[str, TensorMeta] = {}
        for shard in shard_paths:
            for name, t in _load_bin(shard).items():
                _check_listed(name, shard, weight_map, index, metas)
                metas[name] = TensorMeta(name, t.dtype, tuple(t.shape), shard)
        _check_complete(metas, weight_map, index)
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
    fd = _open_regular(path)  # before torch.load, which would block forever on a FIFO
    try:
        magic = os.pread(fd, 4, 0)
    finally:
        os.close(fd)
    is_zip = magic == b"PK\x03\x04"
    if not is_zip and not magic.startswith(b"\x80"):  # torch.save: a zip, or (legacy) a pickle of protocol >= 2
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle); "
            "the file is corrupt or truncated"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        # weights_only stops at the first opcode or global outside its allow-list: either the file
        # is corrupt or it holds objects whose unpickling runs code. Both are refused.
        raise CheckpointError(
            f"{path}: refusing to load: not a plain pickle of tensors ({_torch_reason(e)}); it is corrupt, or "
            f"unpickling it would execute code; convert it to safetensors with a tool you trust"
        ) from e
    except MemoryError as e:
        raise CheckpointError(f"{path}: not enough memory to load this .bin file; convert it to safetensors") from e
    except Exception as e:
        # A corrupt archive or pickle surfaces as RuntimeError, KeyError, EOFError, ValueError, ...
        # depending on where torch's loader trips; all of them mean the same thing to the user.
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_torch_reason(e)}); the file is corrupt or truncated"
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, found {type(sd).__name__}")
    for name, t in sd.items():
        if t.dtype not in TORCH_TO_ST:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        if t.layout != torch.strided:
            raise CheckpointError(f"{path}: tensor {name!r} is {t.layout}, not a dense tensor; convert it first")
    return sd


def _torch_reason(e: BaseException) -> str:
    """The informative part of a torch.load error, on one line (its messages run to a dozen lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = found.group(1) if found else lines[0] if lines else type(e).__name__
    return " ".join(reason.split())[:200]


def _inside(target: Path, root: Path) -> bool:
    """Whether resolved ``target`` lies in resolved folder ``root`` (or in its hub-cache ``blobs/``)."""
    if root in target.parents:
        return True
    # huggingface_hub cache: <repo>/snapshots/<revision>/<name> -> ../../blobs/<hash>
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def check_model_file(folder: Path, name: str) -> None:
    """Refuse ``folder / name`` (config, tokenizer, ...), if present, unless it is a regular file inside ``folder``."""
    if os.path.lexists(folder / name):
        _shard_path(folder, name, None, "model file")


def _shard_path(folder: Path, name: object, source: Path | None, what: str = "weights file") -> Path:
    """``folder / name`` for a weights file named by index ``source`` (or found in ``folder`` when None).

    Refuses a name that is not a plain relative path, one that leaves ``folder`` (``..``, an absolute
    path, a symlink to elsewhere) and one that is not an existing regular file.
    """
    who = f"{source}: shard {name!r}" if source is not None else f"{folder / str(name)}:"
    fix = "fix the index" if source is not None else "a model's files must be regular files in its folder"
    if (
        not isinstance(name, str)
        or not name
        or "\x00" in name
        or not is_utf8(name)
        or os.path.isabs(name)
        or ".." in Path(name).parts
    ):
        raise CheckpointError(f"{who} is not a relative file name inside {folder}; {fix}")
    path = folder / name
    try:
        root, target = folder.resolve(strict=True), path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop, on Python < 3.13
        raise CheckpointError(f"{who} cannot be resolved ({e}); {fix}") from e
    if not _inside(target, root):
        raise CheckpointError(f"{who} leads to {target}, outside {folder}; refusing to read it ({fix})")
    if not os.path.lexists(target):
        raise CheckpointError(f"{who} does not exist in {folder}; the checkpoint is incomplete")
    if not target.is_file():
        try:
            kind = _FILE_KINDS.get(stat.S_IFMT(os.stat(target).st_mode), "not a regular file")
        except OSError:
            kind = "not a readable file"
        raise CheckpointError(f"{who} is {kind}, not a {what}; {fix}")
    return path


def _read_index(index: Path) -> tuple[dict[str, Path], list[Path]]:
    """An index's ``weight_map`` as tensor name -> shard path, and its shards in order of first use."""
    _shard_path(index.parent, index.name, None)
    fd = _open_regular(index)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{index}: is {size} bytes, over the {MAX_HEADER_BYTES}-byte limit for an index; the file is corrupt"
            )
        raw = _pread_all(fd, size, 0, index)
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror})") from e
    finally:
        os.close(fd)
    data = decode_json(raw, str(index), "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' object mapping tensor names to shard files")
    paths: dict[str, Path] = {}
    resolved: dict[str, Path] = {}
    for tensor, shard_name in weight_map.items():
        if not is_utf8(tensor):
            raise CheckpointError(f"{index}: tensor name {tensor!r} is not valid Unicode; fix the index")
        if not isinstance(shard_name, str):
            raise CheckpointError(
                f"{index}: tensor {tensor!r} maps to {shard_name!r}, not a shard file name; fix the index"
            )
        if shard_name not in paths:
            paths[shard_name] = _shard_path(index.parent, shard_name, index)
        resolved[tensor] = paths[shard_name]
    return resolved, list(dict.fromkeys(paths.values()))


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
    if not p.is_dir():
        kind = _FILE_KINDS.get(stat.S_IFMT(p.stat().st_mode), "not a regular file")
        raise CheckpointError(f"{p}: is {kind}, not a model folder or weights file")
    # lexists: a symlink or FIFO under a known name is refused by _shard_path, not silently skipped.
    if os.path.lexists(p / SAFETENSORS_INDEX):
        weight_map, shards = _read_index(p / SAFETENSORS_INDEX)
        ckpt: Checkpoint = SafetensorsCheckpoint(p, shards, weight_map, p / SAFETENSORS_INDEX)
        ckpt.index_files = [p / SAFETENSORS_INDEX]
        return ckpt
    singles = sorted(p.glob("*.safetensors"))
    if os.path.lexists(p / "model.safetensors"):
        return SafetensorsCheckpoint(p, [_shard_path(p, "model.safetensors", None)], None)
    if len(singles) == 1:
        return SafetensorsCheckpoint(p, [_shard_path(p, singles[0].name, None)], None)
    if os.path.lexists(p / BIN_INDEX):
        weight_map, shards = _read_index(p / BIN_INDEX)
        ckpt = BinCheckpoint(p, shards, weight_map, p / BIN_INDEX)
        ckpt.index_files = [p / BIN_INDEX]
        return ckpt
    if os.path.lexists(p / "pytorch_model.bin"):
        return BinCheckpoint(p, [_shard_path(p, "pytorch_model.bin", None)], None)
    if singles:
        raise CheckpointError(
            f"{p}: has {len(singles)} .safetensors files but no {SAFETENSORS_INDEX}; add the index or pass one file"
        )
    raise CheckpointError(
        f"{p}: no model weights found (expected {SAFETENSORS_INDEX}, model.safetensors or pytorch_model.bin)"
    )
