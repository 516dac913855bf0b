"""streammerge: merge huge LLM checkpoints one tensor at a time."""

import os

__version__ = "0.1.0"

# OpenMP threads that wait for work sleep instead of spinning. A merge is thousands of short elementwise
# passes, each a parallel region; on a machine shared with other processes a spinning thread waits for a
# descheduled sibling at every region's end (README, issue 13: 2x the wall time of a CPU merge at a load
# average of 4 on 2 cores). libgomp reads this once, when torch loads it: set here, before torch is
# imported; a user's own setting wins, and a process that imported torch first keeps its policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import merge, plan  # noqa: E402
from .errors import StreamMergeError  # noqa: E402

__all__ = ["merge", "plan", "StreamMergeError", "__version__"]
