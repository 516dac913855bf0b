"""Second-moment sidecars: Adam's ``exp_avg_sq`` per parameter, for OTA merging.

    import streammerge.sidecar as sidecar
    sc = sidecar.load("expert.sidecar")          # or a name-keyed exp_avg_sq .safetensors file
    sc.keys(); sc.metadata; sc.get(name); sc.get_flat(name, start, count); sc.shape(name)
    sidecar.convert("checkpoint-500/", "expert.sidecar", rank=1)     # Trainer/ZeRO/DCP folder, .safetensors, .pt
    sidecar.export(model, optimizer, "expert.sidecar", rank=1)       # from a live training process

``get`` returns the second moment as represented (exact, or reconstructed from its factors), fp32,
full shape; ``get_flat`` returns flat elements ``[start, start + count)`` (row-major) and reads or
computes only what they need. Both return tensors the caller owns. The file format is specified in
``streammerge/io/sidecar_format.py``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import CheckpointError, OutputError, StreamMergeError
from .io.paths import regular_file
from .io.reader import SafetensorsCheckpoint
from .io.second_moment_factors import Factored, factorize, rank1_columns, reconstruct, reconstruct_flat
from .io.second_moment_sources import open_source
from .io.sidecar_format import MAGIC, SidecarReader, SidecarWriter, StorageDtype, TensorRecord

log = logging.getLogger(__name__)

Rank = int | Literal["exact"]


class SecondMoments:
    """What a merge reads: second moments by parameter name. Use ``load`` to open one."""

    path: Path
    metadata: dict[str, Any]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in self.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def representation(self, name: str) -> str:
        return "exact"

    def stored_bytes(self, name: str) -> int:
        """Bytes this tensor takes in the file."""
        raise NotImplementedError

    def step(self, name: str) -> int | None:
        """Adam's step count for ``name`` when known (for bias correction)."""
        return self.metadata.get("step")

    @property
    def beta2(self) -> float | None:
        return self.metadata.get("beta2")

    def get(self, name: str) -> torch.Tensor:
        """The second moment of ``name``: fp32, full shape."""
        raise NotImplementedError

    def get_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        """Flat elements ``[start, start + count)`` of ``get(name)``: fp32, 1-D."""
        raise NotImplementedError

    def get_flat_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """``get_flat(name, start, out.numel())`` into ``out`` (fp32, 1-D, contiguous), memory the caller
        reuses (a fresh buffer per read costs a page fault per 4 KiB, more than the copy)."""
        out.copy_(self.get_flat(name, start, out.numel()))

    def rank1_chunk(self, name: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """For a tensor stored as rank-1 factors: ``(rows, cols, offset)`` with ``get_flat(name, start,
        count)`` = ``outer(rows, cols).reshape(-1)[offset : offset + count]`` up to rounding, both
        factors checked non-negative and finite (else ``CheckpointError``). None for other
        representations."""
        return None

    def _check_range(self, name: str, start: int, count: int) -> None:
        numel = math.prod(self.shape(name))
        if start < 0 or count < 0 or start + count > numel:
            raise ValueError(f"range [{start}, {start + count}) outside {name} of {numel} elements")

    def close(self) -> None:
        pass

    def __enter__(self) -> SecondMoments:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Sidecar(SecondMoments):
    """A streammerge sidecar file. Caches the last decoded frame (exact) or factors (compact)."""

    def __init__(self, path: str | os.PathLike):
        self._reader = SidecarReader(path)
        self.path = self._reader.path
        self.metadata = self._reader.metadata
        self._frame: tuple[str, int, torch.Tensor] | None = None
        self._factors: tuple[str, Factored] | None = None
        self._rank1: tuple[torch.Tensor, torch.Tensor] | None = None  # (r, c / Σv) of self._factors' tensor

    def keys(self) -> list[str]:
        return list(self._reader.records)

    def __contains__(self, name: str) -> bool:
        return name in self._reader.records

    def record(self, name: str) -> TensorRecord:
        return self._reader.record(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.record(name).shape

    def representation(self, name: str) -> str:
        return self._reader.record(name).representation

    def stored_bytes(self, name: str) -> int:
        return self._reader.record(name).stored_bytes

    def step(self, name: str) -> int | None:
        step = self._reader.record(name).step
        return step if step is not None else self.metadata.get("step")

    def _compact(self, record: TensorRecord) -> Factored:
        if self._factors is None or self._factors[0] != record.name:
            self._factors = None
            self._factors = (record.name, self._reader.factored(record))
            self._rank1 = None
        return self._factors[1]

    def rank1_chunk(self, name: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        record = self._reader.record(name)
        if record.representation != "rank1":
            return None
        self._check_range(name, start, count)
        f = self._compact(record)
        if self._rank1 is None:  # once per tensor: the column scale and the factors' check
            r, cols = f.parts["r"], rank1_columns(f)
            for part, x in (("r", r), ("c / total", cols)):
                if x.numel() and not (bool(torch.isfinite(x).all()) and float(x.min()) >= 0):
                    raise CheckpointError(f"{self.path}: tensor {name!r}: rank-1 factor {part} has negative, NaN or "
                                          "infinite values; the sidecar is corrupt (convert it again)")
            self._rank1 = (r, cols)
        r, cols = self._rank1
        n = cols.numel()
        row_lo, row_hi = start // n, (start + count - 1) // n + 1 if count else start // n
        return r[row_lo:row_hi], cols, start - row_lo * n

    def get(self, name: str) -> torch.Tensor:
        record = self._reader.record(name)
        if record.representation == "exact":
            return self._reader.payload(record).reshape(record.shape)
        return reconstruct(self._compact(record))  # computed afresh from the factors: the caller's own

    def _frame_of(self, record: TensorRecord, j: int) -> torch.Tensor:
        if self._frame is None or self._frame[:2] != (record.name, j):
            self._frame = None
            self._frame = (record.name, j, self._reader.frame(record, j))
        return self._frame[2]

    def get_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        record = self._reader.record(name)
        self._check_range(name, start, count)
        if record.representation != "exact":
            return reconstruct_flat(self._compact(record), start, count)  # fresh, as in get()
        per = self._reader.frame_elements
        out = torch.empty(count, dtype=torch.float32)
        done = 0
        while done < count:
            j, offset = divmod(start + done, per)
            piece = self._frame_of(record, j)[offset : offset + count - done]
            out[done : done + piece.numel()] = piece
            done += piece.numel()
        return out

    def close(self) -> None:
        self._frame = self._factors = None
        self._reader.close()


class RawSecondMoments(SecondMoments):
    """A name-keyed ``exp_avg_sq`` safetensors file (the OTA authors' export), read tensor by tensor.

    ``metadata`` has ``source`` and, when the file's ``__metadata__`` carries them as numbers, ``step``
    and ``beta2``; ``optimizer`` is unknown (None).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ckpt = SafetensorsCheckpoint(self.path, [self.path], None)
        for name in self._ckpt.names():
            if not self._ckpt.meta(name).dtype.is_floating_point:
                self._ckpt.close()
                dtype = self._ckpt.meta(name).dtype
                raise CheckpointError(f"{self.path}: tensor {name!r} is {dtype}, not a second moment")
        self.metadata = {"source": str(self.path), "optimizer": None, **_numeric_metadata(self._ckpt.metadata)}

    def keys(self) -> list[str]:
        return self._ckpt.names()

    def __contains__(self, name: str) -> bool:
        return name in self._ckpt

    def shape(self, name: str) -> tuple[int, ...]:
        return self._ckpt.meta(name).shape

    def stored_bytes(self, name: str) -> int:
        return self._ckpt.meta(name).nbytes

    def get(self, name: str) -> torch.Tensor:
        return self._ckpt.read(name).to(torch.float32)

    def get_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        self._check_range(name, start, count)
        return self._ckpt.read(name, start, count).to(torch.float32)

    def get_flat_into(self, name: str, start: int, out: torch.Tensor) -> None:
        self._check_range(name, start, out.numel())
        if self._ckpt.meta(name).dtype == torch.float32:
            self._ckpt.read_into(name, start, out)  # straight from the file, no fresh buffer
        else:
            out.copy_(self._ckpt.read(name, start, out.numel()))

    def close(self) -> None:
        self._ckpt.close()


def _numeric_metadata(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"step": None, "beta2": None}
    try:
        step = int(raw.get("step", ""))
        out["step"] = step if step >= 0 else None
    except ValueError:
        pass
    try:
        beta2 = float(raw.get("beta2", ""))
        out["beta2"] = beta2 if 0 < beta2 < 1 else None
    except ValueError:
        pass
    return out


def load(path: str | os.PathLike) -> SecondMoments:
    """Open a sidecar, or a raw name-keyed exp_avg_sq ``.safetensors`` file, by its first bytes."""
    p = regular_file(path, "a second-moment file (sidecar or exp_avg_sq .safetensors)")
    try:
        with open(p, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot open second moments ({e.strerror})") from e
    if head == MAGIC:
        return Sidecar(p)
    if p.suffix == ".safetensors":
        return RawSecondMoments(p)
    raise CheckpointError(
        f"{p}: not a streammerge sidecar (bad magic bytes) nor a .safetensors file; "
        "convert it with 'streammerge sidecar convert'"
    )


def parse_rank(rank: Rank | str) -> int | None:
    """``"exact"`` -> None; ``1`` / ``"1"`` -> 1; ``k`` -> k (k >= 1). Raises StreamMergeError otherwise."""
    if rank == "exact":
        return None
    try:
        k = int(rank)
    except (TypeError, ValueError):
        k = 0
    if k < 1 or isinstance(rank, bool) or (isinstance(rank, float) and not rank.is_integer()):
        raise StreamMergeError(f"rank {rank!r}: expected 'exact' or a positive integer (1 = row/column sums)")
    return k


def _checked(name: str, v: torch.Tensor, where: Path) -> torch.Tensor:
    if not v.dtype.is_floating_point:
        raise CheckpointError(f"{where}: tensor {name!r} is {v.dtype}, not a floating-point second moment")
    if v.numel():
        lo, hi = torch.aminmax(v)
        if not (lo >= 0 and torch.isfinite(hi)):  # NaN fails both comparisons
            raise CheckpointError(
                f"{where}: second moment {name!r} has negative, NaN or infinite values "
                f"(min {float(lo):g}, max {float(hi):g}); the optimizer state is corrupt"
            )
    return v


def _write(
    out: Path,
    items: Iterator[tuple[str, torch.Tensor, int | None]],
    rank: int | None,
    dtype: StorageDtype,
    metadata: dict[str, Any],
    where: Path,
) -> Path:
    with SidecarWriter(out, dtype) as writer:
        for name, v, step in items:
            writer.add(name, factorize(_checked(name, v, where), rank), step)
            del v  # may be a view of a memory map; let it go before the next tensor is mapped
        if not writer.records:
            raise CheckpointError(f"{where}: has no second moments to convert")
        return writer.finish(metadata)


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    kind: str  # what SRC was
    tensors: int
    stored_bytes: int  # compressed tensor bytes in OUT
    fp32_bytes: int  # the same tensors as fp32 exp_avg_sq
    names_from: str | None  # how integer optimizer ids were named, if they were


def _refuse_same_file(src: Path, out: Path) -> None:
    if out.exists() and src.exists() and os.path.samefile(src, out):
        raise OutputError(f"{out}: is the input; choose another output file")
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a folder; the sidecar is one file, e.g. {out / 'exp_avg_sq.sidecar'}")


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    rank: Rank = 1,
    model: str | os.PathLike | None = None,
    dtype: StorageDtype = "F32",
    overwrite: bool = False,
    use_transformers: bool = True,
) -> ConvertResult:
    """Convert second moments at ``src`` into the sidecar file ``out``, streaming one tensor at a time.

    ``src``: a name-keyed exp_avg_sq ``.safetensors`` file, a ``.pt``/``.bin`` torch file (name-keyed
    dict or optimizer state), a Hugging Face Trainer checkpoint folder (``optimizer.pt`` with integer
    ids; names are recovered and shape-checked, see ``io/second_moment_sources.py``), a DeepSpeed ZeRO
    1/2/3 folder (``io/deepspeed_zero.py``) or a torch.distributed.checkpoint (FSDP) folder
    (``io/dcp_states.py``), reassembled one parameter at a time. ``model``: a model
    folder (config.json, weights) for naming an id-keyed state. ``rank``: "exact", 1 (row/column sums)
    or k (truncated SVD). ``dtype``: storage dtype of the stored values/factors (F32, BF16, F16).
    """
    k = parse_rank(rank)
    src_p, out_p = Path(src), Path(out)
    _refuse_same_file(src_p, out_p)
    if out_p.exists() and not overwrite:
        raise OutputError(f"{out_p}: exists; choose a new file or pass --overwrite")
    if not out_p.parent.is_dir():
        raise OutputError(f"{out_p.parent}: no such folder for the output")
    source = open_source(src_p, model, use_transformers)
    try:
        _write(out_p, source.tensors(), k, dtype, dict(source.metadata), src_p)
    finally:
        source.close()
    with Sidecar(out_p) as sc:
        records = [sc.record(n) for n in sc.keys()]
    return ConvertResult(
        out_p,
        source.kind,
        len(records),
        sum(r.stored_bytes for r in records),
        sum(r.numel * 4 for r in records),
        source.metadata.get("names_from"),
    )


def export(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    path: str | os.PathLike,
    rank: Rank = 1,
    dtype: StorageDtype = "F32",
    source: str | None = None,
) -> Path:
    """Write the second moments of a live ``torch.optim.Adam``/``AdamW`` (or any optimizer whose state has
    ``exp_avg_sq``) as a sidecar at ``path``, named by ``model.named_parameters()``.

    States are matched to names by parameter identity, so any param-group layout works. Parameters that
    have no optimizer state (frozen, or never updated) are skipped and logged. Call it on one process
    with full, unsharded fp32 states on the parameters themselves:

    - DeepSpeed ZeRO (1-3) and FSDP: states are shards; save a checkpoint (``engine.save_checkpoint``,
      or ``dcp.save`` of ``get_optimizer_state_dict``) and ``convert`` that folder, which reassembles
      one parameter at a time.
    A state whose shape differs from its parameter's (a shard) is refused with that advice.
    """
    k = parse_rank(rank)
    items, beta2_by_param = _live_states(model, optimizer)
    steps = {_state_step(optimizer.state[p]) for _, p in items}
    betas = {beta2_by_param.get(id(p)) for _, p in items}
    metadata = {
        "source": source or type(model).__name__,
        "optimizer": type(optimizer).__name__,
        "step": steps.pop() if len(steps) == 1 else None,
        "beta2": betas.pop() if len(betas) == 1 else None,
    }

    def tensors() -> Iterator[tuple[str, torch.Tensor, int | None]]:
        for name, p in items:
            state = optimizer.state[p]
            yield name, state["exp_avg_sq"].detach().to("cpu", torch.float32), _state_step(state)

    return _write(Path(path), tensors(), k, dtype, metadata, Path(path))


def _live_states(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[tuple[str, torch.nn.Parameter]], dict[int, float]]:
    """(name, parameter) pairs that have a full exp_avg_sq, in ``named_parameters()`` order; β₂ by id(param)."""
    beta2_by_param: dict[int, float] = {}
    for group in optimizer.param_groups:
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)):
            beta2_by_param.update({id(p): float(betas[1]) for p in group["params"]})
    items: list[tuple[str, torch.nn.Parameter]] = []
    skipped = []
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            skipped.append(name)
            continue
        v = state["exp_avg_sq"]
        if hasattr(v, "full_tensor") or tuple(v.shape) != tuple(p.shape) or p.numel() == 0:
            raise StreamMergeError(
                f"export: {name!r}: exp_avg_sq of shape {list(v.shape)} for a parameter of shape {list(p.shape)} "
                "is a shard (DeepSpeed ZeRO / FSDP); save a checkpoint and convert that folder (see the docstring)"
            )
        items.append((name, p))
    if skipped:
        log.warning(
            "export: %d parameters have no exp_avg_sq (frozen or never stepped), e.g. %s", len(skipped), skipped[0]
        )
    if not items:
        raise StreamMergeError(
            f"export: {type(optimizer).__name__} holds no exp_avg_sq for any parameter of the model; "
            "export after at least one optimizer step"
        )
    return items, beta2_by_param


def _state_step(state: dict) -> int | None:
    step = state.get("step")
    if isinstance(step, torch.Tensor):
        step = step.item()
    return int(step) if isinstance(step, (int, float)) and step >= 0 else None
