"""Merging models whose vocabularies differ, as mergekit 0.1.5 does (``tokenizer/build.py``, ``tokenizer/embed.py``).

Config (``tokenizer_source: base | union | model:PATH``, or mergekit's ``tokenizer:`` block with
``source``, ``tokens`` and ``pad_to_multiple_of``) -> ``TokenizerSpec``. While planning, the output
tokenizer is built (``io/tokenizer_files``) and each model gets a permutation p: output token id ->
its own row, or -1 where it lacks the token. Every vocabulary tensor (embeddings, lm_head: dim 0 is
the vocabulary) of every model is then seen through ``VocabularyView``, row block by row block:

- row t of model m is m's own row p_m[t] unless m lacks the token or ``tokens:`` forces it;
- otherwise the token's default: the ``tokens:`` source (a model's row for that token, a model's row
  for another ``token``/``token_id`` of its own vocabulary, or zeros); without one, the only model that
  has it; none: zeros; the base model's row where the base has it; else the mean of the rows of the
  models that have it;
- rows past the vocabulary (``pad_to_multiple_of``) are m's mean over the vocabulary rows above.

The merge method then sees same-shaped tensors, as in mergekit. Rows are read where they lie (runs of
consecutive source rows in one read each); defaults are computed for one row range at a time and
shared by all models; the padding mean is accumulated in fp64 over fixed 1024-row blocks, so no
result depends on the chunk size. Reads return fp32.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .errors import ConfigError, PlanError
from .io import tokenizer_files as tf
from .io.reader import Checkpoint

log = logging.getLogger(__name__)

# Tensors whose dim 0 is the vocabulary: every name mergekit 0.1.5's architectures mark with vocabulary_axis 0.
VOCABULARY_TENSORS = frozenset({
    "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias", "embed_tokens.weight", "embed_out.weight",
    "model.language_model.embed_tokens.weight", "model.tok_embeddings.weight", "output.weight", "shared.weight",
    "transformer.wte.weight", "transformer.word_embeddings.weight", "transformer.embd.wte.weight",
    "transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight", "gpt_neox.embed_in.weight",
    "backbone.embeddings.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
    "embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight",
    "roberta.embeddings.word_embeddings.weight", "distilbert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.weight", "cls.predictions.bias", "lm_head.decoder.weight", "lm_head.linear.weight",
    "lm_head.linear.bias", "vocab_projector.weight", "vocab_projector.bias", "layers.0.wte.weight",
})
PAD_MEAN_ROWS = 1024  # fixed row blocks of the padding mean


@dataclass(frozen=True)
class TokenSource:
    """One ``tokens:`` entry: where token's row comes from, and whether it replaces the models' own rows."""

    kind: Literal["model", "model_token", "zero", "none"]
    model: Path | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    source: Literal["base", "union"] | Path
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def parse_tokenizer(raw: dict, resolve: Callable[[object, str], Path], where: str) -> TokenizerSpec | None:
    """``tokenizer_source`` / ``tokenizer:`` of a config mapping (mergekit's rules: not both)."""
    src, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if src is not None and block is not None:
        raise ConfigError(f"{where}: give tokenizer_source or tokenizer:, not both (mergekit refuses both too)")
    if src is not None:
        return TokenizerSpec(_source(src, resolve, where, "tokenizer_source"))
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: tokenizer: must be a mapping with source, tokens, pad_to_multiple_of")
    unknown = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
    if unknown:
        raise ConfigError(f"{where}: tokenizer: unknown key {unknown[0]!r} (known: pad_to_multiple_of, source, tokens)")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad <= 0):
        raise ConfigError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError(f"{where}: tokenizer.tokens must map token -> {{source, force}}")
    return TokenizerSpec(
        _source(block.get("source", "union"), resolve, where, "tokenizer.source"),
        {str(t): _token(t, v, resolve, where) for t, v in tokens.items()},
        pad or None,
    )


def _source(value: object, resolve, where: str, key: str) -> Literal["base", "union"] | Path:
    if value in ("base", "union"):
        return value
    if isinstance(value, str) and value.startswith("model:"):
        value = value[len("model:"):]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be base, union or model:PATH, got {value!r}")
    return resolve(value, key)


