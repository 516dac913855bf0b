"""Build fixtures/ota-authors/: tiny stand-ins for the OTA authors' hub checkpoints (deterministic).

    python scripts/make_ota_authors_fixtures.py [--out fixtures]

One bf16 Llama-shaped base and six experts named after the authors' hub repos (math-reasoning,
coding, coding-tulu3, precise-if, general, knowledge-recall), each a Hugging Face folder
(config.json + model.safetensors) holding, like the hub repos, ``export/exp_avg_sq.safetensors``
(name-keyed fp32 Adam second moments, the authors' export format) and
``export/fisher_diag_s1024_bs128.safetensors`` (their Fisher-diagonal export, same format); coding-tulu3
keeps them in ``export_full_state_checkpoint-1100/``, as its hub repo does.

Values are sized like real SFT: task vectors of ~1e-3 (several bf16 ulps of the weights), second
moments of 1e-16..1e-10 with row and column structure (so rank-1 and rank-K approximations matter
and the configs' absolute FFG thresholds of 1e-21..1e-18 mask part of the entries), some exact zeros.
Besides, ``math-reasoning/export/exp_avg_sq_optimizer.pt`` holds the same second moments as a
name-keyed torch optimizer state dict. The configs using them are fixtures/configs/ota-authors/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 16, 32, 2, 2, 1, 48
EXPERTS = ["math-reasoning", "coding", "coding-tulu3", "precise-if", "general", "knowledge-recall"]


def config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16",
    }


def shapes() -> dict[str, tuple[int, ...]]:
    hd = HIDDEN // HEADS
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (HEADS * hd, HIDDEN), p + "self_attn.k_proj.weight": (KV_HEADS * hd, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * hd, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HEADS * hd),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def second_moment(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """v = 1e-13 · row · col · noise (log-normal factors), about 3 % exact zeros."""
    rows = torch.exp(1.2 * torch.randn(shape[0], generator=g))
    v = rows.reshape(-1, *([1] * (len(shape) - 1))) * torch.exp(0.8 * torch.randn(shape, generator=g))
    if len(shape) == 2:
        v = v * torch.exp(1.0 * torch.randn(shape[1], generator=g))
    v = 1e-13 * v
    v[torch.rand(shape, generator=g) < 0.03] = 0
    return v.to(torch.float32).contiguous()


def save_model(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.to(torch.bfloat16).contiguous() for n, t in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config(), indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    root = ap.parse_args().out / "ota-authors"
    g = torch.Generator().manual_seed(2025)
    base = {}
    for name, shape in shapes().items():
        base[name] = 1 + 0.1 * torch.randn(shape, generator=g) if name.endswith("norm.weight") else (
            torch.randn(shape, generator=g) / shape[-1] ** 0.5)
    save_model(root / "base", base)
    for k, expert in enumerate(EXPERTS):
        eg = torch.Generator().manual_seed(100 + k)
        tensors = {}
        for name, t in base.items():
            tau = 1e-3 * torch.randn(t.shape, generator=eg) * (1 + 3 * (torch.rand(t.shape, generator=eg) < 0.05))
            tensors[name] = t + tau
        save_model(root / expert, tensors)
        # the authors' coding-tulu3 repo keeps its export under another folder name
        export = root / expert / ("export_full_state_checkpoint-1100" if expert == "coding-tulu3" else "export")
        export.mkdir(exist_ok=True)
        moments = {name: second_moment(shape, eg) for name, shape in shapes().items()}
        save_file(moments, export / "exp_avg_sq.safetensors")
        fisher = {name: second_moment(shape, eg) * 10 for name, shape in shapes().items()}
        save_file(fisher, export / "fisher_diag_s1024_bs128.safetensors")
        if expert == "math-reasoning":
            state = {"state": {n: {"step": torch.tensor(2611.0), "exp_avg": torch.zeros(0), "exp_avg_sq": v}
                               for n, v in moments.items()},
                     "param_groups": [{"params": list(moments), "betas": (0.9, 0.999)}]}
            torch.save(state, export / "exp_avg_sq_optimizer.pt")
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
