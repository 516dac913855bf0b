"""streammerge: merge huge LLM checkpoints one tensor at a time."""

__version__ = "0.1.0"
