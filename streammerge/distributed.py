"""One merge across ``torchrun`` ranks (processes, GPUs, machines), on ``torch.distributed``.

    torchrun --nproc-per-node 2 -m streammerge merge CONFIG OUT_DIR          # two processes, one host
    torchrun --nnodes 2 --node-rank K --nproc-per-node N --master-addr HOST --master-port P \\
        -m streammerge merge CONFIG OUT_DIR                                   # on each machine, shared OUT_DIR

A process started with ``WORLD_SIZE`` > 1 joins the process group (``join``: gloo on the CPU; gloo
for the CPU and NCCL for CUDA tensors with ``--device cuda``, one GPU per rank by ``LOCAL_RANK``) and
``engine.run_merge`` hands the merge to ``run_merge`` here:

1. Every rank plans the merge itself; the plans' fingerprints (config, byte-changing options, every
   input file's size, mtime and header hash: the resume journal's) are all-gathered, and a rank whose
   plan differs stops every rank with one line saying what differs.
2. Rank 0 claims OUT_DIR exactly as a single process does (lock, resume or refuse, free space; the
   per-rank journals of an interrupted distributed run are merged into the main journal first), creates
   every shard file with its final header, and broadcasts which tensors are already done.
3. The tensors left are assigned to ranks by estimated cost (``tensor_cost``: bytes and passes for
   elementwise methods, d³ terms for Orthogonal-Residual Decoupling), greedily, largest first, the same
   way on every rank. A whole-model calibration pass (OTA's FFG density) is split the same way and its
   integer histograms are summed with ``all_reduce``, so the thresholds equal a single process's.
4. Each rank computes its tensors with the single-process code, ``pwrite``s them into their planned
   slots of the shared shard files and appends their records to its own journal
   (``OUT_DIR/.streammerge/journal.rankR``; rank 0 uses the main journal); then it fsyncs its output.
5. After a barrier rank 0 appends the other ranks' records to the main journal and finishes the folder
   (renames, index, config, model card). The method's report is combined over ranks.

Every tensor is computed by exactly one process with the same code, so the bytes equal a single-process
merge's (given the same torch build and device type). A merge interrupted anywhere resumes with the same
command, another number of ranks, or one plain process (the per-rank journals are read by all of them).

Coordination uses the rendezvous store (``torch.distributed``'s key-value store): barriers poll it, so a
rank waiting for others keeps watching for failures; every rank adds its finished tensors' counts to it,
and rank 0's progress bar shows the whole merge; a rank that fails posts its one-line error there, every
other rank stops at once (a watcher thread interrupts the main thread), and only rank 0 prints the line.
Collectives (``all_gather_object``, ``all_reduce``) run only after a barrier, so no rank blocks in one
while another has failed.
"""

from __future__ import annotations

import _thread
import heapq
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

from .errors import StreamMergeError

if TYPE_CHECKING:
    from .engine import MergeOptions, MergeResult, ProgressFn
    from .planner import MergePlan, PlannedTensor

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often waiting ranks and the watcher thread look at the store
ACK_WAIT_S = 60.0  # how long a failed rank waits for rank 0 to show its error before printing it itself
# ORD cost of one d³ unit relative to one element read and merged (scripts/bench_ortho.py: a 4096² matrix,
# 2·4096³ units, ~12 s per expert on one core pair; elementwise merges ~4 ns per element and input)
ORD_UNIT_COST = 0.02
# passes over the inputs per element, for elementwise methods (TIES: two radix-select passes + the merge)
PASSES = {"ties": 3, "dare_ties": 2, "dare_linear": 2}


class RemoteRankError(StreamMergeError):
    """Another rank failed; its message (``rank R: ...``) is this one's."""


class PlanMismatchError(StreamMergeError):
    """The ranks planned different merges (raised on every rank alike)."""


_GROUP: Group | None = None


def current() -> Group | None:
    """The group this process joined, or None for a single-process merge."""
    return _GROUP


def rank_device(device: str, local_rank: int) -> torch.device:
    """This rank's compute device: ``cuda`` (or ``auto`` with CUDA present) means ``cuda:LOCAL_RANK``."""
    from .engine import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        if local_rank >= torch.cuda.device_count():
            raise StreamMergeError(
                f"--device {device}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                f"here; start at most that many processes per machine (--nproc-per-node)"
            )
        dev = torch.device("cuda", local_rank)
    return dev


