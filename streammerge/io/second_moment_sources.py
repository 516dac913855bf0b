"""Where Adam second moments come from: files and folders read one tensor at a time for conversion.

``open_source(src, model_dir)`` accepts

- a name-keyed ``exp_avg_sq`` safetensors file (the OTA authors' export), read with ``pread``;
- a torch file (``.pt``/``.bin``/``.pth``) holding ``{name: tensor}``, or an optimizer state dict keyed
  by name (``{"state": {name: {"exp_avg_sq": ...}}}``), or one keyed by integer id (then
  ``model_dir`` must give the model: ``config.json`` and weights);
- a Hugging Face Trainer checkpoint folder: ``optimizer.pt`` (integer ids) plus the model weights in the
  folder or in ``model_dir``. Ids are named as ``optimizer_names`` explains, from the parameter order of
  the model built on the ``meta`` device from ``config.json`` when transformers can, else from the
  checkpoint's own tensor order when that is unambiguous; every state's shape is checked against the
  checkpoint tensor of that name;
- a DeepSpeed ZeRO 1/2/3 folder (``deepspeed_zero``) or a torch.distributed.checkpoint folder
  (``dcp_states``): sharded states reassembled one parameter at a time (their own source classes, with
  the same ``kind``/``metadata``/``names``/``tensors()``/``close()`` surface).

Torch files are opened with ``torch.load(weights_only=True, mmap=True)`` (no pickled code runs) and
re-opened whenever the bytes read through the current mapping would exceed the largest tensor's, so
mapped pages never hold more than about one tensor resident.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .optimizer_names import Layout, assign_names, candidate_layouts
from .paths import regular_file
from .reader import BinCheckpoint, Checkpoint, open_checkpoint

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".bin", ".pth")
OPTIMIZER_FILE = "optimizer.pt"


class MappedTorchFile:
    """A torch file opened lazily through mmap, re-mapped so resident pages stay under ``budget`` bytes."""

    def __init__(self, path: Path, loader: Callable[[Path], Any] | None = None):
        self.path = path
        self._loader = loader  # None: load_torch_file
        self.budget = 0
        self._obj: Any = None
        self._touched = 0

    def load(self) -> Any:
        if self._obj is None:
            self._obj = (self._loader or load_torch_file)(self.path)
            self._touched = 0
        return self._obj

    def before_read(self, nbytes: int) -> Any:
        """The mapped object, re-mapped first if reading ``nbytes`` more would pass the budget."""
        if self._obj is not None and self._touched and self._touched + nbytes > self.budget:
            self._obj = None  # drop every view of the old mapping before making the next
        obj = self.load()
        self._touched += nbytes
        return obj

    def close(self) -> None:
        self._obj = None


def load_torch_file(path: Path) -> Any:
    regular_file(path, "a torch optimizer or exp_avg_sq file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the pickle holds more than tensors and plain data and would execute code "
            f"({str(e).splitlines()[0][:200]})"
        ) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({str(e).splitlines()[0][:200]})") from e


def state_step(value: object) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return int(value)
    return None


@dataclass(frozen=True)
class _Entry:
    keys: tuple[Any, ...] | None  # path inside the torch object; None for a safetensors read
    step: int | None
    nbytes: int


@dataclass
class Source:
    """Second moments to convert: names and metadata up front, tensors one at a time."""

    path: Path
    kind: str
    metadata: dict[str, Any]
    entries: dict[str, _Entry]
    torch_file: MappedTorchFile | None = None
    checkpoint: Checkpoint | None = None

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, int | None]]:
        """(name, second moment, Adam step or None), in source order.

        A tensor may be a view of a memory map: drop it (``del``) before asking for the next one, so
        the map can be released when it is re-opened.
        """
        for name, entry in self.entries.items():
            if self.checkpoint is not None:
                yield name, self.checkpoint.read(name), entry.step
            else:
                yield name, _lookup(self.torch_file.before_read(entry.nbytes), entry.keys), entry.step

    def close(self) -> None:
        if self.torch_file is not None:
            self.torch_file.close()
        if self.checkpoint is not None:
            self.checkpoint.close()


def _lookup(obj: Any, keys: tuple[Any, ...]) -> torch.Tensor:
    for k in keys:
        obj = obj[k]
    return obj


def _torch_source(path: Path, kind: str, mapped: MappedTorchFile, metadata: dict[str, Any],
                  keys: dict[str, tuple[tuple[Any, ...], int | None]]) -> Source:
    obj = mapped.load()
    entries = {}
    for name, (key, step) in keys.items():
        t = _lookup(obj, key)
        entries[name] = _Entry(key, step, t.numel() * t.element_size())
    mapped.budget = max((e.nbytes for e in entries.values()), default=0)
    return Source(path, kind, metadata, entries, torch_file=mapped)


def optimizer_metadata(sd: dict, path: Path, steps: list[int | None]) -> dict[str, Any]:
    groups = sd.get("param_groups") or []
    betas = {float(g["betas"][1]) for g in groups if isinstance(g, dict) and isinstance(g.get("betas"), (tuple, list))}
    if len(betas) > 1:
        log.warning("%s: param groups use different beta2 %s; the sidecar records none", path, sorted(betas))
    decoupled = {g.get("decoupled_weight_decay") for g in groups if isinstance(g, dict)}
    optimizer = {frozenset({True}): "AdamW", frozenset({False}): "Adam"}.get(frozenset(decoupled), "Adam-type")
    known = {s for s in steps if s is not None}
    return {"optimizer": optimizer, "beta2": betas.pop() if len(betas) == 1 else None,
            "step": known.pop() if len(known) == 1 else None}


def _check_state_dict(sd: object, path: Path) -> tuple[dict, list[dict]]:
    well_formed = isinstance(sd, dict) and isinstance(sd.get("state"), dict)
    if not well_formed or not isinstance(sd.get("param_groups"), list):
        raise CheckpointError(f"{path}: not an optimizer state dict (expected 'state' and 'param_groups')")
    groups = sd["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{path}: every param group needs a 'params' list")
    for key, state in sd["state"].items():
        if not isinstance(state, dict) or not isinstance(state.get("exp_avg_sq"), torch.Tensor):
            raise CheckpointError(
                f"{path}: state {key!r} has no 'exp_avg_sq' tensor; only Adam-type optimizer states hold second moments"
            )
    return sd["state"], groups


def _named_state_source(path: Path, mapped: MappedTorchFile, sd: dict) -> Source:
    state, _ = _check_state_dict(sd, path)
    keys = {name: (("state", name, "exp_avg_sq"), state_step(s.get("step"))) for name, s in state.items()}
    meta = {"source": str(path), **optimizer_metadata(sd, path, [s for _, s in keys.values()])}
    return _torch_source(path, "name-keyed optimizer state", mapped, meta, keys)


def _torch_dict_source(path: Path, model_dir: Path | None, use_transformers: bool) -> Source:
    mapped = MappedTorchFile(path)
    obj = mapped.load()
    if isinstance(obj, dict) and "state" in obj and "param_groups" in obj:
        state = obj.get("state")
        if isinstance(state, dict) and state and all(isinstance(k, str) for k in state):
            return _named_state_source(path, mapped, obj)
        if model_dir is None:
            raise CheckpointError(
                f"{path}: optimizer state with integer ids and no names; pass --model MODEL_DIR (config.json and "
                "weights) or convert the whole Trainer checkpoint folder"
            )
        return _id_state_source(path, mapped, obj, model_dir, model_dir, use_transformers)
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{path}: expected a dict of parameter name -> exp_avg_sq tensor, or an optimizer state dict"
        )
    keys = {name: ((name,), None) for name in obj}
    return _torch_source(path, "name-keyed torch dict", mapped, {"source": str(path)}, keys)


def _model_parameters(config_dir: Path) -> tuple[list[str], set[str], str] | str:
    """(trainable names in ``named_parameters()`` order, names inside nn.LayerNorm, class name) of the model
    transformers builds on the meta device from ``config_dir/config.json``; or why it cannot."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed"
    if not (config_dir / "config.json").is_file():
        return f"{config_dir} has no config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(config_dir)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for configs it cannot build
        return f"transformers cannot build the model in {config_dir}/config.json ({type(e).__name__}: {str(e)[:200]})"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    layernorm = {
        f"{mod_name}.{p}" if mod_name else p
        for mod_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for p, _ in module.named_parameters(recurse=False)
    }
    return names, layernorm, type(model).__name__


