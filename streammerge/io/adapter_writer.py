"""Write a merged OFT adapter folder that PEFT loads: ``adapter_config.json`` + ``adapter_model.safetensors``.

The weights file is laid out like a model shard (``writer.ShardWriter``: header planned first, each
tensor ``pwrite``n into its slot, written as a hidden ``.partial`` and renamed once every tensor is in); its bytes
equal ``safetensors.torch.save_file(tensors, metadata={"format": "pt"})``. The config is written last,
so a folder with a config is complete. Tensors are written as given: keys in PEFT's layout
(``base_model.model.<module>.oft_R.weight``), vectors (n, b(b−1)/2) in the inputs' dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, OutputError
from .peft_adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, OftAdapter, common_rotation_map
from .safetensors_format import TensorSpec
from .writer import ShardPlan, ShardWriter, write_text_atomic


def merged_adapter_config(adapters: list[OftAdapter]) -> dict[str, Any]:
    """adapter_config.json of a merged OFT adapter: the first input's config, with ``target_modules`` the
    union of the inputs' (lists) and ``inference_mode`` on. The rotation map must be common
    (``common_rotation_map``) and so must r / oft_block_size."""
    common_rotation_map(adapters)
    first = dict(adapters[0].config)
    for a in adapters[1:]:
        if (a.r, a.config_block_size) != (adapters[0].r, adapters[0].config_block_size):
            raise CheckpointError(f"{a.folder}: r / oft_block_size ({a.r}, {a.config_block_size}) differ from "
                                  f"{adapters[0].folder}'s ({adapters[0].r}, {adapters[0].config_block_size})")
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, list) for t in targets):
        first["target_modules"] = sorted({m for t in targets for m in t})
    elif len({json.dumps(t, sort_keys=True) for t in targets}) > 1:
        raise CheckpointError(f"{adapters[0].folder}: the adapters' target_modules differ and are not all lists; "
                              "cannot write one config for their merge")
    first["inference_mode"] = True
    return first


class AdapterWriter:
    """Write an adapter folder PEFT loads: ``adapter_model.safetensors`` tensor by tensor (planned
    header first, like the model writer), then ``adapter_config.json`` last. Use as a context manager."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any], tensors: list[TensorSpec]):
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.out_dir}: cannot create ({e.strerror})") from e
        self.config = config
        self._writer = ShardWriter(self.out_dir, [ShardPlan(ADAPTER_WEIGHTS[0], list(tensors))])

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._writer.write(key, tensor)
        self._writer.finish_tensor(key)

    def finish(self) -> None:
        self._writer.finalize()
        write_text_atomic(self.out_dir / ADAPTER_CONFIG, json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def __enter__(self) -> AdapterWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()


def write_adapter(out_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write a whole (small) adapter at once; see ``AdapterWriter``."""
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with AdapterWriter(out_dir, config, specs) as w:
        for k, t in tensors.items():
            w.write(k, t)
        w.finish()