def _token(name: object, value: object, resolve, where: str) -> TokenSource:
    key = f"tokenizer.tokens[{name!r}]"
    if value is None:
        value = {}
    if not isinstance(value, dict) or set(value) - {"source", "force"}:
        raise ConfigError(f"{where}: {key} must be a mapping with source and/or force")
    force = value.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}: {key}.force must be true or false, got {force!r}")
    src = value.get("source")
    if src is None:
        return TokenSource("none", force=force)
    if isinstance(src, str):
        return TokenSource("model", resolve(src, f"{key}.source"), force=force)
    if isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
        return TokenSource("zero", force=force)
    if isinstance(src, dict) and src.get("kind") == "model_token" and set(src) <= {"kind", "model", "token",
                                                                                     "token_id"}:
        tid, tok = src.get("token_id"), src.get("token")
        if (tid is None) == (tok is None) or (tid is not None and (type(tid) is not int or tid < 0)):
            raise ConfigError(f"{where}: {key}.source: give exactly one of token_id (an integer >= 0) or token")
        return TokenSource("model_token", resolve(src.get("model"), f"{key}.source.model"), tid,
                           None if tok is None else str(tok), force)
    raise ConfigError(f"{where}: {key}.source must be a model path, {{kind: zero}} or "
                      f"{{kind: model_token, model, token|token_id}}, got {src!r}")


# --- the plan: permutations and default sources --------------------------------------------------

@dataclass
class VocabularyPlan:
    """Output vocabulary and, per model, where each of its rows comes from (see the module docstring)."""

    tokenizer: object  # tokenizers.Tokenizer written to OUT_DIR
    source: tf.ModelTokenizer  # whose tokenizer_config.json is written
    tokens: int  # len(vocab)
    size: int  # output rows: tokens padded to pad_to_multiple_of
    perms: list[torch.Tensor]  # per model, int64 [tokens]: own row or -1
    forced: torch.Tensor  # bool [tokens]
    defaults: dict[int, tuple]  # token id -> ("rows", [(model, row), ...]) mean of those rows | ("zero",)
    models: list[Checkpoint]  # the raw checkpoints, in the order above
    files: list[Path] = field(default_factory=list)  # tokenizer and config files read (the resume fingerprint)
    spec: TokenizerSpec | None = None
    _cache: dict = field(default_factory=dict)
    _index: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line for ``--dry-run``."""
        src = self.spec.source if self.spec is not None else "?"
        missing = sum(int((p < 0).sum()) for p in self.perms)
        pad = f" + {self.size - self.tokens} padding rows" if self.size > self.tokens else ""
        return (f"{self.tokens} tokens{pad} (tokenizer_source {src}); {len(self.defaults)} tokens filled by "
                f"default rules, {missing} rows missing across {len(self.models)} models")

    def default_rows(self, name: str, t0: int, t1: int, rest: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Default rows of tokens in [t0, t1) for tensor ``name``, fp32; shared by every model's view."""
        key = (name, t0, t1)
        if key not in self._cache:
            self._cache.clear()
            if "ids" not in self._index:
                self._index["ids"] = sorted(self.defaults)
            ids = self._index["ids"]
            out = {}
            for t in ids[bisect.bisect_left(ids, t0): bisect.bisect_left(ids, t1)]:
                rule = self.defaults[t]
                if rule[0] == "zero":
                    if ("zero", rest) not in self._index:
                        self._index[("zero", rest)] = torch.zeros(rest, dtype=torch.float32)
                    out[t] = self._index[("zero", rest)]  # only ever copied from
                    continue
                if len(rule[1]) == 1:  # a donor's or the base's row, as it is
                    out[t] = _raw_row(self.models[rule[1][0][0]], name, rule[1][0][1], rest)
                    continue
                acc = torch.zeros(rest, dtype=torch.float32)  # 0 + r1 + r2 ...: mergekit's order of additions
                for m, row in rule[1]:
                    acc += _raw_row(self.models[m], name, row, rest)
                out[t] = acc / len(rule[1])
            self._cache[key] = out
        return self._cache[key]


def _raw_row(ckpt: Checkpoint, name: str, row: int, rest: tuple[int, ...]) -> torch.Tensor:
    width = max(1, _prod(rest))
    return ckpt.read(name, row * width, width).to(torch.float32).reshape(rest)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tokenizer_folder(ckpt: Checkpoint) -> Path:
    """Where a model's tokenizer lives: its folder; an adapter expert's is its base model's."""
    base = getattr(ckpt, "base", None)
    if not tf.has_tokenizer(ckpt.folder) and base is not None:
        return base.folder
    return ckpt.folder


