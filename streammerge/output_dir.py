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
import os
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
    rank_journal_paths,
    read_journal,
)
from .io.writer import INDEX_NAME, ShardPlan, bytes_to_allocate, check_records, existing_shard_path
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
    found = {
        "out_shard_size": plan.max_shard_bytes,
        "chunk_elements": plan.chunk_elements,
        "device": options.device.type,
        "allow_nonfinite": options.allow_nonfinite,
        "streammerge": __version__,
        "torch": torch.__version__,
    }
    if options.device.type == "cuda":  # which tensors run on the CPU instead
        found["gpu_memory"] = options.gpu_memory
    return found


def _out_files(out_dir: Path) -> list[Path]:
    return [p for p in out_dir.iterdir() if p.name != STATE_DIR]


def _discard(out_dir: Path) -> None:
    """Remove what a merge writes into OUT_DIR: shards, partial shards, index, journal."""
    for p in _out_files(out_dir):
        if p.is_file() and (p.name.endswith((".safetensors", ".partial")) or p.name == INDEX_NAME):
            p.unlink()
    journal_path(out_dir).unlink(missing_ok=True)
    remove_rank_journals(out_dir)


def remove_rank_journals(out_dir: Path) -> None:
    """Delete the per-rank journals of a distributed merge (once their records are in the main one)."""
    for p in rank_journal_paths(out_dir):
        p.unlink(missing_ok=True)


def _rank_records(out_dir: Path, fp: str) -> tuple[dict[str, TensorRecord], set[str]]:
    """Records (and the durable ones) of the per-rank journals of a distributed merge of this plan."""
    records: dict[str, TensorRecord] = {}
    durable: set[str] = set()
    for path in rank_journal_paths(out_dir):
        state = read_journal(out_dir, path)
        if state is not None and state.fingerprint == fp:
            records.update(state.records)
            durable |= state.durable
    return records, durable


def _sync_shards(out_dir: Path, shards: list[ShardPlan]) -> None:
    """fsync every shard file there is (whichever process wrote it)."""
    for shard in shards:
        path = existing_shard_path(out_dir, shard)
        if path is None:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(f"{path}: cannot sync shard ({e.strerror})") from e


def absorb_rank_journals(out_dir: Path, journal: Journal, summary: dict, done: dict[str, TensorRecord]) -> int:
    """End of a distributed merge, on rank 0: the other ranks' records (this run's, their bytes synced by
    them) into ``done`` and the main journal. Returns how many."""
    records, _ = _rank_records(out_dir, fingerprint(summary))
    new = [rec for name, rec in records.items() if name not in done]
    for rec in new:
        journal.record(rec)
        done[rec.name] = rec
    return len(new)


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
        remove_rank_journals(plan.out_dir)
        return
    # a distributed run's other ranks kept their own journals: their records count too, and move to the
    # main journal (data synced first, so that they may be marked durable there)
    extra, extra_durable = _rank_records(plan.out_dir, state.fingerprint)
    records = {**extra, **state.records}
    durable = state.durable | (extra_durable - set(state.records))
    claim.done = check_records(plan.out_dir, plan.shards, records, durable)
    claim.dropped = len(records) - len(claim.done)
    claim.journal = Journal.reopen(plan.out_dir, state)
    absorbed = [claim.done[name] for name in extra if name in claim.done and name not in state.records]
    if absorbed:
        _sync_shards(plan.out_dir, plan.shards)
        for rec in absorbed:
            claim.journal.record(rec)
        claim.journal.durable_point()
    remove_rank_journals(plan.out_dir)
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
            remove_rank_journals(out_dir)
        if not claim.already_complete:
            _check_free_space(out_dir, plan.shards)
        if claim.stale_lock:
            log.info("took over the lock of a merge that is gone (%s)", claim.stale_lock)
        yield claim
    finally:
        if claim.journal is not None:
            claim.journal.close()
        lock.release()
