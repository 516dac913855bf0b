"""PEFT adapter folders: OFT and LoRA readers, lazy, one tensor at a time (the writer: ``adapter_writer``).

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, read with ``torch.load(weights_only=True)``); tensors are read through
``open_checkpoint``, so only headers are read at open. Key names and config rules: ``peft_keys``.

**OFT** (``peft_type: OFT``, PEFT >= 0.16 format): per targeted module ``oft_R.weight`` (Linear) or
``oft_embedding_R.weight`` (Embedding), shape (n, b(b−1)/2) — each row a block's strict upper
triangle, row-major; n = in_features/b blocks, or 1 with ``block_share``. The block size b comes from the
config (``oft_block_size``, or in_features/``r``, adjusted as PEFT adjusts it) and is checked against the
stored vectors. The rotation map: exact Cayley unless ``use_cayley_neumann`` (PEFT's default when the key
is missing: true), then ``num_cayley_neumann_terms`` terms in the convention ``peft_version`` implies
(missing or < 0.18: the 0.16–0.17 series); ``coft``/``eps`` project generators as PEFT does.
Refused, with a message naming the format: ``oft_r`` keys (PEFT <= 0.13: full blocks rotating the output
side; 0.14–0.15: with an ``oft_s`` output scale), configs without ``oft_block_size`` (PEFT < 0.14), BOFT,
Conv2d targets.

**LoRA** (``peft_type: LORA``): ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r), or for an
Embedding ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B`` (dim, r). The expert weight is
W₀ + s·B·A (transposed for ``fan_in_fan_out`` and embeddings, as PEFT), s = alpha/r (alpha/sqrt(r) with
``use_rslora``), r from the tensors (checked against ``rank_pattern``), alpha from ``alpha_pattern``
(PEFT's first-matching-key rule). ``lora_bias``: ``lora_B.bias`` adds s·b to the module's bias.
Computed per tensor on demand in fp32, never for a whole model. Refused: DoRA and the other LoRA variants
and base-modifying initialisations (``peft_keys.LORA_REFUSED_OPTIONS`` / ``LORA_REFUSED_INITS``).

**Replacements** (both kinds): whole base tensors saved in the adapter — ``modules_to_save``, trained
biases (``bias: all``), an embedding's ``base_layer.weight`` — replace the base tensor of that name for
this adapter (``replacement``). Everything is validated against the base model's names and shapes
(``validate``); errors name the adapter file and tensor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..row_blocks import fresh, rows_in_blocks
from .hf_files import read_json_object
from .paths import regular_file
from .peft_keys import (
    LORA_REFUSED_INITS,
    LORA_REFUSED_OPTIONS,
    AdapterKey,
    legacy_oft_format,
    lora_scaling,
    neumann_convention,
    oft_block_size,
    parse_key,
    pattern_value,
)
from .reader import Checkpoint, open_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not os.path.lexists(path):
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    return read_json_object(regular_file(path, "an adapter config (JSON)"))


def is_adapter_folder(path: str | Path) -> bool:
    return os.path.lexists(Path(path) / ADAPTER_CONFIG)  # a FIFO or folder there is refused when read


def _weights_file(folder: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if os.path.lexists(folder / name):
            return regular_file(folder / name, "adapter weights")
    raise CheckpointError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} next to {ADAPTER_CONFIG}")


class PeftAdapter:
    """What OFT and LoRA adapters share: config, lazy weights, replaced base tensors."""

    kind = "adapter"

    def __init__(self, folder: Path, config: dict[str, Any], weights: Checkpoint):
        self.folder = folder
        self.config = config
        self.weights = weights
        self.file = weights.files[0]
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter key
        self._keys: list[AdapterKey] = []
        legacy = legacy_oft_format(weights.names())
        if legacy is not None:
            raise CheckpointError(f"{self.file}: is an adapter in {legacy}, which is not supported; "
                                  "only PEFT >= 0.16 OFT adapters (oft_R.weight vectors) are read")
        for key in weights.names():
            parsed = parse_key(key)
            if isinstance(parsed, str):
                raise CheckpointError(f"{self.file}: tensor {key!r} {parsed}")
            if parsed.role == "replacement":
                self.replacements[parsed.target] = key
            else:
                self._keys.append(parsed)

    def _option(self, name: str, default: Any) -> Any:
        value = self.config.get(name)
        return default if value is None else value

    def replacement(self, name: str) -> torch.Tensor | None:
        """The adapter's own copy of base tensor ``name`` (fp32), or None."""
        key = self.replacements.get(name)
        return None if key is None else self.weights.read(key).to(torch.float32)

    def targets(self) -> set[str]:
        """Base tensor names this adapter changes."""
        return set(self.replacements)

    def validate(self, base: Checkpoint) -> None:
        for name, key in self.replacements.items():
            self._check_shape(base, name, key, self.weights.meta(key).shape)

    def _check_shape(self, base: Checkpoint, name: str, key: str, expected: tuple[int, ...]) -> None:
        if name not in base:
            raise CheckpointError(
                f"{self.file}: tensor {key!r} acts on {name!r}, which the base model {base.path} lacks"
            )
        have = tuple(base.meta(name).shape)
        if have != tuple(expected):
            raise CheckpointError(
                f"{self.file}: tensor {key!r} needs base {name!r} of shape {tuple(expected)}, "
                f"but the base model has {have}; adapter and base model do not match"
            )

    def close(self) -> None:
        self.weights.close()


