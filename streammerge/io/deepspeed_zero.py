"""DeepSpeed ZeRO (stage 1, 2, 3) checkpoints as a second-moment source, reassembled one parameter at a time.

A ZeRO checkpoint folder (``engine.save_checkpoint(DIR)``; HF Trainer's ``checkpoint-N/`` is such a DIR):

    DIR/latest                                   the tag of the newest save, e.g. "global_step500"
    DIR/global_step500/mp_rank_00_model_states.pt                 stage 1/2: names and shapes
    DIR/global_step500/zero_pp_rank_0_mp_rank_00_model_states.pt  stage 3 (one per rank; rank 0's is read)
    DIR/global_step500/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   R = 0 .. world size - 1

The model states hold ``param_shapes``: one ``{name: torch.Size}`` per param group, in the order the
flat groups were built. Each optimizer rank file holds ``optimizer_state_dict`` with the torch optimizer's
state over *flat* fp32 tensors. ``exp_avg_sq`` is laid out exactly like the fp32 master weights, so the
rules of DeepSpeed's ``utils/zero_to_fp32.py`` (which reassembles those weights) place every element:

- Stage 1 and 2 (``single_partition_of_fp32_groups``; ``base_optimizer_state`` is the torch state dict,
  or with elastic checkpoints a list of per-group states): per param group g, concatenating every rank's
  partition (rank order, each cut to its ``single_partition_of_fp32_groups[g]`` length, which drops the
  group padding the last rank carries) gives the group's flat vector; parameters follow in
  ``param_shapes[g]`` order, each followed by ``param_alignment_paddings[g][i]`` elements (absent: 0).
  The consumed length, rounded up to 2 × world size, must equal the flat length so rounded.
- Stage 3 (``fp32_flat_groups``; the torch state dict under ``optimizer_state_dict``, one state per
  sub-group): every rank's sub-groups, concatenated, form that rank's flat vector; every parameter (all
  groups' ``param_shapes`` in order) takes ceil(numel / world size) elements at the same running offset
  on every rank; rank pieces concatenated, cut to numel, give the parameter. The running offset must end
  exactly at the rank's flat length.

Rank files are pickles that name DeepSpeed classes (loss scaler, ``ZeroStageEnum``, ``fragment_address``).
They are opened with ``torch.load(weights_only=True, mmap=True)`` and those few names bound to inert
placeholders that only record their arguments, so no code from the file runs and DeepSpeed need not be
installed; any other class is refused. Only the pieces of one parameter are read at a time, and the rank
files are re-mapped once the bytes read through the current mappings would pass the largest parameter's
size, so resident mapped pages stay near one parameter whatever the number of ranks.
Not supported (refused with a message): tensor/pipeline model parallelism (``mp_rank_01``, ...).
Frozen parameters have no optimizer state and are skipped; tied parameters appear once, under the name
DeepSpeed records (``shared_params`` lists the aliases).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .second_moment_sources import MappedTorchFile, load_torch_file, optimizer_metadata, state_step

log = logging.getLogger(__name__)

OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class PickledObject:
    """An inert stand-in for a DeepSpeed class named in a pickle: keeps its arguments and state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


_STAND_INS = [(type(name.rsplit(".", 1)[1], (PickledObject,), {}), name) for name in DEEPSPEED_GLOBALS]


def load_deepspeed_file(path: Path) -> Any:
    """``torch.load(weights_only=True, mmap=True)`` with DeepSpeed's plain-data classes as inert stand-ins."""
    with torch.serialization.safe_globals(_STAND_INS):
        return load_torch_file(path)


# --- where each parameter's elements are: pure functions of the files' small metadata ---------------


@dataclass(frozen=True)
class Piece:
    """``count`` elements at ``start`` of flat tensor ``group`` in rank ``rank``'s file."""

    rank: int
    group: int
    start: int
    count: int


def _cover(rank: int, lengths: list[int], start: int, count: int) -> list[Piece]:
    """Pieces of rank ``rank``'s flat vector [start, start + count), where flat = concat of tensors of ``lengths``."""
    pieces, base = [], 0
    for g, n in enumerate(lengths):
        lo, hi = max(start, base), min(start + count, base + n)
        if lo < hi:
            pieces.append(Piece(rank, g, lo - base, hi - lo))
        base += n
    return pieces


