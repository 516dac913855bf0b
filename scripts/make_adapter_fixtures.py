"""Build the PEFT adapter fixtures in fixtures/adapters/ with real PEFT (deterministic; rerun to regenerate).

    python scripts/make_adapter_fixtures.py [--out fixtures/adapters]

Needs the optional dev dependencies ``peft`` (>= 0.18, so that ``peft_version`` is recorded) and
``transformers``. Every adapter is made on ``fixtures/tiny-llama-fp32-base`` (hidden 64, intermediate
128, 2 layers) and saved with ``save_pretrained`` (adapter_config.json + adapter_model.safetensors; the
generated README.md model card is removed). Weights are random, not PEFT's identity / zero init, so
merges and folds are meaningful:

    oft-cayley-a, oft-cayley-b   exact Cayley, oft_block_size 8, all linear + embed_tokens
    oft-neumann-a, oft-neumann-b Cayley-Neumann (5 terms), oft_block_size 8
    oft-coft                     exact Cayley, coft with an eps that clips some blocks, not all
    oft-blockshare               exact Cayley, block_share (one block per module, repeated)
    oft-rank                     Cayley-Neumann (4 terms), r = 4 blocks per module (block size 16 or 32)
    lora-a                       LoRA r 4, alpha 8, all linear
    lora-b                       LoRA r 8, use_rslora, embed_tokens too (lora_embedding_A/B)
    lora-c                       LoRA r 4, rank_pattern / alpha_pattern, modules_to_save (final norm)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASE = "fixtures/tiny-llama-fp32-base"  # relative: recorded as base_model_name_or_path
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise(model: torch.nn.Module, seed: int, std: float, names: tuple[str, ...]) -> None:
    """Overwrite the adapter parameters whose name contains one of ``names`` with N(0, std²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.copy_(std * torch.randn(p.shape, generator=g))


def _save(model, folder: Path) -> None:
    model.save_pretrained(folder, save_embedding_layers=False)  # no copy of the (unchanged) base embedding
    (folder / "README.md").unlink(missing_ok=True)
    # PEFT writes target_modules from a set (order varies per run): sort it so reruns give the same bytes
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def oft_adapters(out: Path) -> None:
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    specs = {
        "oft-cayley-a": (
            dict(oft_block_size=8, use_cayley_neumann=False, target_modules=LINEAR + ["embed_tokens"]),
            0.05,
        ),
        "oft-cayley-b": (
            dict(oft_block_size=8, use_cayley_neumann=False, target_modules=LINEAR + ["embed_tokens"]),
            0.05,
        ),
        "oft-neumann-a": (dict(oft_block_size=8, use_cayley_neumann=True, target_modules=LINEAR), 0.03),
        "oft-neumann-b": (dict(oft_block_size=8, use_cayley_neumann=True, target_modules=LINEAR), 0.03),
        # projection radius eps/sqrt(blocks): with 8 or 16 blocks and entries ~0.05 some blocks are clipped
        "oft-coft": (dict(oft_block_size=8, use_cayley_neumann=False, coft=True, eps=1.3, target_modules=LINEAR), 0.05),
        "oft-blockshare": (
            dict(oft_block_size=8, use_cayley_neumann=False, block_share=True, target_modules=LINEAR),
            0.05,
        ),
        "oft-rank": (
            dict(r=4, oft_block_size=0, use_cayley_neumann=True, num_cayley_neumann_terms=4, target_modules=LINEAR),
            0.02,
        ),
    }
    for i, (name, (kwargs, std)) in enumerate(specs.items()):
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        peft_model = get_peft_model(model, OFTConfig(init_weights=True, **kwargs))
        _randomise(peft_model, 100 + i, std, ("oft_R", "oft_embedding_R"))
        _save(peft_model, out / name)


def lora_adapters(out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    specs = {
        "lora-a": dict(r=4, lora_alpha=8, target_modules=LINEAR),
        "lora-b": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=LINEAR + ["embed_tokens"]),
        "lora-c": dict(
            r=4,
            lora_alpha=8,
            target_modules=LINEAR,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"down_proj": 3},
            modules_to_save=["model.norm"],
        ),
    }
    for i, (name, kwargs) in enumerate(specs.items()):
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=True, **kwargs))
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:  # A, B ~ N(0, 1/fan): B·A of the order of the base weights' 10 %
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 / math.sqrt(max(p.shape)))
                elif "modules_to_save" in pname:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        _save(peft_model, out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures" / "adapters")
    args = ap.parse_args()
    import os

    os.chdir(ROOT)  # BASE is relative to the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    oft_adapters(args.out)
    lora_adapters(args.out)
    print(f"wrote adapter fixtures to {args.out}")


if __name__ == "__main__":
    main()
