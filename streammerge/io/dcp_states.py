"""FSDP / torch.distributed.checkpoint (DCP) optimizer states as a second-moment source, one tensor at a time.

A DCP folder (``dcp.save(state, checkpoint_id=DIR)``, as Accelerate saves FSDP optimizer states into
``checkpoint-N/optimizer_0/`` and torchtitan into ``step-N/``):

    DIR/.metadata          pickled ``Metadata``: per flattened key its global size, dtype and chunks
                           (offsets, sizes), and per chunk the file, byte offset and length
    DIR/__R_0.distcp       rank R's chunks (each a ``torch.save``d tensor; DCP's safetensors format is refused)

Optimizer states saved through ``get_optimizer_state_dict`` are keyed by parameter name:
``[PREFIX.]state.<parameter name>.exp_avg_sq`` (``PREFIX`` is ``optimizer`` when saved as
``{"optimizer": ...}``). Names are mapped to the model's parameter names by dropping wrapper components
(``_orig_mod``, ``module``, ``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``); FSDP1 flat
parameters (``_flat_param``) cannot be split and are refused.

``.metadata`` is read with a restricted unpickler (DCP itself uses plain ``pickle.load``) that builds
inert ``_DcpRecord`` stand-ins for DCP's metadata dataclasses and enums, plus torch sizes and dtypes,
so nothing in the pickle runs and ``torch.distributed.checkpoint`` (about a second to import) is not
imported. Each tensor is then assembled at full size, one at a time: every chunk's ``torch.save``
archive is parsed in place and its raw bytes read straight into the chunk's slice of the full tensor
(``torch_save_chunk.read_chunk_into``; a row slab, as FSDP2's ``Shard(0)`` writes, is one contiguous
``readinto``), so memory holds one parameter (plus one chunk for non-row chunks). Chunks saved through
DCP's stream extensions (``_extensions``, e.g. ZStandard) are undone by DCP's own extension registry.
Before reading, every chunk file must exist, lie inside the folder and be long enough, and every
tensor's chunks must tile it exactly.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from .torch_save_chunk import Window, read_chunk_into

log = logging.getLogger(__name__)

METADATA = ".metadata"
STATE_KEY = re.compile(r"^(?:(?P<prefix>.*?)\.)?state\.(?P<fqn>.+)\.(?P<what>exp_avg_sq|step)$")
WRAPPERS = frozenset({"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")

# Plain constructors the metadata pickle names (``_get_layout`` maps a name to a torch.layout and is on torch's
# own weights-only allow list; ``StorageMeta.checkpoint_id`` may be a path).
_PLAIN = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
          ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


def state_key(key: str, path: object = None) -> tuple[str, str] | None:
    """(parameter FQN, "exp_avg_sq" or "step") for an optimizer-state key, else None.

    ``path``: the key's path in the saved (nested) state dict from ``Metadata.planner_data``, e.g.
    ``("optimizer", "state", "layers.0.weight", "exp_avg_sq")``; exact where present. Otherwise the
    flattened key is parsed (first ``state.`` component).
    """
    if isinstance(path, tuple) and len(path) >= 3 and path[-3] == "state" and isinstance(path[-2], str):
        return (path[-2], path[-1]) if path[-1] in ("exp_avg_sq", "step") else None
    m = STATE_KEY.match(key)
    return (m.group("fqn"), m.group("what")) if m else None


def model_name(fqn: str) -> str:
    """The model's parameter name for an optimizer-state FQN: wrapper components dropped."""
    return ".".join(part for part in fqn.split(".") if part not in WRAPPERS)


class _DcpRecord:
    """Stands in for one of DCP's metadata dataclasses/enums: attributes from the pickled state, no DCP code run.

    Importing ``torch.distributed.checkpoint`` (to build its own classes) costs about a second; the reader
    needs only the attributes. Enum members arrive as ``Class(value)`` and keep ``value``.
    """

    def __init__(self, *args: Any) -> None:  # an enum member: Class(value)
        if len(args) != 1:
            raise pickle.UnpicklingError(f"{type(self).__name__}{args!r} is not DCP metadata")
        self.value = args[0]

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) form
        elif type(self).__name__ == "TensorProperties" and isinstance(state, tuple) and len(state) == 5:
            state = dict(zip(("dtype", "layout", "requires_grad", "memory_format", "pin_memory"), state, strict=True))
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"{type(self).__name__}: unexpected pickled state")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