def stage12_pieces(
    param_shapes: list[dict[str, tuple[int, ...]]], lean: list[list[int]], paddings: list[list[int]] | None
) -> tuple[dict[str, list[Piece]], str | None]:
    """Per parameter name, its pieces, for stage 1/2; or why the partitions do not add up.

    ``lean[r][g]``: elements of group g held by rank r (without group padding); ``paddings[g][i]``:
    alignment padding after parameter i of group g.
    """
    world = len(lean)
    out: dict[str, list[Piece]] = {}
    for g, shapes in enumerate(param_shapes):
        sizes = [lean[r][g] for r in range(world)]
        starts = [sum(sizes[:r]) for r in range(world)]
        pad = paddings[g] if paddings is not None else [0] * len(shapes)
        if len(pad) != len(shapes):
            return out, f"group {g} has {len(shapes)} parameters but {len(pad)} alignment paddings"
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            pieces = []
            for r in range(world):
                lo, hi = max(offset, starts[r]), min(offset + numel, starts[r] + sizes[r])
                if lo < hi:
                    pieces.append(Piece(r, g, lo - starts[r], hi - lo))
            if sum(p.count for p in pieces) != numel:
                return out, f"parameter {name!r} of group {g} runs past the {sum(sizes)} elements the ranks hold"
            out[name] = pieces
            offset += numel + pad[i]
        align = 2 * world
        if align * math.ceil(offset / align) != align * math.ceil(sum(sizes) / align):
            return out, f"group {g}: parameters take {offset} elements, the ranks hold {sum(sizes)}"
    return out, None


def stage3_pieces(
    param_shapes: list[dict[str, tuple[int, ...]]], lengths: list[list[int]]
) -> tuple[dict[str, list[Piece]], str | None]:
    """Per parameter name, its pieces, for stage 3 (``lengths[r]``: rank r's sub-group sizes)."""
    world = len(lengths)
    total = sum(lengths[0])
    out: dict[str, list[Piece]] = {}
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            if offset + part > total:
                return out, f"parameter {name!r} runs past the {total} elements each rank holds"
            pieces = [p for r in range(world) for p in _cover(r, lengths[r], offset, part)]
            out[name] = _trim(pieces, numel)
            offset += part
    if offset != total:
        return out, f"parameters take {offset} elements per rank, each rank holds {total}"
    return out, None


def _trim(pieces: list[Piece], numel: int) -> list[Piece]:
    """The first ``numel`` elements of ``pieces`` (the last rank's partition ends in padding)."""
    out, left = [], numel
    for p in pieces:
        if left <= 0:
            break
        out.append(Piece(p.rank, p.group, p.start, min(p.count, left)))
        left -= out[-1].count
    return out


# --- the folder ------------------------------------------------------------------------------------


def is_zero_folder(folder: Path) -> bool:
    """True for a ZeRO checkpoint DIR (``latest`` or ``global_step*/``) or one of its step folders."""
    if (folder / "latest").is_file() or any(OPTIM_FILE.match(p.name) for p in folder.iterdir()):
        return True
    return any(p.is_dir() and p.name.startswith("global_step") for p in folder.iterdir())


def step_folder(folder: Path) -> Path:
    """The folder holding the rank files: ``folder`` itself, the one ``latest`` names, or the only global_step*."""
    if any(OPTIM_FILE.match(p.name) for p in folder.iterdir()):
        return folder
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        target = folder / tag
        if not tag or "/" in tag or not target.is_dir():
            raise CheckpointError(f"{latest}: names {tag!r}, which is not a folder here; fix 'latest' or pass the "
                                  "global_step folder itself")
        return target
    steps = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("global_step"))
    if len(steps) != 1:
        raise CheckpointError(f"{folder}: {len(steps)} global_step folders ({', '.join(steps[:3])}) and no 'latest' "
                              "file; pass the one to convert")
    return folder / steps[0]


