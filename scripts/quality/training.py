"""The tiny Llama, its pretraining and the three ways of fine-tuning an expert; files in HF layout.

Every run is seeded; the optimizer is AdamW with linear warm-up and cosine decay; batches come from
``tasks.training_batch`` (loss on the answer tokens only). Full fine-tuning keeps its optimizer so
the expert's Adam second moments can be written next to it for OTA.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tasks import VOCAB, Split, training_batch

log = logging.getLogger(__name__)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    intermediate: int = 384
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention: k_proj/v_proj are (64, 128), wider than tall
    max_positions: int = 32


@dataclass(frozen=True)
class RunSpec:
    """One training run: steps of ``batch`` examples at peak learning rate ``lr``."""

    steps: int
    lr: float
    batch: int = 64
    warmup: int = 50
    weight_decay: float = 0.0


def new_model(size: ModelSize, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(model: torch.nn.Module, pools: list[Split], spec: RunSpec, seq_len: int, seed: int,
          on_step: Callable[[int, float], None] | None = None) -> torch.optim.AdamW:
    """Train the parameters of ``model`` that require grad; return the optimizer (its state kept)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / spec.warmup) * 0.5 * (1 + math.cos(math.pi * step / spec.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(spec.steps):
        ids, labels = training_batch(pools, spec.batch, seq_len, gen)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    return opt


def save_model(model, folder: Path) -> None:
    """An HF folder: config.json + model.safetensors (transformers 5 always writes safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)


def load_model(folder: Path, base: Path | None = None):
    """A model folder, or a PEFT adapter folder folded into its base (``base`` or the one it names)."""
    from transformers import LlamaForCausalLM

    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base = base or Path(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
        model = model.merge_and_unload()
    else:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


# --- the three ways of fine-tuning -------------------------------------------------------------


def finetune_full(base_folder: Path, pool: Split, spec: RunSpec, seq_len: int, seed: int, out: Path,
                  sidecar_module: str | None) -> list[str]:
    """Full fine-tuning with AdamW. Writes the model to ``out``, the raw name-keyed ``exp_avg_sq``
    (fp32 safetensors, the OTA authors' format) to ``out/exp_avg_sq.safetensors`` and, when the
    streammerge under test has ``sidecar.export``, sidecars ``out/v-rank1.sidecar`` and
    ``out/v-exact.sidecar``. Returns the second-moment files written (names inside ``out``)."""
    model = load_model(base_folder)
    opt = train(model, [pool], spec, seq_len, seed)
    save_model(model, out)
    written = [_dump_exp_avg_sq(model, opt, out / "exp_avg_sq.safetensors")]
    if sidecar_module:
        sidecar = importlib.import_module(sidecar_module)
        for rank, name in ((1, "v-rank1.sidecar"), ("exact", "v-exact.sidecar")):
            try:
                sidecar.export(model, opt, out / name, rank=rank)
                written.append(name)
            except Exception as e:  # noqa: BLE001 -- an API still in flux: warn, keep the raw dump
                log.warning("sidecar.export(rank=%r) failed: %s", rank, e)
    return written


def _dump_exp_avg_sq(model, opt: torch.optim.Optimizer, path: Path) -> str:
    state = {name: opt.state[p]["exp_avg_sq"].detach().to(torch.float32).contiguous()
             for name, p in model.named_parameters() if p in opt.state}
    save_file(state, path, metadata={"format": "pt"})
    return path.name


def finetune_lora(base_folder: Path, pool: Split, spec: RunSpec, seq_len: int, seed: int, out: Path,
                  merged_out: Path, rank: int, alpha: int) -> None:
    """A PEFT LoRA adapter on every attention and MLP projection, saved to ``out``; the base with the
    adapter folded in (W + (alpha/rank)·BA) saved to ``merged_out`` for the model-level methods."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A init
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGET_MODULES, bias="none")
    _finetune_adapter(base_folder, cfg, get_peft_model, pool, spec, seq_len, seed, out, merged_out)


def finetune_oft(base_folder: Path, pool: Split, spec: RunSpec, seq_len: int, seed: int, out: Path,
                 merged_out: Path, block_size: int) -> None:
    """A PEFT OFT adapter (block-diagonal rotations of each projection's input, PEFT's defaults:
    Cayley–Neumann map, no COFT), saved to ``out``; the base with it folded in to ``merged_out``."""
    from peft import OFTConfig, get_peft_model

    cfg = OFTConfig(r=0, oft_block_size=block_size, target_modules=TARGET_MODULES, module_dropout=0.0)
    _finetune_adapter(base_folder, cfg, get_peft_model, pool, spec, seq_len, seed, out, merged_out)


def _finetune_adapter(base_folder: Path, cfg, get_peft_model, pool: Split, spec: RunSpec, seq_len: int, seed: int,
                      out: Path, merged_out: Path) -> None:
    model = get_peft_model(load_model(base_folder), cfg)
    train(model, [pool], spec, seq_len, seed)
    model.save_pretrained(out)
    save_model(copy.deepcopy(model).merge_and_unload(), merged_out)
