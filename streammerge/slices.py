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
  slice's parameters. Which tensors are "pre": ``slice_plan.is_pre_weight`` (names holding ``embed``
  but not ``embed_out``, ``wte``, ``wpe``, rotary or relative position tables), which sorts every
  single-stack architecture mergekit defines as it does.
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
This module reads the config; ``slice_plan`` plans it: every output tensor gets a ``TensorSources``
(which checkpoint and tensor each input is, and the resolved parameters), which the engine reads
instead of the plan-wide base and experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelEntry, _fields, _resolve_path, same_path
from .errors import ConfigError
from .methods import MergeMethod

SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
MODULE_NAME = "default"  # mergekit's name for the one module of a single-stack architecture


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

    @property
    def slices_key(self) -> str:
        """How messages name the slices list: ``slices`` or ``modules.default.slices``."""
        return "slices" if self.where == "slices" else f"{self.where}.slices"


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
        scopes.append((f"{layout.slices_key}[{i}].parameters", sl.parameters))
        per_source += [(f"{layout.slices_key}[{i}].sources[{j}].parameters", s.parameters)
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