def _rank_files(folder: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        m = OPTIM_FILE.match(p.name)
        if not m:
            continue
        if int(m.group(2)) != 0:
            raise CheckpointError(f"{p}: model-parallel rank {int(m.group(2))}; tensor/pipeline-parallel ZeRO "
                                  "checkpoints are not supported (convert them with ds_to_universal first)")
        if int(m.group(1)) in found:
            raise CheckpointError(f"{p}: rank {m.group(1)} has two optimizer files ({found[int(m.group(1))].name})")
        found[int(m.group(1))] = p
    if not found:
        raise CheckpointError(f"{folder}: no *_optim_states.pt rank files")
    for r in range(max(found) + 1):
        if r not in found:
            name = found[min(found)].name.replace(f"rank_{min(found)}_", f"rank_{r}_", 1)
            raise CheckpointError(f"{folder / name}: missing rank file (ranks {sorted(found)} are here); the save "
                                  "was incomplete, or a rank's file was lost")
    return [found[r] for r in range(len(found))]


def _value(x: Any) -> Any:
    """An enum or namedtuple stand-in's first argument; plain values as they are."""
    return x.args[0] if isinstance(x, PickledObject) and x.args else x


def _model_states(folder: Path, stage: int) -> tuple[Path, dict]:
    name = "mp_rank_00_model_states.pt" if stage <= 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a ZeRO-{stage} checkpoint needs it for the parameter names")
    sd = load_deepspeed_file(path)
    shapes = sd.get("param_shapes") if isinstance(sd, dict) else None
    if isinstance(shapes, dict):
        shapes = [shapes]
    if not isinstance(shapes, list) or not all(isinstance(s, dict) for s in shapes):
        raise CheckpointError(f"{path}: no 'param_shapes' list; not a DeepSpeed ZeRO model-states file")
    return path, sd


class ZeroSource:
    """A ZeRO checkpoint: names and metadata up front (from the files' small pickles), tensors one at a time."""

    kind = "DeepSpeed ZeRO checkpoint"

    def __init__(self, folder: Path):
        self.path = folder
        self.step_dir = step_folder(folder)
        self.files = _rank_files(self.step_dir)
        heads = [self._optimizer_head(p) for p in self.files]
        self.stage = heads[0]["stage"]
        for p, h in zip(self.files, heads, strict=True):
            if h["stage"] != self.stage:
                raise CheckpointError(f"{p}: ZeRO stage {h['stage']}, but {self.files[0].name} has {self.stage}; "
                                      "the rank files come from different runs")
            if isinstance(h["world"], int) and h["world"] > len(self.files):
                n = len(self.files)
                missing = self.files[-1].name.replace(f"rank_{n - 1}_", f"rank_{n}_", 1)
                raise CheckpointError(f"{self.step_dir / missing}: missing rank file ({p.name} was saved by a world of "
                                      f"{h['world']} ranks); the save was incomplete, or a rank's file was lost")
            if h["world"] != len(self.files):
                raise CheckpointError(f"{p}: saved by a world of {h['world']} ranks, but {len(self.files)} rank files "
                                      f"are in {self.step_dir}; the save is incomplete or mixed")
            if h["steps"] != heads[0]["steps"]:
                raise CheckpointError(f"{p}: Adam step {h['steps']} but {self.files[0].name} has {heads[0]['steps']}; "
                                      "the rank files come from different steps")
        model_path, model_sd = _model_states(self.step_dir, self.stage)
        shapes = [{n: tuple(s) for n, s in g.items()} for g in model_sd["param_shapes"]]
        self.pieces = self._place(shapes, heads, model_path)
        self.shapes = {n: s for g in shapes for n, s in g.items()}
        config = model_sd.get("ds_config") if isinstance(model_sd.get("ds_config"), dict) else {}
        mixed = [k for k in ("bf16", "fp16") if isinstance(config.get(k), dict) and config[k].get("enabled")]
        precision = f"{mixed[0]} mixed precision" if mixed else "fp32"
        largest = max((math.prod(s) * 4 for s in self.shapes.values()), default=0)
        self._mapped = [MappedTorchFile(p, load_deepspeed_file) for p in self.files]
        self._budget, self._touched = largest, 0
        step = heads[0]["steps"][0] if len(set(heads[0]["steps"])) == 1 else None
        self.metadata = {
            "source": str(folder),
            **optimizer_metadata(heads[0]["torch_sd"], self.files[0], [step]),
            "layout": f"DeepSpeed ZeRO-{self.stage}, {len(self.files)} ranks, {precision}, {len(shapes)} param "
                      f"groups, {sum(len(g) for g in shapes)} parameters ({self.step_dir.name})",
        }
        frozen = model_sd.get("frozen_param_shapes") or {}
        if frozen:
            log.info("%s: %d frozen parameters have no optimizer state (skipped)", model_path, len(frozen))

    @property
    def names(self) -> list[str]:
        return list(self.pieces)

    def _optimizer_head(self, path: Path) -> dict[str, Any]:
        """The small facts of one rank file: stage, world size, flat lengths, steps, where exp_avg_sq is."""
        sd = load_deepspeed_file(path)
        osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
        if not isinstance(osd, dict):
            raise CheckpointError(f"{path}: no 'optimizer_state_dict'; not a DeepSpeed ZeRO optimizer file")
        world = _value(osd.get("partition_count"))
        world = max(world) if isinstance(world, list) else world
        if "fp32_flat_groups" in osd:
            stage, flats, torch_sd = 3, osd["fp32_flat_groups"], osd.get("optimizer_state_dict")
            key = ("optimizer_state_dict", "optimizer_state_dict", "state")
        elif "single_partition_of_fp32_groups" in osd:
            stage = _value(osd.get("zero_stage", 1))  # BF16_Optimizer (ZeRO-1 in bf16) records no stage
            flats, torch_sd = osd["single_partition_of_fp32_groups"], osd.get("base_optimizer_state")
            key = ("optimizer_state_dict", "base_optimizer_state", "state")
            if isinstance(torch_sd, list):  # elastic checkpoint: one lean state per group
                torch_sd, key = {"state": dict(enumerate(torch_sd)), "param_groups": []}, key[:2]
        else:
            raise CheckpointError(f"{path}: neither fp32_flat_groups (ZeRO-3) nor single_partition_of_fp32_groups "
                                  "(ZeRO-1/2); not a DeepSpeed ZeRO optimizer file")
        states = torch_sd.get("state") if isinstance(torch_sd, dict) else None
        if not isinstance(flats, list) or not isinstance(states, dict) or not isinstance(world, int):
            raise CheckpointError(f"{path}: malformed ZeRO optimizer state (flat groups, state or partition_count)")
        lengths, steps = [], []
        for g, flat in enumerate(flats):
            state = states.get(g)
            v = state.get("exp_avg_sq") if isinstance(state, dict) else None
            if not isinstance(v, torch.Tensor) or not isinstance(flat, torch.Tensor) or v.numel() < flat.numel():
                raise CheckpointError(f"{path}: flat group {g} has no exp_avg_sq of at least its {flat.numel()} "
                                      "elements; only Adam-type optimizer states hold second moments")
            lengths.append(flat.numel())
            steps.append(state_step(state.get("step")))
            if steps[-1] is None:  # FusedAdam keeps the step in its param group; elastic saves keep it apart
                groups = torch_sd.get("param_groups") or []
                group = groups[g] if g < len(groups) and isinstance(groups[g], dict) else {}
                steps[-1] = state_step(group.get("step", osd.get("base_optimizer_state_step")))
        return {"stage": stage, "world": world, "lengths": lengths, "steps": steps, "key": key,
                "paddings": osd.get("param_alignment_paddings"), "torch_sd": torch_sd}

    def _place(self, shapes: list[dict], heads: list[dict], model_path: Path) -> dict[str, list[Piece]]:
        self._key = heads[0]["key"]
        lengths = [h["lengths"] for h in heads]
        if self.stage <= 2:
            for p, h in zip(self.files, heads, strict=True):
                if len(h["lengths"]) != len(shapes):
                    raise CheckpointError(f"{p}: {len(h['lengths'])} flat groups, but {model_path.name} lists "
                                          f"{len(shapes)} param groups; the files come from different runs")
            pieces, why = stage12_pieces(shapes, lengths, heads[0]["paddings"])
        else:
            for p, h in zip(self.files, heads, strict=True):
                if sum(h["lengths"]) != sum(lengths[0]):
                    raise CheckpointError(f"{p}: holds {sum(h['lengths'])} elements, rank 0 holds {sum(lengths[0])}; "
                                          "the partitions do not add up")
            pieces, why = stage3_pieces(shapes, lengths)
        if why:
            raise CheckpointError(f"{self.files[0]}: the partitions do not add up ({why}); the rank files and "
                                  f"{model_path.name} come from different runs")
        return pieces

    def _read(self, piece: Piece, what: str) -> torch.Tensor:
        nbytes = piece.count * 4
        if self._touched and self._touched + nbytes > self._budget:
            for m in self._mapped:  # drop every view of the old mappings before mapping again
                m.close()
            self._touched = 0
        self._touched += nbytes
        obj = self._mapped[piece.rank].load()
        flats = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        path = (*self._key, piece.group, "exp_avg_sq") if what == "exp_avg_sq" else ("optimizer_state_dict", flats,
                                                                                       piece.group)
        for k in path:
            obj = obj[k]
        return obj[piece.start : piece.start + piece.count]

    def tensors(self, what: str = "exp_avg_sq") -> Iterator[tuple[str, torch.Tensor, int | None]]:
        """(name, fp32 exp_avg_sq in the parameter's shape, step), one parameter at a time.

        ``what="fp32_weights"`` gives the fp32 master weights instead (same flat layout; for checks).
        """
        step = self.metadata.get("step")
        for name, pieces in self.pieces.items():
            out = torch.empty(math.prod(self.shapes[name]), dtype=torch.float32)
            done = 0
            for p in pieces:
                try:
                    out[done : done + p.count] = self._read(p, what)
                except CheckpointError as e:
                    raise CheckpointError(f"{e} (reading parameter {name!r})") from e
                except (KeyError, IndexError, TypeError, RuntimeError) as e:  # a file changed since it was opened
                    raise CheckpointError(f"{self.files[p.rank]}: cannot read {what} of parameter {name!r} "
                                          f"({type(e).__name__}: {str(e)[:200]})") from e
                done += p.count
            yield name, out.view(self.shapes[name]), step
            del out

    def close(self) -> None:
        for m in getattr(self, "_mapped", []):
            m.close()
