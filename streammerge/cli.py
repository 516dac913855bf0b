"""The ``streammerge`` command line. rich lives here only; errors print one line, exit code 1."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from .errors import StreamMergeError


def one_line(message: str) -> str:
    """``message`` with every non-printable character escaped (newlines, ANSI codes, surrogate-escaped
    bytes of non-UTF-8 file names), so that it prints as one line on any terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _fail(message: str, exc: BaseException | None = None) -> None:
    from . import distributed

    group = distributed.current()
    if group is not None:  # a torchrun rank: rank 0 prints the first error of any rank, the others stay quiet
        message = group.report(message, exc)
    if message is not None:
        click.echo(f"error: {one_line(message)}", err=True)
    if group is not None and group.rank == 0:
        group.shown()
    sys.exit(1)


def handle_errors(fn):
    """One line and exit 1 for user errors; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        try:
            return fn(*args, **kwargs)
        except StreamMergeError as e:
            if debug:
                raise
            _fail(str(e), e)
        except KeyboardInterrupt as e:
            _fail("interrupted; re-run the same command to resume", e)
        except MemoryError as e:
            if debug:
                raise
            _fail("out of memory; try a smaller --chunk-size or a machine with more RAM", e)
        except OSError as e:
            if debug:
                raise
            _fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), e)

    return click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")(wrapper)


@click.group()
@click.version_option(package_name="streammerge")
def main() -> None:
    """Merge and convert huge LLM checkpoints tensor by tensor, in little RAM."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]: where the math runs.")
@click.option(
    "--out-shard-size", default="5GB", show_default=True, help="Max bytes per output shard (e.g. 200MB, 5GB)."
)
@click.option(
    "--chunk-size",
    "chunk_elements",
    default=None,
    type=int,
    help="Elements per chunk for elementwise methods (a multiple of 1048576).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and memory estimate; write nothing.")
@click.option(
    "--restart", is_flag=True, help="Discard an earlier unfinished (or different) merge in OUT_DIR and start over."
)
@click.option("--overwrite", is_flag=True, help="Replace the model files in a non-empty OUT_DIR.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs that hold NaN/Inf instead of refusing them.")
@click.option(
    "--sync-every",
    default="1GB",
    show_default=True,
    help="Make the output durable (fsync) every this many bytes; 0: after every tensor; 'end': only at the end.",
)
@click.option(
    "--gpu-memory",
    default=None,
    help="With --device cuda: GPU bytes a tensor's working set may take (e.g. 8GB; default: what the device "
    "reports); a tensor that does not fit runs on the CPU.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def merge(
    config: Path,
    out_dir: Path,
    device: str,
    out_shard_size: str,
    chunk_elements: int | None,
    dry_run: bool,
    restart: bool,
    overwrite: bool,
    allow_nonfinite: bool,
    sync_every: str,
    gpu_memory: str | None,
    quiet: bool,
) -> None:
    """Merge as CONFIG (a mergekit YAML) says into the Hugging Face folder OUT_DIR.

    Re-running the same command after an interruption resumes where it stopped. Started by torchrun
    (WORLD_SIZE > 1), every rank takes a share of the tensors (README: Distributed merges)."""
    from . import distributed
    from .api import plan as make_plan
    from .device_budget import resolve_gpu_memory
    from .engine import MergeOptions, resolve_device, run_merge
    from .planner import DEFAULT_CHUNK_ELEMENTS, describe_plan, fmt_bytes, parse_size

    group = distributed.join(device)  # None unless started by torchrun with WORLD_SIZE > 1
    lead = group is None or group.rank == 0  # the process that talks to the user
    chunk = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    if chunk <= 0 or chunk % (1 << 20):
        raise StreamMergeError(f"--chunk-size {chunk}: must be a positive multiple of 1048576")
    sync_bytes = None if sync_every == "end" else 0 if sync_every.strip() == "0" else parse_size(sync_every)
    _raise_open_file_limit()
    the_plan = make_plan(config, out_dir, out_shard_size=out_shard_size, chunk_elements=chunk)
    try:
        if dry_run:
            for line in describe_plan(the_plan) if lead else []:
                click.echo(line)
            distributed.leave()
            return
        _tune_allocator()
        compute_device = group.device if group is not None else resolve_device(device)
        budget = resolve_gpu_memory(compute_device, gpu_memory)
        options = MergeOptions(compute_device, overwrite, restart, allow_nonfinite, sync_bytes, budget)
        if quiet or not lead:
            result = run_merge(the_plan, options)
        else:
            result = _run_with_progress(the_plan, options)
    finally:
        the_plan.close()
    distributed.leave()
    if not lead:
        return
    for line in result.report:
        click.echo(line)
    if result.already_complete:
        click.echo(
            f"{result.out_dir} already holds this merge, complete; nothing to do "
            f"(--restart to redo it, `streammerge verify {result.out_dir}` to check it)"
        )
    elif not quiet:
        speed = fmt_bytes(int(result.bytes_written / max(result.seconds, 1e-9)))
        resumed = f" ({result.resumed_tensors} resumed from an earlier run)" if result.resumed_tensors else ""
        ranks = f" on {group.world_size} ranks" if group is not None else ""
        click.echo(
            f"wrote {result.tensors} tensors{resumed}, {fmt_bytes(result.bytes_written)} to {result.out_dir} "
            f"in {result.seconds:.1f} s ({speed}/s){ranks}"
        )


