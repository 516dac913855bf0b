"""mergekit-compatible merge configs: parse the YAML, resolve parameters per tensor.

Supported (mergekit 0.1.x semantics):

    merge_method: ties                # a name in streammerge.methods.METHODS
    base_model: path/to/base          # local folder or weights file
    models:
      - model: path/to/expert
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true}     # global; per-model names here are defaults for every model
    dtype: float32                    # math is always fp32 here; this only sets the default out dtype
    out_dtype: bfloat16
    seed: 0                           # streammerge extension: DARE masks

``slices:`` and ``modules:`` (layer ranges per source, frankenmerges) are read by ``streammerge.slices``
into ``MergeConfig.layout`` and planned by ``streammerge.slice_plan``.

A parameter value is a scalar, a gradient (list of numbers interpolated over layers: t = layer /
(num_layers - 1), t = 0 for tensors outside the layer stack) or a list of ``{filter, value}``
entries where the first whose ``filter`` is a substring of the tensor name (or is absent / "*")
wins. A per-model parameter resolves from the model's own ``parameters`` first, then the global
ones, then the method default. Paths are taken relative to the working directory, or to the
config file's folder when that is where they exist.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from .errors import ConfigError, StreamMergeError
from .io import hub
from .io.paths import regular_file
from .methods import METHODS, MergeMethod
from .preconditioner_paths import resolve_preconditioner_path
from .vocabulary import TokenizerSpec, parse_tokenizer

if TYPE_CHECKING:
    from .slices import Layout

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
UNSUPPORTED_KEYS: dict[str, str] = {}  # keys mergekit reads that streammerge refuses: key -> why
KNOWN_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype", "seed",
              "tokenizer_source", "tokenizer", "chat_template", "name"}
PRECONDITIONER_KEY = "preconditioner_path"  # OTA authors' per-model parameter naming a file
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # other keys beside model:, e.g. sidecar:
    lora: Path | None = None  # mergekit's ``model+adapter``: the PEFT adapter applied to ``path``


@dataclass(frozen=True)
class MergeConfig:
    method: MergeMethod
    base_model: Path | None
    models: list[ModelEntry]
    parameters: Mapping[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    seed: int
    source: str  # the YAML text, for the model card and the plan fingerprint
    layout: Layout | None = None  # slices: / modules: (then ``models`` lists every model they read, once)
    base_lora: Path | None = None  # ``base_model: model+adapter``
    tokenizer: TokenizerSpec | None = None  # tokenizer_source / tokenizer: (vocabularies merged, as mergekit)

    @property
    def inputs(self) -> list[Path]:
        """Every model path the config names: the base, then ``models:``."""
        paths = ([self.base_model] if self.base_model else []) + [m.path for m in self.models]
        return paths + [p for p in (self.base_lora, *(m.lora for m in self.models)) if p is not None]

    @property
    def experts(self) -> list[ModelEntry]:
        """The ``models:`` entries the method merges (task-vector methods skip the base, as mergekit)."""
        if self.method.base_model == "unused" or self.base_model is None:
            return list(self.models)
        return [m for m in self.models if not self.is_base(m)]

    def is_base(self, entry: ModelEntry) -> bool:
        """Whether a ``models:`` entry names the base model itself (adapter included, as mergekit compares)."""
        if self.base_model is None or not same_path(entry.path, self.base_model):
            return False
        if (entry.lora is None) != (self.base_lora is None):
            return False
        return entry.lora is None or same_path(entry.lora, self.base_lora)


def same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def load_config(path: str | os.PathLike) -> MergeConfig:
    p = regular_file(path, "config", ConfigError, verb="read")
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror})") from e
    return parse_config(text, p.parent, str(p))


def parse_config(text: str, root: Path | None = None, where: str = "config") -> MergeConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {str(e).splitlines()[0]} ({_yaml_mark(e)})") from e
    except RecursionError as e:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{where}: invalid YAML: nested too deeply to be a merge config") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with merge_method, models, ...")
    for key, why in UNSUPPORTED_KEYS.items():
        if key in raw:
            raise ConfigError(f"{where}: {why}")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KNOWN_KEYS))})")
    name = raw.get("merge_method")
    if name not in METHODS:
        raise ConfigError(f"{where}: unknown merge_method {name!r} (available: {', '.join(METHODS)})")
    method = METHODS[name]
    tokenizer = parse_tokenizer(raw, lambda value, key: _resolve_path(value, root, where, key), where)
    base, base_lora = _resolve_model(raw["base_model"], root, where, "base_model") if raw.get("base_model") else (
        None, None)
    from .slices import check_layout_parameters, layout_models, parse_layout  # slices imports this module

    layout = parse_layout(raw, root, where, method)
    has_slice_bases = layout is not None and layout.slices and all(s.base_model for s in layout.slices)
    if method.base_model == "required" and base is None and not has_slice_bases:
        raise ConfigError(f"{where}: merge_method {name} needs base_model:")
    if layout is not None:
        models = layout_models(layout, base)
    else:
        models = [_model_entry(m, i, root, where, method) for i, m in enumerate(raw.get("models") or [])]
    if not models:
        raise ConfigError(f"{where}: models: must list at least one model")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: parameters: must be a mapping")
    if PRECONDITIONER_KEY in params:
        raise ConfigError(f"{where}: parameters: {PRECONDITIONER_KEY} names one model's file; give it under that "
                          "model's parameters:")
    cfg = MergeConfig(
        method=method,
        base_model=base,
        models=models,
        parameters=params,
        dtype=_dtype(raw.get("dtype"), where, "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), where, "out_dtype"),
        seed=_seed(raw.get("seed", 0), where),
        source=text,
        layout=layout,
        base_lora=base_lora,
        tokenizer=tokenizer,
    )
    if layout is not None:  # parameters resolve per slice; missing required ones are found while planning
        check_layout_parameters(layout, params, method, where)
        return cfg
    _check_expert_count(cfg, where)
    if method.max_models is not None and len(cfg.experts) > method.max_models:
        raise ConfigError(f"{where}: merge_method {name} takes at most {method.max_models} model(s) under models:, "
                          f"got {len(cfg.experts)}")
    _check_parameter_names(cfg, where)
    return cfg


def _check_expert_count(cfg: MergeConfig, where: str) -> None:
    low, high = cfg.method.expert_count
    n = len(cfg.experts)
    if low <= n and (high is None or n <= high):
        return
    want = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
    besides = " besides base_model" if cfg.method.base_model != "unused" and cfg.base_model is not None else ""
    raise ConfigError(
        f"{where}: models: merge_method {cfg.method.name} merges {want} model(s){besides}, got {n}; "
        f"list {want} under models:"
    )


def _yaml_mark(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "see the file"


def _local_path(value: str, root: Path | None) -> Path | None:
    """``value`` as an existing local path (relative to the working directory, else to the config's folder)."""
    p = Path(value).expanduser()
    if not p.exists() and root is not None and not p.is_absolute() and (root / p).exists():
        p = root / p
    return p if p.exists() else None


def _resolve_path(value: object, root: Path | None, where: str, key: str, models: bool = True) -> Path:
    """A local path, else (``models``) a hub model id ``org/name[@revision]`` resolved to its cached snapshot
    folder. A local path of that name always wins over the hub."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a path, got {value!r}")
    p = _local_path(value, root)
    if p is not None:
        return p
    if not models:
        raise ConfigError(f"{where}: {key} {value!r} does not exist")
    if hub.is_repo_id(value):
        try:
            return hub.resolve_model(value)
        except StreamMergeError as e:
            raise ConfigError(f"{where}: {key}: {e}") from e
    raise ConfigError(
        f"{where}: {key} {value!r} does not exist; give a local checkpoint folder or file, or a hub model id "
        f"org/name[@revision]"
    )


def _resolve_model(value: object, root: Path | None, where: str, key: str) -> tuple[Path, Path | None]:
    """A model path, or mergekit's ``model+adapter`` (split at its one ``+`` unless the whole name exists
    locally): ``(model, adapter or None)``."""
    if isinstance(value, str) and "+" in value and _local_path(value, root) is None:
        parts = value.split("+")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"{where}: {key} {value!r}: expected mergekit's MODEL+ADAPTER with exactly one '+' (or a local path)"
            )
        model = _resolve_path(parts[0], root, where, key)
        adapter = _resolve_path(parts[1], root, where, f"{key} (adapter after '+')")
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(
                f"{where}: {key} {value!r}: {adapter} is not a PEFT adapter folder (no adapter_config.json); "
                f"MODEL+ADAPTER applies a PEFT adapter to MODEL"
            )
        return model, adapter
    return _resolve_path(value, root, where, key), None


def _model_entry(raw: object, i: int, root: Path | None, where: str, method: MergeMethod) -> ModelEntry:
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConfigError(f"{where}: models[{i}] must be a mapping with a model: key")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: models[{i}].parameters must be a mapping")
    extra = {}
    for key, value in raw.items():
        if key in ("model", "parameters"):
            continue
        if key not in method.model_keys:
            allowed = ", ".join(["model", "parameters", *sorted(method.model_keys)])
            raise ConfigError(f"{where}: models[{i}]: unknown key {key!r} for {method.name} (allowed: {allowed})")
        extra[key] = _resolve_path(value, root, where, f"models[{i}].{key}", models=False)  # local file paths
    if PRECONDITIONER_KEY in params and _takes(method, PRECONDITIONER_KEY):
        # the OTA authors' per-model second-moment file: a path (or hub file), resolved like model paths
        extra[PRECONDITIONER_KEY] = resolve_preconditioner_path(
            params[PRECONDITIONER_KEY], root, where, f"models[{i}].parameters.{PRECONDITIONER_KEY}"
        )
    path, lora = _resolve_model(raw["model"], root, where, f"models[{i}].model")
    return ModelEntry(path, params, extra, lora)


def _takes(method: MergeMethod, key: str) -> bool:
    return any(f.name == key for f in dataclasses.fields(method.model_params))


def _dtype(value: object, where: str, key: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in DTYPE_NAMES:
        raise ConfigError(f"{where}: {key} {value!r} is not one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[value]


def _seed(value: object, where: str) -> int:
    if type(value) is not int or value < 0:
        raise ConfigError(f"{where}: seed must be a non-negative integer, got {value!r}")
    return value


def yaml_name(f: dataclasses.Field) -> str:
    """YAML key of a params field: the field name without a trailing '_' (``lambda_`` -> ``lambda``)."""
    return f.name.rstrip("_")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {yaml_name(f): f for f in dataclasses.fields(cls)}


def _check_parameter_names(cfg: MergeConfig, where: str) -> None:
    glob, per_model = _fields(cfg.method.params), _fields(cfg.method.model_params)
    for key in cfg.parameters:
        if key not in glob and key not in per_model:
            raise ConfigError(
                f"{where}: unknown parameter {key!r} for {cfg.method.name} "
                f"(known: {', '.join(sorted(set(glob) | set(per_model)))})"
            )
    for m in cfg.models:
        for key in m.parameters:
            if key not in per_model:
                raise ConfigError(
                    f"{where}: unknown per-model parameter {key!r} for {m.path} with {cfg.method.name} "
                    f"(per-model: {', '.join(sorted(per_model)) or 'none'})"
                )
    # Resolve once for a representative name so that malformed values and missing required
    # parameters fail before any file is written.
    try:
        glob, models = resolve_parameters(cfg, "model.layers.0.self_attn.q_proj.weight", 0.0)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e  # name the config file too
    if cfg.method.validate is not None:
        try:
            cfg.method.validate(glob, models)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's gradient position t for a tensor: layer / (num_layers - 1); 0 outside the stack."""
    m = LAYER_RE.search(name)
    if not m:
        return 0.0
    return 1.0 if num_layers <= 1 else int(m.group(1)) / (num_layers - 1)


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """mergekit's ``evaluate_setting``: scalar, gradient or first matching ``{filter, value}``."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise ConfigError(f"parameter list entries must be numbers or {{filter, value}} mappings, got {cond!r}")
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor and str(flt) in tensor):
                return evaluate(cond["value"], tensor, t)
        return None
    raise ConfigError(f"unexpected parameter value {setting!r}")


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kind = kind.removesuffix(" | None")  # value is not None here
    if kind == "float" and isinstance(value, str):
        try:  # YAML 1.1 (PyYAML) reads 1e-26, without a dot, as a string
            value = float(value)
        except ValueError:
            pass
        else:
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {yaml_name(f)} must be a finite number, got {value!r}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {yaml_name(f)} must be true or false, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {yaml_name(f)} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {yaml_name(f)} must be a finite number, got {value!r}")
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {yaml_name(f)} must be an integer, got {value!r}")
        return value
    return value


def _build(cls: type, scopes: list[Mapping[str, Any]], tensor: str, t: float, where: str) -> Any:
    values = {}
    for name, f in _fields(cls).items():
        for scope in scopes:
            if name in scope:
                v = evaluate(scope[name], tensor, t)
                if v is not None:
                    values[f.name] = _coerce(v, f, where)
                    break
        else:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required parameter {name!r} (tensor {tensor})")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def resolve_parameters(cfg: MergeConfig, tensor: str, t: float) -> tuple[Any, list[Any]]:
    """The method's global params and one per-model params object per expert, for one tensor."""
    glob = _build(cfg.method.params, [cfg.parameters], tensor, t, "parameters")
    per_model = [
        _build(cfg.method.model_params, [m.parameters, cfg.parameters], tensor, t, f"model {m.path}")
        for m in cfg.experts
    ]
    return glob, per_model
