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

Whole-model state: a method with ``start_run`` gets one object per merge (``start_run(n_experts,
device)``), handed to every chunk as ``inputs.run``. If ``run.needs_calibration(model_params)`` says
so (``model_params``: the per-expert params of the first merged tensor), the engine first runs a
calibration pass: ``run.observe(inputs)`` for every chunk of every merged tensor, then
``run.calibrate()``. After the merge, ``run.report()`` gives lines for the user (e.g. OTA's achieved
FFG density). ``model_keys`` names the keys a ``models:`` entry may carry beside ``model:`` and
``parameters:`` for this method (e.g. OTA's ``sidecar:``); the engine turns them into ``aux`` loaders
(``SECOND_MOMENT``: the expert's Adam second moment for the chunk).

``base_model``: "required" methods work on task vectors (expert - base) and, like mergekit, skip a
``models:`` entry that is the base; "unused" methods (linear) treat every ``models:`` entry, the base
included, as an expert and are never given a base tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

# ``ExpertInput.aux`` keys the engine provides
SECOND_MOMENT = "second_moment"  # expert's Adam exp_avg_sq for the chunk (fp32, chunk-shaped), from its sidecar
SECOND_MOMENT_BIAS_CORRECTION = "second_moment_bias_correction"  # 0-d 1/(1 − β₂^step), or None if unknown
# the same second moment as rank-1 factors, when its sidecar stores it so (else the loader gives None)
SECOND_MOMENT_RANK1 = "second_moment_rank1"


@dataclass(frozen=True)
class Rank1Chunk:
    """A chunk of a rank-1 second moment: v = (rows ⊗ cols) flattened, elements [offset, offset + count).

    ``rows`` and ``cols`` are fp32, non-negative and finite (the sidecar checks them once per tensor),
    so a method may work on the factors (e.g. (a ⊗ b)^p = a^p ⊗ b^p) instead of the full chunk."""

    rows: torch.Tensor  # (R,) the rows the chunk spans
    cols: torch.Tensor  # (n,) the column factor, scale folded in
    offset: int
    count: int

    def expand(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
               plus: float | None = None) -> torch.Tensor:
        """``rows ⊗ cols (+ plus)`` (default: this chunk's factors, i.e. v) flattened and cut to the
        chunk: a view of a fresh (R, n) matrix. (``outer`` then ``add_``: torch's ``addr`` with a scalar
        input gives the same bits about 3x slower.)"""
        rows = self.rows if rows is None else rows
        cols = self.cols if cols is None else cols
        full = torch.outer(rows, cols)
        if plus is not None:
            full.add_(plus)
        return full.reshape(-1)[self.offset : self.offset + self.count]


@dataclass(frozen=True)
class ExpertInput:
    """One expert's view of the current chunk."""

    load: Callable[[], torch.Tensor]  # fp32, same shape/device as ``ChunkInputs.base``; reads anew per call
    params: Any  # the method's ``model_params`` dataclass, resolved for this tensor
    # Extra per-expert inputs some methods use, e.g. {"second_moment": loader}; loaders may return None.
    aux: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    kind: str = "model"  # what the expert is on disk: "model" (full weights), "lora" or "oft" (PEFT adapters)
    # The chunk in its stored dtype (bf16/fp16/fp32) on the compute device; lets ``delta`` widen inside the
    # subtraction instead of in a separate pass. None: ``delta`` uses ``load``.
    load_stored: Callable[[], torch.Tensor] | None = None
    # ``load_stored_range(offset, count)``: elements [offset, offset + count) of the chunk as stored (1-D), read
    # anew per call, for a method that walks a chunk in small blocks of every expert at once. None: only
    # whole-chunk loads.
    load_stored_range: Callable[[int, int], torch.Tensor] | None = None

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """θᵢ − θ₀ for this chunk: fp32, fresh memory, the same bits as ``load() - base`` (widening
        bf16/fp16 to fp32 is exact). Widened by a plain copy, then subtracted in fp32: torch's
        mixed-dtype ``sub(bf16, fp32)`` takes a slow casting loop (about 4x the time of the two)."""
        if self.load_stored is not None:
            stored = self.load_stored()
            if stored.dtype in (torch.bfloat16, torch.float16, torch.float32):
                return torch.empty_like(base).copy_(stored).sub_(base)
        x = self.load()
        x -= base
        return x


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
    run: Any = None  # the merge's whole-model state (``MergeMethod.start_run``), or None


class MergeRun(Protocol):
    """Whole-model state of one merge (see the module docstring)."""

    def needs_calibration(self, model_params: list[Any]) -> bool: ...

    def observe(self, inputs: ChunkInputs) -> None: ...

    def calibrate(self) -> Any: ...

    def report(self) -> list[str]: ...


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[[ChunkInputs], torch.Tensor]
    params: type  # frozen dataclass of global parameters
    model_params: type  # frozen dataclass of per-model parameters
    base_model: Literal["required", "optional", "unused"]
    elementwise: bool = True
    prepare: Callable[[Callable[[], Iterator[ChunkInputs]]], Any] | None = None
    start_run: Callable[[int, torch.device], MergeRun] | None = None
    model_keys: frozenset[str] = frozenset()  # extra keys of a ``models:`` entry, e.g. {"sidecar"}
    # The global parameters (YAML names) the path taken for experts of these kinds ("model", "lora",
    # "oft") uses, given the global ``parameters:``; the planner refuses any other that a config sets.
    # None: every parameter of ``params`` is used.
    used_parameters: Callable[[list[str], Mapping[str, Any]], frozenset[str]] | None = None
    # estimated peak bytes to merge one tensor (name, shape, n_experts) for the plan; None: the engine's default
    working_set: Callable[[str, tuple[int, ...], int], int] | None = None
    expert_count: tuple[int, int | None] = (0, None)  # (min, max or None) experts merged (base excluded)
    max_models: int | None = None  # most models one tensor may merge (passthrough: 1); checked at config time
    # checks the resolved (params, model_params) together while the config is read; raises ValueError
    validate: Callable[[Any, list[Any]], None] | None = None


@dataclass(frozen=True)
class NoParams:
    pass


def check_density(density: float) -> None:
    """A kept fraction must be in (0, 1]: 0 would drop every entry, above 1 means nothing (mergekit
    clamps it silently; streammerge refuses it)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")

