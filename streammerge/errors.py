"""The one exception family streammerge raises for anything a user can fix.

Every message names the file or tensor at fault and, where there is one, the fix. The CLI prints
``str(error)`` on one line and exits non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class StreamMergeError(Exception):
    """Base class: a problem with the user's input, config or environment."""


class ConfigError(StreamMergeError):
    """The merge config (YAML or API arguments) is invalid."""


class CheckpointError(StreamMergeError):
    """A checkpoint file or folder is missing, malformed or inconsistent."""


class PlanError(StreamMergeError):
    """The inputs do not fit together (missing tensor, shape mismatch, bad output folder)."""


class OutputError(StreamMergeError):
    """Writing the output failed (disk full, permissions, another merge holds the folder)."""
