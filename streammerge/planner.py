"""From a config and the inputs' headers, the full plan of a merge, before any tensor is read.

The plan fixes every output tensor (name, shape, dtype), the order they are computed in, which
shard each lands in, and estimates of output bytes and the engine's working set. Inconsistent
inputs (a tensor missing from an expert, a shape mismatch, a float tensor in one model that is an
integer or bool tensor in another, an output folder that overlaps an input or holds an input file
through a symlink) are refused here, naming the file and tensor, before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import LAYER_RE, MergeConfig, ModelEntry
from .errors import PlanError
from .experts import AdapterAppliedModel, AdapterExpert, is_adapter
from .io.hf_files import COPIED_FILES
from .io.peft_adapters import open_adapter
from .io.reader import Checkpoint, TensorMeta, check_model_file, open_checkpoint
from .io.writer import OutputTensor, ShardPlan, plan_shards
from .second_moments import describe as describe_second_moments
from .second_moments import open_second_moments
from .sidecar import SecondMoments
from .vocabulary import VocabularyPlan, VocabularyView
from .vocabulary import build_plan as build_vocabulary_plan

DEFAULT_SHARD_BYTES = 5 * 10**9
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 16 MB of fp32 per buffer; a multiple of dare.RNG_BLOCK
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"200MiB"`` -> 209_715_200, ``1024`` -> 1024 (bytes)."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = SIZE_RE.match(text)
        if not m or (m.group(2) or "").lower() not in SIZE_UNITS:
            raise PlanError(f"size {text!r} is not a byte count such as 1000000, 200MB or 5GB")
        value, unit = float(m.group(1)), (m.group(2) or "").lower()
    size = int(value * SIZE_UNITS[unit])
    if size <= 0:
        raise PlanError(f"size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class PlannedTensor:
    out: OutputTensor
    merged: bool  # False: a non-float tensor copied from the reference model


@dataclass
class MergePlan:
    config: MergeConfig
    out_dir: Path
    reference: Checkpoint  # defines the output tensors and the non-weight files: the base, else models[0]
    base: Checkpoint | None  # given to the method (None for methods that do not use one)
    experts: list[Checkpoint]
    tensors: list[PlannedTensor]
    shards: list[ShardPlan]
    num_layers: int
    chunk_elements: int
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    second_moments: list[SecondMoments | None] = field(default_factory=list)  # per expert (OTA sidecars)
    vocabulary: VocabularyPlan | None = None  # tokenizer_source / tokenizer: the merged vocabulary

    @property
    def output_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    @property
    def working_set_bytes(self) -> int:
        """Estimated peak bytes the engine holds beyond the Python/torch runtime.

        Elementwise methods hold about ten fp32 buffers of one chunk (base, one expert and its raw
        bytes, up to five consensus accumulators, masks) plus two chunks queued for the writer;
        others about four copies of the largest tensor plus the same queue.
        """
        largest = max((t.out.numel for t in self.tensors), default=0)
        if self.config.method.elementwise:
            return 12 * 4 * min(largest, self.chunk_elements)
        return 6 * 4 * largest

    def checkpoints(self) -> list[Checkpoint]:
        """Every opened input, once."""
        return list({id(c): c for c in [self.reference, self.base, *self.experts] if c is not None}.values())

    def input_files(self) -> list[Path]:
        """Every file the output depends on: shards, indexes, and the files copied from the reference."""
        files = [f for ckpt in self.checkpoints() for f in (*ckpt.files, *ckpt.index_files)]
        files += [self.reference.folder / name for name in ("config.json", *COPIED_FILES)
                  if (self.reference.folder / name).is_file()]
        files += [sc.path for sc in self.second_moments if sc is not None]
        files += self.vocabulary.files if self.vocabulary is not None else []
        return files

    def close(self) -> None:
        for ckpt in self.checkpoints():
            ckpt.close()
        for sc in self.second_moments:
            if sc is not None:
                sc.close()


def _tensor_order(name: str) -> tuple[int, str]:
    m = LAYER_RE.search(name)
    if m:
        return int(m.group(1)), name
    return (-1, name) if "embed" in name else (1 << 30, name)


def check_output_dir(out_dir: Path, inputs: list[Path]) -> None:
    out = out_dir.resolve()
    for p in inputs:
        folder = (p if p.is_dir() else p.parent).resolve()
        if out == folder or folder in out.parents:
            raise PlanError(f"output folder {out_dir} is inside input {p}; choose a folder outside every input")
        if out in folder.parents:
            raise PlanError(f"input {p} is inside the output folder {out_dir}; choose another output folder")


def check_files_outside_output(out_dir: Path, checkpoints: list[Checkpoint]) -> None:
    """Refuse an input file that resolves into ``out_dir`` (a symlinked shard or file given directly)."""
    out = out_dir.resolve()
    for ckpt in checkpoints:
        for f in ckpt.files:
            if out in f.resolve().parents:
                raise PlanError(
                    f"{f}: leads to {f.resolve()}, inside the output folder {out_dir}; choose another output folder"
                )


def dtype_kind(dtype: torch.dtype) -> str:
    """``floating-point``, ``complex``, ``boolean`` or ``integer``: tensors merge only within one kind."""
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def _check_matches(name: str, meta: TensorMeta, other: TensorMeta, model: Path) -> None:
    """An expert's tensor must have the reference's shape and the same kind of dtype (bf16 vs fp32 is fine)."""
    if other.shape != meta.shape:
        raise PlanError(
            f"{other.file}: tensor {name!r} has shape {list(other.shape)}, which differs from "
            f"{list(meta.shape)} in {meta.file}; the models must share one architecture"
        )
    if dtype_kind(other.dtype) != dtype_kind(meta.dtype):
        raise PlanError(
            f"{other.file}: tensor {name!r} is {str(other.dtype).replace('torch.', '')} ({dtype_kind(other.dtype)}) "
            f"but {str(meta.dtype).replace('torch.', '')} ({dtype_kind(meta.dtype)}) in {meta.file}; "
            f"{model} does not fit this architecture"
        )


def _check_unused_base(config: MergeConfig, experts: list) -> None:
    """A method that ignores base_model (linear) with a base not in ``models:``: mergekit refuses such a
    config (the base would be an input without a weight); say so instead of silently leaving it out.
    PEFT adapter experts are the exception: their weights are views of the base."""
    if config.method.base_model != "unused" or config.base_model is None:
        return
    if any(isinstance(e, AdapterExpert) and not isinstance(e, AdapterAppliedModel) for e in experts):
        return
    if any(config.is_base(m) for m in config.models):
        return
    raise PlanError(
        f"base_model {config.base_model}: merge_method {config.method.name} does not use a base model, and it is not "
        f"listed under models:; list it there with a weight to include it, or remove base_model: "
        f"(mergekit refuses this config too)"
    )


def _vocabulary_views(config: MergeConfig, base, experts, reference, base_model):
    """Every model seen through the merged vocabulary (``vocabulary.py``): base first, then ``models:``."""
    models, paths = [], []
    for ckpt, path in [(base_model, config.base_model), *zip(experts, [m.path for m in config.experts], strict=True)]:
        if ckpt is not None and all(ckpt is not c for c in models):
            models.append(ckpt)
            paths.append(path)
    plan = build_vocabulary_plan(config.tokenizer, models, paths, 0 if base_model is not None else None)
    views = {id(c): VocabularyView(c, plan, i) for i, c in enumerate(models)}
    return (views[id(base)] if base is not None else None, [views[id(e)] for e in experts], views[id(reference)],
            plan)


def make_plan(
    config: MergeConfig,
    out_dir: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> MergePlan:
    check_output_dir(out_dir, config.inputs)
    opened: dict[object, Checkpoint] = {}

    def get(path: Path) -> Checkpoint:
        key = path.resolve()
        if key not in opened:
            opened[key] = open_checkpoint(path)
        return opened[key]

    def applied(model: Path, lora: Path) -> Checkpoint:
        """mergekit's MODEL+ADAPTER: the adapter applied to that model, seen as a full model."""
        key = ("applied", model.resolve(), lora.resolve())
        if key not in opened:
            model_ckpt = get(model)
            opened[key] = AdapterAppliedModel(model_ckpt, open_adapter(lora, model_ckpt))
        return opened[key]

    def base_view() -> Checkpoint:
        return applied(config.base_model, config.base_lora) if config.base_lora else get(config.base_model)

    def expert(entry: ModelEntry) -> Checkpoint:
        path = entry.path
        if entry.lora is not None:
            return applied(path, entry.lora)
        if not is_adapter(path):
            return get(path)
        if config.base_model is None:
            raise PlanError(f"{path}: is a PEFT adapter; set base_model: to the model it was trained on")
        key = ("adapter", path.resolve())
        if key not in opened:
            base_ckpt = base_view()
            opened[key] = AdapterExpert(base_ckpt, open_adapter(path, base_ckpt))
        return opened[key]

    try:
        if config.base_model is not None and is_adapter(config.base_model):
            raise PlanError(
                f"base_model {config.base_model}: is a PEFT adapter; base_model must be the full model "
                "the adapters were trained on (or MODEL+ADAPTER, mergekit's syntax for the adapter applied to MODEL)"
            )
        base = base_view() if config.base_model and config.method.base_model != "unused" else None
        experts = [expert(m) for m in config.experts]
        _check_unused_base(config, experts)
        reference = base_view() if config.base_model else experts[0]
        vocabulary = None
        if config.tokenizer is not None:
            base, experts, reference, vocabulary = _vocabulary_views(config, base, experts, reference,
                                                                     base_view() if config.base_model else None)
        check_files_outside_output(out_dir, list(opened.values()))
        for name in ("config.json", *COPIED_FILES):  # copied into OUT_DIR after the merge: check them now
            check_model_file(reference.folder, name)
        tensors = []
        for name in sorted(reference.names(), key=_tensor_order):
            meta = reference.meta(name)
            for entry, ckpt in zip(config.experts, experts, strict=False):
                if name not in ckpt:
                    raise PlanError(f"model {entry.path} has no tensor {name!r} (present in {meta.file})")
                _check_matches(name, meta, ckpt.meta(name), entry.path)
            merged = meta.dtype.is_floating_point
            dtype = (config.out_dtype or config.dtype or meta.dtype) if merged else meta.dtype
            tensors.append(PlannedTensor(OutputTensor(name, dtype, meta.shape), merged))
        if not tensors:
            raise PlanError(f"{reference.path}: has no tensors to merge")
        sidecars = open_second_moments(config, [t.out for t in tensors if t.merged])
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise
    layers = [int(m.group(1)) for t in tensors if (m := LAYER_RE.search(t.out.name))]
    return MergePlan(
        config=config,
        out_dir=out_dir,
        reference=reference,
        base=base,
        experts=experts,
        tensors=tensors,
        shards=plan_shards([t.out for t in tensors], max_shard_bytes),
        num_layers=max(layers) + 1 if layers else 0,
        chunk_elements=chunk_elements,
        max_shard_bytes=max_shard_bytes,
        second_moments=sidecars,
        vocabulary=vocabulary,
    )


