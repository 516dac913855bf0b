"""The Python API: ``streammerge.merge(config, out_dir)``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from .config import MergeConfig, load_config, parse_config
from .device_budget import resolve_gpu_memory
from .engine import (
    DEFAULT_SYNC_BYTES,
    MergeOptions,
    MergeResult,
    ProgressFn,
    resolve_device,
    run_merge,
)
from .planner import DEFAULT_CHUNK_ELEMENTS, MergePlan, make_plan, parse_size


def _as_config(config: MergeConfig | Mapping | str | os.PathLike) -> MergeConfig:
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(yaml.safe_dump(dict(config), sort_keys=False), Path.cwd(), "config")
    if isinstance(config, str) and "\n" in config:
        return parse_config(config, Path.cwd(), "config")
    return load_config(config)


def plan(
    config: MergeConfig | Mapping | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    out_shard_size: int | str = "5GB",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> MergePlan:
    """Open the inputs' headers and plan the merge; nothing is written."""
    return make_plan(_as_config(config), Path(out_dir), parse_size(out_shard_size), chunk_elements)


def merge(
    config: MergeConfig | Mapping | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    out_shard_size: int | str = "5GB",
    overwrite: bool = False,
    restart: bool = False,
    allow_nonfinite: bool = False,
    sync_bytes: int | None = DEFAULT_SYNC_BYTES,
    progress: ProgressFn | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    gpu_memory: int | str | None = None,
) -> MergeResult:
    """Merge as ``config`` says (a YAML path, YAML text, a dict or a ``MergeConfig``) into ``out_dir``.

    Writes a Hugging Face model folder: safetensors shards (+ index), config.json with the output
    dtype, tokenizer files and a model card. An interrupted merge into the same ``out_dir`` with
    the same config, options and inputs resumes where it stopped (``restart=True`` discards it).
    ``sync_bytes``: make the output durable every this many bytes (0: after every tensor, None:
    only at the end). ``gpu_memory`` (CUDA only; default: what the device reports): a tensor whose working
    set exceeds it runs on the CPU. Raises ``StreamMergeError`` for bad input. Under torchrun (``WORLD_SIZE`` > 1)
    every rank calls it alike and computes its share (see ``streammerge.distributed``).
    """
    from . import distributed

    group = distributed.join(device)  # a torchrun rank (WORLD_SIZE > 1): this process merges its share
    compute_device = group.device if group else resolve_device(device)
    budget = resolve_gpu_memory(compute_device, gpu_memory)
    options = MergeOptions(compute_device, overwrite, restart, allow_nonfinite, sync_bytes, budget)
    p = plan(config, out_dir, out_shard_size=out_shard_size, chunk_elements=chunk_elements)
    try:
        return run_merge(p, options, progress)
    finally:
        p.close()
