"""Build fixtures/tiny-trainer-checkpoint: a real Hugging Face Trainer checkpoint of a tiny Llama.

    python scripts/make_trainer_fixture.py [--out fixtures]      # needs transformers (dev only)

Trains a tiny ``LlamaForCausalLM`` (hidden 32, 2 layers, vocab 128, attention biases, tied
embeddings) for a few steps with the real ``transformers.Trainer`` (AdamW, weight decay 0.1, so both
of its parameter groups exist: decay weights, then biases and norm weights) on random tokens, and
keeps what the sidecar converter reads:

    model.safetensors      the trained weights (fp32; tied lm_head stored once, as transformers does)
    optimizer.pt           optimizer.state_dict(): integer parameter ids, no names
    config.json, generation_config.json, trainer_state.json

The scheduler, RNG and training-args pickles are dropped. Also writes
``fixtures/tiny-exp-avg-sq.safetensors``: the same second moments keyed by parameter name, as the
OTA authors export them (names taken from the live optimizer by identity, not by recovery).
Outputs are ~200 KB; CPU only, a few seconds.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

KEEP = ("model.safetensors", "optimizer.pt", "config.json", "generation_config.json", "trainer_state.json")
STEPS = 6


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def build(out: Path) -> None:
    import transformers

    transformers.set_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, attention_bias=True, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3, weight_decay=0.1,
            optim="adamw_torch", adam_beta2=0.98, save_strategy="steps", save_steps=STEPS, logging_steps=STEPS,
            report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(64, 16, 128, seed=1))
        trainer.train()
        ckpt = Path(tmp) / f"checkpoint-{STEPS}"
        dest = out / "tiny-trainer-checkpoint"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for name in KEEP:
            shutil.copy2(ckpt / name, dest / name)
        # The name-keyed export the OTA authors use, from the live optimizer (names by identity).
        by_param = trainer.optimizer.state
        named = {n: by_param[p]["exp_avg_sq"].detach().clone() for n, p in model.named_parameters() if p in by_param}
        save_file(named, out / "tiny-exp-avg-sq.safetensors", metadata={"format": "pt"})
    print(
        f"wrote {dest} ({sum(f.stat().st_size for f in dest.iterdir()):,} bytes) "
        f"and {out / 'tiny-exp-avg-sq.safetensors'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    build(ap.parse_args().out)


if __name__ == "__main__":
    main()
