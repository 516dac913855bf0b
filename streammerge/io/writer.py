"""Planned-layout safetensors writer: headers first, then each tensor's bytes into its slot.

Every output tensor's name, dtype and shape are known before any math runs, so ``plan_shards``
assigns tensors to shards (greedy in processing order, at most ``max_shard_bytes`` of data per
shard unless one tensor alone is larger) and ``ShardWriter`` writes each shard's final header at
once, sizes the file, and lets the engine ``pwrite`` tensors into their slots, in any order of
tensors and, within a tensor, as consecutive flat chunks. Only the bytes being written are in
memory. The bytes of each shard equal ``safetensors.torch.save_file`` of its tensors with metadata
``{"format": "pt"}``.

Crash safety: shards are written as ``.<name>.partial`` inside the output folder. Only when every
tensor of every shard is written does ``finalize`` fsync them, rename them all to their final
``model-0000K-of-0000M.safetensors`` names and write ``model.safetensors.index.json`` (temp +
rename) last, so a folder never looks complete before it is. ``finish_tensor`` returns each
tensor's ``TensorRecord`` (slot and CRC-32) for the resume journal; a writer built with the
records of an interrupted run reopens its partial shards without truncating them and trusts those
slots (``check_records`` decides which records to trust).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import OutputError
from .journal import TensorRecord
from .safetensors_format import TORCH_TO_ST, TensorSpec, build_header

INDEX_NAME = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}
CRC_BLOCK = 64 << 20  # bytes read at a time when re-checking a slot


OutputTensor = TensorSpec  # an output tensor is fully described by name, dtype and shape


@dataclass
class ShardPlan:
    file_name: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def header(self) -> tuple[bytes, dict[str, tuple[int, int]]]:
        """Header bytes (length prefix included) and each tensor's absolute ``(begin, end)`` slot."""
        return build_header([(t.name, TORCH_TO_ST[t.dtype], t.shape) for t in self.tensors], SHARD_METADATA)

    @property
    def file_bytes(self) -> int:
        return len(self.header()[0]) + self.data_bytes


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[ShardPlan]:
    """Assign tensors to shards in the given order, like mergekit and transformers do."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    names = shard_file_names(len(groups))
    return [ShardPlan(name, group) for name, group in zip(names, groups, strict=False)]


def partial_name(file_name: str) -> str:
    return f".{file_name}.partial"


def crc32_of_range(path: Path, offset: int, length: int) -> int | None:
    """CRC-32 of ``length`` bytes at ``offset`` of ``path``; None if the file is shorter or unreadable."""
    crc = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                block = f.read(min(left, CRC_BLOCK))
                if not block:
                    return None
                crc = zlib.crc32(block, crc)
                left -= len(block)
    except OSError:
        return None
    return crc


def _shard_file_matches(path: Path, shard: ShardPlan) -> bool:
    """Whether ``path`` has the planned size and header bytes of ``shard``."""
    prefix, _ = shard.header()
    try:
        if path.stat().st_size != len(prefix) + shard.data_bytes:
            return False
        with open(path, "rb") as f:
            return f.read(len(prefix)) == prefix
    except OSError:
        return False


def check_records(out_dir: Path, shards: list[ShardPlan], records: dict[str, TensorRecord],
                  durable: set[str]) -> dict[str, TensorRecord]:
    """The journal records an interrupted run may keep.

    A record is kept when its slot is the planned one and its shard file (partial, or already
    renamed) has the planned size and header. Records not known durable are re-read and their
    CRC compared, so data lost by a power failure is recomputed rather than trusted.
    """
    kept: dict[str, TensorRecord] = {}
    for shard in shards:
        _, slots = shard.header()
        path = existing_shard_path(out_dir, shard)
        if path is None or not _shard_file_matches(path, shard):
            continue
        for t in shard.tensors:
            rec = records.get(t.name)
            if rec is None or rec.shard != shard.file_name or (rec.offset, rec.offset + rec.length) != slots[t.name]:
                continue
            if t.name not in durable and crc32_of_range(path, rec.offset, rec.length) != rec.crc32:
                continue
            kept[t.name] = rec
    return kept


def existing_shard_path(out_dir: Path, shard: ShardPlan) -> Path | None:
    for path in (out_dir / partial_name(shard.file_name), out_dir / shard.file_name):
        if path.is_file():
            return path
    return None


def bytes_to_allocate(out_dir: Path, shards: list[ShardPlan]) -> int:
    """Disk bytes the remaining writes may still allocate (shard files are sparse until written)."""
    need = 0
    for shard in shards:
        size = shard.file_bytes
        path = existing_shard_path(out_dir, shard)
        allocated = 0
        if path is not None:
            st = path.stat()
            allocated = min(st.st_size, st.st_blocks * 512) if st.st_size == size else 0
        need += size - allocated
    return need


@dataclass
class _OpenShard:
    plan: ShardPlan
    fd: int
    path: Path
    slots: dict[str, tuple[int, int]]


@dataclass
class _Progress:
    written: int = 0  # bytes of this tensor written so far, from its start
    crc: int = 0


class ShardWriter:
    """Writes the planned shards into ``out_dir``. Use as a context manager; call ``finalize()``.

    ``done`` are journal records of tensors an interrupted run finished (already checked with
    ``check_records``): their shards are reopened without truncation and they are not written.
    ``create=False`` (the other ranks of a distributed merge, writing beside each other): every shard
    file already exists, made by rank 0's ``open_all``; it is opened as it is, never created or truncated.
    """

    def __init__(self, out_dir: Path, shards: list[ShardPlan], done: dict[str, TensorRecord] | None = None,
                 create: bool = True):
        self.out_dir = out_dir
        self.create = create
        self.shards = shards
        self.done = dict(done or {})
        self._open: dict[str, _OpenShard] = {}
        self._shard_of: dict[str, ShardPlan] = {t.name: s for s in shards for t in s.tensors}
        self._progress: dict[str, _Progress] = {}
        self.remaining = sum(s.data_bytes for s in shards) - sum(r.length for r in self.done.values())

    def _shard(self, name: str) -> _OpenShard:
        plan = self._shard_of[name]
        shard = self._open.get(plan.file_name)
        if shard is not None:
            return shard
        prefix, slots = plan.header()
        path = self.out_dir / partial_name(plan.file_name)
        final = self.out_dir / plan.file_name
        resume = any(t.name in self.done for t in plan.tensors)
        try:
            if not self.create:
                if not _shard_file_matches(path, plan):
                    raise OutputError(f"{path}: missing or not the planned shard file; another process changed "
                                      f"the output folder during the merge")
                fd = os.open(path, os.O_RDWR)
                shard = self._open[plan.file_name] = _OpenShard(plan, fd, path, slots)
                return shard
            if resume and not path.exists() and final.exists():
                os.replace(final, path)  # renamed by a finalize that was interrupted
            if resume and _shard_file_matches(path, plan):
                fd = os.open(path, os.O_RDWR)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, len(prefix) + plan.data_bytes)
                _pwrite_all(fd, memoryview(prefix), 0, path, self.remaining)
        except OSError as e:
            raise OutputError(_os_error_message(path, e, "create shard", self.remaining)) from e
        shard = self._open[plan.file_name] = _OpenShard(plan, fd, path, slots)
        return shard

    def open_all(self) -> None:
        """Create (or reopen) every shard file now, header written and size set (before other processes
        write into them: see ``create``)."""
        for plan in self.shards:
            if plan.tensors:
                self._shard(plan.tensors[0].name)

    def write(self, name: str, data: torch.Tensor, start: int = 0) -> None:
        """Write ``data``: tensor ``name`` whole, or its flat elements from ``start`` on.

        Chunks of one tensor must come in order (``start`` = elements written so far).
        """
        shard = self._shard(name)
        begin, end = shard.slots[name]
        data = data.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
        progress = self._progress.setdefault(name, _Progress())
        offset = start * data.element_size()
        if offset != progress.written or begin + offset + raw.numel() > end:
            raise ValueError(f"{name}: chunk at byte {offset} out of order or past its slot")
        view = memoryview(raw.numpy())
        _pwrite_all(shard.fd, view, begin + offset, shard.path, self.remaining)
        progress.crc = zlib.crc32(view, progress.crc)
        progress.written += raw.numel()
        self.remaining -= raw.numel()

    def finish_tensor(self, name: str) -> TensorRecord:
        """The journal record of tensor ``name``, once all its bytes are written."""
        shard = self._shard(name)
        begin, end = shard.slots[name]
        progress = self._progress.pop(name, _Progress())
        if progress.written != end - begin:
            raise ValueError(f"{name}: {progress.written} of {end - begin} bytes written")
        record = TensorRecord(name, shard.plan.file_name, begin, end - begin, progress.crc)
        self.done[name] = record
        return record

    def sync(self) -> None:
        """fsync every open shard: all bytes written so far are on disk."""
        for shard in self._open.values():
            try:
                os.fsync(shard.fd)
            except OSError as e:
                raise OutputError(_os_error_message(shard.path, e, "sync shard", self.remaining)) from e

    def finalize(self) -> None:
        """Check every tensor is written, fsync, rename every shard to its final name, write the index.

        Idempotent: a finalize interrupted half-way is completed by calling it again.
        """
        missing = [t.name for s in self.shards for t in s.tensors if t.name not in self.done]
        if missing:
            raise ValueError(f"finalize with {len(missing)} tensors unwritten, e.g. {missing[0]}")
        for plan in self.shards:
            if plan.file_name not in self._open and not (self.out_dir / plan.file_name).exists():
                partial = self.out_dir / partial_name(plan.file_name)
                if not partial.exists():  # no tensors (all empty) or never opened: create it now
                    self._shard(plan.tensors[0].name)
        self.sync()
        self.close()
        for plan in self.shards:
            partial, final = self.out_dir / partial_name(plan.file_name), self.out_dir / plan.file_name
            try:
                if partial.exists():
                    os.replace(partial, final)
            except OSError as e:
                raise OutputError(_os_error_message(final, e, "finish shard", 0)) from e
        _fsync_dir(self.out_dir)
        if len(self.shards) > 1:
            total = sum(s.data_bytes for s in self.shards)
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted((t.name, s.file_name) for s in self.shards for t in s.tensors)),
            }
            write_text_atomic(self.out_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for shard in self._open.values():
            os.close(shard.fd)
        self._open.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _os_error_message(path: Path, e: OSError, action: str, remaining: int) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path.parent)
        return (f"{path}: disk full, cannot {action}: {remaining:,} bytes of output still to write, "
                f"{free:,} free; free space and re-run the same command to resume")
    return f"{path}: cannot {action} ({e.strerror})"


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _pwrite_all(fd: int, view: memoryview, offset: int, path: Path, remaining: int) -> None:
    view = view.cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise OutputError(_os_error_message(path, e, f"write at byte {offset + done}", remaining)) from e
        done += n


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(_os_error_message(path, e, "write", 0)) from e
