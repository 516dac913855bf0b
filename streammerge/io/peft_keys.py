"""PEFT adapter key names and config rules as tables and pure functions (no file I/O).

A PEFT adapter file stores, for a model wrapped as ``PeftModel(base)``, keys of the form

    base_model.model.<module>.<adapter param>        e.g. base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight

where ``<module>`` is the module's name in the base model (``model.layers.0.self_attn.q_proj``) and the
adapter name ("default") is already stripped. Other keys are whole base tensors the adapter replaces
(``modules_to_save``, trained biases, a resized embedding's ``base_layer.weight``):
``base_model.model.<module>[.base_layer].<param>`` -> ``<module>.<param>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

PEFT_PREFIX = "base_model.model."

Role = Literal["oft", "oft_embedding", "lora_A", "lora_B", "lora_B_bias", "lora_embedding_A", "lora_embedding_B",
               "replacement"]

# adapter parameter (the key's tail after the module) -> role; formats we read
ADAPTER_PARAMS: dict[str, Role] = {
    "oft_R.weight": "oft",
    "oft_embedding_R.weight": "oft_embedding",
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_B.bias": "lora_B_bias",
    "lora_embedding_A": "lora_embedding_A",
    "lora_embedding_B": "lora_embedding_B",
}

# adapter parameters of formats we refuse, with what they are (first match wins: longest names first)
REFUSED_PARAMS: dict[str, str] = {
    "oft_r": "an OFT adapter in a pre-0.16 PEFT format (full oft_r blocks)",
    "oft_s": "an OFT adapter in the PEFT 0.14-0.15 format (oft_r blocks with an oft_s output scale)",
    "boft_R": "a BOFT adapter (boft_R butterfly factors)",
    "boft_s": "a BOFT adapter (boft_s scale)",
    "lora_magnitude_vector": "a DoRA adapter (lora_magnitude_vector)",
    "lora_embedding_magnitude": "a DoRA adapter",
}

# tokens that mark adapter parameters of PEFT methods we do not read, so that such a key is never
# mistaken for a replaced base tensor
FOREIGN_MARKERS = ("lora_", "oft_", "boft_", "hada_", "lokr_", "ia3_", "vera_", "fourierft_", "ln_tuning",
                   "vblora_", "hra_", "bone_", "miss_", "shira_", "c3a_", "randlora_", "road_", "waveft_",
                   "gralora_", "delora_", "trainable_tokens_", "prompt_embeddings")


@dataclass(frozen=True)
class AdapterKey:
    key: str  # as stored in the adapter file
    module: str  # module path in the base model, e.g. 'model.layers.0.self_attn.q_proj'
    role: Role
    target: str  # the base tensor it acts on: '<module>.weight' ('<module>.bias' for lora_B_bias), or
    # the replaced tensor's name for 'replacement'


def parse_key(key: str) -> AdapterKey | str:
    """An ``AdapterKey``, or a one-line reason the key cannot be read."""
    if not key.startswith(PEFT_PREFIX):
        return f"does not start with {PEFT_PREFIX!r} (not a PeftModel state dict)"
    rest = key[len(PEFT_PREFIX):]
    for tail, role in ADAPTER_PARAMS.items():
        if rest.endswith("." + tail):
            module = rest[: -len(tail) - 1]
            return AdapterKey(key, module, role, module + (".bias" if role == "lora_B_bias" else ".weight"))
    parts = rest.split(".")
    for name, what in sorted(REFUSED_PARAMS.items(), key=lambda kv: -len(kv[0])):
        if name in parts:
            return f"is {what}, which is not supported"
    if any(marker in part for part in parts for marker in FOREIGN_MARKERS):
        return "is an adapter parameter of a kind streammerge does not read"
    if ".default." in f".{rest}." or "modules_to_save" in parts:
        return "still carries an adapter name / wrapper (not saved with save_pretrained?)"
    target = ".".join(p for p in parts if p != "base_layer")
    return AdapterKey(key, target.rsplit(".", 1)[0], "replacement", target)


def legacy_oft_format(keys: list[str]) -> str | None:
    """Name the pre-0.16 OFT format of an adapter from its keys, or None. PEFT <= 0.13 stored full
    blocks ``oft_r`` (r, b, b) rotating the output side; 0.14–0.15 stored ``oft_r`` over the input side
    plus an ``oft_s`` (out, 1) output scale."""
    parts = {p for k in keys for p in k.split(".")}
    if "oft_r" not in parts:
        return None
    if "oft_s" in parts:
        return "the PEFT 0.14-0.15 OFT format (full oft_r blocks on the input side and an oft_s output scale)"
    return "the PEFT <= 0.13 OFT format (full oft_r blocks rotating the output side)"


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'0.18.0.dev0@abc123' -> (0, 18, 0); None when missing or unparsable."""
    if not isinstance(text, str):
        return None
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text.partition("@")[0])
    return tuple(int(x) for x in match.group(1).split(".")) if match else None


def neumann_convention(peft_version: str | None) -> Literal["peft-0.18", "peft-0.16"]:
    """PEFT >= 0.18 sums I + 2Q + … + Q^(k−1); 0.16–0.17 ended with 2Q^(k−1). ``peft_version`` is only
    recorded since 0.18, so a missing one means older — PEFT's own rule (``OFTConfig.check_kwargs``)."""
    version = parse_version(peft_version)
    return "peft-0.18" if version is not None and version >= (0, 18) else "peft-0.16"


def adjust_oft_parameters(in_features: int, value: int) -> int:
    """PEFT's ``OFTLayer.adjust_oft_parameters``: the divisor of in_features nearest to ``value``
    (the lower one on a tie), used when r or oft_block_size does not divide the layer."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def oft_block_size(in_features: int, r: int, block_size: int) -> int:
    """The block size PEFT uses for a layer with ``in_features`` inputs, from the config's r or
    oft_block_size (exactly one is non-zero), adjusted as PEFT adjusts it."""
    if r == 0 and block_size != 0:
        if in_features % block_size != 0 or block_size > in_features:
            block_size = adjust_oft_parameters(in_features, block_size)
        return block_size
    if r != 0 and block_size == 0:
        if in_features % r != 0 or r > in_features:
            r = adjust_oft_parameters(in_features, r)
        return in_features // r
    raise ValueError(f"exactly one of r ({r}) and oft_block_size ({block_size}) must be non-zero")


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` lookup for rank_pattern / alpha_pattern: the first key (in the
    config's order) that matches the end of the module name on a '.' boundary, as a regex."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha/r, or alpha/sqrt(r) with ``use_rslora``."""
    return alpha / rank**0.5 if use_rslora else alpha / rank


# LoRA config entries whose non-default value changes what the adapter means beyond W₀ + s·B·A
# (or needs a modified base model): key -> what it is. A truthy value is refused.
LORA_REFUSED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (use_dora) renormalises the merged weight by lora_magnitude_vector",
    "use_qalora": "QA-LoRA (use_qalora) pools inputs group-wise",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "LoRA on nn.Parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
# init_lora_weights values whose adapters assume a base model modified at init (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA move the principal part out of W₀) or that are LoRA variants (MiCA)
LORA_REFUSED_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
