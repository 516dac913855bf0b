"""The plan of a ``slices:``/``modules:`` config (``streammerge.slices`` reads it; its docstring gives
mergekit's semantics): the layer stack of every input found by name, every output tensor with its own
inputs (``TensorSources``: checkpoint and tensor name of the base and of each expert, and the
parameters resolved for the slice), checked before anything is written, and the config.json keys the
output's layer count changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LAYER_RE, _build, same_path
from .errors import PlanError
from .experts import is_adapter
from .io.hf_files import COPIED_FILES, read_config
from .io.reader import Checkpoint, check_model_file, open_checkpoint
from .io.writer import OutputTensor, plan_shards
from .planner import MergePlan, PlannedTensor, check_files_outside_output, check_output_dir, dtype_kind
from .slices import Layout, OutputSlice, SliceSource

# Non-layer tensors merged with the first slice ("pre", mergekit's pre_weights); the rest (final norm, lm_head)
# with the last. Checked against every single-stack architecture mergekit 0.1.5 defines (tests/test_slices.py).
PRE_MARKERS = ("embed", "wte", "wpe", "rotary_pos_emb", "relative_pe")
POST_MARKERS = ("embed_out",)  # GPT-NeoX's lm_head
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")  # config.json lists with one entry per layer


@dataclass(frozen=True)
class TensorSources:
    """Where one output tensor's inputs come from, and its resolved parameters."""

    base: tuple[Checkpoint, str] | None  # (checkpoint, tensor name)
    experts: tuple[tuple[Checkpoint, str], ...]
    params: Any
    model_params: tuple[Any, ...]

    def inputs(self) -> list[tuple[Checkpoint, str]]:
        return ([self.base] if self.base is not None else []) + list(self.experts)


@dataclass(frozen=True)
class LayerStack:
    """A checkpoint's layer tensors: ``names[i]`` maps suffix -> full name for layer i."""

    prefix: str  # e.g. "model.layers."
    names: list[dict[str, str]]

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def rename(self, suffix: str, index: int) -> str:
        return f"{self.prefix}{index}{suffix}"


def layer_stack(ckpt: Checkpoint) -> LayerStack:
    prefixes: set[str] = set()
    layers: dict[int, dict[str, str]] = {}
    for name in ckpt.names():
        m = LAYER_RE.search(name)
        if m:
            prefixes.add(name[: m.start(1)])
            layers.setdefault(int(m.group(1)), {})[name[m.end(1):]] = name
    if len(prefixes) > 1:
        raise PlanError(f"{ckpt.path}: holds more than one layer stack ({', '.join(sorted(prefixes))}); slices: work "
                        f"on models with one (mergekit's multi-module configs are not supported)")
    if not prefixes:
        raise PlanError(f"{ckpt.path}: has no layer tensors (names like model.layers.0.…); slices: need a layer stack")
    n = max(layers) + 1
    missing = [i for i in range(n) if i not in layers]
    if missing:
        raise PlanError(f"{ckpt.path}: has tensors for layer {n - 1} but none for layer {missing[0]}")
    return LayerStack(prefixes.pop(), [layers[i] for i in range(n)])


def is_pre_weight(name: str) -> bool:
    return any(marker in name for marker in PRE_MARKERS) and not any(marker in name for marker in POST_MARKERS)


