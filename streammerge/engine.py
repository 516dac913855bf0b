"""The merge loop: for each planned tensor, fetch inputs, compute, hand bytes to the writer.

Per tensor: resolve the method's parameters for that name, ask the kernel to read the *next*
tensor's bytes ahead (``Checkpoint.prefetch``, non-blocking ``posix_fadvise``, so prefetch holds no
memory however many experts there are), run the method's ``prepare`` pass if it has one, then
either feed the method flat chunks of ``plan.chunk_elements`` elements (elementwise methods: memory
independent of tensor size) or the whole tensor, cast each result to the output dtype and
``pwrite`` it into its planned slot. Inputs are read as stored, cast to fp32 on the compute
device, and dropped as soon as the method lets go of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import layer_position, resolve_parameters
from .errors import OutputError, StreamMergeError
from .io.hf_files import write_model_card, write_model_files
from .io.reader import Checkpoint
from .io.writer import INDEX_NAME, ShardWriter
from .methods.base import ChunkInputs, ExpertInput
from .planner import MergePlan, PlannedTensor, chunk_ranges

log = logging.getLogger(__name__)

# progress(tensor_name, bytes_written) after each tensor
ProgressFn = Callable[[str, int], None]


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StreamMergeError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise StreamMergeError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def _loader(ckpt: Checkpoint, name: str, start: int, count: int | None, device: torch.device) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        raw = ckpt.read(name, start, count)
        return raw.to(device=device, dtype=torch.float32)

    return load


def _inputs(plan: MergePlan, tensor: PlannedTensor, params, model_params, start: int, count: int | None,
            state, device: torch.device) -> ChunkInputs:
    name = tensor.out.name
    base = _loader(plan.base, name, start, count, device)() if plan.base is not None else None
    experts = [
        ExpertInput(_loader(ckpt, name, start, count, device), mp)
        for ckpt, mp in zip(plan.experts, model_params)
    ]
    return ChunkInputs(name, tensor.out.shape, start, base, experts, params, plan.config.seed, state, device)


def merge_tensor(plan: MergePlan, tensor: PlannedTensor, writer: ShardWriter, device: torch.device) -> None:
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
            yield _inputs(plan, tensor, params, model_params, start, count, state, device)

    state = method.prepare(chunks) if method.prepare is not None else None
    for inputs in chunks(state):
        result = method.merge(inputs)
        writer.write(out.name, result.reshape(-1).to(out.dtype), inputs.start)
        del inputs, result



def _prefetch(plan: MergePlan, tensor: PlannedTensor) -> None:
    sources = [plan.reference] if not tensor.merged else [c for c in (plan.base, *plan.experts) if c is not None]
    for ckpt in sources:
        ckpt.prefetch(tensor.out.name)


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite``, then clear our old outputs."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out_dir.iterdir()]
    if existing and not overwrite:
        raise OutputError(f"{out_dir}: is not empty; choose a new folder or pass --overwrite to replace its model files")
    for p in existing:
        if p.name.endswith((".safetensors", ".partial")) or p.name == INDEX_NAME:
            p.unlink()


def run_merge(plan: MergePlan, device: torch.device, progress: ProgressFn | None = None, overwrite: bool = False) -> MergeResult:
    t0 = time.perf_counter()
    prepare_output_dir(plan.out_dir, overwrite)
    log.info("merging %d tensors with %s on %s into %s", len(plan.tensors), plan.config.method.name, device, plan.out_dir)
    try:
        with ShardWriter(plan.out_dir, plan.shards) as writer:
            for i, tensor in enumerate(plan.tensors):
                if i + 1 < len(plan.tensors):
                    _prefetch(plan, plan.tensors[i + 1])
                merge_tensor(plan, tensor, writer, device)
                if progress is not None:
                    progress(tensor.out.name, tensor.out.nbytes)
            writer.finish()
    except OSError as e:
        if e.errno == 28:
            raise OutputError(f"{plan.out_dir}: disk full ({e.strerror}); free space and run again") from e
        raise
    files_from = plan.reference.folder
    write_model_files(files_from, plan.out_dir, plan.config.out_dtype or plan.config.dtype)
    inputs = [str(p) for p in ([plan.config.base_model] if plan.config.base_model else []) + [m.path for m in plan.config.models]]
    write_model_card(plan.out_dir, plan.config.source, plan.config.method.name, inputs)
    return MergeResult(plan.out_dir, len(plan.tensors), plan.output_bytes, time.perf_counter() - t0)