def build_plan(spec: TokenizerSpec, models: list[Checkpoint], paths: list[Path], base_index: int | None
               ) -> VocabularyPlan:
    """``models`` (base first when there is one) with their config paths ``paths``."""
    ref = models[0]
    if not tf.has_tokenizer(tokenizer_folder(ref)):
        raise PlanError(f"{tokenizer_folder(ref) / tf.TOKENIZER_FILE}: missing; merging vocabularies needs the "
                        "base model's tokenizer.json")
    base_tok = tf.stripped(tf.load_tokenizer(tokenizer_folder(ref)))
    toks: list[tf.ModelTokenizer] = [base_tok]
    for ckpt in models[1:]:
        folder = tokenizer_folder(ckpt)
        if tf.has_tokenizer(folder):
            toks.append(tf.load_tokenizer(folder))
        else:  # mergekit: "Unable to load tokenizer ... Assuming same as base"
            log.warning("%s has no tokenizer.json; assuming the same as %s", folder, ref.folder)
            size = tf.config_vocab_size(folder)
            toks.append(dataclasses.replace(base_tok, folder=folder, vocab_size=size or base_tok.vocab_size))
    if spec.source == "base":
        out, source = tf._copy(base_tok.tokenizer), base_tok
    elif spec.source == "union":
        out, warnings = tf.union(base_tok, toks[1:])
        for w in warnings:
            log.warning("%s", w)
        source = base_tok
    else:
        source = tf.load_tokenizer(spec.source)
        out = tf._copy(source.tokenizer)
    tf.add_tokens(out, list(spec.tokens))
    if spec.source == "base":
        # mergekit's output tokenizer *is* the base's here, so the tokens: it adds join the base's vocabulary too:
        # a new token whose id falls inside the base's (padded) embedding takes the base's row at that id.
        toks[0] = dataclasses.replace(base_tok, tokenizer=out)
    vocab = out.get_vocab(with_added_tokens=True)
    ntok = len(vocab)
    if sorted(vocab.values()) != list(range(ntok)):
        raise PlanError(f"{source.folder / tf.TOKENIZER_FILE}: token ids are not 0..{ntok - 1} without gaps; "
                        "such a vocabulary cannot index embedding rows")
    size = ntok
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size = (size // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    perms = []
    for mt in toks:
        mv = mt.vocab()
        p = torch.full((ntok,), -1, dtype=torch.int64)
        for tok, new in vocab.items():
            old = mv.get(tok)
            if old is not None and old < mt.vocab_size:
                p[new] = old  # (mergekit leaves an id >= vocab_size unmapped and then fails; here it is missing)
        perms.append(p)
    present = torch.stack([p >= 0 for p in perms])  # (models, tokens)
    forced = torch.zeros(ntok, dtype=torch.bool)
    defaults: dict[int, tuple] = {}
    index = {path.resolve(): i for i, path in enumerate(paths)}
    orig_vocabs = [mt.vocab() for mt in toks]
    for tok, t in vocab.items():
        cfg = spec.tokens.get(tok)
        if cfg is not None and cfg.force:
            forced[t] = True
        has = present[:, t]
        if cfg is None:
            if bool(has.all()):
                continue
            n = int(has.sum())
            if n == 0:
                log.warning("token %r is in no model; its rows are zero", tok)
                defaults[t] = ("zero",)
            elif n == 1 or (base_index is not None and bool(has[base_index])):
                m = int(has.nonzero()[0]) if n == 1 else base_index
                defaults[t] = ("rows", [(m, int(perms[m][t]))])
            else:
                defaults[t] = ("rows", [(m, int(perms[m][t])) for m in range(len(models)) if has[m]])
            continue
        if not cfg.force and bool(has.all()):
            continue
        defaults[t] = _configured_default(tok, t, cfg, index, perms, orig_vocabs, models)
    files = [f for mt in [*toks, source] for f in (mt.folder / tf.TOKENIZER_FILE, mt.folder / tf.TOKENIZER_CONFIG,
                                                    mt.folder / "config.json") if f.is_file()]
    return VocabularyPlan(out, source, ntok, size, perms, forced, defaults, models, sorted(set(files)), spec)


def _configured_default(tok, t, cfg: TokenSource, index, perms, orig_vocabs, models) -> tuple:
    where = f"tokenizer.tokens[{tok!r}]"
    if cfg.kind == "zero":
        return ("zero",)
    if cfg.kind == "none":
        raise PlanError(f"{where}: token {tok!r} is missing from some model (or forced) and has no source; "
                        "give source: a model, {kind: zero} or {kind: model_token, ...}")
    m = index.get(cfg.model.resolve())
    if m is None:
        raise PlanError(f"{where}: source model {cfg.model} is not one of the merged models")
    if cfg.kind == "model":
        if perms[m][t] < 0:
            raise PlanError(f"{where}: source model {cfg.model} has no token {tok!r}")
        return ("rows", [(m, int(perms[m][t]))])
    row = cfg.token_id if cfg.token_id is not None else orig_vocabs[m].get(cfg.token)
    if row is None:
        raise PlanError(f"{where}: token {cfg.token!r} is not in the vocabulary of {cfg.model}")
    return ("rows", [(m, row)])


class VocabularyView(Checkpoint):
    """Model ``index`` of ``plan`` with its vocabulary tensors in the output vocabulary (fp32 reads)."""

    def __init__(self, inner: Checkpoint, plan: VocabularyPlan, index: int):
        metas = {}
        for name in inner.names():
            meta = inner.meta(name)
            if name in VOCABULARY_TENSORS and meta.shape:
                meta = dataclasses.replace(meta, shape=(plan.size, *meta.shape[1:]))
            metas[name] = meta
        super().__init__(inner.path, metas, inner.files, inner.metadata)
        self.folder, self.index_files, self.kind = inner.folder, inner.index_files, inner.kind
        self.cheap_ranges = inner.cheap_ranges
        self.inner, self.plan, self.index = inner, plan, index
        self._pad_means: dict[str, torch.Tensor] = {}
        for name in inner.names():
            if name in VOCABULARY_TENSORS and inner.meta(name).shape:
                rows = inner.meta(name).shape[0]
                need = int(plan.perms[index].max()) + 1 if plan.tokens else 0
                if need > rows:
                    raise PlanError(f"{inner.meta(name).file}: tensor {name!r} has {rows} rows but its tokenizer "
                                    f"uses row {need - 1}; config vocab_size and the weights disagree")

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        if name not in VOCABULARY_TENSORS or not self.meta(name).shape:
            return self.inner.read(name, start, count)
        meta = self.meta(name)
        rest = tuple(meta.shape[1:])
        if count is None:
            return self.rows(name, 0, meta.shape[0]).reshape(meta.shape)
        if start < 0 or start + count > meta.numel:
            raise ValueError(f"range [{start}, {start + count}) outside {name} of {meta.numel} elements")
        width = max(1, _prod(rest))
        r0, r1 = start // width, -(-(start + count) // width)
        flat = self.rows(name, r0, r1).reshape(-1)
        return flat[start - r0 * width: start - r0 * width + count].clone()

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Output rows [r0, r1) of vocabulary tensor ``name`` for this model, fp32 (r1 - r0, *rest)."""
        plan, rest = self.plan, tuple(self.meta(name).shape[1:])
        width = max(1, _prod(rest))
        out = torch.zeros((r1 - r0, *rest), dtype=torch.float32)
        t1 = min(r1, plan.tokens)
        if r0 < t1:
            src_t = plan.perms[self.index][r0:t1]
            own = (src_t >= 0) & ~plan.forced[r0:t1]
            src = src_t.tolist()
            i = 0
            idx = own.nonzero().reshape(-1).tolist()
            while i < len(idx):  # runs of consecutive source rows: one read each
                j = i
                while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1 and src[idx[j + 1]] == src[idx[j]] + 1:
                    j += 1
                s, n = src[idx[i]], j - i + 1
                out[idx[i]: idx[i] + n].copy_(self.inner.read(name, s * width, n * width).view(n, *rest))
                i = j + 1
            defaults = plan.default_rows(name, r0, t1, rest)
            for k in (~own).nonzero().reshape(-1).tolist():
                row = defaults.get(r0 + k)
                if row is None:
                    log.error("no embedding for token id %d in model %s", r0 + k, self.inner.path)
                else:
                    out[k] = row
        if r1 > plan.tokens:
            out[max(r0, plan.tokens) - r0:] = self.pad_mean(name)
        return out

    def pad_mean(self, name: str) -> torch.Tensor:
        """Mean of this model's vocabulary rows (mergekit pads with it), fp64 over fixed blocks -> fp32."""
        if name not in self._pad_means:
            rest = tuple(self.meta(name).shape[1:])
            acc = torch.zeros(rest, dtype=torch.float64)
            for b in range(0, self.plan.tokens, PAD_MEAN_ROWS):
                acc += self.rows(name, b, min(b + PAD_MEAN_ROWS, self.plan.tokens)).to(torch.float64).sum(0)
            self._pad_means[name] = (acc / self.plan.tokens).to(torch.float32)
        return self._pad_means[name]

    def aux(self, name: str) -> dict:
        return {} if name in VOCABULARY_TENSORS else self.inner.aux(name)

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(name)

    def close(self) -> None:
        self.inner.close()
