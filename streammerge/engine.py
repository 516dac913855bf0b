"""The merge loop: for each planned tensor, fetch inputs, compute, hand bytes to the writer, record it.

Per tensor: skip it if the resume journal says an earlier run finished it; resolve the method's
parameters for that name; ask the kernel to read the *next* tensor's bytes ahead
(``Checkpoint.prefetch``, non-blocking ``posix_fadvise``, so prefetch holds no memory however many
experts there are); run the method's ``prepare`` pass if it has one; then feed the method flat
chunks of ``plan.chunk_elements`` elements (elementwise methods: memory independent of tensor
size) or the whole tensor; cast each result to the output dtype, ``pwrite`` it into its planned
slot, and append the tensor's record (slot, CRC-32) to the journal. Inputs are read as stored,
checked for NaN/Inf, cast to fp32 on the compute device, and dropped as soon as the method lets go
of them. How the output folder is claimed, resumed or refused is in ``output_dir``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .config import layer_position, resolve_parameters
from .errors import CheckpointError, StreamMergeError
from .io.hf_files import write_model_card, write_model_files
from .io.journal import Journal
from .io.reader import Checkpoint
from .io.writer import ShardWriter
from .methods.base import ChunkInputs, ExpertInput
from .output_dir import claim_output_dir
from .planner import MergePlan, PlannedTensor, chunk_ranges

log = logging.getLogger(__name__)

DEFAULT_SYNC_BYTES = 10**9


@dataclass(frozen=True)
class ProgressEvent:
    """What ``run_merge`` reports as it goes.

    ``start``: ``tensors``/``nbytes`` already done by an earlier run (0 for a fresh merge);
    ``tensor``: one tensor of ``nbytes`` output bytes finished (``name``).
    """

    kind: Literal["start", "tensor"]
    name: str = ""
    nbytes: int = 0
    tensors: int = 0


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class MergeOptions:
    device: torch.device = torch.device("cpu")
    overwrite: bool = False  # replace model files in a non-empty OUT_DIR (and any earlier merge)
    restart: bool = False  # discard an earlier, unfinished or different merge in OUT_DIR
    allow_nonfinite: bool = False  # merge inputs holding NaN/Inf instead of refusing them
    sync_bytes: int | None = DEFAULT_SYNC_BYTES  # durable point every this many output bytes; 0: every tensor


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int  # output bytes of the whole model
    seconds: float
    resumed_tensors: int = 0  # finished by an earlier, interrupted run and not recomputed
    computed_tensors: int = 0  # computed by this run
    already_complete: bool = False  # OUT_DIR already held this merge, finished


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StreamMergeError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise StreamMergeError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def check_finite(x: torch.Tensor, ckpt: Checkpoint, name: str, start: int) -> None:
    """Refuse NaN/Inf in an input chunk. One reduction in the common case; the sum of finite
    values overflowing to inf only costs the exact check."""
    if bool(torch.isfinite(x.sum())):
        return
    bad = (~torch.isfinite(x)).reshape(-1).nonzero()
    if bad.numel():
        raise CheckpointError(
            f"{ckpt.meta(name).file}: tensor {name!r} holds {bad.numel()} NaN/Inf value(s) (first at flat "
            f"element {start + int(bad[0])}); fix the checkpoint, or pass --allow-nonfinite to merge it anyway"
        )


def _loader(ckpt: Checkpoint, name: str, start: int, count: int | None, device: torch.device,
            finite: bool) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        x = ckpt.read(name, start, count).to(device=device, dtype=torch.float32)
        if finite:
            check_finite(x, ckpt, name, start)
        return x

    return load


def _inputs(plan: MergePlan, tensor: PlannedTensor, params, model_params, start: int, count: int | None,
            state, options: MergeOptions) -> ChunkInputs:
    name, device, finite = tensor.out.name, options.device, not options.allow_nonfinite
    base = _loader(plan.base, name, start, count, device, finite)() if plan.base is not None else None
    experts = [
        ExpertInput(_loader(ckpt, name, start, count, device, finite), mp)
        for ckpt, mp in zip(plan.experts, model_params)
    ]
    return ChunkInputs(name, tensor.out.shape, start, base, experts, params, plan.config.seed, state, device)


def merge_tensor(plan: MergePlan, tensor: PlannedTensor, writer: ShardWriter, options: MergeOptions) -> None:
    """Compute one output tensor and write it (in chunks for elementwise methods)."""
    out = tensor.out
    if not tensor.merged:
        writer.write(out.name, plan.reference.read(out.name))
        return
    method = plan.config.method
    params, model_params = resolve_parameters(plan.config, out.name, layer_position(out.name, plan.num_layers))
    ranges = chunk_ranges(out.numel, plan.chunk_elements) if method.elementwise else [(0, None)]

    def chunks(state=None) -> Iterator[ChunkInputs]:
        for start, count in ranges:
            yield _inputs(plan, tensor, params, model_params, start, count, state, options)

    state = method.prepare(chunks) if method.prepare is not None else None
    for inputs in chunks(state):
        result = method.merge(inputs)
        writer.write(out.name, result.reshape(-1).to(out.dtype), inputs.start)
        del inputs, result


def _prefetch(plan: MergePlan, tensor: PlannedTensor) -> None:
    sources = [plan.reference] if not tensor.merged else [c for c in (plan.base, *plan.experts) if c is not None]
    for ckpt in sources:
        ckpt.prefetch(tensor.out.name)


def run_merge(plan: MergePlan, options: MergeOptions | None = None, progress: ProgressFn | None = None) -> MergeResult:
    """Run ``plan`` into ``plan.out_dir``, resuming an interrupted run of the same plan."""
    options = options or MergeOptions()
    t0 = time.perf_counter()
    with claim_output_dir(plan, options) as claim:
        total = len(plan.tensors)
        if claim.already_complete:
            log.info("%s already holds this merge, complete", plan.out_dir)
            return MergeResult(plan.out_dir, total, plan.output_bytes, time.perf_counter() - t0,
                               resumed_tensors=total, already_complete=True)
        done = claim.done
        if progress is not None:
            progress(ProgressEvent("start", nbytes=sum(r.length for r in done.values()), tensors=len(done)))
        log.info("merging %d tensors (%d already done) with %s on %s into %s",
                 total, len(done), plan.config.method.name, options.device, plan.out_dir)
        with ShardWriter(plan.out_dir, plan.shards, done) as writer:
            computed = _merge_all(plan, options, writer, claim.journal, progress)
            write_model_files(plan.reference.folder, plan.out_dir, plan.config.out_dtype or plan.config.dtype)
            write_model_card(plan.out_dir, plan.config.source, plan.config.method.name, [str(p) for p in plan.config.inputs])
            writer.finalize()
        claim.journal.complete()
    return MergeResult(plan.out_dir, total, plan.output_bytes, time.perf_counter() - t0,
                       resumed_tensors=total - computed, computed_tensors=computed)


def _merge_all(plan: MergePlan, options: MergeOptions, writer: ShardWriter, journal: Journal,
               progress: ProgressFn | None) -> int:
    """The loop: every tensor not yet done is computed, written and journaled. Returns how many."""
    todo = [t for t in plan.tensors if t.out.name not in writer.done]
    since_sync = 0
    for i, tensor in enumerate(todo):
        if i + 1 < len(todo):
            _prefetch(plan, todo[i + 1])
        merge_tensor(plan, tensor, writer, options)
        journal.record(writer.finish_tensor(tensor.out.name))
        since_sync += tensor.out.nbytes
        if options.sync_bytes is not None and since_sync >= options.sync_bytes:
            writer.sync()
            journal.durable_point()
            since_sync = 0
        if progress is not None:
            progress(ProgressEvent("tensor", tensor.out.name, tensor.out.nbytes))
    return len(todo)