def _tune_allocator() -> None:
    """Keep freed chunk buffers in the heap (glibc): the engine allocates and frees buffers of the same
    few sizes for every chunk, and glibc would otherwise return each to the OS and fault it in again,
    which costs more than the arithmetic on it. Peak RSS is unchanged (it is the working set)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the largest glibc allows
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _raise_open_file_limit() -> None:
    """Every input shard stays open from planning to the end (one descriptor each): many experts
    of many shards can pass the usual soft limit of 1024, so raise it to the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ImportError, ValueError, OSError):
        pass


def _run_with_progress(plan, options):
    """One rich bar over output bytes: tensors done, bytes, speed and ETA."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from .engine import run_merge
    from .planner import fmt_bytes

    n = len(plan.tensors)
    total = sum(t.out.nbytes for t in plan.tensors)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ]
    name = plan.config.method.name
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"{name} 0/{n} tensors", total=total)
        done = 0
        left = [total]  # output bytes still to compute
        calibrated = [0, 0]  # tensors read by a calibration pass, of how many

        def progress(event) -> None:
            nonlocal done
            if event.kind == "start":
                done = event.tensors
                left[0] = total - event.nbytes
                if done:
                    bar.console.print(f"resuming: {done}/{n} tensors ({fmt_bytes(event.nbytes)}) already done")
                # reset, not advance: bytes done by an earlier run do not count towards the speed
                bar.reset(task, total=total, completed=event.nbytes, description=f"{name} {done}/{n} tensors")
            elif event.kind == "calibrate_start":
                bar.reset(task, total=event.nbytes, completed=0, description=f"{name}: calibrating 0/{event.tensors}")
                calibrated[:] = [0, event.tensors]
            elif event.kind == "calibrate":
                calibrated[0] += 1
                bar.update(
                    task,
                    advance=event.nbytes,
                    description=f"{name}: calibrating {calibrated[0]}/{calibrated[1]} tensors",
                )
                if calibrated[0] == calibrated[1]:
                    bar.reset(task, total=total, completed=total - left[0], description=f"{name} {done}/{n} tensors")
            else:
                done += 1
                left[0] -= event.nbytes
                bar.update(task, advance=event.nbytes, description=f"{name} {done}/{n} tensors")

        return run_merge(plan, options, progress)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@handle_errors
def verify(out_dir: Path) -> None:
    """Re-read every tensor of a merged OUT_DIR and check it against the merge journal and headers."""
    from .verify import verify_output

    report = verify_output(out_dir)
    for line in report.notes:
        click.echo(line)
    for name, why in report.bad:
        click.echo(f"BAD {name}: {why}", err=True)
    if report.bad:
        _fail(f"{out_dir}: {len(report.bad)} problem(s) found; {report.checked} tensors checked")
    click.echo(
        f"{out_dir}: {report.checked} tensors verified" + (" against the merge journal" if report.journal else "")
    )


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@handle_errors
def inspect(path: Path) -> None:
    """List the tensors, shards, dtypes and sizes of a checkpoint PATH (folder or file)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .io.reader import open_checkpoint
    from .planner import fmt_bytes

    ckpt = open_checkpoint(path)
    try:
        # Names come from the file: escape them, or "[/x]" in a tensor name is a rich markup error.
        table = Table(title=escape(str(path)))
        for col in ("tensor", "dtype", "shape", "bytes", "file"):
            table.add_column(col, justify="right" if col == "bytes" else "left")
        per_file: dict[str, int] = {}
        by_dtype: dict[str, int] = {}
        for name in ckpt.names():
            m = ckpt.meta(name)
            dtype = str(m.dtype).replace("torch.", "")
            table.add_row(
                escape(one_line(name)),
                dtype,
                "x".join(map(str, m.shape)) or "scalar",
                f"{m.nbytes:,}",
                escape(one_line(m.file.name)),
            )
            per_file[m.file.name] = per_file.get(m.file.name, 0) + m.nbytes
            by_dtype[dtype] = by_dtype.get(dtype, 0) + m.numel
        console = Console() if sys.stdout.isatty() else Console(width=160)
        console.print(table)
        for f, n in per_file.items():
            console.print(f"{escape(one_line(f))}: {fmt_bytes(n)}")
        params = ", ".join(f"{n:,} {d}" for d, n in by_dtype.items())
        console.print(f"{len(ckpt.names())} tensors in {len(per_file)} file(s); parameters: {params}")
    finally:
        ckpt.close()


