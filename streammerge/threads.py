"""One CPU thread for the linear algebra whose bits depend on how many threads share it.

MKL's (and OpenBLAS') LAPACK routines and some BLAS kernels split their work by thread count, so an SVD,
QR, solve or product run with 2 threads can differ in the last bits from the same call with 1. A merge
must not depend on that: torchrun ranks run one thread each, a plain process runs torch's default, and a
resumed merge may run under another ``OMP_NUM_THREADS``. Decompositions and products therefore run on
one thread; the parallelism for them is ranks (``torchrun``), not threads. Elementwise passes and the
fixed-unit sums of ``methods/group_sums.py`` keep torch's threads (their bits do not depend on them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
