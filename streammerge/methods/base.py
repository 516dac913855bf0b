"""What a merge method is, as the engine sees it.

A method is a ``MergeMethod`` record: a pure ``merge(inputs) -> Tensor`` function over fp32 torch
tensors, a frozen dataclass of global parameters and one of per-model parameters (field names are
mergekit's; defaults are the dataclass defaults; a field without default is required), and two facts
the engine uses to stream:

- ``elementwise``: output element j depends only on element j of the inputs (plus per-tensor state
  from ``prepare``). The engine may then hand ``merge`` flat 1-D chunks of the tensor, so peak memory
  does not depend on the size of the largest tensor.
- ``prepare``: an optional statistics pass run before the chunks (e.g. TIES' per-expert magnitude
  threshold). It is called with ``chunks``, a function that yields the tensor's ``ChunkInputs`` one
  chunk at a time (a single whole-tensor one for non-elementwise methods) and may be called again
  for another pass, so statistics over huge tensors need only chunk-sized memory. What ``prepare``
  returns is passed to every chunk of ``merge`` as ``inputs.state``.

Experts are *loaders*, not tensors: ``experts[i].load()`` reads expert i's chunk (fp32, on the compute
device) when called, so a method that accumulates expert by expert holds one expert at a time, and
a two-pass method simply loads twice. No method does I/O or chooses a device itself.

``base_model``: "required" methods work on task vectors (expert - base) and, like mergekit, skip a
``models:`` entry that is the base; "unused" methods (linear) treat every ``models:`` entry, the base
included, as an expert and are never given a base tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class ExpertInput:
    """One expert's view of the current chunk."""

    load: Callable[[], torch.Tensor]  # fp32, same shape/device as ``ChunkInputs.base``; reads anew per call
    params: Any  # the method's ``model_params`` dataclass, resolved for this tensor
    # Extra per-expert inputs some methods use, e.g. {"second_moment": loader}; loaders may return None.
    aux: Mapping[str, Callable[[], torch.Tensor | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkInputs:
    """Everything ``merge`` (and ``prepare``) sees for one output tensor, or one chunk of it."""

    tensor: str  # output tensor name
    shape: tuple[int, ...]  # full tensor shape
    start: int  # flat element offset of this chunk; 0 for a whole tensor
    base: torch.Tensor | None  # fp32 base chunk; 1-D for elementwise chunks, else full shape
    experts: list[ExpertInput]
    params: Any  # the method's ``params`` dataclass, resolved for this tensor
    seed: int  # deterministic per (global seed, tensor name); see ``tensor_seed``
    state: Any = None  # what ``prepare`` returned for this tensor
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[[ChunkInputs], torch.Tensor]
    params: type  # frozen dataclass of global parameters
    model_params: type  # frozen dataclass of per-model parameters
    base_model: Literal["required", "optional", "unused"]
    elementwise: bool = True
    prepare: Callable[[Callable[[], Iterator[ChunkInputs]]], Any] | None = None


@dataclass(frozen=True)
class NoParams:
    pass