@dataclass(frozen=True)
class OftModule:
    key: str  # adapter key of the generator vectors
    target: str  # base weight name
    embedding: bool  # Embedding (W·R) rather than Linear (W·Rᵀ)
    block_size: int  # b
    blocks: int  # stored rows n: in_features / b, or 1 with block_share


@dataclass(frozen=True)
class OftRotationMap:
    """How one adapter turns generators into rotations (see ``methods.orthomerge.oft_rotation_blocks``)."""

    neumann_terms: int | None  # None: exact Cayley
    neumann_convention: str  # "peft-0.18" | "peft-0.16"
    coft_eps: float | None  # the config's eps when coft is on
    block_share: bool


class OftAdapter(PeftAdapter):
    kind = "oft"

    def __init__(self, folder: Path, config: dict[str, Any], weights: Checkpoint):
        super().__init__(folder, config, weights)
        where = folder / ADAPTER_CONFIG
        if "oft_block_size" not in config:
            raise CheckpointError(
                f"{where}: OFT config without oft_block_size: an adapter from PEFT < 0.14 (full oft_r blocks on "
                "the output side), which is not supported; retrain or convert it with PEFT >= 0.16"
            )
        self.r = int(self._option("r", 0))
        self.config_block_size = int(self._option("oft_block_size", 0))
        if (self.r != 0) == (self.config_block_size != 0):
            raise CheckpointError(
                f"{where}: exactly one of r ({self.r}) and oft_block_size ({self.config_block_size}) must be non-zero"
            )
        neumann = bool(self._option("use_cayley_neumann", True))  # OFTConfig's default
        terms = int(self._option("num_cayley_neumann_terms", 5))
        if neumann and terms < 1:
            raise CheckpointError(f"{where}: num_cayley_neumann_terms must be >= 1, got {terms}")
        coft = bool(self._option("coft", False))
        self.rotation = OftRotationMap(
            neumann_terms=terms if neumann else None,
            neumann_convention=neumann_convention(config.get("peft_version")),
            coft_eps=float(self._option("eps", 6e-5)) if coft else None,
            block_share=bool(self._option("block_share", False)),
        )
        self.modules: dict[str, OftModule] = {}
        for k in self._keys:
            if k.role not in ("oft", "oft_embedding"):
                raise CheckpointError(f"{self.file}: tensor {k.key!r} is not an OFT parameter (peft_type is OFT)")
            shape = tuple(weights.meta(k.key).shape)
            if len(shape) != 2:
                raise CheckpointError(f"{self.file}: tensor {k.key!r} has shape {shape}; expected (blocks, b(b-1)/2)")
            b = (1 + math.isqrt(1 + 8 * shape[1])) // 2
            if b * (b - 1) // 2 != shape[1]:
                raise CheckpointError(f"{self.file}: tensor {k.key!r}: {shape[1]} is not b(b-1)/2 for any block size b")
            self.modules[k.target] = OftModule(k.key, k.target, k.role == "oft_embedding", b, shape[0])

    def validate(self, base: Checkpoint) -> None:
        super().validate(base)
        for name, m in self.modules.items():
            if name not in base:
                raise CheckpointError(
                    f"{self.file}: tensor {m.key!r} rotates {name!r}, which the base model {base.path} lacks"
                )
            shape = tuple(base.meta(name).shape)
            if len(shape) != 2:
                raise CheckpointError(
                    f"{self.file}: tensor {m.key!r} targets {name!r} of shape {shape}; only Linear "
                    "and Embedding OFT layers are supported (not Conv2d)"
                )
            in_features = shape[1]
            expected = oft_block_size(in_features, self.r, self.config_block_size)
            blocks = 1 if self.rotation.block_share else in_features // expected
            if m.block_size != expected or m.blocks != blocks or in_features % m.block_size:
                raise CheckpointError(
                    f"{self.file}: tensor {m.key!r} holds {m.blocks} block(s) of size {m.block_size}, but base "
                    f"{name!r} {shape} with r={self.r}, oft_block_size={self.config_block_size}, "
                    f"block_share={self.rotation.block_share} needs {blocks} of size {expected}"
                )

    def targets(self) -> set[str]:
        return super().targets() | set(self.modules)

    def generator(self, name: str) -> torch.Tensor:
        """The stored generator vectors for base weight ``name``: (n, b(b−1)/2), fp32."""
        return self.weights.read(self.modules[name].key).to(torch.float32)


