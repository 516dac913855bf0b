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
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .adapter_output import run_adapter_merge, wants_adapter_output
from .config import layer_position, resolve_parameters
from .device_budget import gpu_memory_report, tensor_options
from .errors import CheckpointError, StreamMergeError
from .io.hf_files import write_model_card, write_model_files
from .io.journal import Journal
from .io.reader import Checkpoint
from .io.tokenizer_files import write_tokenizer
from .io.writer import ShardWriter
from .memory import release_free_memory
from .methods.base import (
    SECOND_MOMENT,
    SECOND_MOMENT_BIAS_CORRECTION,
    SECOND_MOMENT_RANK1,
    ChunkInputs,
    ExpertInput,
    Rank1Chunk,
)
from .output_dir import claim_output_dir
from .planner import MergePlan, PlannedTensor, chunk_ranges
from .sidecar import SecondMoments

log = logging.getLogger(__name__)

DEFAULT_SYNC_BYTES = 10**9
WRITE_BEHIND_DEPTH = 2  # chunks queued for the writer thread


@dataclass(frozen=True)
class ProgressEvent:
    """What ``run_merge`` reports as it goes.

    ``start``: ``tensors``/``nbytes`` already done by an earlier run (0 for a fresh merge);
    ``tensor``: one tensor of ``nbytes`` output bytes finished (``name``);
    ``calibrate_start``: a whole-model calibration pass over ``tensors`` tensors (``nbytes``) begins;
    ``calibrate``: that pass has read tensor ``name``.
    """

    kind: Literal["start", "tensor", "calibrate_start", "calibrate"]
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
    gpu_memory: int | None = None  # CUDA: a tensor whose working set exceeds this many bytes runs on the CPU


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int  # output bytes of the whole model
    seconds: float
    resumed_tensors: int = 0  # finished by an earlier, interrupted run and not recomputed
    computed_tensors: int = 0  # computed by this run
    already_complete: bool = False  # OUT_DIR already held this merge, finished
    report: list[str] = field(default_factory=list)  # the method's lines for the user (e.g. FFG density achieved)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StreamMergeError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise StreamMergeError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def _first_nonfinite(x: torch.Tensor) -> tuple[int, int] | None:
    """(count, first flat index) of NaN/Inf in ``x``, or None. One reduction in the common case: the
    sum of finite values overflowing to inf only costs the exact check."""
    if bool(torch.isfinite(x.sum())):
        return None
    bad = (~torch.isfinite(x)).reshape(-1).nonzero()
    return (bad.numel(), int(bad[0])) if bad.numel() else None


def check_finite(x: torch.Tensor, ckpt: Checkpoint, name: str, start: int) -> None:
    """Refuse NaN/Inf in an input chunk, naming the file, tensor and element."""
    found = _first_nonfinite(x)
    if found is not None:
        raise CheckpointError(
            f"{ckpt.meta(name).file}: tensor {name!r} holds {found[0]} NaN/Inf value(s) (first at flat "
            f"element {start + found[1]}); fix the checkpoint, or pass --allow-nonfinite to merge it anyway"
        )


def _loader(ckpt: Checkpoint, name: str, start: int, count: int | None, device: torch.device,
            finite: bool) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        x = ckpt.read(name, start, count).to(device=device, dtype=torch.float32)
        if finite:
            check_finite(x, ckpt, name, start)
        return x

    return load


def _stored_loader(ckpt: Checkpoint, name: str, start: int, count: int | None,
                   device: torch.device) -> Callable[[], torch.Tensor]:
    """The chunk as stored, on the compute device (no NaN check: elementwise methods check their output)."""
    return lambda: ckpt.read(name, start, count).to(device)


def _stored_range_loader(ckpt: Checkpoint, name: str, start: int, count: int | None,
                         device: torch.device) -> Callable[[int, int], torch.Tensor] | None:
    """Elements [offset, offset + n) of the chunk as stored, on the compute device (``_stored_loader`` for
    part of the chunk); None where a range read is not cheap (adapter views compute whole row blocks) or
    the chunk is the whole shaped tensor (methods that are not elementwise)."""
    if count is None or not ckpt.cheap_ranges:
        return None

    def load(offset: int, n: int) -> torch.Tensor:
        if offset < 0 or n < 0 or offset + n > count:
            raise ValueError(f"range [{offset}, {offset + n}) outside the chunk of {count} elements of {name}")
        return ckpt.read(name, start + offset, n).to(device)

    return load


