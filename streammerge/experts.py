"""Experts that are PEFT adapters: a base model seen through an adapter, tensor by tensor.

A ``models:`` entry may be a PEFT adapter folder (``adapter_config.json``) instead of a model; it
then needs ``base_model:``. ``AdapterExpert`` presents it to the planner and the engine as the
checkpoint the adapter stands for, never materialised as a whole:

- **LoRA**: tensor = W₀ + s·B·A (a trained bias: b₀ + s·b; ``modules_to_save``: the adapter's copy),
  computed for the rows a read asks for, in fp32;
- **OFT**: tensor = W₀ with the adapter's rotation folded in as PEFT's ``merge_and_unload`` does
  (W·Rᵀ; W·R for embeddings), row by row as well; ``aux`` also hands OrthoMerge the raw generators
  (``OftInput``), which its OFT path merges in the Lie algebra instead of the folded weights.

Tensors the adapter does not touch are read from the base as stored. This module joins the adapter
readers (``io``) with the rotation math (``methods``), as the engine does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .io.peft_adapters import LoraAdapter, OftAdapter, PeftAdapter, is_adapter_folder
from .io.reader import Checkpoint, TensorMeta
from .methods.orthomerge import OFT_INPUT, OftInput, fold_oft, oft_rotation_blocks
from .row_blocks import rows_in_blocks


class AdapterExpert(Checkpoint):
    """``base`` as ``adapter`` changes it (see the module docstring). Reads return fp32 for tensors the
    adapter changes, the stored dtype otherwise."""

    cheap_ranges = False  # a range read computes its whole row blocks

    def __init__(self, base: Checkpoint, adapter: PeftAdapter):
        metas = {name: base.meta(name) for name in base.names()}
        files = [adapter.file, adapter.folder / "adapter_config.json"]
        super().__init__(adapter.folder, metas, files, {})
        self.base = base
        self.adapter = adapter
        self.kind = adapter.kind  # "lora" | "oft"
        self._changed = adapter.targets()

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(name)

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        meta = self.meta(name)
        if name not in self._changed:
            return self.base.read(name, start, count)
        if count is None:
            return self._changed_rows(name, 0, meta.shape[0] if meta.shape else 1).reshape(meta.shape)
        if start < 0 or start + count > meta.numel:
            raise ValueError(f"range [{start}, {start + count}) outside {name} of {meta.numel} elements")
        row = meta.numel // meta.shape[0] if meta.shape and meta.shape[0] else 1
        r0, r1 = start // row, -(-(start + count) // row)
        rows = self._changed_rows(name, r0, r1).reshape(-1)
        return rows[start - r0 * row : start - r0 * row + count].clone()

    def _changed_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the adapter's version of ``name`` (first-dim entries of a 1-D tensor), fp32,
        computed in the fixed row blocks of ``row_blocks`` so that any range has the whole tensor's bits."""
        meta = self.meta(name)
        rows = meta.shape[0] if meta.shape else 1
        return rows_in_blocks(r0, r1, rows, meta.numel // rows if rows else 1,
                              lambda b0, b1: self._block(name, b0, b1))

    def _block(self, name: str, r0: int, r1: int) -> torch.Tensor:
        own = self.adapter.replacement(name)
        if own is not None:
            w = own[r0:r1].clone()
        else:
            w = self._base_rows(name, r0, r1)
        if isinstance(self.adapter, LoraAdapter):
            d = self.adapter.delta(name, w.device, rows=(r0, r1))
            if d is not None:
                w += d
        elif isinstance(self.adapter, OftAdapter) and name in self.adapter.modules:
            m, rot = self.adapter.modules[name], self.adapter.rotation
            blocks = oft_rotation_blocks(self.adapter.generator(name), m.block_size, rot.neumann_terms,
                                         rot.neumann_convention, rot.coft_eps)
            w = fold_oft(w, blocks, m.embedding)
        return w

    def _base_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        meta = self.meta(name)
        row = meta.numel // meta.shape[0] if meta.shape and meta.shape[0] else 1
        flat = self.base.read(name, r0 * row, (r1 - r0) * row).to(torch.float32)
        return flat.reshape(r1 - r0, *meta.shape[1:]) if meta.shape else flat

    def aux(self, name: str) -> dict:
        if not isinstance(self.adapter, OftAdapter):
            return {}
        adapter = self.adapter

        def oft_input() -> OftInput:
            m, rot = adapter.modules.get(name), adapter.rotation
            return OftInput(
                generator=adapter.generator(name) if m is not None else None,
                replacement=adapter.replacement(name),
                block_size=m.block_size if m is not None else 0,
                embedding=m.embedding if m is not None else False,
                neumann_terms=rot.neumann_terms,
                neumann_convention=rot.neumann_convention,
                coft_eps=rot.coft_eps,
            )

        return {OFT_INPUT: oft_input}

    def prefetch(self, name: str) -> None:
        self.base.prefetch(name)

    def close(self) -> None:
        self.adapter.close()


def is_adapter(path: Path) -> bool:
    return is_adapter_folder(path)


class AdapterAppliedModel(AdapterExpert):
    """mergekit's ``MODEL+ADAPTER``: ``model`` with the adapter merged in, seen as a plain full model.

    mergekit merges the adapter into the model with PEFT (``merge_and_unload``) and then treats the
    result as an ordinary model; so does this view (``kind`` "model", no adapter-specific inputs), row
    range by row range as ``AdapterExpert``. Its side files (config, tokenizer) are ``model``'s."""

    kind = "model"

    def __init__(self, model: Checkpoint, adapter: PeftAdapter):
        super().__init__(model, adapter)
        self.kind = "model"
        self.path, self.folder = model.path, model.folder
        self.files = [*model.files, *self.files]
        self.index_files = list(model.index_files)

    def aux(self, name: str) -> dict:
        return {}

    def close(self) -> None:
        super().close()
        self.base.close()
