"""Exact-match accuracy of greedy generation of the answer span, per task."""

from __future__ import annotations

import torch

from .tasks import Split, TaskData


@torch.no_grad()
def exact_match(model, split: Split, batch: int = 512) -> float:
    """Fraction of examples whose greedily generated answer equals the reference, every token.

    All prompts of a split have one length, so decoding needs no padding; each step re-runs the
    whole (short) sequence instead of keeping a KV cache.
    """
    answer_len = split.answers.shape[1]
    correct = 0
    for start in range(0, split.prompts.shape[0], batch):
        ids = split.prompts[start : start + batch]  # (B, prompt_len)
        for _ in range(answer_len):
            next_token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            ids = torch.cat([ids, next_token], dim=1)
        correct += int((ids[:, -answer_len:] == split.answers[start : start + batch]).all(dim=1).sum())
    return correct / split.prompts.shape[0]


def accuracies(model, tasks: dict[str, TaskData], split: str) -> dict[str, float]:
    """{task: exact-match accuracy} on ``split`` ("val" or "test") of every task."""
    model.eval()
    return {name: exact_match(model, getattr(task, split)) for name, task in tasks.items()}
