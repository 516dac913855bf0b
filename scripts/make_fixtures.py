"""Build the tiny Llama-shaped checkpoints in fixtures/ (deterministic; rerun to regenerate).

    python scripts/make_fixtures.py [--out fixtures]

Each model is a Hugging Face folder in the layout `transformers` writes: config.json (LlamaConfig),
generation_config.json, two safetensors shards written by the reference `safetensors.torch.save_file`
and model.safetensors.index.json. Experts are the base plus a seeded perturbation, like fine-tunes.

    tiny-llama-base, tiny-llama-math, tiny-llama-code          bf16 (norms in fp32, like some exports)
    tiny-llama-fp32-base, tiny-llama-fp32-a, tiny-llama-fp32-b fp32, for exact comparisons
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 256


def llama_config(dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


def llama_shapes() -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def base_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in llama_shapes().items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return out


def expert_weights(base: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * t.abs().mean() * torch.randn(t.shape, generator=g) for n, t in base.items()}


def save_hf_folder(folder: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, keep_norms_fp32: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cast = {
        n: (t if keep_norms_fp32 and n.endswith("norm.weight") else t.to(dtype)).contiguous()
        for n, t in tensors.items()
    }
    names = list(cast)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, group in shards.items():
        save_file({n: cast[n] for n in group}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in cast.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dtype_name = str(dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(llama_config(dtype_name), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    args = ap.parse_args()
    base = base_weights(0)
    save_hf_folder(args.out / "tiny-llama-base", base, torch.bfloat16, keep_norms_fp32=True)
    save_hf_folder(args.out / "tiny-llama-math", expert_weights(base, 1), torch.bfloat16, keep_norms_fp32=True)
    save_hf_folder(args.out / "tiny-llama-code", expert_weights(base, 2), torch.bfloat16, keep_norms_fp32=True)
    base32 = base_weights(10)
    save_hf_folder(args.out / "tiny-llama-fp32-base", base32, torch.float32, keep_norms_fp32=False)
    save_hf_folder(args.out / "tiny-llama-fp32-a", expert_weights(base32, 11), torch.float32, keep_norms_fp32=False)
    save_hf_folder(args.out / "tiny-llama-fp32-b", expert_weights(base32, 12), torch.float32, keep_norms_fp32=False)
    print(f"wrote fixtures to {args.out}")


if __name__ == "__main__":
    main()
