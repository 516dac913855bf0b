"""Benchmark merging models whose vocabularies differ: streammerge against mergekit, wall time and peak RSS.

    python scripts/bench_vocab.py                      # vocab 32000, hidden 2048, bf16: 3 models, ~0.8 GB
    python scripts/bench_vocab.py --vocab 8000 --hidden 512 --skip-mergekit

Builds (once, under --data-dir) three Llama-shaped models of one layer whose tokenizers (BPE, made with
the ``tokenizers`` library) differ: the base (``vocab`` tokens); expert A = the base + 256 added special
tokens; expert B = a shuffled vocabulary that drops 1/8 of the base's tokens and adds as many of its own,
its embedding padded to a multiple of 64. The vocabulary tensors (embeddings and lm_head) are the bulk of
the bytes, as in a real model's vocabulary merge. Each tool merges ``task_arithmetic`` with
``tokenizer: {source: union, pad_to_multiple_of: 64}`` in its own process (peak RSS from ``wait4``),
page cache warm. Prints a markdown table and the tensors' largest difference between the two outputs,
compared token by token.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import gb, measure, repeated, warm  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]


def tokenizer(tokens: list[str], added: list[str] = ()):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return tok


def build_model(folder: Path, tok, rows: int, hidden: int, seed: int) -> None:
    if (folder / "model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    inter = 2 * hidden
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "vocab_size": rows, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"}))
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (rows, hidden), "lm_head.weight": (rows, hidden),
              "model.norm.weight": (hidden,), "model.layers.0.input_layernorm.weight": (hidden,),
              "model.layers.0.post_attention_layernorm.weight": (hidden,)}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[f"model.layers.0.self_attn.{p}.weight"] = (hidden, hidden)
    shapes.update({"model.layers.0.mlp.gate_proj.weight": (inter, hidden), "model.layers.0.mlp.up_proj.weight":
                   (inter, hidden), "model.layers.0.mlp.down_proj.weight": (hidden, inter)})
    save_file({k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()},
              folder / "model.safetensors", metadata={"format": "pt"})


def build(data: Path, vocab: int, hidden: int) -> list[Path]:
    words = SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    rng = random.Random(0)
    base, a, b = data / "base", data / "a", data / "b"
    build_model(base, tokenizer(words), vocab, hidden, 0)
    build_model(a, tokenizer(words, [f"<|extra_{i}|>" for i in range(256)]), vocab + 256, hidden, 1)
    kept = words[:3] + rng.sample(words[3:], len(words) - 3 - vocab // 8)
    own = [f"b{i}" for i in range(vocab // 8)]
    body = kept[3:] + own
    rng.shuffle(body)
    b_tokens = words[:3] + body
    build_model(b, tokenizer(b_tokens), -(-len(b_tokens) // 64) * 64, hidden, 2)
    return [base, a, b]


def vocab_of(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


def compare(mk: Path, ours: Path) -> float:
    """Largest |difference| between the two outputs, vocabulary rows matched by token."""
    vm, vo = vocab_of(mk), vocab_of(ours)
    tm, to = load_file(mk / "model.safetensors"), load_file(ours / "model.safetensors")
    order_m = torch.tensor([vm[t] for t in vm])
    order_o = torch.tensor([vo[t] for t in vm])
    worst = 0.0
    for name, t in tm.items():
        o = to[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            n = len(vm)
            d = max((o[order_o].float() - t[order_m].float()).abs().max().item(),
                    (o[n:].float() - t[n:].float()).abs().max().item() if t.shape[0] > n else 0.0)
        else:
            d = (o.float() - t.float()).abs().max().item()
        worst = max(worst, d)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--data-dir", type=Path, default=Path("bench_data/vocab"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-mergekit", action="store_true")
    args = ap.parse_args()
    data = args.data_dir / f"v{args.vocab}-h{args.hidden}"
    base, a, b = build(data, args.vocab, args.hidden)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base.resolve()), "dtype": "float32",
           "out_dtype": "bfloat16",
           "models": [{"model": str(a.resolve()), "parameters": {"weight": 0.5}},
                      {"model": str(b.resolve()), "parameters": {"weight": 0.5}}],
           "tokenizer": {"source": "union", "pad_to_multiple_of": 64}}
    cfg_path = data / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    warm([base, a, b])
    tools = ["streammerge"] + ([] if args.skip_mergekit else ["mergekit"])
    outs = {t: data / f"out-{t}" for t in tools}
    runs: dict[str, list] = {t: [] for t in tools}
    for _ in range(args.repeats):
        for tool in tools:
            shutil.rmtree(outs[tool], ignore_errors=True)
            cmd = ([sys.executable, "-m", "streammerge.cli", "merge", str(cfg_path), str(outs[tool]), "--quiet"]
                   if tool == "streammerge" else
                   [shutil.which("mergekit-yaml") or "mergekit-yaml", str(cfg_path), str(outs[tool])])
            runs[tool].append(measure(cmd))
    largest = max(args.vocab + 256, args.vocab) * args.hidden * 4
    torch_rss = measure([sys.executable, "-c", "import torch"])[1]
    print(f"\nvocab {args.vocab}, hidden {args.hidden}, bf16 inputs; largest vocabulary tensor {gb(largest)} in fp32; "
          f"`import torch` RSS {gb(torch_rss)}; budget torch + 4 x largest = {gb(torch_rss + 4 * largest)}\n")
    print("| tool | wall s | CPU s | peak RSS | exit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for tool in tools:
        wall, rss, code, cpu = repeated(runs[tool])
        print(f"| {tool} | {wall:.1f} | {cpu:.1f} | {gb(rss)} | {code} |")
    if not args.skip_mergekit and all(r[2] == 0 for rs in runs.values() for r in rs):
        worst = compare(outs["mergekit"], outs["streammerge"])
        print(f"\nlargest |streammerge - mergekit| (rows matched by token): {worst}")


if __name__ == "__main__":
    main()