@dataclass(frozen=True)
class LoraModule:
    target: str  # base weight name
    a_key: str
    b_key: str
    embedding: bool
    rank: int
    scaling: float
    fan_in_fan_out: bool


class LoraAdapter(PeftAdapter):
    kind = "lora"

    def __init__(self, folder: Path, config: dict[str, Any], weights: Checkpoint):
        super().__init__(folder, config, weights)
        where = folder / ADAPTER_CONFIG
        for option, what in LORA_REFUSED_OPTIONS.items():
            if config.get(option):
                raise CheckpointError(f"{where}: {what} is not supported; merge it into the model with PEFT first")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(LORA_REFUSED_INITS):
            raise CheckpointError(
                f"{where}: init_lora_weights {init!r} changes the base weights at init (or is a LoRA variant); "
                "convert the adapter with PEFT's path_initial_model_for_weight_conversion, or merge it with PEFT"
            )
        by_module: dict[str, dict[str, AdapterKey]] = {}
        for k in self._keys:
            if not k.role.startswith("lora_"):
                raise CheckpointError(f"{self.file}: tensor {k.key!r} is not a LoRA parameter (peft_type is LORA)")
            by_module.setdefault(k.module, {})[k.role] = k
        self.modules: dict[str, LoraModule] = {}
        self.biases: dict[str, tuple[str, float]] = {}  # base bias name -> (lora_B.bias key, scaling)
        for module, parts in by_module.items():
            self._add_module(module, parts)

    def _add_module(self, module: str, parts: dict[str, AdapterKey]) -> None:
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a, b = (
            (parts.get("lora_embedding_A"), parts.get("lora_embedding_B"))
            if embedding
            else (parts.get("lora_A"), parts.get("lora_B"))
        )
        if a is None or b is None:
            present = ", ".join(k.key for k in parts.values())
            raise CheckpointError(f"{self.file}: module {module!r} has {present} but not both LoRA A and B")
        a_shape, b_shape = self.weights.meta(a.key).shape, self.weights.meta(b.key).shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CheckpointError(
                f"{self.file}: {a.key!r} {tuple(a_shape)} and {b.key!r} {tuple(b_shape)} are not r x in and out x r"
            )
        rank = a_shape[0]
        expected_rank = pattern_value(self.config.get("rank_pattern"), module, self._option("r", 8))
        if rank != expected_rank:
            raise CheckpointError(
                f"{self.file}: {a.key!r} has rank {rank}, but the config (r / rank_pattern) says {expected_rank}"
            )
        alpha = pattern_value(self.config.get("alpha_pattern"), module, self._option("lora_alpha", 8))
        scaling = lora_scaling(float(alpha), rank, bool(self._option("use_rslora", False)))
        target = module + ".weight"
        self.modules[target] = LoraModule(
            target,
            a.key,
            b.key,
            embedding,
            rank,
            scaling,
            bool(self._option("fan_in_fan_out", False)) and not embedding,
        )
        if "lora_B_bias" in parts:
            self.biases[module + ".bias"] = (parts["lora_B_bias"].key, scaling)

    def targets(self) -> set[str]:
        return super().targets() | set(self.modules) | set(self.biases)

    def validate(self, base: Checkpoint) -> None:
        super().validate(base)
        for name, m in self.modules.items():
            a = self.weights.meta(m.a_key).shape  # (r, in) or (r, num_embeddings)
            b = self.weights.meta(m.b_key).shape  # (out, r) or (dim, r)
            expected = (a[1], b[0]) if (m.embedding or m.fan_in_fan_out) else (b[0], a[1])
            self._check_shape(base, name, m.a_key, expected)
        for name, (key, _) in self.biases.items():
            self._check_shape(base, name, key, tuple(self.weights.meta(key).shape))

    def delta(
        self, name: str, device: torch.device | str | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        """s·B·A for base weight ``name`` (s·b for a ``lora_bias`` bias), fp32, in the base's layout; None
        if this adapter does not touch ``name``. ``rows``: only rows [r0, r1) of that (first-dim entries
        of a bias). Read on the CPU, computed on ``device``."""
        if name in self.biases:
            key, scaling = self.biases[name]
            bias = self.weights.read(key).to(device=device, dtype=torch.float32) * scaling
            return bias if rows is None else bias[rows[0] : rows[1]]
        m = self.modules.get(name)
        if m is None:
            return None
        a = self.weights.read(m.a_key).to(device=device, dtype=torch.float32)  # (r, in) / (r, num_embeddings)
        b = self.weights.read(m.b_key).to(device=device, dtype=torch.float32)  # (out, r) / (dim, r)
        transposed = m.embedding or m.fan_in_fan_out  # the base stores (B·A)ᵀ: its rows are columns of B·A
        n_rows, row_elements = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])

        def block(b0: int, b1: int) -> torch.Tensor:  # rows [b0, b1) of s·B·A in the base's layout
            if transposed:
                product = (b @ fresh(a[:, b0:b1])).transpose(0, 1).contiguous()
            else:
                product = fresh(b[b0:b1]) @ a  # (rows, in)
            return product.mul_(m.scaling)

        r0, r1 = rows if rows is not None else (0, n_rows)
        return rows_in_blocks(r0, r1, n_rows, row_elements, block)

    def expert_tensor(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """This adapter's version of base tensor ``name``: its replacement, W₀ + s·B·A, or W₀ (fp32, a
        fresh tensor on base's device)."""
        own = self.replacement(name)
        out = base.to(torch.float32, copy=True) if own is None else own.to(base.device)
        d = self.delta(name, base.device)
        if d is not None:
            out += d
        return out


def open_adapter(path: str | Path, base: Checkpoint | None = None) -> OftAdapter | LoraAdapter:
    """Open a PEFT adapter folder lazily; with ``base``, validate it against the base model's tensors."""
    folder = Path(path)
    config = read_adapter_config(folder)
    kind = str(config.get("peft_type", "")).upper()
    where = folder / ADAPTER_CONFIG
    if kind == "BOFT":
        raise CheckpointError(
            f"{where}: BOFT adapters (boft_R butterfly factors + boft_s) are not supported; "
            "merge it into the model with PEFT first"
        )
    if kind not in ("OFT", "LORA"):
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (OFT and LORA are)")
    weights = open_checkpoint(_weights_file(folder))
    try:
        adapter = (OftAdapter if kind == "OFT" else LoraAdapter)(folder, config, weights)
        if base is not None:
            adapter.validate(base)
    except BaseException:
        weights.close()
        raise
    return adapter


def _rotation_fields(a: OftAdapter) -> dict[str, Any]:
    """What decides a generator's meaning; the Neumann convention only matters with Neumann."""
    m = a.rotation
    return {
        "cayley": "exact" if m.neumann_terms is None else f"neumann, {m.neumann_terms} terms, {m.neumann_convention}",
        "coft eps": m.coft_eps,
        "block_share": m.block_share,
    }


def common_rotation_map(adapters: list[OftAdapter]) -> OftRotationMap:
    """The rotation map all ``adapters`` share. Generators of different maps are not comparable (the
    Neumann series approximates the transpose of the exact map), so a difference is an error."""
    first = _rotation_fields(adapters[0])
    for a in adapters[1:]:
        for key, value in _rotation_fields(a).items():
            if value != first[key]:
                raise CheckpointError(
                    f"{a.folder}: OFT {key} is {value!r} but {adapters[0].folder} has {first[key]!r}; "
                    "adapters merged together must use the same rotation map"
                )
    return adapters[0].rotation


def oft_sources(adapters: list[OftAdapter], name: str) -> list[tuple[OftAdapter, OftModule]]:
    """The adapters that rotate base weight ``name``, with their module records; their block layouts
    must agree (CheckpointError otherwise)."""
    found = [(a, a.modules[name]) for a in adapters if name in a.modules]
    for a, m in found[1:]:
        ref_a, ref = found[0]
        if (m.block_size, m.blocks, m.embedding) != (ref.block_size, ref.blocks, ref.embedding):
            raise CheckpointError(
                f"{a.file}: {m.key!r} has {m.blocks} block(s) of size {m.block_size} but {ref_a.file} has "
                f"{ref.blocks} of size {ref.block_size}; they cannot be merged"
            )
    return found
