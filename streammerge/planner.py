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
from typing import TYPE_CHECKING

import torch

from .config import LAYER_RE, MergeConfig, ModelEntry, layer_position, resolve_parameters
from .errors import ConfigError, PlanError
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

if TYPE_CHECKING:
    from .slice_plan import TensorSources

DEFAULT_SHARD_BYTES = 5 * 10**9
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 16 MB of fp32 per buffer
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
    merged: bool  # False: a non-float tensor copied from the reference model (or its first source)
    sources: TensorSources | None = None  # slices: configs: this tensor's own inputs and parameters


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
    notes: list[str] = field(default_factory=list)  # lines for the run's report (e.g. buffers taken from the base)
    config_updates: dict = field(default_factory=dict)  # config.json keys set in the output (slices: layer count)
    vocabulary: VocabularyPlan | None = None  # tokenizer_source / tokenizer: the merged vocabulary

    @property
    def output_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    @property
    def working_set_bytes(self) -> int:
        """Estimated peak bytes the engine holds beyond the Python/torch runtime.

        Elementwise methods hold about ten fp32 buffers of one chunk (base, one expert and its raw
        bytes, up to five consensus accumulators, masks) plus two chunks queued for the writer;
        others about four copies of the largest tensor plus the same queue; a method with a
        ``working_set`` estimate (OrthoMerge) its largest per-tensor figure.
        """
        largest = max((t.out.numel for t in self.tensors), default=0)
        if self.config.method.working_set is not None:  # the method's own per-tensor estimate
            estimate = self.config.method.working_set
            return max((estimate(t.out.name, t.out.shape, len(self.experts)) for t in self.tensors if t.merged),
                       default=0)
        if self.config.method.elementwise:
            return 12 * 4 * min(largest, self.chunk_elements)
        return 6 * 4 * largest

    def tensor_working_set(self, tensor: PlannedTensor) -> int:
        """Estimated peak bytes the engine holds on the compute device for one tensor (``--gpu-memory``):
        ten chunk buffers and two queued for elementwise methods; for others six copies of the tensor and,
        for a matrix, six d_in × d_in ones (decompositions such as ORD's)."""
        numel = tensor.out.numel
        if self.config.method.elementwise:
            return 12 * 4 * min(numel, self.chunk_elements)
        square = tensor.out.shape[-1] ** 2 if len(tensor.out.shape) == 2 else 0
        return 4 * (6 * numel + 6 * square)

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


def _check_used_parameters(config: MergeConfig, experts: list) -> None:
    """Refuse a global parameter that the path these experts take does not use (e.g. ``density`` for
    OrthoMerge's OFT path): a silently ignored setting reads as if it had worked."""
    used = config.method.used_parameters
    if used is None:
        return
    kinds = [getattr(e, "kind", "model") for e in experts]
    allowed = used(kinds, config.parameters)
    unused = sorted(set(config.parameters) - allowed)
    if unused:
        raise ConfigError(
            f"parameters: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by {config.method.name} "
            f"with these experts ({', '.join(sorted(set(kinds)))}); remove {'it' if len(unused) == 1 else 'them'} "
            f"(used here: {', '.join(sorted(allowed))})"
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
    if chunk_elements <= 0:
        raise PlanError(f"chunk size {chunk_elements}: must be a positive number of elements")
    if config.layout is not None:  # slices: / modules:, planned tensor by tensor from their sources
        from .slice_plan import plan_layout

        return plan_layout(config, out_dir, max_shard_bytes, chunk_elements)
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
        _check_used_parameters(config, experts)
        reference = base_view() if config.base_model else experts[0]
        vocabulary = None
        if config.tokenizer is not None:
            base, experts, reference, vocabulary = _vocabulary_views(config, base, experts, reference,
                                                                     base_view() if config.base_model else None)
        check_files_outside_output(out_dir, list(opened.values()))
        for name in ("config.json", *COPIED_FILES):  # copied into OUT_DIR after the merge: check them now
            check_model_file(reference.folder, name)
        tensors = []
        from_base: dict[str, list[str]] = {}  # expert path -> integer/bool buffers it lacks
        for name in sorted(reference.names(), key=_tensor_order):
            meta = reference.meta(name)
            for entry, ckpt in zip(config.experts, experts, strict=True):
                if name not in ckpt:
                    if not meta.dtype.is_floating_point and reference is not ckpt:
                        # an integer/bool buffer (BERT's position_ids) that newer transformers no longer save:
                        # never merged, the output takes the reference's copy anyway
                        from_base.setdefault(str(entry.path), []).append(name)
                        continue
                    raise PlanError(f"model {entry.path} has no tensor {name!r} (present in {meta.file})")
                _check_matches(name, meta, ckpt.meta(name), entry.path)
            merged = meta.dtype.is_floating_point
            dtype = (config.out_dtype or config.dtype or meta.dtype) if merged else meta.dtype
            tensors.append(PlannedTensor(OutputTensor(name, dtype, meta.shape), merged))
        if not tensors:
            raise PlanError(f"{reference.path}: has no tensors to merge")
        sidecars = open_second_moments(config, [t.out for t in tensors if t.merged])
        _check_parameters_of_every_tensor(config, tensors)
        notes = [
            f"model {path} lacks {len(names)} integer/bool buffer(s), taken from {reference.path}: {', '.join(names)}"
            for path, names in from_base.items()
        ]
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
        notes=notes,
        vocabulary=vocabulary,
    )


def _check_parameters_of_every_tensor(config: MergeConfig, tensors: list[PlannedTensor]) -> None:
    """Resolve every merged tensor's parameters now: a filter or gradient may give a bad value (a density
    out of range, say) for some tensors only, and that must be refused before anything is written."""
    layers = [int(m.group(1)) for t in tensors if (m := LAYER_RE.search(t.out.name))]
    num_layers = max(layers) + 1 if layers else 0
    for t in tensors:
        if t.merged:
            try:
                resolve_parameters(config, t.out.name, layer_position(t.out.name, num_layers))
            except ConfigError as e:
                raise ConfigError(f"{e} (tensor {t.out.name})") from e


def describe_plan(plan: MergePlan) -> list[str]:
    """Human-readable lines for ``--dry-run``."""
    cfg = plan.config
    dtypes = sorted({str(t.out.dtype).replace("torch.", "") for t in plan.tensors})
    lines = [
        f"method      {cfg.method.name}",
        f"base        {cfg.base_model or '-'}{'+' + str(cfg.base_lora) if cfg.base_lora else ''}",
        *([f"expert      {e.path}{'+' + str(e.lora) if e.lora else ''}" for e in cfg.experts]
          if cfg.layout is None else _describe_layout(cfg.layout)),
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


def _describe_layout(layout) -> list[str]:
    from .slices import describe_layout

    return describe_layout(layout)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def chunk_ranges(numel: int, chunk: int) -> list[tuple[int, int]]:
    """Flat ``(start, count)`` ranges covering ``numel`` elements."""
    return [(s, min(chunk, numel - s)) for s in range(0, numel, chunk)] or [(0, 0)]