def name_layouts(
    group_count: int, weights: Checkpoint, config_dir: Path, use_transformers: bool
) -> tuple[list[Layout], str]:
    """Candidate layouts for an id-keyed state, and where their names come from (for metadata)."""
    reason = "not tried"
    if use_transformers:
        found = _model_parameters(config_dir)
        if not isinstance(found, str):
            names, layernorm, cls = found
            return candidate_layouts(names, layernorm, group_count, ordered=True), f"transformers {cls} (meta device)"
        reason = found
    # Fallback: a single pickled .bin keeps state_dict order; safetensors headers are sorted by name.
    ordered = isinstance(weights, BinCheckpoint) and len(weights.files) == 1
    log.info(
        "naming optimizer states without transformers (%s); checkpoint order %s",
        reason,
        "kept" if ordered else "unknown, matching by shape",
    )
    how = "checkpoint tensor order" if ordered else "checkpoint tensor shapes"
    return candidate_layouts(weights.names(), (), group_count, ordered), f"{how} ({reason})"


def _id_state_source(
    path: Path, mapped: MappedTorchFile, sd: dict, weights_dir: Path, config_dir: Path, use_transformers: bool
) -> Source:
    state, groups = _check_state_dict(sd, path)
    group_ids = [list(g["params"]) for g in groups]
    flat = [i for ids in group_ids for i in ids]
    if len(set(flat)) != len(flat) or not all(type(i) is int for i in flat):
        raise CheckpointError(f"{path}: param group ids are not unique integers; the file is corrupt")
    stray = [k for k in state if k not in set(flat)]
    if stray:
        raise CheckpointError(f"{path}: state {stray[0]!r} belongs to no param group; the file is corrupt")
    weights = open_checkpoint(weights_dir)
    try:
        layouts, names_from = name_layouts(len(group_ids), weights, config_dir, use_transformers)
        shapes = {n: weights.meta(n).shape for n in weights.names()}
    finally:
        weights.close()
    state_shapes = {i: tuple(s["exp_avg_sq"].shape) for i, s in state.items()}
    names = assign_names(group_ids, state_shapes, layouts, shapes, str(path))
    keys = {names[i]: (("state", i, "exp_avg_sq"), state_step(state[i].get("step"))) for i in flat if i in state}
    skipped = [names[i] for i in flat if i not in state]
    if skipped:
        log.warning(
            "%s: %d parameters have no optimizer state (never updated), e.g. %s", path, len(skipped), skipped[0]
        )
    meta = {
        "source": str(path),
        **optimizer_metadata(sd, path, [s for _, s in keys.values()]),
        "names_from": names_from,
    }
    return _torch_source(path, "optimizer state (integer ids)", mapped, meta, keys)


