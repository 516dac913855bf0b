"""Merge methods: one module each, pure tensor math, joined to files only by the engine."""

from __future__ import annotations

from . import dare, linear, orthomerge, ota, passthrough, task_arithmetic, ties
from .base import ChunkInputs, ExpertInput, MergeMethod

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        linear.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.LINEAR,
        dare.TIES,
        ota.METHOD,
        orthomerge.METHOD,
        passthrough.METHOD,
    )
}

__all__ = ["METHODS", "ChunkInputs", "ExpertInput", "MergeMethod"]
