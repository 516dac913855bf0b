"""The non-weight files of a Hugging Face model folder: config, tokenizer, generation config, card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from .paths import regular_file
from .writer import write_text_atomic

# Copied verbatim from the source model when present.
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)
DTYPE_STRINGS = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def read_json_object(path: Path) -> dict:
    """A small JSON file that must hold one object (config.json, adapter_config.json)."""
    regular_file(path, "a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    return read_json_object(path) if path.is_file() else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def write_model_files(source: Path, out_dir: Path, dtype: torch.dtype | None, updates: dict | None = None,
                      vocab_size: int | None = None) -> list[str]:
    """Copy config (with its dtype set to ``dtype`` and ``updates`` applied) and tokenizer files; return the
    names written.

    With ``vocab_size`` (a merged vocabulary), the config's ``vocab_size`` is set to it and no tokenizer
    file is copied: the caller writes the merged tokenizer."""
    written = []
    config = read_config(source)
    if config is not None:
        config.update(updates or {})
        if vocab_size is not None:
            config["vocab_size"] = vocab_size
        if dtype in DTYPE_STRINGS:
            # transformers < 5 reads torch_dtype, >= 5 reads dtype; keep whichever the source used.
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for key in keys:
                config[key] = DTYPE_STRINGS[dtype]
        write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
        written.append("config.json")
    for name in COPIED_FILES:
        if vocab_size is not None and name in TOKENIZER_FILES:
            continue
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
            written.append(name)
    return written


def write_model_card(out_dir: Path, config_yaml: str, method: str, inputs: list[str]) -> None:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, streammerge]",
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with streammerge using the `{method}` method.",
        "",
        "## Inputs",
        "",
        *[f"- `{p}`" for p in inputs],
        "",
        "## Configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    write_text_atomic(out_dir / "README.md", "\n".join(lines))
