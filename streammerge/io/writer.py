"""Planned-layout safetensors writer: headers first, then each tensor's bytes into its slot.

Every output tensor's name, dtype and shape are known before any math runs, so ``plan_shards``
assigns tensors to shards (greedy in processing order, at most ``max_shard_bytes`` of data per
shard unless one tensor alone is larger) and ``ShardWriter`` writes each shard's final header at
once, reserves its full size, and lets the engine ``pwrite`` tensors (or flat chunks of them) into
their slots in any order. Only the bytes being written are in memory.

Crash safety: shards are written as ``.<name>.partial`` inside the output folder and renamed to
their final ``model-0000K-of-0000M.safetensors`` name only once every byte is written and fsynced;
the index ``model.safetensors.index.json`` is written (temp + rename) last. A folder with an index
is therefore complete. The bytes of each shard equal ``safetensors.torch.save_file`` of its tensors
with metadata ``{"format": "pt"}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import OutputError
from .safetensors_format import TORCH_TO_ST, TensorSpec, build_header

INDEX_NAME = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}


OutputTensor = TensorSpec  # an output tensor is fully described by name, dtype and shape


@dataclass
class ShardPlan:
    file_name: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


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
    return [ShardPlan(name, group) for name, group in zip(names, groups)]


def partial_name(file_name: str) -> str:
    return f".{file_name}.partial"


@dataclass
class _OpenShard:
    plan: ShardPlan
    fd: int
    path: Path
    slots: dict[str, tuple[int, int]]
    remaining: int  # data bytes not yet written


class ShardWriter:
    """Writes the planned shards into ``out_dir``. Use as a context manager; call ``finish()``."""

    def __init__(self, out_dir: Path, shards: list[ShardPlan]):
        self.out_dir = out_dir
        self.shards = shards
        self._open: dict[str, _OpenShard] = {}
        self._shard_of: dict[str, ShardPlan] = {t.name: s for s in shards for t in s.tensors}
        self._written: dict[str, int] = {}

    def header(self, shard: ShardPlan) -> tuple[bytes, dict[str, tuple[int, int]]]:
        return build_header([(t.name, TORCH_TO_ST[t.dtype], t.shape) for t in shard.tensors], SHARD_METADATA)

    def _shard(self, name: str) -> _OpenShard:
        plan = self._shard_of[name]
        shard = self._open.get(plan.file_name)
        if shard is None:
            prefix, slots = self.header(plan)
            path = self.out_dir / partial_name(plan.file_name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, len(prefix) + plan.data_bytes)
                _pwrite_all(fd, memoryview(prefix), 0, path)
            except OSError as e:
                raise OutputError(f"{path}: cannot create shard ({e.strerror})") from e
            shard = self._open[plan.file_name] = _OpenShard(plan, fd, path, slots, plan.data_bytes)
        return shard

    def write(self, name: str, data: torch.Tensor, start: int = 0) -> None:
        """Write ``data`` (the tensor, or its flat elements from ``start`` on) into its slot."""
        shard = self._shard(name)
        begin, end = shard.slots[name]
        data = data.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
        offset = begin + start * data.element_size()
        if offset + raw.numel() > end:
            raise ValueError(f"write past the slot of {name}")
        _pwrite_all(shard.fd, memoryview(raw.numpy()), offset, shard.path)
        shard.remaining -= raw.numel()
        self._written[name] = self._written.get(name, 0) + raw.numel()
        if shard.remaining == 0:
            self._complete(shard)

    def _complete(self, shard: _OpenShard) -> None:
        final = self.out_dir / shard.plan.file_name
        try:
            os.fsync(shard.fd)
            os.close(shard.fd)
            os.replace(shard.path, final)
        except OSError as e:
            raise OutputError(f"{final}: cannot finish shard ({e.strerror})") from e
        del self._open[shard.plan.file_name]

    def finish(self) -> None:
        """Complete empty shards, then write the index (multi-shard outputs only)."""
        for plan in self.shards:
            if plan.data_bytes == 0 and not (self.out_dir / plan.file_name).exists():
                self._complete(self._shard(plan.tensors[0].name))
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


def _pwrite_all(fd: int, view: memoryview, offset: int, path: Path) -> None:
    view = view.cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise OutputError(f"{path}: write failed at byte {offset + done} ({e.strerror})") from e
        done += n


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from e
