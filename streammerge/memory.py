"""Give freed heap memory back to the operating system between tensors.

glibc keeps freed memory in its arenas (one per thread that allocates: the merge loop and the
writer thread) and returns it only when a free leaves enough at the top of a heap. After a tensor of
a few hundred MB the arenas then hold holes that later, differently sized chunks may not fit, and
peak RSS creeps up with every extra pass a method makes — that is, with the number of experts.
``malloc_trim(0)`` releases every whole free page of every arena (``madvise(MADV_DONTNEED)`` inside
a heap, not only its top), so each tensor starts from the same footprint. It costs well under a
millisecond per call on a heap of this size. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable


def _malloc_trim() -> Callable[[], None]:
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0) and None


release_free_memory = _malloc_trim()
