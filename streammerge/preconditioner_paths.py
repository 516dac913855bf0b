"""Where an OTA ``preconditioner_path`` points: a local file (or Trainer folder), or a hub file.

The OTA authors write second-moment files as local paths or as hub files, ``org/name/path/in/repo``
or ``org/name:path/in/repo``. A value that exists locally (relative to the working directory, or to
the config file's folder) is that file. Otherwise a value of a hub form is resolved like a hub model
(``io/hub.py``): the local Hugging Face cache first, a download when online, and offline one line
naming the repository, the file and how to fetch it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError, StreamMergeError

# org/name/path/in/repo  or  org/name:path/in/repo  (org and name: hub repo id characters)
HUB_FILE_RE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:/|:)(?P<file>[^:].*)$")


def split_hub_file(value: str) -> tuple[str, str] | None:
    """``(repo_id, filename)`` of a hub-form value, or None when it is not one."""
    m = HUB_FILE_RE.match(value)
    return (m.group("repo"), m.group("file")) if m else None


def resolve_hub_file(repo_id: str, filename: str, where: str, key: str) -> Path:
    """The local path of ``filename`` in hub repo ``repo_id[@revision]`` (cache first, see ``io/hub.py``)."""
    from .io import hub

    parsed = hub.split_repo_file(f"{repo_id}:{filename}")
    if parsed is None:
        raise ConfigError(f"{where}: {key} {repo_id}/{filename}: not a hub file name (org/name/path or org/name:path)")
    repo, revision, path_in_repo = parsed
    try:
        return hub.resolve_repo_file(repo, path_in_repo, revision)
    except StreamMergeError as e:
        raise ConfigError(f"{where}: {key}: {e}") from e


def resolve_preconditioner_path(value: object, root: Path | None, where: str, key: str) -> Path:
    """The local path a ``preconditioner_path`` value names (see the module docstring)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a path to a second-moment file, got {value!r}")
    p = Path(value).expanduser()
    if not p.exists() and root is not None and not p.is_absolute() and (root / p).exists():
        p = root / p
    if p.exists():
        return p
    hub = split_hub_file(value) if not value.startswith(("/", ".", "~")) else None
    if hub is not None:
        return resolve_hub_file(hub[0], hub[1], where, key)
    raise ConfigError(f"{where}: {key} {value!r} does not exist (expected an exp_avg_sq .safetensors file, a "
                      "streammerge sidecar, a torch optimizer state or a Trainer checkpoint folder)")
