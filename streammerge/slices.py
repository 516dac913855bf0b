"""mergekit's ``slices:`` and ``modules:`` configs: layer ranges of several models, merged slice by
slice and stacked into one output model (frankenmerges when the layer count changes).

    slices:
      - sources:                           # every source of a slice has the same number of layers
          - model: path/to/a
            layer_range: [0, 24]           # [start, end): layers start .. end-1
            parameters: {weight: 0.7}      # per-model parameters for this slice
          - model: path/to/b
            layer_range: [0, 24]
        base_model: path/to/a              # optional: this slice's base (else the global base_model)
        parameters: {t: 0.3}               # this slice's parameters
      - sources: [{model: path/to/b, layer_range: [20, 40]}]
    modules:                               # the same, one level down; single-stack models have one
      default: {slices: [...] | models: [...], parameters: {...}}   # module, mergekit's "default"

What mergekit 0.1.5 does (``plan.py``, ``config.py``, ``merge.py``), and so this module:

- Output layers are numbered from 0 in slice order; output layer k of a slice of n layers reads layer
  ``start + k'`` (k' its offset in the slice) of each source and gets the gradient position
  t = k' / (n - 1) (t = 1 when n = 1).
- Tensors outside the layer stack take t = 0: the embeddings (pre) are merged from the first slice's
  sources with the first slice's parameters; the final norm and lm_head (post) from the last slice's
  sources (its first len(first slice's sources) ones, as mergekit's zip truncates them) with the last
  slice's parameters. Which tensors are "pre": names holding ``embed``, ``wte`` or ``wpe``.
- Parameters resolve, most specific first: the source's, the slice's, the module's, the global ones.
  Per-model values are evaluated against the source tensor's name, global ones against the output's.
- A method that uses a base (TIES, task arithmetic, ...) needs the slice's base model
  (``slices[i].base_model`` or the global one) among the slice's sources; it is the base there and the
  other sources are the experts. ``linear`` and ``passthrough`` merge every source.
- ``modules: {default: {models: ...}}`` is ``models:`` with module-level parameters; as mergekit, the
  base model is added to the sources when it is not listed.
- config.json comes from ``base_model`` (else the first slice's first source) with its layer count
  (``num_hidden_layers``) set to the output's; per-layer lists (``layer_types``) are rebuilt from the
  sources' entries for the layers taken.

The layer stack is found by name (``…layers.N.…``, as ``config.LAYER_RE``), not by an architecture
table: a model whose tensors hold more than one stack (vision towers, encoder-decoders) is refused.
Every output tensor gets a ``TensorSources`` (which checkpoint and tensor each input is, and the
resolved parameters); the engine reads those instead of the plan-wide base and experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import LAYER_RE, ModelEntry, _build, _fields, _resolve_path, same_path
from .errors import ConfigError, PlanError
from .experts import is_adapter
from .io.hf_files import read_config
from .io.reader import Checkpoint, open_checkpoint
from .io.writer import OutputTensor
from .methods import MergeMethod

SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
MODULE_NAME = "default"  # mergekit's name for the one module of a single-stack architecture
PRE_MARKERS = ("embed", "wte", "wpe")  # non-layer tensors merged with the first slice (the rest: the last)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")  # config.json lists with one entry per layer


@dataclass(frozen=True)
class SliceSource:
    path: Path
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: Path | None = None  # this slice's own base; None: the config's
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """A ``slices:`` or ``modules:`` config. ``models`` is set for ``modules: {default: {models:}}``, whose
    layer ranges are known only once the models are opened; ``slices`` otherwise."""

    where: str  # the YAML key it came from, for messages: "slices" or "modules.default"
    slices: tuple[OutputSlice, ...] | None
    models: tuple[ModelEntry, ...] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)  # the module's


@dataclass(frozen=True)
class TensorSources:
    """Where one output tensor's inputs come from, and its resolved parameters."""

    base: tuple[Checkpoint, str] | None  # (checkpoint, tensor name)
    experts: tuple[tuple[Checkpoint, str], ...]
    params: Any
    model_params: tuple[Any, ...]

    def inputs(self) -> list[tuple[Checkpoint, str]]:
        return ([self.base] if self.base is not None else []) + list(self.experts)


# ---------------------------------------------------------------- parsing (config.parse_config calls this)


