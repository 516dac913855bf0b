"""Tokenizers for vocabulary merging, read and built as mergekit 0.1.5 does (``mergekit/tokenizer/build.py``).

mergekit drives ``transformers``' fast tokenizers; everything it uses is the ``tokenizers`` backend
underneath, which this module calls directly (``pip install 'streammerge[tokenizers]'``):

- a model's vocabulary is ``tokenizer.json``'s vocabulary with its added tokens (``get_vocab()``), and
  its embedding size is ``config.json``'s ``vocab_size`` (else the vocabulary's size);
- the base tokenizer is *stripped*: tokens whose id is >= the base's ``vocab_size`` are removed (BPE
  only, as mergekit);
- ``union``: the base tokenizer, then every other model's ordinary tokens it lacks (in order of first
  appearance, base first, then ``models:``), then every model's added tokens, first settings win;
  ``model:PATH``: that tokenizer as it is; ``base``: the stripped base tokenizer;
- the ``tokens:`` names are added last, as ordinary tokens, where they are not in the vocabulary yet.

The merged tokenizer is written as ``tokenizer.json`` (the backend's serialisation), the source's
``tokenizer_config.json`` (its ``added_tokens_decoder``, when it has one, updated to the new added tokens)
and the source's ``chat_template.jinja`` when it has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .hf_files import read_config
from .writer import write_text_atomic

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise CheckpointError(
            "merging vocabularies (tokenizer_source / tokenizer:) needs the tokenizers library: "
            "pip install 'streammerge[tokenizers]'"
        ) from e
    return tokenizers


@dataclass
class ModelTokenizer:
    """One model's tokenizer and the number of embedding rows its config declares."""

    folder: Path
    tokenizer: Any  # tokenizers.Tokenizer
    vocab_size: int  # embedding rows that belong to tokens (config vocab_size, else the vocabulary's size)
    config: dict  # tokenizer_config.json ({} if absent)

    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    def added(self) -> dict[int, Any]:
        return self.tokenizer.get_added_tokens_decoder()


def has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_FILE).is_file()


def _check_json(path: Path) -> dict:
    """Parse ``tokenizer.json`` ourselves first, so that a bad file gets one line naming the key at fault."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable tokenizer (invalid JSON: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a readable tokenizer (expected a JSON object)")
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), (dict, list)):
        raise CheckpointError(f"{path}: not a readable tokenizer (key 'model.vocab' missing or not a vocabulary)")
    added = data.get("added_tokens", [])
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str) for t in added
    ):
        raise CheckpointError(
            f"{path}: not a readable tokenizer (key 'added_tokens' must list {{id, content}} objects)"
        )
    return data


def load_tokenizer(folder: Path) -> ModelTokenizer:
    """The tokenizer of model folder ``folder`` (its ``tokenizer.json``); one line naming file and key if bad."""
    tk = _tokenizers()
    path = folder / TOKENIZER_FILE
    data = _check_json(path)
    try:
        tok = tk.Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # the backend's message names the JSON position, not the key: add the top-level keys
        raise CheckpointError(
            f"{path}: not a readable tokenizer (key 'model' of type {data['model'].get('type')!r}: {e})"
        ) from e
    config = {}
    if (folder / TOKENIZER_CONFIG).is_file():
        try:
            config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder / TOKENIZER_CONFIG}: not readable JSON ({e})") from e
        if not isinstance(config, dict):
            raise CheckpointError(f"{folder / TOKENIZER_CONFIG}: expected a JSON object")
    size = config_vocab_size(folder)
    return ModelTokenizer(folder, tok, size if size is not None else len(tok.get_vocab(with_added_tokens=True)),
                          config)


def config_vocab_size(folder: Path) -> int | None:
    cfg = read_config(folder) or {}
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    if size is not None and (type(size) is not int or size <= 0):
        raise CheckpointError(f"{folder / 'config.json'}: key 'vocab_size' must be a positive integer, got {size!r}")
    return size


def stripped(mt: ModelTokenizer) -> ModelTokenizer:
    """mergekit's ``get_stripped_tokenizer``: drop tokens whose id is >= ``vocab_size`` (BPE only)."""
    vocab = mt.vocab()
    unused = {tok for tok, idx in vocab.items() if idx >= mt.vocab_size}
    if not unused:
        return mt
    data = json.loads(mt.tokenizer.to_str())
    where = mt.folder / TOKENIZER_FILE
    if data["model"].get("type") != "BPE":
        raise CheckpointError(
            f"{where}: {len(unused)} token(s) have ids >= config vocab_size {mt.vocab_size}; only a BPE tokenizer "
            f"can be stripped of them (key 'model.type' is {data['model'].get('type')!r}), as in mergekit"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < mt.vocab_size]
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)

    def keep(m: Any) -> bool:
        toks = m.split(" ") if isinstance(m, str) and m.count(" ") == 1 else m
        if not isinstance(toks, list):
            raise CheckpointError(f"{where}: key 'model.merges' holds an unexpected entry {m!r}")
        return not any(t in unused for t in toks)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok = _tokenizers().Tokenizer.from_str(json.dumps(data))
    return ModelTokenizer(mt.folder, tok, mt.vocab_size, mt.config)


