"""Claiming the output folder: lock it, then start fresh, resume, or refuse.

    no OUT_DIR, or an empty one              -> start
    a journal with this plan's fingerprint  -> resume (or nothing to do, if it is complete)
    a journal of another plan               -> refuse, saying what changed, unless --restart
    other files and no journal               -> refuse unless --overwrite
    --restart / --overwrite                  -> discard earlier model files and journal, start

Before any tensor is computed the free disk space is checked against what the remaining writes
can still allocate.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .errors import OutputError
from .io.journal import (
    STATE_DIR,
    Journal,
    JournalState,
    OutputLock,
    TensorRecord,
    describe_changes,
    fingerprint,
    journal_path,
    plan_summary,
    read_journal,
)
from .io.writer import INDEX_NAME, ShardPlan, bytes_to_allocate, check_records
from .planner import fmt_bytes

if TYPE_CHECKING:
    from .engine import MergeOptions
    from .planner import MergePlan

log = logging.getLogger(__name__)

JOURNAL_MARGIN = 1 << 20  # bytes kept free beyond the shards, for the journal and small files


@dataclass
class Claim:
    journal: Journal | None = None
    done: dict[str, TensorRecord] = field(default_factory=dict)
    already_complete: bool = False
    dropped: int = 0  # journal records not trusted (their tensors are recomputed)
    stale_lock: str | None = None  # the holder of a lock left by a merge that died


def plan_options(plan: MergePlan, options: MergeOptions) -> dict:
    """Options that change the output bytes; a resume needs them unchanged."""
    return {
        "out_shard_size": plan.max_shard_bytes,
        "chunk_elements": plan.chunk_elements,
        "device": options.device.type,
        "allow_nonfinite": options.allow_nonfinite,
        "streammerge": __version__,
        "torch": torch.__version__,
    }


def _out_files(out_dir: Path) -> list[Path]:
    return [p for p in out_dir.iterdir() if p.name != STATE_DIR]


def _discard(out_dir: Path) -> None:
    """Remove what a merge writes into OUT_DIR: shards, partial shards, index, journal."""
    for p in _out_files(out_dir):
        if p.is_file() and (p.name.endswith((".safetensors", ".partial")) or p.name == INDEX_NAME):
            p.unlink()
    journal_path(out_dir).unlink(missing_ok=True)


def _check_complete(plan: MergePlan) -> None:
    for shard in plan.shards:
        path = plan.out_dir / shard.file_name
        if not path.is_file() or path.stat().st_size != shard.file_bytes:
            raise OutputError(
                f"{plan.out_dir}: holds this merge, marked complete, but {shard.file_name} is missing or has "
                f"the wrong size; run `streammerge verify {plan.out_dir}` or re-run with --restart"
            )


def _check_free_space(out_dir: Path, shards: list[ShardPlan]) -> None:
    need = bytes_to_allocate(out_dir, shards) + JOURNAL_MARGIN
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise OutputError(
            f"{out_dir}: not enough disk space: the merge still needs {fmt_bytes(need)} "
            f"({need:,} bytes), {fmt_bytes(free)} is free; free space or choose another output folder"
        )


def _resume(plan: MergePlan, state: JournalState, claim: Claim) -> None:
    if state.complete:
        _check_complete(plan)
        claim.already_complete = True
        return
    claim.done = check_records(plan.out_dir, plan.shards, state.records, state.durable)
    claim.dropped = len(state.records) - len(claim.done)
    claim.journal = Journal.reopen(plan.out_dir, state)
    if claim.dropped:
        log.warning("%d journal records did not match the files in %s; those tensors are recomputed",
                    claim.dropped, plan.out_dir)


@contextmanager
def claim_output_dir(plan: MergePlan, options: MergeOptions) -> Iterator[Claim]:
    """Lock ``plan.out_dir`` and decide how this run uses it (see the module docstring)."""
    out_dir = plan.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    existed = out_dir.exists()
    if (
        existed
        and _out_files(out_dir)
        and not (out_dir / STATE_DIR).is_dir()
        and not (options.overwrite or options.restart)
    ):
        raise OutputError(
            f"{out_dir}: is not empty; choose a new folder or pass --overwrite to replace its model files"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the output folder ({e.strerror})") from e
    lock = OutputLock(out_dir).acquire()
    claim = Claim(stale_lock=lock.stale_holder)
    try:
        summary = plan_summary(
            plan.config.source, plan_options(plan, options), plan.input_files(), len(plan.tensors), plan.output_bytes
        )
        state = read_journal(out_dir)
        if options.overwrite or options.restart:
            _discard(out_dir)
            state = None
        elif state is None and _out_files(out_dir):
            raise OutputError(
                f"{out_dir}: holds files but no resumable merge journal; choose a new folder or pass "
                f"--restart to discard them"
            )
        elif state is not None and state.fingerprint != fingerprint(summary):
            changes = "; ".join(describe_changes(state.summary, summary))
            raise OutputError(
                f"{out_dir}: holds an unfinished or different merge and cannot resume it: {changes}; "
                f"re-run with --restart to discard it, or choose another output folder"
            )
        if state is not None:
            _resume(plan, state, claim)
        else:
            claim.journal = Journal.create(out_dir, summary)
        if not claim.already_complete:
            _check_free_space(out_dir, plan.shards)
        if claim.stale_lock:
            log.info("took over the lock of a merge that is gone (%s)", claim.stale_lock)
        yield claim
    finally:
        if claim.journal is not None:
            claim.journal.close()
        lock.release()
