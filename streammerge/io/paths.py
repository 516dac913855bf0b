"""Paths a user names, checked for what they are before anything opens them.

Opening a FIFO for reading blocks until a writer appears, and a device or socket is never a
checkpoint, so every file a user points streammerge at (configs, sidecars, optimizer states, adapter
and model configs, weights) is first ``stat``-ed — which never blocks — and refused with one line
unless it is a regular file (a symlink to one is fine: Hugging Face caches are made of them).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CheckpointError, StreamMergeError

FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


def kind_of(mode: int) -> str:
    """'a FIFO', 'a folder', … for an ``st_mode`` that is not a regular file's."""
    return FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def regular_file(
    path: str | os.PathLike, what: str, error: type[StreamMergeError] = CheckpointError, verb: str = "open"
) -> Path:
    """``path``, checked to be (or to lead to) a regular file without opening it; ``what`` names the
    file's role in the message (e.g. "a sidecar file"), ``verb`` what could not be done to a missing one."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        raise error(f"{p}: cannot {verb} {what} ({e.strerror})") from e
    if not stat.S_ISREG(mode):
        raise error(f"{p}: is {kind_of(mode)}, not {what}")
    return p
