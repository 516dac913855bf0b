"""Synthetic capabilities: token sequences with a task prefix, a tiny vocabulary, disjoint splits.

Every example is ``prompt + answer``: the prompt starts with the task's token and ends with ``=``;
the answer has a fixed number of tokens per task. A model has a capability when greedy decoding
after the prompt reproduces the whole answer (exact match). All prompts of one task have the same
length, so a task's examples batch without padding.

    sub    <sub> o x₁ … x₆ =            -> each letter through substitution table A (o = +) or B (o = ?)
    idx    <idx> x₁ … x₈ ? q =          -> x_(q+1), the letter at position q (0-based)
    sort   <sort> o d₁ … d₆ =           -> the digits sorted, ascending (o = +) or descending (o = ?)
    shift  <shift> k d₁ … d₆ =          -> each digit plus k, mod 10

**Why the base is mediocre.** Pretraining sees only one half of each capability: table A only,
queries of the first four positions, ascending sorts, shifts by k < 5.
A base that learns those halves scores about 0.5 on the full test distribution of each task (which
it cannot reach by interpolation: table B, positions 4–7, descending order and k ≥ 5 are new rules);
an expert fine-tuned on the full distribution of its task learns the other half. This makes the
base's level a property of the data, not of where pretraining happened to stop (tiny models learn
these tasks in sudden jumps, so "stop when mediocre" is fragile), and it gives every expert the
same kind of room to improve.

Splits: ``test`` and ``val`` are drawn first (full distribution, distinct prompts, each from its own
seeded stream); the pretraining and fine-tuning pools are drawn from their own streams and never
contain a held-out prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

DIGITS = [str(d) for d in range(10)]
LETTERS = list("abcdefghijklmnop")
SYMBOLS = ["+", "=", "?"]
TASK_NAMES = ["sub", "idx", "sort", "shift"]
VOCAB = ["<pad>", *DIGITS, *LETTERS, *SYMBOLS, *(f"<{t}>" for t in TASK_NAMES)]
TOKEN = {s: i for i, s in enumerate(VOCAB)}
PAD = TOKEN["<pad>"]

Example = tuple[list[str], list[str]]  # (prompt symbols, answer symbols)
# A generator draws one example; ``pretrain=True`` restricts it to the half the base may see.
Generator = Callable[[random.Random, bool], Example]


# two fixed random permutations of the letters (seeded by their names: the same on every run)
TABLES = {o: dict(zip(LETTERS, random.Random(f"table {o}").sample(LETTERS, len(LETTERS)), strict=False)) for o in "+?"}


def _sub(rng: random.Random, pretrain: bool) -> Example:
    xs = [rng.choice(LETTERS) for _ in range(6)]
    o = "+" if pretrain or rng.random() < 0.5 else "?"
    return ["<sub>", o, *xs, "="], [TABLES[o][x] for x in xs]


def _idx(rng: random.Random, pretrain: bool) -> Example:
    xs = [rng.choice(LETTERS) for _ in range(8)]
    q = rng.randrange(4 if pretrain else 8)
    return ["<idx>", *xs, "?", str(q), "="], [xs[q]]


def _sort(rng: random.Random, pretrain: bool) -> Example:
    ds = [rng.choice(DIGITS) for _ in range(6)]
    descending = False if pretrain else rng.random() < 0.5
    return ["<sort>", "?" if descending else "+", *ds, "="], sorted(ds, reverse=descending)


def _shift(rng: random.Random, pretrain: bool) -> Example:
    k = rng.randrange(5 if pretrain else 10)
    ds = [rng.randrange(10) for _ in range(6)]
    return ["<shift>", str(k), *map(str, ds), "="], [str((d + k) % 10) for d in ds]


GENERATORS: dict[str, Generator] = {"sub": _sub, "idx": _idx, "sort": _sort, "shift": _shift}


@dataclass(frozen=True)
class Split:
    """prompts: (n, prompt_len) int64 token ids; answers: (n, answer_len) int64."""

    prompts: torch.Tensor
    answers: torch.Tensor

    def head(self, n: int) -> Split:
        return Split(self.prompts[:n], self.answers[:n])


@dataclass(frozen=True)
class TaskData:
    name: str
    pretrain: Split  # the restricted half, for the base
    train: Split  # the full distribution, for the expert
    val: Split  # held out: choosing hyper-parameters
    test: Split  # held out: the reported numbers

    @property
    def seq_len(self) -> int:
        return self.train.prompts.shape[1] + self.train.answers.shape[1]


def _encode(examples: list[Example]) -> Split:
    prompts = torch.tensor([[TOKEN[s] for s in p] for p, _ in examples], dtype=torch.long)
    answers = torch.tensor([[TOKEN[s] for s in a] for _, a in examples], dtype=torch.long)
    return Split(prompts, answers)


def _distinct(gen: Generator, rng: random.Random, n: int, exclude: set[tuple[str, ...]]) -> list[Example]:
    """n examples of the full distribution with distinct prompts, none in ``exclude``."""
    out: list[Example] = []
    seen = set(exclude)
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        prompt, answer = gen(rng, False)
        if tuple(prompt) not in seen:
            seen.add(tuple(prompt))
            out.append((prompt, answer))
    raise RuntimeError(f"cannot draw {n} distinct held-out examples from {gen.__name__}")


def _pool(gen: Generator, rng: random.Random, n: int, pretrain: bool, held_out: set[tuple[str, ...]]) -> list[Example]:
    """n training examples (repeats allowed), never a held-out prompt."""
    out: list[Example] = []
    while len(out) < n:
        prompt, answer = gen(rng, pretrain)
        if tuple(prompt) not in held_out:
            out.append((prompt, answer))
    return out


def make_task(name: str, n_train: int, n_val: int, n_test: int, seed: int) -> TaskData:
    gen = GENERATORS[name]
    test = _distinct(gen, random.Random(f"{seed}:{name}:test"), n_test, set())
    val = _distinct(gen, random.Random(f"{seed}:{name}:val"), n_val, {tuple(p) for p, _ in test})
    held_out = {tuple(p) for p, _ in test + val}
    pretrain = _pool(gen, random.Random(f"{seed}:{name}:pretrain"), n_train, True, held_out)
    train = _pool(gen, random.Random(f"{seed}:{name}:train"), n_train, False, held_out)
    return TaskData(name, _encode(pretrain), _encode(train), _encode(val), _encode(test))


def make_tasks(names: list[str], n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, TaskData]:
    return {n: make_task(n, n_train, n_val, n_test, seed) for n in names}


def training_batch(
    pools: list[Split], batch: int, seq_len: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn uniformly over ``pools`` (one per task), then over examples; right-padded.

    Returns input_ids and labels, both (batch, seq_len) int64; labels are -100 except on the answer
    tokens, so the loss is on the answer only (prompt tokens are random by construction). Right
    padding needs no attention mask: under causal attention no real token attends to a pad.
    """
    which = torch.randint(len(pools), (batch,), generator=gen)
    ids = torch.full((batch, seq_len), PAD, dtype=torch.long)
    labels = torch.full((batch, seq_len), -100, dtype=torch.long)
    for t, pool in enumerate(pools):
        rows = (which == t).nonzero().flatten()
        if rows.numel() == 0:
            continue
        pick = torch.randint(pool.prompts.shape[0], (rows.numel(),), generator=gen)
        p, a = pool.prompts[pick], pool.answers[pick]
        lp, la = p.shape[1], a.shape[1]
        ids[rows, :lp] = p
        ids[rows, lp : lp + la] = a
        labels[rows, lp : lp + la] = a
    return ids, labels
