"""The Python API: ``streammerge.merge(config, out_dir)``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from .config import MergeConfig, load_config, parse_config
from .engine import MergeResult, ProgressFn, resolve_device, run_merge
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
    progress: ProgressFn | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> MergeResult:
    """Merge as ``config`` says (a YAML path, YAML text, a dict or a ``MergeConfig``) into ``out_dir``.

    Writes a Hugging Face model folder: safetensors shards (+ index), config.json with the output
    dtype, tokenizer files and a model card. Raises ``StreamMergeError`` for bad input.
    """
    dev = resolve_device(device)
    p = plan(config, out_dir, out_shard_size=out_shard_size, chunk_elements=chunk_elements)
    try:
        return run_merge(p, dev, progress, overwrite)
    finally:
        p.close()
