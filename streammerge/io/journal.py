"""The resume journal: what an interrupted merge had finished, so a re-run can pick up there.

It lives in ``OUT_DIR/.streammerge/journal`` beside the lock ``OUT_DIR/.streammerge/lock``, and
stays there after the merge so that ``streammerge verify`` can check the output against it.

Format (version 1): UTF-8 text, one record per line, append-only. Each line is

    <JSON object, no newlines> TAB <CRC-32 of the JSON bytes, 8 lowercase hex digits> LF

Record kinds, by the object's ``"kind"`` key:

    {"kind": "begin", "format": "streammerge-journal", "version": 1, "fingerprint": HEX,
     "plan": {"config": HEX, "options": {...}, "inputs": {path: {"size", "mtime_ns", "head"}},
              "tensors": int, "bytes": int}}                          -- first line, exactly once
    {"kind": "tensor", "name": str, "shard": file name, "offset": int, "length": int,
     "crc32": int}                                                  -- one per finished tensor
    {"kind": "sync"}                                                 -- everything above is on disk
    {"kind": "complete"}                                             -- shards renamed, index written

A distributed merge (``streammerge.distributed``) keeps one journal per rank: rank 0 the main one, rank
R > 0 ``OUT_DIR/.streammerge/journal.rankR`` (same format and ``begin`` record). Whoever claims the folder
next (any number of ranks, or one process) appends the records of rank journals with the same
fingerprint to the main journal and deletes them; so does rank 0 when it finishes the merge.

``fingerprint`` is the SHA-256 of the canonical JSON of ``plan`` minus nothing: the config text's
hash, the options that change output bytes, and each input file's identity (size, mtime and a hash
of its header: the safetensors JSON header, or the first MiB of other files). A re-run whose
fingerprint differs refuses to resume and says which part changed. ``offset``/``length`` are the
tensor's absolute byte range in its shard file, ``crc32`` the CRC-32 of those bytes.

Reading stops at the first line that is torn or fails its CRC (a crash in the middle of an
append); everything after it is treated as not done and is cut off before appending again.

Durability (fsync policy): a tensor record is appended with ``write(2)`` right after its bytes are
``pwrite``-n, without fsync. Both live in the page cache, so a killed process (``kill -9``, OOM,
Ctrl-C) loses nothing. Against power loss or an OS crash, the engine makes a *durable point*
every ``sync_bytes`` of output (default 1 GB), at the end, and before renaming shards: fsync every
open shard, then append ``sync`` and fsync the journal. Records before the last ``sync`` are
trusted on resume; those after it are re-checked by reading their bytes back and comparing the
CRC, so a record that reached the disk before its data is caught and its tensor redone. The cost
is one fsync of the data written since the last durable point (the kernel writes it back anyway);
``scripts/bench_merge.py --sync-costs`` measures it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError

JOURNAL_FORMAT = "streammerge-journal"
JOURNAL_VERSION = 1
STATE_DIR = ".streammerge"
JOURNAL_NAME = "journal"
LOCK_NAME = "lock"
HEAD_BYTES = 1 << 20  # non-safetensors inputs: identity hashes this much of the file's start


def file_identity(path: Path) -> dict[str, int | str]:
    """Size, mtime and a hash of the header of one input file (see the module docstring)."""
    try:
        st = path.stat()
        with open(path, "rb") as f:
            head = f.read(8)
            if path.suffix == ".safetensors" and len(head) == 8:
                n = int.from_bytes(head, "little")
                head += f.read(min(n, st.st_size - 8))
            else:
                head += f.read(HEAD_BYTES - 8)
    except OSError as e:
        raise OutputError(f"{path}: cannot read input to fingerprint the merge ({e.strerror})") from e
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": hashlib.sha256(head).hexdigest()}


def plan_summary(config_text: str, options: dict, inputs: list[Path], tensors: int, nbytes: int) -> dict:
    """The part of the journal's ``begin`` record that decides whether a re-run may resume."""
    return {
        "config": hashlib.sha256(config_text.encode()).hexdigest(),
        "options": options,
        "inputs": {str(p.resolve()): file_identity(p) for p in sorted(set(inputs), key=str)},
        "tensors": tensors,
        "bytes": nbytes,
    }


