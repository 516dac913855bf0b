"""Merge methods: one module each, pure tensor math, joined to files only by the engine."""

from __future__ import annotations

from . import (
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    orthomerge,
    ota,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
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
        breadcrumbs.LINEAR,
        breadcrumbs.TIES,
        della.TIES,
        della.LINEAR,
        ram.RAM,
        ram.RAMPLUS_TL,
        sce.METHOD,
        slerp.METHOD,
        nuslerp.METHOD,
        multislerp.METHOD,
        karcher.METHOD,
        model_stock.METHOD,
        nearswap.METHOD,
        arcee_fusion.METHOD,
        passthrough.METHOD,
    )
}

__all__ = ["METHODS", "ChunkInputs", "ExpertInput", "MergeMethod"]
