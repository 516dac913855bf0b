"""Passthrough: θ = sᵢ·θᵢ of the one input model (mergekit ``passthrough``; ``scale`` unset: θᵢ as is).

Used for frankenmerges: ``slices:`` that each take one model's layer range and stack them. With
``models:`` it takes exactly one model (e.g. to re-shard or change the dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ChunkInputs, MergeMethod, NoParams


@dataclass(frozen=True)
class PassthroughModelParams:
    scale: float | None = None


def merge(inputs: ChunkInputs) -> torch.Tensor:
    (expert,) = inputs.experts  # the config check allows one model (METHOD.max_models)
    if expert.params.scale is None and expert.load_stored is not None:
        # no math: the stored chunk as is (the engine's one cast to the output dtype gives the same bits
        # as widening to fp32 first, which is exact), without an fp32 copy
        return expert.load_stored()
    x = expert.load()
    if expert.params.scale is not None:
        x *= expert.params.scale
    return x


METHOD = MergeMethod("passthrough", merge, NoParams, PassthroughModelParams, base_model="unused", max_models=1)