def plan_layout(config, out_dir: Path, max_shard_bytes: int, chunk_elements: int):
    """The ``MergePlan`` of a ``slices:``/``modules:`` config: every output tensor with its ``TensorSources``."""
    layout: Layout = config.layout
    check_output_dir(out_dir, config.inputs)
    opened: dict[Path, Checkpoint] = {}
    stacks: dict[Path, LayerStack] = {}

    def get(path: Path) -> Checkpoint:
        if is_adapter(path):
            raise PlanError(f"{path}: is a PEFT adapter; {layout.where}: takes full models (give adapters under "
                            f"models:, or merge the adapter into its base first)")
        key = path.resolve()
        if key not in opened:
            opened[key] = open_checkpoint(path)
        return opened[key]

    def stack(path: Path) -> LayerStack:
        key = path.resolve()
        if key not in stacks:
            stacks[key] = layer_stack(get(path))
        return stacks[key]

    try:
        slices = layout.slices or _models_slice(layout, config.base_model, stack)
        for m in config.inputs:
            get(m)
        reference = get(config.base_model or slices[0].sources[0].path)
        ref_stack = stack(reference.path)
        check_files_outside_output(out_dir, list(opened.values()))
        for name in ("config.json", *COPIED_FILES):  # copied into OUT_DIR after the merge: check them now
            check_model_file(reference.folder, name)
        _check_ranges(layout, slices, stack)
        build = _TensorBuilder(config, layout, slices, get, reference)
        outer = [n for n in sorted(reference.names()) if not LAYER_RE.search(n)]
        tensors = [build(0, n, [(s, n) for s in slices[0].sources], n, 0.0) for n in outer if is_pre_weight(n)]
        layer_sources: list[tuple[Path, int]] = []  # per output layer: its first source and that source's layer
        for si, sl in enumerate(slices):
            first = sl.sources[0]
            n = first.layer_range[1] - first.layer_range[0]
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                k = len(layer_sources)
                suffixes = _layer_suffixes(layout, si, sl, offset, stack)
                for suffix in suffixes:
                    picked = [(s, stack(s.path).names[s.layer_range[0] + offset][suffix]) for s in sl.sources]
                    tensors.append(build(si, ref_stack.rename(suffix, k), picked, suffix, t))
                layer_sources.append((first.path, first.layer_range[0] + offset))
        last = len(slices) - 1
        post = slices[last].sources[: len(slices[0].sources)]  # mergekit zips with the first slice's count
        tensors += [build(last, n, [(s, n) for s in post], n, 0.0) for n in outer if not is_pre_weight(n)]
        updates = _config_updates(reference, ref_stack, layer_sources, stack)
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise
    return MergePlan(
        config=config,
        out_dir=out_dir,
        reference=reference,
        base=None,
        experts=list(opened.values()),  # every input, for the fingerprint and close(); tensors name their own
        tensors=tensors,
        shards=plan_shards([t.out for t in tensors], max_shard_bytes),
        num_layers=len(layer_sources),
        chunk_elements=chunk_elements,
        max_shard_bytes=max_shard_bytes,
        config_updates=updates,
    )


def _models_slice(layout: Layout, base: Path | None, stack) -> tuple[OutputSlice, ...]:
    """``modules: {default: {models:}}`` as mergekit normalizes it: one slice over every model's whole
    stack, the base added when it is not listed."""
    sources = [SliceSource(m.path, (0, stack(m.path).num_layers), m.parameters) for m in layout.models]
    if base is not None and not any(same_path(m.path, base) for m in layout.models):
        sources.append(SliceSource(base, (0, stack(base).num_layers)))
    counts = {s.layer_range[1] for s in sources}
    if len(counts) > 1:
        found = ", ".join(f"{s.path}: {s.layer_range[1]}" for s in sources)
        raise PlanError(f"{layout.where}.models: the models have different numbers of layers ({found}); "
                        f"use slices: with layer_range to pick equal ranges")
    return (OutputSlice(tuple(sources)),)


def _check_ranges(layout: Layout, slices: tuple[OutputSlice, ...], stack) -> None:
    for i, sl in enumerate(slices):
        for j, s in enumerate(sl.sources):
            n = stack(s.path).num_layers
            if s.layer_range[1] > n:
                raise PlanError(
                    f"{layout.slices_key}[{i}].sources[{j}].layer_range {list(s.layer_range)}: {s.path} has {n} layers "
                    f"(0..{n - 1}); the range's end must be at most {n}"
                )


def _layer_suffixes(layout: Layout, si: int, sl: OutputSlice, offset: int, stack) -> list[str]:
    """The tensors (name suffixes) of one output layer: its first source's; every source must have the same."""
    first = sl.sources[0]
    want = stack(first.path).names[first.layer_range[0] + offset]
    for j, s in enumerate(sl.sources[1:], 1):
        have = stack(s.path).names[s.layer_range[0] + offset]
        odd = sorted(set(want) ^ set(have))
        if odd:
            where = f"{layout.slices_key}[{si}].sources[{j}]"
            (holder, layer), lacker = (((s.path, s.layer_range[0] + offset), first.path) if odd[0] in have
                                       else ((first.path, first.layer_range[0] + offset), s.path))
            raise PlanError(f"{where}: layer {layer} of {holder} has tensor …{odd[0]} that the matching layer of "
                            f"{lacker} lacks; a slice's sources must share one architecture")
    return sorted(want)


