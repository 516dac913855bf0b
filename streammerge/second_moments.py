"""Opening the experts' second-moment sidecars (``sidecar:`` beside ``model:``) for OTA merges.

Each sidecar is checked against the model while planning: every tensor it shares with the model
must have the model's shape, and it must share at least one tensor name (a sidecar keyed
``module.model.…`` for a model keyed ``model.…`` fits nothing and is refused, not silently
ignored). A merged tensor that some expert's sidecar lacks follows the method's documented rule
(OTA: ``missing_second_moment``); ``describe`` says how many there are before anything runs.
"""

from __future__ import annotations

from .config import LAYER_RE, PRECONDITIONER_KEY, MergeConfig, layer_position, resolve_parameters
from .errors import PlanError
from .io.writer import OutputTensor
from .preconditioners import BlockBuffer, Preconditioner, key_candidates, open_preconditioner
from .sidecar import SecondMoments, load


def open_second_moments(config: MergeConfig, tensors: list[OutputTensor]) -> list[SecondMoments | None]:
    """One opened sidecar (or None) per expert of ``config``, in ``config.experts`` order."""
    if any(PRECONDITIONER_KEY in e.extra for e in config.experts):
        return open_preconditioners(config, tensors)
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


def open_preconditioners(config: MergeConfig, tensors: list[OutputTensor]) -> list[SecondMoments | None]:
    """The OTA authors' ``preconditioner_path`` files, one per expert, every merged tensor checked now:
    its key found (their fallbacks, ``preconditioners.key_candidates``) and of the model's shape."""
    shapes = {t.name: t.shape for t in tensors}
    num_layers = 1 + max((int(m.group(1)) for n in shapes if (m := LAYER_RE.search(n))), default=0)
    resolved = {n: resolve_parameters(config, n, layer_position(n, num_layers)) for n in shapes}
    opened: list[SecondMoments | None] = []
    buffer = BlockBuffer()  # one for every expert: their factors are computed one tensor and expert at a time
    try:
        for i, entry in enumerate(config.experts):
            if "sidecar" in entry.extra:
                raise PlanError(f"model {entry.path}: give its second moments as sidecar: or as "
                                f"parameters.{PRECONDITIONER_KEY}, and the same way for every model, not both")
            path = entry.extra.get(PRECONDITIONER_KEY)
            if path is None:
                raise PlanError(f"model {entry.path}: has no parameters.{PRECONDITIONER_KEY}; the OTA authors' "
                                "method needs one for every model")
            inner = open_preconditioner(path, entry.path)
            opened.append(inner)
            keys = {}
            for name, shape in shapes.items():
                key = next((k for k in key_candidates(name) if k in inner), None)
                if key is None:
                    if resolved[name][0].missing_second_moment == "linear":
                        continue
                    raise PlanError(
                        f"{path}: has no second moment for tensor {name!r} of {entry.path} (looked for "
                        f"{', '.join(repr(k) for k in dict.fromkeys(key_candidates(name)))}); the file belongs "
                        "to another model (set missing_second_moment: linear to merge such tensors linearly)"
                    )
                if tuple(inner.shape(key)) != tuple(shape):
                    raise PlanError(
                        f"{path}: key {key!r} has shape {list(inner.shape(key))} but tensor {name!r} of "
                        f"{entry.path} is {list(shape)}; the preconditioner belongs to another model"
                    )
                keys[name] = key
            if not keys:
                raise PlanError(f"{path}: none of its tensor names is a tensor of {entry.path}; "
                                "the preconditioner belongs to another model")
            approx = {n: (resolved[n][1][i].rank1_approx, resolved[n][1][i].rank) for n in keys}
            opened[-1] = Preconditioner(inner, keys, approx.__getitem__, buffer)
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
            f"sidecar     {entry.path}: {entry.extra.get('sidecar') or entry.extra.get(PRECONDITIONER_KEY)} "
            f"({len(tensors) - len(missing)} tensors{note})"
        )
    return lines