def join(device: str = "auto") -> Group | None:
    """Join the process group ``torchrun`` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); None when WORLD_SIZE is unset or 1. Idempotent."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or "1")
        if world <= 1:
            return None
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as e:
        raise StreamMergeError(
            f"WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers ({e}); start streammerge "
            f"with torchrun, or unset WORLD_SIZE for a single process"
        ) from None
    import torch.distributed as dist

    dev = rank_device(device, local_rank)
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        if dist.is_initialized():  # the caller's program set it up
            store = dist.distributed_c10d._get_default_store()
        else:
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
            dist.init_process_group(
                backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                timeout=timedelta(days=1),  # collectives run only once every rank is there (see module doc)
            )
    except (ValueError, RuntimeError) as e:
        raise StreamMergeError(f"cannot join the torch.distributed process group as rank {rank} of {world}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _GROUP = Group(rank, world, local_rank, dev, dist.PrefixStore(f"streammerge/{attempt}", store))
    return _GROUP


def leave() -> None:
    """Stop the watcher and leave the process group (end of the command)."""
    global _GROUP
    group, _GROUP = _GROUP, None
    if group is None:
        return
    group.stop_watching()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Group:
    """This process's place in the merge: rank, world size, device, and the store it coordinates through."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, store):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.store = store
        self.host = socket.gethostname()
        self.remote_error: str | None = None  # another rank's error, seen by the watcher
        self.reported = False  # this rank's own error is in the store
        self._barriers = 0
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._progress: ProgressFn | None = None
        self._progress_lock = threading.Lock()
        self._calibrating = False
        # (tensors, bytes) by progress kind: this rank's running totals, and what rank 0's bar has shown
        self._mine = {"calibrate": (0, 0), "tensor": (0, 0)}
        self._shown = {"calibrate": (0, 0), "tensor": (0, 0)}

    # --- failures ---------------------------------------------------------------------------------

    def post_error(self, message: str) -> None:
        """Tell every rank this one failed (the first error posted is the one shown)."""
        if self.reported:
            return
        self.reported = True
        text = message if self.rank == 0 else f"rank {self.rank} ({self.host}): {message}"
        try:
            self.store.compare_set("error", "", text)
        except (RuntimeError, ValueError):  # the store is gone: torchrun is tearing the job down
            pass

    def _posted_error(self) -> str | None:
        try:
            if self.store.check(["error"]):
                return self.store.get("error").decode(errors="replace")
        except (RuntimeError, ValueError):
            return None
        return None

    def check_remote(self) -> None:
        """Raise ``RemoteRankError`` if another rank has failed."""
        if self.remote_error is None and not self.reported:
            self.remote_error = self._posted_error()
        if self.remote_error is not None:
            raise RemoteRankError(self.remote_error)

    def report(self, message: str, exc: BaseException | None) -> str | None:
        """The CLI's last word on an error: the line to print on this rank, or None (another rank prints it).

        Rank 0 prints its own error, or else the one another rank posted, then calls ``shown``; the other
        ranks post theirs and wait (up to ``ACK_WAIT_S``) until rank 0 has shown it, so that torchrun,
        which stops every rank once one exits, does not stop rank 0 before it printed."""
        remote = isinstance(exc, RemoteRankError) or (isinstance(exc, KeyboardInterrupt) and self.remote_error)
        collective = isinstance(exc, PlanMismatchError)  # every rank raised it: rank 0 shows it
        if self.rank == 0:
            if isinstance(exc, KeyboardInterrupt) and self.remote_error:
                return self.remote_error
            if not remote:
                self.post_error(message)
            return message
        if not (remote or collective):
            self.post_error(message)
        deadline = time.monotonic() + ACK_WAIT_S
        while time.monotonic() < deadline:
            try:
                if self.store.check(["error_shown"]):
                    return None
            except (RuntimeError, ValueError):
                break
            time.sleep(POLL_S / 4)
        return None if remote or collective else f"rank {self.rank} ({self.host}): {message}"

    def shown(self) -> None:
        """Rank 0 has printed the error: the other ranks may exit."""
        try:
            self.store.set("error_shown", "1")
        except (RuntimeError, ValueError):
            pass

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Post any error of this rank; turn the watcher's interrupt into ``RemoteRankError``."""
        try:
            yield
        except KeyboardInterrupt:
            if self.remote_error is not None:
                raise RemoteRankError(self.remote_error) from None
            self.post_error("interrupted; re-run the same command to resume")
            raise
        except RemoteRankError:
            raise
        except PlanMismatchError:
            raise
        except BaseException as e:
            self.post_error(str(e) if isinstance(e, StreamMergeError) else f"{type(e).__name__}: {e}")
            raise

    # --- the watcher thread -----------------------------------------------------------------------

    def watch(self, progress: ProgressFn | None) -> None:
        """Start the thread that stops this rank when another fails and, on rank 0, feeds the progress bar
        from every rank's counts."""
        self._progress = progress if self.rank == 0 else None
        self._calibrating = False
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="streammerge-ranks", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._stop.set()
            self._watcher.join()
            self._watcher = None
            self._show_progress()  # the last counts

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            if self.remote_error is None and not self.reported:
                found = self._posted_error()
                if found is not None:
                    self.remote_error = found
                    _thread.interrupt_main()
                    return
            self._show_progress()

    def emit(self, event) -> None:
        """Hand a progress event of the whole merge (``start``, ``calibrate_start``) to rank 0's bar."""
        if event.kind == "calibrate_start":
            self._calibrating = True
        if self._progress is not None:
            with self._progress_lock:
                self._progress(event)
            self._show_progress()

    def count(self, event) -> None:
        """This rank finished a tensor (``tensor``) or read one for calibration (``calibrate``): its running
        totals go to the store in one ``set``, so rank 0 never sees a tensor without its bytes."""
        kind = "calibrate" if event.kind == "calibrate" else "tensor"
        tensors, nbytes = self._mine[kind]
        self._mine[kind] = (tensors + 1, nbytes + event.nbytes)
        self.store.set(f"progress/{kind}/{self.rank}", f"{tensors + 1} {nbytes + event.nbytes}")

    def _totals(self, kind: str) -> tuple[int, int]:
        tensors = nbytes = 0
        for r in range(self.world_size):
            key = f"progress/{kind}/{r}"
            if self.store.check([key]):
                t, b = self.store.get(key).split()
                tensors, nbytes = tensors + int(t), nbytes + int(b)
        return tensors, nbytes

    def _show_progress(self) -> None:
        if self._progress is None:
            return
        from .engine import ProgressEvent

        with self._progress_lock:
            try:
                for kind in ("calibrate", "tensor") if self._calibrating else ("tensor",):
                    tensors, nbytes = self._totals(kind)
                    shown_t, shown_b = self._shown[kind]
                    new_t, new_b = tensors - shown_t, nbytes - shown_b
                    for i in range(new_t):  # one event per tensor, the bytes on the last
                        self._progress(ProgressEvent(kind, nbytes=new_b if i == new_t - 1 else 0))
                    self._shown[kind] = (tensors, nbytes)
            except (RuntimeError, ValueError):
                pass

    # --- barriers and collectives -------------------------------------------------------------------

    def barrier(self, what: str) -> None:
        """Wait until every rank got here, watching for failures (no timeout: ranks may work for hours)."""
        self._barriers += 1
        key = f"barrier/{self._barriers}"
        self.store.add(key, 1)
        wait = 0.005
        while int(self.store.add(key, 0)) < self.world_size:
            self.check_remote()
            time.sleep(wait)
            wait = min(wait * 2, POLL_S)
        log.debug("rank %d: every rank reached %s", self.rank, what)

    def all_gather(self, obj, what: str) -> list:
        import torch.distributed as dist

        self.barrier(what)
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, what: str):
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        self.barrier(what)
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` (integer counts) over ranks, in place, on its device (gloo on CPU, NCCL on CUDA)."""
        import torch.distributed as dist

        self.barrier("all_reduce")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


# --- assignment of tensors to ranks -----------------------------------------------------------------------


def tensor_cost(plan: MergePlan, tensor: PlannedTensor) -> float:
    """Estimated work for one output tensor, in element-reads: the elements of every input read per pass
    for elementwise methods (TIES: 3 passes), plus the d³ terms of ORD's decompositions on the path each
    matrix takes (``ord_subspace.cost_units``: dense d_in³ terms, or the subspace path's k³ terms)."""
    out = tensor.out
    if not tensor.merged:
        return float(out.numel)
    method = plan.config.method
    inputs = len(plan.experts) + (plan.base is not None)
    if method.elementwise:
        return float(out.numel * inputs * PASSES.get(method.name, 1 + (method.prepare is not None)))
    cost = float(out.numel * inputs)
    if method.name == "orthomerge" and len(out.shape) == 2:
        from .config import layer_position, resolve_parameters
        from .methods import ord_subspace
        from .methods.orthomerge import takes_orthogonal_part

        params, _ = resolve_parameters(plan.config, out.name, layer_position(out.name, plan.num_layers))
        if takes_orthogonal_part(out.name, out.shape, params):
            d_out, d_in = out.shape
            reads = 2 if params.variant == "C" else 1
            path = ord_subspace.choose_path((d_out, d_in), params.procrustes_eps)
            cost = cost * reads + ORD_UNIT_COST * len(plan.experts) * ord_subspace.cost_units(d_out, d_in, path)
    return cost


def assign(costs: list[float], world_size: int) -> list[int]:
    """The rank of each item: largest cost first, each to the least-loaded rank (lowest rank on ties).
    Deterministic, so every rank computes the same assignment."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0.0, r) for r in range(world_size)]
    owner = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owner


def share(plan: MergePlan, tensors: list[PlannedTensor], group: Group) -> set[str]:
    """Names of ``tensors`` this rank computes."""
    owner = assign([tensor_cost(plan, t) for t in tensors], group.world_size)
    return {t.out.name for t, r in zip(tensors, owner, strict=True) if r == group.rank}


# --- the merge -------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    computed: int
    run: object


def check_same_plan(group: Group, summary: dict) -> None:
    """Every rank must plan the same merge: same config, byte-changing options and input files."""
    from .io.journal import describe_changes, fingerprint

    mine = (fingerprint(summary), summary, group.host)
    seen = group.all_gather(mine, "the plan check")
    first_fp, first_summary, first_host = seen[0]
    for r, (fp, summary_r, host) in enumerate(seen):
        if fp != first_fp:
            changes = "; ".join(describe_changes(first_summary, summary_r)) or "the plan differs"
            raise PlanMismatchError(
                f"rank {r} ({host}) planned a different merge than rank 0 ({first_host}): {changes}; every rank "
                f"must see the same config, options and input files (a shared file system for OUT_DIR and inputs)"
            )


def run_merge(plan: MergePlan, options: MergeOptions, progress: ProgressFn | None, group: Group) -> MergeResult:
    """``engine.run_merge`` for one rank of a distributed merge (see the module docstring)."""
    from .adapter_output import run_adapter_merge, wants_adapter_output
    from .engine import MergeResult
    from .io.journal import plan_summary
    from .output_dir import plan_options

    t0 = time.perf_counter()
    group.watch(progress)
    try:
        with group.guard():
            summary = plan_summary(
                plan.config.source, plan_options(plan, options), plan.input_files(), len(plan.tensors),
                plan.output_bytes,
            )
            check_same_plan(group, summary)
            if wants_adapter_output(plan):  # a few MB: rank 0 writes it, the others wait
                result = run_adapter_merge(plan, options) if group.rank == 0 else None
                group.barrier("the adapter output")
                return result or MergeResult(plan.out_dir, 0, 0, time.perf_counter() - t0)
            if group.rank == 0:
                return _rank0(plan, options, group, summary, t0)
            return _other_rank(plan, options, group, summary, t0)
    finally:
        group.stop_watching()


def _rank0(plan, options, group: Group, summary: dict, t0: float) -> MergeResult:
    from .device_budget import gpu_memory_report
    from .engine import MergeResult, ProgressEvent
    from .io.hf_files import write_model_card, write_model_files
    from .io.writer import ShardWriter
    from .output_dir import absorb_rank_journals, claim_output_dir

    total = len(plan.tensors)
    with claim_output_dir(plan, options) as claim:
        if claim.already_complete:
            group.broadcast(None, "the output folder claim")
            return MergeResult(plan.out_dir, total, plan.output_bytes, time.perf_counter() - t0,
                               resumed_tensors=total, already_complete=True)
        done = claim.done
        group.emit(ProgressEvent("start", nbytes=sum(r.length for r in done.values()), tensors=len(done)))
        log.info("merging %d tensors (%d already done) with %s on %d ranks into %s",
                 total, len(done), plan.config.method.name, group.world_size, plan.out_dir)
        with ShardWriter(plan.out_dir, plan.shards, done) as writer:
            writer.open_all()  # every shard file exists, with its header, before any rank writes into it
            writer.sync()  # and other machines see it (network file systems flush on fsync)
            group.broadcast(done, "the output folder claim")
            outcome = _work(plan, options, group, writer, claim.journal, done)
            absorbed = absorb_rank_journals(plan.out_dir, claim.journal, summary, done=writer.done)
            missing = [t.out.name for t in plan.tensors if t.out.name not in writer.done]
            if missing:
                raise StreamMergeError(f"{plan.out_dir}: {len(missing)} tensors were not written by any rank "
                                       f"(e.g. {missing[0]!r}); re-run the same command to finish them")
            log.debug("rank 0: %d records of other ranks joined the main journal", absorbed)
            write_model_files(plan.reference.folder, plan.out_dir, plan.config.out_dtype or plan.config.dtype)
            inputs = [str(p) for p in plan.config.inputs]
            write_model_card(plan.out_dir, plan.config.source, plan.config.method.name, inputs)
            writer.finalize()
        claim.journal.complete()
    from .output_dir import remove_rank_journals

    remove_rank_journals(plan.out_dir)
    report = (outcome.run.report() if outcome.run is not None else []) + gpu_memory_report(plan, options)
    return MergeResult(plan.out_dir, total, plan.output_bytes, time.perf_counter() - t0,
                       resumed_tensors=total - outcome.computed, computed_tensors=outcome.computed, report=report)


def _other_rank(plan, options, group: Group, summary: dict, t0: float) -> MergeResult:
    from .engine import MergeResult
    from .io.journal import Journal, rank_journal_path
    from .io.writer import ShardWriter

    total = len(plan.tensors)
    done = group.broadcast(None, "the output folder claim")
    if done is None:
        return MergeResult(plan.out_dir, total, plan.output_bytes, time.perf_counter() - t0,
                           resumed_tensors=total, already_complete=True)
    journal = Journal.create(plan.out_dir, summary, path=rank_journal_path(plan.out_dir, group.rank))
    try:
        with ShardWriter(plan.out_dir, plan.shards, done, create=False) as writer:
            outcome = _work(plan, options, group, writer, journal, done)
    finally:
        journal.close()
    return MergeResult(plan.out_dir, total, plan.output_bytes, time.perf_counter() - t0,
                       resumed_tensors=total - outcome.computed, computed_tensors=outcome.computed)


def _work(plan, options, group: Group, writer, journal, done: dict) -> _Outcome:
    """This rank's part: calibration share (reduced over ranks), its tensors, its output made durable;
    then the barrier after which rank 0 finishes the folder. Returns the merge's combined counts."""
    from .engine import _merge_all, _start_run

    def progress(event) -> None:
        if event.kind in ("tensor", "calibrate"):
            group.count(event)
        else:
            group.emit(event)

    merged = [t for t in plan.tensors if t.merged]
    calibration = share(plan, merged, group)
    todo = [t for t in plan.tensors if t.out.name not in done]
    mine = share(plan, todo, group)
    run = _start_run(plan, options, done, progress, mine=calibration, reduce=lambda r: reduce_run(r, group))
    computed = _merge_all(plan, options, writer, journal, progress, run, mine=mine)
    writer.sync()  # this rank's bytes are on disk before rank 0 renames the shards
    journal.durable_point()
    gathered = group.all_gather((computed, run), "the end of the merge")
    if run is not None and hasattr(run, "absorb"):
        for r, (_, other) in enumerate(gathered):
            if r != group.rank and other is not None:
                run.absorb(other)
    return _Outcome(sum(c for c, _ in gathered), run)


def reduce_run(run, group: Group) -> None:
    """Before ``run.calibrate()``: combine what every rank's calibration share observed."""
    if hasattr(run, "reduce_calibration"):
        run.reduce_calibration(group.all_reduce_sum_, lambda obj: group.all_gather(obj, "the calibration"))
    elif group.world_size > 1:
        raise StreamMergeError(
            f"{type(run).__name__}: this method's whole-model calibration pass cannot be split over ranks "
            f"(no reduce_calibration); run it in one process"
        )