class _TensorBuilder:
    """One ``PlannedTensor`` with its ``TensorSources``: inputs checked, parameters resolved."""

    def __init__(self, config, layout: Layout, slices: tuple[OutputSlice, ...], get, reference: Checkpoint):
        self.config, self.layout, self.slices, self.get, self.reference = config, layout, slices, get, reference
        self.templates: dict[str, Any] = {}  # suffix or name -> the reference's TensorMeta the output must match
        ref_stack = layer_stack(reference)
        for layer in ref_stack.names:
            for suffix, name in layer.items():
                self.templates.setdefault(suffix, reference.meta(name))
        for name in reference.names():
            if not LAYER_RE.search(name):
                self.templates[name] = reference.meta(name)

    def __call__(self, si: int, out_name: str, picked: list[tuple[SliceSource, str]], key: str, t: float):
        config, method, sl = self.config, self.config.method, self.slices[si]
        where = f"{self.layout.slices_key}[{si}]"
        template = self.templates.get(key)
        if template is None:
            raise PlanError(f"{where}: tensor {picked[0][1]!r} of {picked[0][0].path} has no counterpart in the layers "
                            f"of {self.reference.path}, whose config.json the output gets; these slices cannot stack")
        inputs = []
        for src, name in picked:
            ckpt = self.get(src.path)
            if name not in ckpt:
                raise PlanError(f"{where}: model {src.path} has no tensor {name!r} (output tensor {out_name!r})")
            meta = ckpt.meta(name)
            if meta.shape != template.shape or dtype_kind(meta.dtype) != dtype_kind(template.dtype):
                raise PlanError(
                    f"{where}: tensor {name!r} of {src.path} is {list(meta.shape)} {dtype_kind(meta.dtype)}, but "
                    f"output tensor {out_name!r} must be {list(template.shape)} {dtype_kind(template.dtype)} like "
                    f"{template.name!r} in {self.reference.path}; these slices cannot stack into one model"
                )
            inputs.append((src, ckpt, name))
        base_path = sl.base_model or config.base_model
        base = None
        experts = inputs
        if method.base_model != "unused" and base_path is not None:
            found = [i for i, (src, _, _) in enumerate(inputs) if same_path(src.path, base_path)]
            if not found:
                raise PlanError(f"{where}: base model {base_path} is not among the sources this slice merges for "
                                f"{out_name!r}; list it under sources: with a layer_range (as mergekit requires)")
            base = inputs[found[0]]
            experts = [x for i, x in enumerate(inputs) if i != found[0]]
        if method.base_model == "required" and base is None:
            raise PlanError(f"{where}: merge_method {method.name} needs a base model: set base_model: globally or for "
                            f"the slice, and list it among the slice's sources")
        if not experts:
            raise PlanError(f"{where}: has no source besides its base model {base_path}; add the models to merge")
        if method.max_models is not None and len(experts) > method.max_models:
            raise PlanError(f"{where}: merge_method {method.name} takes at most {method.max_models} model(s) per "
                            f"slice, this one lists {len(experts)}")
        scopes = [sl.parameters, self.layout.parameters, config.parameters]
        params = _build(method.params, scopes, out_name, t, f"{where}.parameters")
        model_params = tuple(
            _build(method.model_params, [src.parameters, *scopes], name, t, f"{where} model {src.path}")
            for src, _, name in experts
        )
        merged = template.dtype.is_floating_point
        dtype = (config.out_dtype or config.dtype or template.dtype) if merged else template.dtype
        sources = TensorSources(None if base is None else (base[1], base[2]),
                                tuple((ckpt, name) for _, ckpt, name in experts), params, model_params)
        return PlannedTensor(OutputTensor(out_name, dtype, template.shape), merged, sources)


def _config_updates(reference: Checkpoint, ref_stack: LayerStack, layer_sources: list[tuple[Path, int]],
                    stack) -> dict[str, Any]:
    """config.json keys to change: the layer count, and per-layer lists rebuilt for the layers taken."""
    cfg = read_config(reference.folder) or {}
    updates: dict[str, Any] = {}
    count_key = next((k for k in LAYER_COUNT_KEYS if isinstance(cfg.get(k), int)), None)
    if count_key is not None:
        updates[count_key] = len(layer_sources)
    elif cfg and len(layer_sources) != ref_stack.num_layers:
        raise PlanError(f"{reference.folder / 'config.json'}: names no layer count ({', '.join(LAYER_COUNT_KEYS)}); "
                        f"cannot write a config for the output's {len(layer_sources)} layers")
    for key in PER_LAYER_KEYS:
        if not isinstance(cfg.get(key), list):
            continue
        values = []
        for path, layer in layer_sources:
            own = (read_config(path if path.is_dir() else path.parent) or {}).get(key)
            if not isinstance(own, list) or len(own) != stack(path).num_layers:
                raise PlanError(f"{path}: config.json has no {key} list with one entry per layer; the output's {key} "
                                f"cannot be built from it")
            values.append(own[layer])
        updates[key] = values
    return updates
