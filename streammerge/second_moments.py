"""Opening the experts' second-moment sidecars (``sidecar:`` beside ``model:``) for OTA merges.

Each sidecar is checked against the model while planning: every tensor it shares with the model
must have the model's shape, and it must share at least one tensor name (a sidecar keyed
``module.model.…`` for a model keyed ``model.…`` fits nothing and is refused, not silently
ignored). A merged tensor that some expert's sidecar lacks follows the method's documented rule
(OTA: ``missing_second_moment``); ``describe`` says how many there are before anything runs.
"""

from __future__ import annotations

from .config import MergeConfig
from .errors import PlanError
from .io.writer import OutputTensor
from .sidecar import SecondMoments, load


def open_second_moments(config: MergeConfig, tensors: list[OutputTensor]) -> list[SecondMoments | None]:
    """One opened sidecar (or None) per expert of ``config``, in ``config.experts`` order."""
    shapes = {t.name: t.shape for t in tensors}
    opened: list[SecondMoments | None] = []
    try:
        for entry in config.experts:
            path = entry.extra.get("sidecar")
            if path is None:
                opened.append(None)
                continue
            sc = load(path)
            opened.append(sc)
            shared = [name for name in sc.keys() if name in shapes]
            if not shared:
                example = next(iter(sc.keys()), "nothing")
                raise PlanError(
                    f"{path}: none of its {len(sc.keys())} tensor names is a tensor of {entry.path} "
                    f"(it has e.g. {example!r}); the sidecar belongs to another model or needs its names fixed"
                )
            for name in shared:
                if tuple(sc.shape(name)) != tuple(shapes[name]):
                    raise PlanError(
                        f"{path}: tensor {name!r} has shape {list(sc.shape(name))} but {list(shapes[name])} in "
                        f"{entry.path}; the sidecar belongs to another model"
                    )
    except BaseException:
        for sc in opened:
            if sc is not None:
                sc.close()
        raise
    return opened


def describe(config: MergeConfig, tensors: list[OutputTensor], sidecars: list[SecondMoments | None]) -> list[str]:
    """Dry-run lines: per expert, its sidecar and how many merged tensors it has no second moment for."""
    lines = []
    for entry, sc in zip(config.experts, sidecars, strict=False):
        if sc is None:
            lines.append(f"sidecar     {entry.path}: none (every tensor merged without second moments)")
            continue
        missing = [t.name for t in tensors if t.name not in sc]
        note = f", {len(missing)} merged tensors without (e.g. {missing[0]})" if missing else ""
        lines.append(
            f"sidecar     {entry.path}: {entry.extra['sidecar']} ({len(tensors) - len(missing)} tensors{note})"
        )
    return lines