def describe_plan(plan: MergePlan) -> list[str]:
    """Human-readable lines for ``--dry-run``."""
    cfg = plan.config
    dtypes = sorted({str(t.out.dtype).replace("torch.", "") for t in plan.tensors})
    lines = [
        f"method      {cfg.method.name}",
        f"base        {cfg.base_model or '-'}{'+' + str(cfg.base_lora) if cfg.base_lora else ''}",
        *[f"expert      {e.path}{'+' + str(e.lora) if e.lora else ''}" for e in cfg.experts],
        *(
            describe_second_moments(cfg, [t.out for t in plan.tensors if t.merged], plan.second_moments)
            if any(sc is not None for sc in plan.second_moments)
            else []
        ),
        *([f"vocabulary  {plan.vocabulary.describe()}"] if plan.vocabulary is not None else []),
        f"tensors     {len(plan.tensors)} ({sum(not t.merged for t in plan.tensors)} copied), "
        f"{plan.num_layers} layers, out dtype {', '.join(dtypes)}",
        f"output      {fmt_bytes(plan.output_bytes)} in {len(plan.shards)} shard(s) -> {plan.out_dir}",
    ]
    for s in plan.shards:
        lines.append(f"  {s.file_name}  {len(s.tensors)} tensors  {fmt_bytes(s.data_bytes)}")
    lines.append(f"peak RAM    ~{fmt_bytes(plan.working_set_bytes)} working set + the Python/torch runtime (~0.4 GB)")
    return lines


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def chunk_ranges(numel: int, chunk: int) -> list[tuple[int, int]]:
    """Flat ``(start, count)`` ranges covering ``numel`` elements."""
    return [(s, min(chunk, numel - s)) for s in range(0, numel, chunk)] or [(0, 0)]