def fingerprint(summary: dict) -> str:
    return hashlib.sha256(json.dumps(summary, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two ``plan_summary`` dicts."""
    changes = []
    if old.get("config") != new.get("config"):
        changes.append("the config changed")
    old_opts, new_opts = old.get("options", {}), new.get("options", {})
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            changes.append(f"option {key} changed from {old_opts.get(key)!r} to {new_opts.get(key)!r}")
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for path in sorted(set(old_in) | set(new_in)):
        if path not in new_in:
            changes.append(f"input {path} is no longer used")
        elif path not in old_in:
            changes.append(f"input {path} is new")
        elif old_in[path] != new_in[path]:
            what = [k for k in ("size", "mtime_ns", "head") if old_in[path].get(k) != new_in[path].get(k)]
            words = {"size": "size", "mtime_ns": "modification time", "head": "header"}
            changes.append(f"input {path} changed ({', '.join(words[w] for w in what)})")
    if not changes and old != new:
        changes.append("the plan changed")
    return changes


@dataclass(frozen=True)
class TensorRecord:
    """A finished output tensor: its bytes are ``[offset, offset + length)`` of ``shard``."""

    name: str
    shard: str
    offset: int
    length: int
    crc32: int


@dataclass
class JournalState:
    """What an existing journal says, up to its first damaged line."""

    summary: dict
    fingerprint: str
    records: dict[str, TensorRecord] = field(default_factory=dict)
    durable: set[str] = field(default_factory=set)  # tensors recorded before the last sync
    complete: bool = False
    valid_bytes: int = 0  # length of the undamaged prefix of the file


def _encode(obj: dict) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b"\t" + f"{zlib.crc32(text):08x}".encode() + b"\n"


def _decode(line: bytes) -> dict | None:
    text, sep, crc = line.rstrip(b"\n").rpartition(b"\t")
    if not sep or not line.endswith(b"\n") or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(text):
            return None
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def journal_path(out_dir: Path) -> Path:
    return out_dir / STATE_DIR / JOURNAL_NAME


def rank_journal_path(out_dir: Path, rank: int) -> Path:
    """The journal of rank ``rank`` > 0 of a distributed merge (same format; rank 0 uses the main one)."""
    return out_dir / STATE_DIR / f"{JOURNAL_NAME}.rank{rank}"


def rank_journal_paths(out_dir: Path) -> list[Path]:
    return sorted((out_dir / STATE_DIR).glob(f"{JOURNAL_NAME}.rank*"))


def read_journal(out_dir: Path, path: Path | None = None) -> JournalState | None:
    """Parse ``OUT_DIR/.streammerge/journal`` (or the journal at ``path``); None if there is none or its
    first line is unusable."""
    path = path or journal_path(out_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputError(f"{path}: cannot read the resume journal ({e.strerror})") from e
    state: JournalState | None = None
    pending: set[str] = set()
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break
        obj = _decode(data[pos : end + 1])
        if obj is None:
            break
        kind = obj.get("kind")
        if state is None:
            if kind != "begin" or obj.get("format") != JOURNAL_FORMAT:
                return None
            if obj.get("version") != JOURNAL_VERSION:
                raise OutputError(
                    f"{path}: journal version {obj.get('version')!r} is not {JOURNAL_VERSION}; "
                    f"re-run with --restart to discard that merge"
                )
            state = JournalState(obj.get("plan", {}), str(obj.get("fingerprint")))
        elif kind == "tensor":
            try:
                rec = TensorRecord(
                    str(obj["name"]), str(obj["shard"]), int(obj["offset"]), int(obj["length"]), int(obj["crc32"])
                )
            except (KeyError, TypeError, ValueError):
                break
            state.records[rec.name] = rec
            pending.add(rec.name)
        elif kind == "sync":
            state.durable |= pending
            pending = set()
        elif kind == "complete":
            state.complete = True
        else:
            break
        pos = end + 1
        state.valid_bytes = pos
    return state


class Journal:
    """Appends records to the journal file (see the module docstring for the policy)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, out_dir: Path, summary: dict, path: Path | None = None) -> Journal:
        path = path or journal_path(out_dir)
        path.parent.mkdir(exist_ok=True)
        fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        journal = cls(path, fd)
        journal._append(
            {
                "kind": "begin",
                "format": JOURNAL_FORMAT,
                "version": JOURNAL_VERSION,
                "fingerprint": fingerprint(summary),
                "plan": summary,
            }
        )
        journal.sync()
        return journal

    @classmethod
    def reopen(cls, out_dir: Path, state: JournalState) -> Journal:
        """Continue an existing journal after its undamaged prefix (a torn tail is cut off)."""
        path = journal_path(out_dir)
        fd = _open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, state.valid_bytes)
        except OSError as e:
            os.close(fd)
            raise OutputError(f"{path}: cannot repair the resume journal ({e.strerror})") from e
        os.lseek(fd, 0, os.SEEK_END)
        return cls(path, fd)

    def _append(self, obj: dict) -> None:
        line = _encode(obj)
        done = 0
        while done < len(line):
            try:
                done += os.write(self._fd, line[done:])
            except OSError as e:
                raise OutputError(_write_error(self.path, e, "append to the resume journal")) from e

    def record(self, rec: TensorRecord) -> None:
        self._append(
            {
                "kind": "tensor",
                "name": rec.name,
                "shard": rec.shard,
                "offset": rec.offset,
                "length": rec.length,
                "crc32": rec.crc32,
            }
        )

    def sync(self) -> None:
        """Make every line appended so far durable (the caller fsyncs the data first)."""
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise OutputError(_write_error(self.path, e, "sync the resume journal")) from e

    def durable_point(self) -> None:
        self._append({"kind": "sync"})
        self.sync()

    def complete(self) -> None:
        self._append({"kind": "complete"})
        self.sync()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags, 0o644)
    except OSError as e:
        raise OutputError(f"{path}: cannot open the resume journal ({e.strerror})") from e


def _write_error(path: Path, e: OSError, action: str) -> str:
    if e.errno == errno.ENOSPC:
        return f"{path}: disk full, cannot {action}; free space and re-run the same command to resume"
    return f"{path}: cannot {action} ({e.strerror})"


class OutputLock:
    """An exclusive ``flock`` on ``OUT_DIR/.streammerge/lock`` for the duration of a merge.

    The kernel drops a ``flock`` when its process dies, so a lock file left by a killed merge is
    stale by construction: the next merge takes it and says so. The file names the holder
    (host and pid) for the message a second, concurrent merge prints. (``flock`` is not reliable on
    some network file systems; run one merge per output folder there.)
    """

    def __init__(self, out_dir: Path):
        self.path = out_dir / STATE_DIR / LOCK_NAME
        self._fd = -1
        self.stale_holder: str | None = None  # who held it before, if that merge died

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"{self.path.parent.parent}: another merge ({holder}) is writing this folder; "
                    f"wait for it or choose another output folder"
                ) from None
            raise OutputError(f"{self.path}: cannot lock ({e.strerror})") from e
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        self.stale_holder = previous or None
        me = f"pid {os.getpid()} on {socket.gethostname()}".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