def _second_moment_loaders(sc: SecondMoments | None, name: str, start: int, count: int | None,
                           device: torch.device) -> dict[str, Callable[[], torch.Tensor | None]]:
    """``aux`` loaders of one expert's second moment for this chunk; none if its sidecar lacks it."""
    if sc is None or name not in sc:
        return {}

    def second_moment() -> torch.Tensor:
        v = sc.get(name) if count is None else sc.get_flat(name, start, count)
        return v.to(device=device, dtype=torch.float32)

    def rank1() -> Rank1Chunk | None:
        n = math.prod(sc.shape(name))
        found = sc.rank1_chunk(name, start, n if count is None else count)
        if found is None:
            return None
        rows, cols, offset = found
        return Rank1Chunk(rows.to(device), cols.to(device), offset, n if count is None else count)

    def bias_correction() -> torch.Tensor | None:
        step, beta2 = sc.step(name), sc.beta2
        if step is None or step < 1 or beta2 is None or not 0 < beta2 < 1:
            return None
        return torch.tensor(1.0 / (1.0 - beta2**step))

    return {SECOND_MOMENT: second_moment, SECOND_MOMENT_RANK1: rank1, SECOND_MOMENT_BIAS_CORRECTION: bias_correction}


def tensor_inputs(plan: MergePlan, tensor: PlannedTensor) -> tuple[tuple[Checkpoint, str] | None,
                                                                     list[tuple[Checkpoint, str]]]:
    """(base, experts) of a tensor as (checkpoint, tensor name): its own sources (slices:), else the plan's."""
    if tensor.sources is not None:
        return tensor.sources.base, list(tensor.sources.experts)
    name = tensor.out.name
    return ((plan.base, name) if plan.base is not None else None), [(ckpt, name) for ckpt in plan.experts]


def _inputs(plan: MergePlan, tensor: PlannedTensor, params, model_params, start: int, count: int | None,
            state, options: MergeOptions, run) -> ChunkInputs:
    # Elementwise methods check their output instead of every input (one reduction per chunk, not one per
    # input and pass): NaN/Inf in any input reaches the output at that element (masks multiply, sums add).
    device = options.device
    finite = not options.allow_nonfinite and not plan.config.method.elementwise
    base_in, experts_in = tensor_inputs(plan, tensor)
    base = _loader(*base_in, start, count, device, finite)() if base_in is not None else None
    sidecars = plan.second_moments or [None] * len(experts_in)
    experts = [
        ExpertInput(_loader(ckpt, name, start, count, device, finite), mp,
                    {**_second_moment_loaders(sc, name, start, count, device), **ckpt.aux(name)}, ckpt.kind,
                    None if finite else _stored_loader(ckpt, name, start, count, device),
                    None if finite else _stored_range_loader(ckpt, name, start, count, device))
        for (ckpt, name), mp, sc in zip(experts_in, model_params, sidecars, strict=False)
    ]
    return ChunkInputs(tensor.out.name, tensor.out.shape, start, base, experts, params, plan.config.seed, state,
                       device, run)


def tensor_chunks(plan: MergePlan, tensor: PlannedTensor, options: MergeOptions, run=None):
    """``chunks(state=None)``: a function yielding the tensor's ``ChunkInputs``, one per chunk, anew per call."""
    out = tensor.out
    if tensor.sources is not None:  # slices: resolved while planning, per slice and source
        params, model_params = tensor.sources.params, tensor.sources.model_params
    else:
        params, model_params = resolve_parameters(plan.config, out.name, layer_position(out.name, plan.num_layers))
    ranges = chunk_ranges(out.numel, plan.chunk_elements) if plan.config.method.elementwise else [(0, None)]

    def chunks(state=None) -> Iterator[ChunkInputs]:
        for start, count in ranges:
            yield _inputs(plan, tensor, params, model_params, start, count, state, options, run)

    chunks.params, chunks.model_params = params, model_params  # lets ``prepare`` decide before reading anything
    return chunks


