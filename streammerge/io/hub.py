"""Models named by Hugging Face hub id: ``org/name`` or ``org/name@revision`` -> a local snapshot folder.

Rule (``resolve_model``'s caller decides what is a hub id): a path that exists locally always wins; a
value that does not exist and looks like ``org/name[@revision]`` is a hub id. It is resolved through
``huggingface_hub``:

1. the local cache first (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default,
   read when the call is made): a cached snapshot of that revision that holds weights is used as is,
   with no network access;
2. otherwise, unless ``HF_HUB_OFFLINE`` is set, a download of the weights, config and tokenizer files
   only: ``*.safetensors`` (``*.bin`` only when the repository has no safetensors), ``*.json``,
   ``tokenizer.model``, ``vocab.txt``, ``merges.txt`` (what mergekit fetches, plus the two slow-tokenizer
   files);
3. offline, or when the hub cannot be reached: one line naming the repository and the command that
   fetches it.

``resolve_repo_file`` does the same for one file of a repository (e.g. a second-moment file named
``org/name/path/in/repo`` or ``org/name:path/in/repo``). The snapshot folder's files are symlinks
into the cache's ``blobs/``; the checkpoint reader accepts exactly that layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
WEIGHT_PATTERNS = ("*.safetensors",)
BIN_PATTERNS = ("*.bin",)
SIDE_PATTERNS = ("*.json", "tokenizer.model", "vocab.txt", "merges.txt")


def split_revision(value: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; mergekit's ModelPath rule (at most one ``@``)."""
    if value.count("@") == 1:
        repo, rev = value.split("@")
        return repo, rev or None
    return value, None


def is_repo_id(value: str) -> bool:
    """``org/name`` or ``org/name@revision`` (the caller checks first that no local path has that name)."""
    if value.count("@") > 1:
        return False
    repo, _ = split_revision(value)
    return bool(REPO_ID_RE.match(repo)) and ".." not in repo


def cache_dir() -> Path:
    """The hub cache as the environment says now: HF_HUB_CACHE, else $HF_HOME/hub, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(_hub().constants.HF_HUB_CACHE)


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE") or bool(_hub().constants.HF_HUB_OFFLINE)


def fetch_command(repo_id: str, revision: str | None, filename: str | None = None) -> str:
    rev = f" --revision {revision}" if revision else ""
    what = f" {filename}" if filename else " --include '*.safetensors' '*.json' 'tokenizer.model'"
    return f"hf download {repo_id}{rev}{what}"


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(
            "hub model ids need huggingface_hub: pip install 'streammerge[hub]' (or give a local folder)"
        ) from e
    return huggingface_hub


def _has_weights(folder: Path) -> bool:
    return any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir())


def _unreachable(repo_id: str, revision: str | None, why: str, filename: str | None = None) -> CheckpointError:
    name = f"{repo_id}@{revision}" if revision else repo_id
    item = f"file {filename!r} of hub repository {name}" if filename else f"hub model {name}"
    return CheckpointError(
        f"{item} is not in the local cache ({cache_dir()}) and {why}; no local folder has that name either. "
        f"Fetch it where the hub is reachable: `{fetch_command(repo_id, revision, filename)}` "
        f"(older huggingface_hub: `huggingface-cli download ...`), or give a local folder"
    )


def resolve_model(value: str) -> Path:
    """The local snapshot folder of hub model ``org/name[@revision]`` (see the module docstring)."""
    hub = _hub()
    repo_id, revision = split_revision(value)
    cache = cache_dir()
    try:
        folder = Path(hub.snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
        if folder.is_dir() and _has_weights(folder):
            return folder
    except Exception:  # not cached (huggingface_hub raises several kinds): try the hub
        pass
    if offline():
        raise _unreachable(repo_id, revision, "HF_HUB_OFFLINE is set")
    try:
        files = hub.list_repo_files(repo_id, revision=revision)
        weights = WEIGHT_PATTERNS if any(f.endswith(".safetensors") for f in files) else BIN_PATTERNS
        folder = Path(hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                            allow_patterns=[*weights, *SIDE_PATTERNS]))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _unreachable(repo_id, revision, f"the hub could not provide it ({reason})") from e
    if not _has_weights(folder):
        raise CheckpointError(f"hub model {value}: the repository holds no .safetensors or .bin weights")
    return folder


def resolve_repo_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """The local path of ``filename`` in hub repository ``repo_id`` (cache first, then a download)."""
    hub = _hub()
    cache = cache_dir()
    found = hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    if offline():
        raise _unreachable(repo_id, revision, "HF_HUB_OFFLINE is set", filename)
    try:
        return Path(hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _unreachable(repo_id, revision, f"the hub could not provide it ({reason})", filename) from e


def split_repo_file(value: str) -> tuple[str, str | None, str] | None:
    """The authors' hub forms of a file: ``org/name:path/in/repo`` or ``org/name/path/in/repo`` (each with an
    optional ``@revision`` after the name) -> ``(repo_id, revision, path_in_repo)``; None if neither."""
    if ":" in value:
        repo, _, filename = value.partition(":")
    else:
        parts = value.split("/")
        if len(parts) < 3:
            return None
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not filename or not is_repo_id(repo) or ".." in filename.split("/"):
        return None
    repo_id, revision = split_revision(repo)
    return repo_id, revision, filename