@main.group()
def sidecar() -> None:
    """Second-moment sidecars (Adam exp_avg_sq per parameter) for OTA merging."""


@sidecar.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--rank",
    default="1",
    show_default=True,
    help="exact, 1 (row and column sums: O(m+n) per matrix) or K (truncated SVD of rank K).",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Model folder (config.json + weights) that names an optimizer.pt's integer ids.",
)
@click.option("--dtype", "storage", default="fp32", show_default=True, help="Storage dtype: fp32, bf16 or fp16.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@handle_errors
def sidecar_convert(src: Path, out: Path, rank: str, model_dir: Path | None, storage: str, overwrite: bool) -> None:
    """Convert second moments at SRC into the sidecar file OUT, one tensor at a time.

    SRC: a name-keyed exp_avg_sq .safetensors file, a .pt/.bin torch file (name-keyed dict or
    optimizer state), a Hugging Face Trainer checkpoint folder (optimizer.pt + model weights), or a
    DeepSpeed ZeRO 1/2/3 or torch.distributed.checkpoint (FSDP) folder, reassembled per parameter.
    """
    from .planner import fmt_bytes
    from .sidecar import convert

    dtypes = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
    if storage not in dtypes:
        raise StreamMergeError(f"--dtype {storage!r}: expected fp32, bf16 or fp16")
    result = convert(src, out, rank=rank, model=model_dir, dtype=dtypes[storage], overwrite=overwrite)
    ratio = result.stored_bytes / max(result.fp32_bytes, 1)
    named = f"; names from {result.names_from}" if result.names_from else ""
    click.echo(
        f"wrote {result.out}: {result.tensors} tensors from a {result.kind}, {fmt_bytes(result.stored_bytes)} "
        f"= {ratio:.2%} of {fmt_bytes(result.fp32_bytes)} fp32 exp_avg_sq{named}"
    )


@sidecar.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@handle_errors
def sidecar_inspect(file: Path) -> None:
    """List each tensor of a sidecar FILE (or raw exp_avg_sq .safetensors): representation and bytes.

    FILE may also be a DeepSpeed ZeRO or torch.distributed.checkpoint folder: its layout is reported.
    """
    import math

    if file.is_dir():
        _inspect_source(file)
        return

    from rich.console import Console
    from rich.table import Table

    from .planner import fmt_bytes
    from .sidecar import load

    with load(file) as sc:
        table = Table(title=str(file))
        for col in ("tensor", "shape", "representation", "stored bytes", "fp32 bytes", "ratio"):
            table.add_column(col, justify="right" if "bytes" in col or col == "ratio" else "left")
        stored = full = 0
        for name in sc.keys():
            shape = sc.shape(name)
            nbytes, fp32 = sc.stored_bytes(name), 4 * math.prod(shape)
            stored, full = stored + nbytes, full + fp32
            table.add_row(
                name,
                "x".join(map(str, shape)) or "scalar",
                sc.representation(name),
                f"{nbytes:,}",
                f"{fp32:,}",
                f"{nbytes / max(fp32, 1):.2%}",
            )
        console = Console() if sys.stdout.isatty() else Console(width=160)
        console.print(table)
        facts = ", ".join(f"{k}: {v}" for k, v in sc.metadata.items() if v is not None)
        console.print(f"metadata: {facts or 'none'}")
        console.print(
            f"{len(sc.keys())} tensors: {fmt_bytes(stored)} stored, {fmt_bytes(full)} as fp32 exp_avg_sq "
            f"(ratio {stored / max(full, 1):.2%})"
        )


def _inspect_source(folder: Path) -> None:
    """The layout of a second-moment source folder (ZeRO / DCP): what convert would read, nothing converted."""
    import math

    from .io.second_moment_sources import open_source
    from .planner import fmt_bytes

    source = open_source(folder)
    try:
        shapes = getattr(source, "shapes", None) or {}
        click.echo(f"{source.kind}: {source.metadata.get('layout') or source.kind}")
        facts = ", ".join(f"{k}: {v}" for k, v in source.metadata.items() if v is not None and k != "layout")
        click.echo(f"metadata: {facts}")
        numel = sum(math.prod(s) for s in shapes.values())
        size = f", {fmt_bytes(4 * numel)} as fp32 exp_avg_sq" if numel else ""
        click.echo(f"{len(source.names)} parameters{size}")
    finally:
        source.close()


if __name__ == "__main__":
    main()