def merge_tensor(plan: MergePlan, tensor: PlannedTensor, writer: ShardWriter | WriteBehind, options: MergeOptions,
                 run=None) -> None:
    """Compute one output tensor and write it (in chunks for elementwise methods)."""
    out = tensor.out
    if not tensor.merged:
        ckpt, name = tensor.sources.inputs()[0] if tensor.sources is not None else (plan.reference, out.name)
        writer.write(out.name, ckpt.read(name))
        return
    method = plan.config.method
    chunks = tensor_chunks(plan, tensor, options, run)
    state = method.prepare(chunks) if method.prepare is not None else None
    for inputs in chunks(state):
        result = method.merge(inputs)
        if method.elementwise and not options.allow_nonfinite:
            found = _first_nonfinite(result)
            if found is not None:
                _blame_nonfinite(plan, tensor, inputs, options, found)
        writer.write(out.name, result.reshape(-1).to(out.dtype).cpu(), inputs.start)
        del inputs, result


def _blame_nonfinite(plan: MergePlan, tensor: PlannedTensor, inputs: ChunkInputs, options: MergeOptions,
                     found: tuple[int, int]) -> None:
    """A merged chunk holds NaN/Inf: name the input that holds them, or say the math overflowed."""
    name = tensor.out.name
    # this chunk's inputs first, then the whole tensor's (statistics passes, e.g. DARE's L1 norms, carry
    # a NaN from one chunk into every other)
    ranges = [(inputs.start, min(plan.chunk_elements, tensor.out.numel - inputs.start))]
    ranges += chunk_ranges(tensor.out.numel, plan.chunk_elements)
    base_in, experts_in = tensor_inputs(plan, tensor)
    for start, count in ranges:
        for ckpt, in_name in [x for x in (base_in, *experts_in) if x is not None]:
            _loader(ckpt, in_name, start, count, options.device, True)()
    raise StreamMergeError(
        f"merged tensor {name!r} has {found[0]} NaN/Inf value(s) (first at flat element {inputs.start + found[1]}) "
        f"although its inputs are finite: an overflow of the merge's fp32 math; check the weights, or pass "
        f"--allow-nonfinite to write it anyway"
    )