_RECORD_CLASSES: dict[tuple[str, str], type] = {}


def _record_class(module: str, name: str) -> type:
    if (module, name) not in _RECORD_CLASSES:
        _RECORD_CLASSES[module, name] = type(name, (_DcpRecord,), {"__module__": __name__})
    return _RECORD_CLASSES[module, name]


class _MetadataUnpickler(pickle.Unpickler):
    """Builds ``_DcpRecord`` stand-ins for DCP's metadata classes, ``torch.Size``, torch dtypes/layouts and
    ``_PLAIN``; refuses every other global (nothing the pickle names is called but these)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and name.isidentifier() and not name.startswith("__"):
            return _record_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if (module, name) in _PLAIN:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


def read_metadata(folder: Path) -> Any:
    path = folder / METADATA
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not readable torch.distributed.checkpoint metadata "
                              f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from e
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata")
    return md


def find_dcp_folder(folder: Path) -> Path | None:
    """``folder`` if it holds ``.metadata``; else its one ``optimizer*/`` (Accelerate) subfolder that does."""
    if (folder / METADATA).is_file():
        return folder
    found = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("optimizer") and
                   (p / METADATA).is_file())
    if len(found) > 1:
        raise CheckpointError(f"{folder}: several DCP optimizer folders ({', '.join(p.name for p in found)}); "
                              "pass the one to convert")
    return found[0] if found else None


def _tiles(size: tuple[int, ...], chunks: list[Any]) -> bool:
    """True when the chunks' boxes lie inside ``size``, do not overlap and cover it exactly."""
    boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in chunks]
    for off, sz in boxes:
        if len(off) != len(size) or len(sz) != len(size):
            return False
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(off, sz, size, strict=True)):
            return False
    if sum(math.prod(sz) for _, sz in boxes) != math.prod(size):
        return False
    if all(off[1:] == (0,) * (len(size) - 1) and sz[1:] == size[1:] for off, sz in boxes):
        rows = sorted((off[0], sz[0]) for off, sz in boxes if sz[0])  # row slabs (FSDP's Shard(0)): 1-D intervals
        return all(a + n <= b for (a, n), (b, _) in zip(rows, rows[1:], strict=False))

    def overlap(a: tuple, b: tuple) -> bool:
        return all(max(ao, bo) < min(ao + an, bo + bn) for ao, an, bo, bn in zip(*a, *b, strict=True))

    return not any(overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _untransformed(f: BinaryIO, info: Any) -> BinaryIO:
    """A chunk saved through DCP stream extensions (e.g. ``ZStandard``), undone as DCP's reader does, in memory."""
    from torch.distributed.checkpoint._extension import ExtensionRegistry  # only for such chunks: ~1 s import

    stream: Any = Window(f, info.offset, info.length)
    for extension in ExtensionRegistry().from_descriptor_list(info.transform_descriptors):
        stream = extension.transform_from(stream)
    return io.BytesIO(stream.read())


class DcpSource:
    """A DCP folder's ``exp_avg_sq`` tensors by model parameter name, read one tensor at a time."""

    kind = "torch.distributed.checkpoint (FSDP) folder"

    def __init__(self, folder: Path):
        self.path = folder
        md = read_metadata(folder)
        self._md = md
        found: dict[str, str] = {}
        steps: dict[str, str] = {}
        planner = md.planner_data if isinstance(getattr(md, "planner_data", None), dict) else {}
        for key, item in md.state_dict_metadata.items():
            parsed = state_key(key, planner.get(key))
            if parsed is None or not hasattr(item, "chunks"):
                continue
            fqn, what = parsed
            if "_flat_param" in fqn.split(".")[-1] or "flat_param" in fqn:
                raise CheckpointError(f"{folder / METADATA}: {key!r} is an FSDP1 flat parameter (several parameters in "
                                      "one); save with get_optimizer_state_dict, which keys states by parameter name")
            name = model_name(fqn)
            target = found if what == "exp_avg_sq" else steps
            if name in target:
                raise CheckpointError(f"{folder / METADATA}: {key!r} and {target[name]!r} both name parameter {name!r}")
            target[name] = key
        if not found:
            raise CheckpointError(f"{folder / METADATA}: no '[optimizer.]state.<parameter>.exp_avg_sq' tensors; only "
                                  "Adam-type optimizer states saved by parameter name hold second moments")
        for key in [*found.values(), *steps.values()]:
            item = md.state_dict_metadata[key]
            if not (isinstance(getattr(getattr(item, "properties", None), "dtype", None), torch.dtype)
                    and isinstance(item.size, tuple) and all(isinstance(n, int) and n >= 0 for n in item.size)):
                raise CheckpointError(f"{folder / METADATA}: {key!r} has no tensor dtype and size; the metadata is "
                                      "corrupt")
        files = {info.relative_path for info in md.storage_data.values()}
        root = folder.resolve()
        for rel in sorted(files):
            if Path(rel).is_absolute() or root not in (folder / rel).resolve().parents:
                raise CheckpointError(f"{folder / METADATA}: chunk file {rel!r} lies outside the checkpoint folder; "
                                      "the metadata is corrupt")
            if not (folder / rel).is_file():
                raise CheckpointError(f"{folder / rel}: missing rank file (listed in {METADATA}); the save was "
                                      "incomplete, or a rank's file was lost")
        sizes = {rel: (folder / rel).stat().st_size for rel in files}
        stored: dict[str, int] = {}
        for index, info in md.storage_data.items():
            if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[info.relative_path]:
                raise CheckpointError(f"{folder / info.relative_path}: shorter than {METADATA} says ({index.fqn!r} "
                                      f"at bytes {info.offset}+{info.length}); truncated, or from another save")
            stored[index.fqn] = stored.get(index.fqn, 0) + info.length
        for name, key in found.items():
            item = md.state_dict_metadata[key]
            need = math.prod(item.size) * item.properties.dtype.itemsize
            if not _tiles(tuple(item.size), item.chunks) or stored.get(key, 0) < need:
                raise CheckpointError(f"{folder / METADATA}: the shards of {key!r} (parameter {name!r}) do not add up "
                                      f"to its size {list(item.size)}; the metadata is corrupt or mixed")
        self.keys = found
        self.shapes = {name: tuple(md.state_dict_metadata[key].size) for name, key in found.items()}
        self._chunks = {(index.fqn, tuple(getattr(index, "offset", None) or ())): info
                        for index, info in md.storage_data.items()}
        step_keys = {k: name for name, k in steps.items() if name in found}
        step_values = {float(t.item()) for t in self._load(step_keys).values()} if step_keys else set()
        step = int(step_values.pop()) if len(step_values) == 1 else None
        if len(step_values) > 1:
            log.warning("%s: parameters have different Adam steps; the sidecar records none", folder)
        self.metadata = {
            "source": str(folder), "optimizer": "Adam-type", "step": step, "beta2": None,
            "layout": f"torch.distributed.checkpoint, {len(files)} rank files, {len(found)} parameters",
        }

    @property
    def names(self) -> list[str]:
        return list(self.keys)

    def _load(self, keys: dict[str, str]) -> dict[str, torch.Tensor]:
        """Full tensors for ``{key: parameter name}``, each chunk read straight into its slice."""
        out = {}
        for key, name in keys.items():
            item = self._md.state_dict_metadata[key]
            full = out[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
            for chunk in item.chunks:
                info = self._chunks.get((key, tuple(chunk.offsets)))
                path = self.path / info.relative_path if info else self.path / METADATA
                try:
                    if info is None:
                        raise ValueError(f"no storage entry for the chunk at {list(chunk.offsets)}")
                    dest = full[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))]
                    with open(path, "rb", buffering=0) as f:
                        if getattr(info, "transform_descriptors", None):
                            read_chunk_into(_untransformed(f, info), 0, None, dest)
                        else:
                            read_chunk_into(f, info.offset, info.length, dest)
                except Exception as e:  # noqa: BLE001 - zip, pickle, torch.load and OS errors alike: name the file
                    at = f" at bytes {info.offset}+{info.length}" if info else ""
                    raise CheckpointError(f"{path}: cannot read {key!r} (parameter {name!r}){at}: "
                                          f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from e
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, int | None]]:
        step = self.metadata.get("step")
        for name, key in self.keys.items():
            yield name, self._load({key: name})[key].to(torch.float32), step

    def close(self) -> None:
        pass


__all__ = ["DcpSource", "find_dcp_folder", "model_name", "read_metadata"]