def parse_layout(raw: dict, root: Path | None, where: str, method: MergeMethod) -> Layout | None:
    """The ``slices:``/``modules:`` part of a config, or None for a plain ``models:`` one."""
    given = [k for k in ("models", "slices", "modules") if raw.get(k) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: give exactly one of models:, slices: or modules: (got {', '.join(given)})")
    if not given or given[0] == "models":
        return None
    if method.start_run is not None or method.model_keys:
        raise ConfigError(f"{where}: merge_method {method.name} works on models: only; {given[0]}: is not supported "
                          f"with it")
    if given[0] == "slices":
        return Layout("slices", _slices(raw["slices"], root, where, "slices"))
    modules = raw["modules"]
    if not isinstance(modules, dict):
        raise ConfigError(f"{where}: modules: must be a mapping of module name to {{slices | models, parameters}}")
    for name in modules:
        if name != MODULE_NAME:
            raise ConfigError(
                f"{where}: modules: unknown module {name!r}; streammerge merges single-stack models, whose one "
                f"module mergekit names {MODULE_NAME!r}"
            )
    key = f"modules.{MODULE_NAME}"
    module = modules[MODULE_NAME]
    if not isinstance(module, dict):
        raise ConfigError(f"{where}: {key} must be a mapping with slices: or models:")
    _known_keys(module, MODULE_KEYS, where, key)
    params = _params(module.get("parameters"), where, f"{key}.parameters")
    if bool(module.get("slices")) == bool(module.get("models")):
        raise ConfigError(f"{where}: {key}: give exactly one of slices: or models:")
    if module.get("slices"):
        return Layout(key, _slices(module["slices"], root, where, f"{key}.slices"), parameters=params)
    models = module["models"]
    if not isinstance(models, list):
        raise ConfigError(f"{where}: {key}.models must be a list")
    entries = []
    for i, m in enumerate(models):
        m = {"model": m} if isinstance(m, str) else m
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{where}: {key}.models[{i}] must be a mapping with a model: key")
        _known_keys(m, ("model", "parameters"), where, f"{key}.models[{i}]")
        entries.append(ModelEntry(_resolve_path(m["model"], root, where, f"{key}.models[{i}].model"),
                                  _params(m.get("parameters"), where, f"{key}.models[{i}].parameters")))
    return Layout(key, None, models=tuple(entries), parameters=params)


def _known_keys(raw: dict, known: tuple[str, ...], where: str, key: str) -> None:
    for k in raw:
        if k not in known:
            hint = " (mergekit 0.1.5 reads it but never uses it)" if k == "residual_weight" else ""
            raise ConfigError(f"{where}: {key}: unknown key {k!r}{hint} (known: {', '.join(known)})")


def _params(value: object, where: str, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping")
    return value


def _slices(raw: object, root: Path | None, where: str, key: str) -> tuple[OutputSlice, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: {key} must be a non-empty list of {{sources: [...]}}")
    out = []
    for i, s in enumerate(raw):
        k = f"{key}[{i}]"
        if not isinstance(s, dict) or not s.get("sources"):
            raise ConfigError(f"{where}: {k} must be a mapping with a non-empty sources: list")
        _known_keys(s, SLICE_KEYS, where, k)
        if not isinstance(s["sources"], list):
            raise ConfigError(f"{where}: {k}.sources must be a list of {{model, layer_range}}")
        sources = tuple(_source(src, root, where, f"{k}.sources[{j}]") for j, src in enumerate(s["sources"]))
        for j, src in enumerate(sources):
            if any(same_path(src.path, other.path) for other in sources[:j]):
                raise ConfigError(f"{where}: {k}.sources[{j}]: model {src.path} is already a source of this slice; "
                                  f"a slice takes each model once (mergekit refuses duplicate inputs too)")
        lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{list(src.layer_range)}" for src in sources)
            raise ConfigError(f"{where}: {k}.sources: layer ranges {ranges} hold different numbers of layers; "
                              f"every source of a slice must give the same number")
        base = _resolve_path(s["base_model"], root, where, f"{k}.base_model") if s.get("base_model") else None
        out.append(OutputSlice(sources, base, _params(s.get("parameters"), where, f"{k}.parameters")))
    return tuple(out)


def _source(raw: object, root: Path | None, where: str, key: str) -> SliceSource:
    if not isinstance(raw, dict) or "model" not in raw or "layer_range" not in raw:
        raise ConfigError(f"{where}: {key} must be a mapping with model: and layer_range: [start, end]")
    _known_keys(raw, SOURCE_KEYS, where, key)
    lr = raw["layer_range"]
    if (not isinstance(lr, list) or len(lr) != 2 or not all(type(v) is int for v in lr)
            or lr[0] < 0 or lr[1] <= lr[0]):
        raise ConfigError(f"{where}: {key}.layer_range must be [start, end] with 0 <= start < end "
                          f"(layers start .. end-1), got {lr!r}")
    path = _resolve_path(raw["model"], root, where, f"{key}.model")
    return SliceSource(path, (lr[0], lr[1]), _params(raw.get("parameters"), where, f"{key}.parameters"))


def layout_models(layout: Layout, base: Path | None) -> list[ModelEntry]:
    """Every distinct model a layout reads (no parameters), for ``MergeConfig.models``."""
    paths = [m.path for m in layout.models] if layout.models else [s.path for sl in layout.slices for s in sl.sources]
    paths += [sl.base_model for sl in layout.slices or () if sl.base_model is not None]
    if layout.models and base is not None:
        paths.append(base)
    out: list[Path] = []
    for p in paths:
        if not any(same_path(p, q) for q in out):
            out.append(p)
    return [ModelEntry(p) for p in out]


def check_layout_parameters(layout: Layout, global_params: Mapping[str, Any], method: MergeMethod,
                            where: str) -> None:
    """Every parameter name in every scope must be one the method knows (per-model ones at source level)."""
    glob, per_model = _fields(method.params), _fields(method.model_params)
    scopes = [("parameters", global_params), (f"{layout.where}.parameters", layout.parameters)]
    per_source = []
    for i, sl in enumerate(layout.slices or ()):
        scopes.append((f"{layout.where}.slices[{i}].parameters", sl.parameters))
        per_source += [(f"{layout.where}.slices[{i}].sources[{j}].parameters", s.parameters)
                       for j, s in enumerate(sl.sources)]
    per_source += [(f"{layout.where}.models[{i}].parameters", m.parameters) for i, m in enumerate(layout.models or ())]
    for key, scope in scopes:
        for name in scope:
            if name not in glob and name not in per_model:
                raise ConfigError(f"{where}: {key}: unknown parameter {name!r} for {method.name} "
                                  f"(known: {', '.join(sorted(set(glob) | set(per_model))) or 'none'})")
    for key, scope in per_source:
        for name in scope:
            if name not in per_model:
                raise ConfigError(f"{where}: {key}: unknown per-model parameter {name!r} for {method.name} "
                                  f"(per-model: {', '.join(sorted(per_model)) or 'none'})")


# ---------------------------------------------------------------- planning (planner.make_plan calls this)


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
    return any(marker in name for marker in PRE_MARKERS)


def plan_layout(config, out_dir: Path, max_shard_bytes: int, chunk_elements: int):
    """The ``MergePlan`` of a ``slices:``/``modules:`` config: every output tensor with its ``TensorSources``."""
    from .io.hf_files import COPIED_FILES
    from .io.reader import check_model_file
    from .io.writer import plan_shards
    from .planner import MergePlan, check_files_outside_output, check_output_dir

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
                    f"{layout.where}[{i}].sources[{j}].layer_range {list(s.layer_range)}: {s.path} has {n} layers "
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
            where = f"{layout.where}[{si}].sources[{j}]"
            holder, lacker = (s.path, first.path) if odd[0] in have else (first.path, s.path)
            raise PlanError(f"{where}: layer {s.layer_range[0] + offset} of {holder} has tensor …{odd[0]} that the "
                            f"matching layer of {lacker} lacks; a slice's sources must share one architecture")
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
        from .planner import PlannedTensor, dtype_kind

        config, method, sl = self.config, self.config.method, self.slices[si]
        where = f"{self.layout.where}[{si}]"
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


def describe_layout(layout: Layout) -> list[str]:
    """``--dry-run`` lines: each slice's sources and the output layers it fills."""
    if layout.slices is None:
        return [f"model       {m.path}  ({layout.where}.models: every layer)" for m in layout.models]
    lines, k = [], 0
    for i, sl in enumerate(layout.slices):
        first = sl.sources[0]
        n = first.layer_range[1] - first.layer_range[0]
        srcs = ", ".join(f"{s.path} {list(s.layer_range)}" for s in sl.sources)
        base = f" (base {sl.base_model})" if sl.base_model else ""
        lines.append(f"slice {i:<5} {srcs} -> layers {k}..{k + n - 1}{base}")
        k += n
    return lines