class WriteBehind:
    """Hands chunks to one background thread that ``pwrite``s them, checksums them and journals each
    finished tensor, in order, so the disk and the CRC overlap the next chunk's math. At most
    ``depth`` chunks wait in the queue. An error on the thread is raised on the next call here."""

    def __init__(self, writer: ShardWriter, journal: Journal, depth: int = WRITE_BEHIND_DEPTH):
        self.writer, self.journal = writer, journal
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="streammerge-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    if item[0] == "write":
                        self.writer.write(*item[1:])
                    else:
                        self.journal.record(self.writer.finish_tensor(item[1]))
            except BaseException as e:  # handed to the main thread
                self._error = e
            finally:
                self._queue.task_done()

    def _put(self, item: tuple | None) -> None:
        self._raise()
        self._queue.put(item)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def write(self, name: str, data: torch.Tensor, start: int = 0) -> None:
        self._put(("write", name, data, start))

    def finish(self, name: str) -> None:
        self._put(("finish", name))

    def drain(self) -> None:
        """Wait until everything queued is written and journaled."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _prefetch(plan: MergePlan, tensor: PlannedTensor) -> None:
    if not tensor.merged:  # copied as merge_tensor copies it
        sources = tensor.sources.inputs()[:1] if tensor.sources is not None else [(plan.reference, tensor.out.name)]
    else:
        base_in, experts_in = tensor_inputs(plan, tensor)
        sources = [x for x in (base_in, *experts_in) if x is not None]
    for ckpt, name in sources:
        ckpt.prefetch(name)


def run_merge(plan: MergePlan, options: MergeOptions | None = None, progress: ProgressFn | None = None) -> MergeResult:
    """Run ``plan`` into ``plan.out_dir``, resuming an interrupted run of the same plan."""
    options = options or MergeOptions()
    from . import distributed

    group = distributed.current()
    if group is not None:  # one rank of a torchrun launch: see distributed.py
        return distributed.run_merge(plan, options, progress, group)
    if wants_adapter_output(plan):
        return run_adapter_merge(plan, options)
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
        run = _start_run(plan, options, done, progress)
        with ShardWriter(plan.out_dir, plan.shards, done) as writer:
            computed = _merge_all(plan, options, writer, claim.journal, progress, run)
            vocab = plan.vocabulary
            write_model_files(plan.reference.folder, plan.out_dir, plan.config.out_dtype or plan.config.dtype,
                              plan.config_updates, vocab.size if vocab is not None else None)
            if vocab is not None:
                write_tokenizer(vocab.tokenizer, vocab.source, plan.out_dir)
            inputs = [str(p) for p in plan.config.inputs]
            write_model_card(plan.out_dir, plan.config.source, plan.config.method.name, inputs)
            writer.finalize()
        claim.journal.complete()
    report = plan.notes + (run.report() if run is not None else []) + gpu_memory_report(plan, options)
    for line in report:
        log.info("%s", line)
    return MergeResult(
        plan.out_dir,
        total,
        plan.output_bytes,
        time.perf_counter() - t0,
        resumed_tensors=total - computed,
        computed_tensors=computed,
        report=report,
    )


def _start_run(plan: MergePlan, options: MergeOptions, done: dict, progress: ProgressFn | None,
               mine: set[str] | None = None, reduce: Callable | None = None):
    """The method's whole-model state, calibrated over every merged tensor first if it asks for it.

    A resumed merge calibrates again (the pass is deterministic, so the thresholds are the same).
    Distributed (``distributed.py``): this rank observes only the tensors named in ``mine``, and
    ``reduce(run)`` combines every rank's observations before ``run.calibrate()``."""
    method = plan.config.method
    merged = [t for t in plan.tensors if t.merged]
    if method.start_run is None or not merged or all(t.out.name in done for t in plan.tensors):
        return None
    run = method.start_run(len(plan.experts), options.device)
    _, model_params = resolve_parameters(
        plan.config, merged[0].out.name, layer_position(merged[0].out.name, plan.num_layers)
    )
    if run.needs_calibration(model_params):
        if progress is not None:
            progress(ProgressEvent("calibrate_start", nbytes=sum(t.out.nbytes for t in merged), tensors=len(merged)))
        observed = merged if mine is None else [t for t in merged if t.out.name in mine]
        for i, tensor in enumerate(observed):
            if i + 1 < len(observed):
                _prefetch(plan, observed[i + 1])
            for inputs in tensor_chunks(plan, tensor, tensor_options(plan, tensor, options), run)():
                run.observe(inputs)
                del inputs
            if progress is not None:
                progress(ProgressEvent("calibrate", tensor.out.name, tensor.out.nbytes))
        if reduce is not None:
            reduce(run)
        run.calibrate()
    return run


def _merge_all(
    plan: MergePlan, options: MergeOptions, writer: ShardWriter, journal: Journal, progress: ProgressFn | None,
    run=None, mine: set[str] | None = None,
) -> int:
    """The loop: every tensor not yet done (and, distributed, named in ``mine``) is computed, written and
    journaled. Returns how many."""
    todo = [t for t in plan.tensors if t.out.name not in writer.done and (mine is None or t.out.name in mine)]
    since_sync = 0
    behind = WriteBehind(writer, journal)
    try:
        for i, tensor in enumerate(todo):
            if i + 1 < len(todo):
                _prefetch(plan, todo[i + 1])
            merge_tensor(plan, tensor, behind, tensor_options(plan, tensor, options), run)
            behind.finish(tensor.out.name)
            release_free_memory()
            since_sync += tensor.out.nbytes
            if options.sync_bytes is not None and since_sync >= options.sync_bytes:
                behind.drain()
                writer.sync()
                journal.durable_point()
                since_sync = 0
            if progress is not None:
                progress(ProgressEvent("tensor", tensor.out.name, tensor.out.nbytes))
        behind.drain()
    finally:
        behind.close()
    return len(todo)