def _trainer_source(folder: Path, model_dir: Path | None, use_transformers: bool) -> Source:
    weights_dir = next((d for d in (model_dir, folder) if d is not None and _has_weights(d)), None)
    if weights_dir is None:
        raise CheckpointError(
            f"{folder}: has {OPTIMIZER_FILE} but no model weights to name and check its states; pass --model MODEL_DIR"
        )
    config_dir = model_dir if model_dir is not None and (model_dir / "config.json").is_file() else folder
    mapped = MappedTorchFile(folder / OPTIMIZER_FILE)
    source = _id_state_source(folder / OPTIMIZER_FILE, mapped, mapped.load(), weights_dir, config_dir, use_transformers)
    source.kind = "Hugging Face Trainer checkpoint"
    source.metadata["source"] = str(folder)
    return source


def _has_weights(folder: Path) -> bool:
    return any(
        (folder / n).is_file()
        for n in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )


def _sharded_source(folder: Path) -> Any:
    """A DeepSpeed ZeRO or torch.distributed.checkpoint folder's source, or None when ``folder`` is neither."""
    from . import dcp_states, deepspeed_zero  # they build on this module

    if deepspeed_zero.is_zero_folder(folder):
        return deepspeed_zero.ZeroSource(folder)
    found = dcp_states.find_dcp_folder(folder)
    if found is not None:
        return dcp_states.DcpSource(found)
    return None


def open_source(
    src: str | os.PathLike, model_dir: str | os.PathLike | None = None, use_transformers: bool = True
) -> Any:
    """Open ``src`` for conversion (a ``Source``, ``ZeroSource`` or ``DcpSource``); ``model_dir`` names (and
    shape-checks) id-keyed optimizer states.

    ``use_transformers=False`` skips building the model and names ids from the checkpoint alone.
    """
    path = Path(src)
    model = Path(model_dir) if model_dir is not None else None
    if model is not None and not model.is_dir():
        raise CheckpointError(f"--model {model}: not a folder (expected config.json and model weights)")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / OPTIMIZER_FILE).is_file():
            return _trainer_source(path, model, use_transformers)
        sharded = _sharded_source(path)
        if sharded is not None:
            return sharded
        raise CheckpointError(
            f"{path}: no {OPTIMIZER_FILE}, DeepSpeed ZeRO rank files (global_step*/) or torch.distributed.checkpoint "
            "(.metadata) here; expected a Trainer checkpoint folder, a ZeRO or DCP folder, an exp_avg_sq "
            ".safetensors file or a torch .pt/.bin file"
        )
    regular_file(path, "an optimizer state, exp_avg_sq file or Trainer checkpoint folder")
    if path.suffix == ".safetensors":
        ckpt = open_checkpoint(path)
        for name in ckpt.names():
            if not ckpt.meta(name).dtype.is_floating_point:
                ckpt.close()
                raise CheckpointError(
                    f"{path}: tensor {name!r} is {ckpt.meta(name).dtype}, not a floating-point second moment"
                )
        entries = {n: _Entry(None, None, ckpt.meta(n).nbytes) for n in ckpt.names()}
        return Source(path, "name-keyed safetensors", {"source": str(path)}, entries, checkpoint=ckpt)
    if path.suffix in TORCH_SUFFIXES:
        return _torch_dict_source(path, model, use_transformers)
    raise CheckpointError(f"{path}: unknown second-moment source (expected .safetensors, .pt/.bin/.pth or a folder)")
