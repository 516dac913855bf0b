"""Build fixtures/tok-{base,a,b}: tiny Llama models whose tokenizers really differ (deterministic; rerun to regenerate).

    python scripts/make_tokenizer_fixtures.py [--out fixtures]

Tokenizers are BPE models made with the ``tokenizers`` library and saved by transformers'
``PreTrainedTokenizerFast.save_pretrained`` (tokenizer.json + tokenizer_config.json, as real models ship):

- ``tok-base``: <unk> <s> </s>, letters a..p, merges ab, cd, abcd, ef (23 tokens); its embedding matrix is
  padded to 24 rows (config vocab_size 24), so the last row belongs to no token.
- ``tok-a``: the base tokenizer plus added tokens <|im_start|>, <|im_end|> (special) and "foo" (not
  special); 26 rows.
- ``tok-b``: another BPE vocabulary (letters in another order, merges gh, ij, no ef/abcd, a token "zz"),
  <|im_end|> at another id; embedding padded to 32 rows.

Weights: Llama (hidden 16, 1 layer), fp32, seeded; embed_tokens and lm_head have one row per config
vocab entry.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

HIDDEN, INTER, HEADS, KV = 16, 32, 2, 1
SPECIALS = ["<unk>", "<s>", "</s>"]


def bpe(letters: str, merges: list[tuple[str, str]], extra: list[str] = ()) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in letters:
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for t in extra:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def save_model(folder: Path, tok: Tokenizer, rows: int, seed: int) -> None:
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=128)
    fast.save_pretrained(folder)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": 1, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": rows, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    g = torch.Generator().manual_seed(seed)
    head = HIDDEN // HEADS
    shapes = {
        "model.embed_tokens.weight": (rows, HIDDEN),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (KV * head, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (KV * head, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.mlp.gate_proj.weight": (INTER, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (INTER, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, INTER),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (rows, HIDDEN),
    }
    save_file({k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    args = ap.parse_args()
    base_merges = [("a", "b"), ("c", "d"), ("ab", "cd"), ("e", "f")]
    base = bpe("abcdefghijklmnop", base_merges)
    save_model(args.out / "tok-base", base, rows=24, seed=0)

    a = bpe("abcdefghijklmnop", base_merges)
    a.add_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                  AddedToken("<|im_end|>", special=True, normalized=False)])
    a.add_tokens([AddedToken("foo", special=False)])
    save_model(args.out / "tok-a", a, rows=26, seed=1)

    b = bpe("ponmlkjihgfedcba", [("g", "h"), ("i", "j"), ("a", "b"), ("c", "d")], extra=["zz"])
    b.add_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    save_model(args.out / "tok-b", b, rows=32, seed=2)
    for name in ("tok-base", "tok-a", "tok-b"):
        print(name, sorted(p.name for p in (args.out / name).iterdir()))


if __name__ == "__main__":
    main()
