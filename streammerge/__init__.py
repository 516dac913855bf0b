"""streammerge: merge huge LLM checkpoints one tensor at a time."""

from .api import merge, plan
from .errors import StreamMergeError

__version__ = "0.1.0"
__all__ = ["merge", "plan", "StreamMergeError", "__version__"]
