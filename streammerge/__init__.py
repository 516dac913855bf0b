"""streammerge: merge huge LLM checkpoints one tensor at a time."""

__version__ = "0.1.0"

from .api import merge, plan  # noqa: E402
from .errors import StreamMergeError  # noqa: E402

__all__ = ["merge", "plan", "StreamMergeError", "__version__"]
