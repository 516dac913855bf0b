"""Parameter names for the integer ids of a torch optimizer state dict. Pure: lists and dicts in and out.

``optimizer.state_dict()`` numbers parameters 0, 1, 2, ... in the order of its param groups and, within
a group, in the order the parameters were given; its ``state`` is keyed by those ids, with no names.
Hugging Face's ``Trainer.create_optimizer`` (transformers 5.x, ``get_decay_parameter_names``) builds
two groups from the model's ``named_parameters()`` (trainable ones only, each in that order):

    group 0 (weight decay): every parameter not matched below
    group 1 (no decay):     parameters inside an ``nn.LayerNorm`` module (``ALL_LAYERNORM_LAYERS``), or
                            whose lower-cased full name matches one of ``NO_DECAY_PATTERNS``

Older transformers releases (before the name patterns) excluded only names containing "bias" and
``nn.LayerNorm`` modules, so RMSNorm weights were decayed; ``candidate_layouts`` offers both rules and
``assign_names`` keeps the ones that fit the file: same group sizes and every state's shape equal to
the checkpoint tensor's shape. One fitting assignment is returned; none or several is an error.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ..errors import CheckpointError

# transformers Trainer.get_decay_parameter_names: forbidden_name_patterns, searched in the lower-cased name
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
LEGACY_NO_DECAY_PATTERNS = (r"bias",)


@dataclass(frozen=True)
class Layout:
    """A guess at the names behind a state dict's param groups."""

    rule: str  # what produced it, for messages
    groups: tuple[tuple[str, ...], ...]  # names per param group
    ordered: bool = True  # False: the order inside a group is unknown; names are matched by shape


def hf_trainer_groups(
    names: list[str], layernorm_params: Collection[str] = (), patterns: tuple[str, ...] = NO_DECAY_PATTERNS
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(decay, no_decay) names as HF Trainer splits ``names`` (``named_parameters()`` order, trainable).

    ``layernorm_params``: names of parameters owned by ``nn.LayerNorm`` modules (type-based exclusion).
    """
    compiled = [re.compile(p) for p in patterns]
    skip = set(layernorm_params)

    def decays(name: str) -> bool:
        return name not in skip and not any(p.search(name.lower()) for p in compiled)

    return tuple(n for n in names if decays(n)), tuple(n for n in names if not decays(n))


def candidate_layouts(
    names: list[str], layernorm_params: Collection[str], n_groups: int, ordered: bool
) -> list[Layout]:
    """The layouts a checkpoint with ``n_groups`` param groups may have (duplicates removed)."""
    if n_groups == 1:
        return [Layout("one group of all parameters", (tuple(names),), ordered)]
    if n_groups != 2:
        return []
    layouts = [
        Layout("HF Trainer groups (decay, then biases and norms)", hf_trainer_groups(names, layernorm_params), ordered),
        Layout(
            "HF Trainer groups, older rule (only biases and nn.LayerNorm undecayed)",
            hf_trainer_groups(names, layernorm_params, LEGACY_NO_DECAY_PATTERNS),
            ordered,
        ),
    ]
    unique: list[Layout] = []
    for layout in layouts:
        if all(layout.groups != u.groups for u in unique):
            unique.append(layout)
    return unique


def _fit(
    layout: Layout,
    group_ids: list[list[int]],
    state_shapes: Mapping[int, tuple[int, ...]],
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[dict[int, str] | None, str, bool]:
    """The assignment ``layout`` gives, or None, why it does not fit and whether that is an ambiguity."""
    if len(layout.groups) != len(group_ids):
        return None, f"{len(group_ids)} param groups, the layout has {len(layout.groups)}", False
    out: dict[int, str] = {}
    for g, (ids, names) in enumerate(zip(group_ids, layout.groups, strict=False)):
        if len(ids) != len(names):
            return None, f"param group {g} has {len(ids)} ids, the layout puts {len(names)} parameters there", False
        missing = [n for n in names if n not in shapes]
        if missing:
            return None, f"{missing[0]!r} is not in the checkpoint's weights", False
        if layout.ordered:
            for i, name in zip(ids, names, strict=False):
                if i in state_shapes and tuple(state_shapes[i]) != tuple(shapes[name]):
                    return (
                        None,
                        f"state {i} has shape {list(state_shapes[i])} but {name!r} has {list(shapes[name])}",
                        False,
                    )
                out[i] = name
            continue
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for name in names:
            by_shape.setdefault(tuple(shapes[name]), []).append(name)
        for i in ids:
            if i not in state_shapes:
                return None, f"state {i} is absent, so its shape cannot place it (the parameter order is needed)", True
            candidates = by_shape.get(tuple(state_shapes[i]), [])
            if len(candidates) != 1:
                what = (
                    "no parameter" if not candidates else f"{len(candidates)} parameters ({', '.join(candidates[:3])})"
                )
                return (
                    None,
                    f"state {i} of shape {list(state_shapes[i])} fits {what} in param group {g}",
                    len(candidates) > 1,
                )
            out[i] = candidates.pop()
    return out, "", False


def assign_names(
    group_ids: list[list[int]],
    state_shapes: Mapping[int, tuple[int, ...]],
    layouts: list[Layout],
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
) -> dict[int, str]:
    """Map every param id to its name: the one assignment that the candidate ``layouts`` agree on.

    ``group_ids``: each param group's ``params`` list; ``state_shapes``: the ``exp_avg_sq`` shape per id
    (ids without state may be absent); ``shapes``: the checkpoint's tensor shapes by name.
    Raises ``CheckpointError`` (prefixed with ``where``) when no layout fits or several differ.
    """
    if not layouts:
        raise CheckpointError(
            f"{where}: {len(group_ids)} param groups; only the 1- or 2-group layouts of HF Trainer and plain "
            "torch optimizers can be named; export from the live process with streammerge.sidecar.export"
        )
    fits: list[tuple[Layout, dict[int, str]]] = []
    reasons: list[str] = []
    ambiguous = False
    for layout in layouts:
        mapping, why, unclear = _fit(layout, group_ids, state_shapes, shapes)
        ambiguous |= unclear
        if mapping is None:
            reasons.append(f"{layout.rule}: {why}")
        elif all(mapping != m for _, m in fits):
            fits.append((layout, mapping))
    if len(fits) == 1:
        return fits[0][1]
    if not fits and ambiguous:
        raise CheckpointError(
            f"{where}: ambiguous parameter names without the model's parameter order ({'; '.join(reasons)}); "
            "install transformers so the order comes from config.json, or pass --model with a loadable config"
        )
    if not fits:
        raise CheckpointError(f"{where}: cannot name the optimizer states ({'; '.join(reasons)})")
    rules = " and ".join(f"'{layout.rule}'" for layout, _ in fits)
    raise CheckpointError(
        f"{where}: ambiguous parameter names: {rules} both fit with different names; "
        "export the second moments by name from the training process instead"
    )