def _copy(tok: Any) -> Any:
    return _tokenizers().Tokenizer.from_str(tok.to_str())


def _same_added(a: Any, b: Any) -> bool:
    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def union(base: ModelTokenizer, others: list[ModelTokenizer]) -> tuple[Any, list[str]]:
    """mergekit's ``build_union_tokenizer``; returns the tokenizer and warnings for the log."""
    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    warnings = []
    for mt in [base, *others]:
        added = mt.added()
        for tok, idx in mt.vocab().items():  # added tokens too: mergekit's skip test never matches (int keys)
            if idx >= mt.vocab_size:
                warnings.append(f"token {tok!r} in {mt.folder} tokenizer but >= vocab_size {mt.vocab_size}")
                continue
            out_vocab.setdefault(tok, len(out_vocab))
        for idx, info in sorted(added.items()):
            if idx >= mt.vocab_size:
                continue
            if info.content in out_added:
                if not _same_added(out_added[info.content], info):
                    warnings.append(f"token {info.content!r} added with different settings; the first is used")
                continue
            out_added[info.content] = info
    res = _copy(base.tokenizer)
    base_vocab = base.vocab()
    # mergekit adds them one call at a time; one call with the same list in the same order assigns the same ids
    # (each new token takes the next id) and avoids rebuilding the backend's added-token matcher per token.
    res.add_tokens([tok for tok in out_vocab if tok not in out_added and tok not in base_vocab])
    res.add_tokens(list(out_added.values()))
    return res, warnings


def add_tokens(tok: Any, names: list[str]) -> None:
    """The ``tokens:`` names mergekit adds to the output tokenizer (ordinary tokens) where missing."""
    existing = set(tok.get_vocab(with_added_tokens=True))
    tok.add_tokens([name for name in dict.fromkeys(names) if name not in existing])


def write_tokenizer(tok: Any, source: ModelTokenizer, out_dir: Path) -> list[str]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (the source's, added tokens updated)."""
    write_text_atomic(out_dir / TOKENIZER_FILE, tok.to_str(pretty=True))
    written = [TOKENIZER_FILE]
    config = dict(source.config)
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())
        }
    if config or (source.folder / TOKENIZER_CONFIG).is_file():
        write_text_atomic(out_dir / TOKENIZER_CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        written.append(TOKENIZER_CONFIG)
    template = source.folder / CHAT_TEMPLATE
    if template.is_file():  # the tokenizer's chat template travels with it (model:PATH: PATH's, not the base's)
        write_text_atomic(out_dir / CHAT_TEMPLATE, template.read_text(encoding="utf-8"))
        written.append(CHAT_TEMPLATE)
    return written
