"""Merging models whose tokenizers differ: same tensors and tokenizer as mergekit 0.1.5 on fixtures/tok-*."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, load_folder

import streammerge
from streammerge.cli import main
from streammerge.vocabulary import VOCABULARY_TENSORS

pytest.importorskip("tokenizers")
TOK = {k: str(FIXTURES / f"tok-{k}") for k in ("base", "a", "b")}


def _ta(**extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": TOK["base"],
        "models": [{"model": TOK["a"], "parameters": {"weight": 0.5}},
                   {"model": TOK["b"], "parameters": {"weight": 0.7}}],
        "dtype": "float32",
        **extra,
    }


CASES = {
    "union": _ta(tokenizer_source="union"),
    "base": _ta(tokenizer_source="base"),
    "model_path": _ta(tokenizer_source=TOK["b"]),
    "block_tokens_pad": _ta(tokenizer={
        "source": "union",
        "pad_to_multiple_of": 8,
        "tokens": {
            "<|im_start|>": {"source": TOK["a"]},
            "zz": {"source": {"kind": "zero"}},
            "ab": {"source": {"kind": "model_token", "model": TOK["b"], "token": "gh"}, "force": True},
            "<new>": {"source": {"kind": "model_token", "model": TOK["a"], "token_id": 5}},
        },
    }),
    "base_with_new_token": _ta(tokenizer={"source": "base", "tokens": {"<new>": {"source": {"kind": "zero"}}}}),
    "ties_union": {
        "merge_method": "ties",
        "base_model": TOK["base"],
        "models": [{"model": TOK["a"], "parameters": {"weight": 1.0, "density": 0.6}},
                   {"model": TOK["b"], "parameters": {"weight": 0.5, "density": 0.8}}],
        "dtype": "float32",
        "tokenizer_source": "union",
    },
    "linear_no_base": {
        "merge_method": "linear",
        "models": [{"model": TOK["b"], "parameters": {"weight": 0.3}},
                   {"model": TOK["a"], "parameters": {"weight": 0.7}}],
        "dtype": "float32",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 16},
    },
}


def _mergekit(cfg: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(lazy_unpickle=False, quiet=True, write_model_card=False))


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_and_tokenizer_as_mergekit(tmp_path, monkeypatch, case):
    pytest.importorskip("mergekit.merge")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = CASES[case]
    _mergekit(cfg, tmp_path / "mk")
    if "base_model" not in cfg:
        # without base_model mergekit takes the first of a *set* of models (hash order) as the tokenizer base;
        # streammerge the first of models:. List the one mergekit took first, then compare.
        mk_model_vocab = json.loads((tmp_path / "mk" / "tokenizer.json").read_text())["model"]["vocab"]
        first = [m for m in cfg["models"]
                 if json.loads((FIXTURES / m["model"] / "tokenizer.json").read_text())["model"]["vocab"]
                 == mk_model_vocab]
        cfg = {**cfg, "models": first[:1] + [m for m in cfg["models"] if m is not first[0]]}
    streammerge.merge(cfg, tmp_path / "ours")
    theirs, ours = load_folder(tmp_path / "mk"), load_folder(tmp_path / "ours")
    assert set(ours) == set(theirs)
    # mergekit's union orders the models it adds tokens from by a set of model references (hash order, a new
    # one per process); streammerge: base, then models: in config order. Rows are compared token by token.
    v_mk, v_ours = _vocab(tmp_path / "mk"), _vocab(tmp_path / "ours")
    assert set(v_mk) == set(v_ours)
    n = len(v_mk)
    for name, t in theirs.items():
        assert ours[name].shape == t.shape, name
        if name not in VOCABULARY_TENSORS:
            torch.testing.assert_close(ours[name], t, rtol=1e-6, atol=1e-6, msg=name)
            continue
        for tok, i in v_mk.items():
            torch.testing.assert_close(ours[name][v_ours[tok]], t[i], rtol=1e-6, atol=1e-6, msg=f"{name} {tok}")
        torch.testing.assert_close(ours[name][n:], t[n:], rtol=1e-6, atol=1e-6, msg=f"{name} padding")
    tok = [json.loads((tmp_path / d / "tokenizer.json").read_text()) for d in ("mk", "ours")]
    added = [{a["content"]: {k: v for k, v in a.items() if k != "id"} for a in x.pop("added_tokens")} for x in tok]
    assert added[0] == added[1]
    vocabs = [x["model"].pop("vocab") for x in tok]
    assert vocabs[0] == vocabs[1] and tok[0] == tok[1]  # the model's own vocabulary and every other field
    if case in ("base", "model_path", "base_with_new_token"):  # no union order involved: the same ids
        assert v_mk == v_ours
    cfgs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("mk", "ours")]
    assert cfgs[0]["vocab_size"] == cfgs[1]["vocab_size"] == ours["lm_head.weight"].shape[0]
    tc = [json.loads((tmp_path / d / "tokenizer_config.json").read_text()) for d in ("mk", "ours")]
    for key in ("bos_token", "eos_token", "unk_token", "tokenizer_class", "model_max_length"):
        assert tc[0].get(key) == tc[1].get(key), key


def _rows(folder, name="model.embed_tokens.weight"):
    return load_folder(folder)[name]


def _vocab(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


def test_rows_follow_mergekits_rules_independently(tmp_path):
    """The rules of mergekit's PermutedVocabulary, checked on the output of a linear merge with weight 1 on one
    model (the merged rows are then exactly that model's permuted and filled rows)."""
    cfg = {"merge_method": "linear", "dtype": "float32", "base_model": TOK["base"],
           "models": [{"model": TOK["base"], "parameters": {"weight": 0.0}},
                      {"model": TOK["a"], "parameters": {"weight": 0.0}},
                      {"model": TOK["b"], "parameters": {"weight": 1.0}}],
           "tokenizer": {"source": "union", "pad_to_multiple_of": 8}}
    streammerge.merge(cfg, tmp_path / "out")
    out, vocab = _rows(tmp_path / "out"), _vocab(tmp_path / "out")
    raw = {k: _rows(TOK[k]) for k in TOK}
    v = {k: _vocab(FIXTURES / f"tok-{k}") for k in TOK}
    assert out.shape[0] % 8 == 0 and out.shape[0] >= len(vocab) == 29
    for tok, t in vocab.items():
        if tok in v["b"]:  # b's own row
            expected = raw["b"][v["b"][tok]]
        elif tok in v["base"]:  # missing from b, base has it: the base's row
            expected = raw["base"][v["base"][tok]]
        else:  # only in a (the one donor)
            expected = raw["a"][v["a"][tok]]
        assert torch.equal(out[t], expected), tok
    mean = out[: len(vocab)].double().mean(0).float()
    torch.testing.assert_close(out[len(vocab):], mean.expand(out.shape[0] - len(vocab), -1))


def test_identical_tokenizers_union_changes_nothing(tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": TOK["a"], "dtype": "float32",
           "models": [{"model": TOK["a"], "parameters": {"weight": 1.0}}]}
    other = tmp_path / "a2"
    shutil.copytree(TOK["a"], other)
    cfg["models"] = [{"model": str(other), "parameters": {"weight": 0.5}}]
    streammerge.merge(cfg, tmp_path / "plain")
    streammerge.merge({**cfg, "tokenizer_source": "union"}, tmp_path / "union")
    a, b = load_folder(tmp_path / "plain"), load_folder(tmp_path / "union")
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)
    assert _vocab(tmp_path / "union") == _vocab(tmp_path / "plain")


@pytest.mark.parametrize("chunk", [1 << 20, 1 << 22])
def test_result_does_not_depend_on_chunk_size(tmp_path, chunk):
    from streammerge.planner import make_plan

    cfg = streammerge.config.parse_config(__import__("yaml").safe_dump(CASES["block_tokens_pad"]))
    plan = make_plan(cfg, tmp_path / "x", chunk_elements=chunk)
    try:
        names = ["model.embed_tokens.weight", "lm_head.weight"]
        for e in plan.experts:
            for name in names:
                whole = e.read(name)
                n = whole.numel()
                for step in (16, 48, 7 * 16 + 3):
                    parts = torch.cat([e.read(name, s, min(step, n - s)) for s in range(0, n, step)])
                    assert torch.equal(parts, whole.reshape(-1)), (name, step)
    finally:
        plan.close()


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json: not a readable tokenizer"),
        (lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}'), "key 'model.vocab'"),
        (lambda d: (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {}}, "added_tokens": [1]})),
         "key 'added_tokens'"),
    ],
)
def test_unreadable_tokenizer_is_one_line_and_nothing_written(tmp_path, mutate, needle):
    bad = tmp_path / "bad"
    shutil.copytree(TOK["b"], bad)
    mutate(bad)
    cfg = CASES["union"] | {"models": [{"model": TOK["a"], "parameters": {"weight": 0.5}},
                                       {"model": str(bad), "parameters": {"weight": 0.7}}]}
    path = tmp_path / "c.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    result = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr and str(bad / "tokenizer.json") in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
        ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of must be a positive"),
        ({"tokenizer": {"source": "union", "bogus": 1}}, "unknown key 'bogus'"),
        ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": TOK["a"]}}}}},
         "exactly one of token_id"),
        ({"tokenizer": {"tokens": {"<new>": {}}}}, "has no source"),
        ({"tokenizer": {"tokens": {"<new>": {"source": str(FIXTURES / "tiny-llama-fp32-a")}}}},
         "is not one of the merged models"),
        ({"tokenizer_source": "model:/nonexistent/tok"}, "does not exist"),
    ],
)
def test_bad_tokenizer_configs_are_one_line(tmp_path, extra, needle):
    path = tmp_path / "c.yaml"
    path.write_text(__import__("yaml").safe_dump(_ta(**extra)))
    result = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_vocabulary_rows_are_read_a_row_block_at_a_time(tmp_path):
    """A read of a few rows reads only runs of those rows (and the default rules' single rows) from the models,
    never a whole vocabulary tensor; the padding mean reads fixed blocks once per model and tensor."""
    from streammerge.planner import make_plan

    cfg = streammerge.config.parse_config(__import__("yaml").safe_dump(CASES["block_tokens_pad"]))
    plan = make_plan(cfg, tmp_path / "x")
    try:
        counts = []
        for raw in plan.vocabulary.models:
            read = raw.read

            def spy(name, start=0, count=None, read=read):
                counts.append(count)
                return read(name, start, count)

            raw.read = spy
        width = 16
        for view in plan.experts:
            counts.clear()
            view.read("lm_head.weight", 4 * width, 3 * width)  # rows 4..6
            assert counts and all(c is not None and c <= 3 * width for c in counts), counts
    finally:
        plan.close()


def test_a_changed_tokenizer_is_not_resumed_over(tmp_path):
    """The tokenizer files are inputs of the merge: a re-run after one changed refuses to resume."""
    src = tmp_path / "b"
    shutil.copytree(TOK["b"], src)
    cfg = CASES["union"] | {"models": [{"model": TOK["a"], "parameters": {"weight": 0.5}},
                                       {"model": str(src), "parameters": {"weight": 0.7}}]}
    streammerge.merge(cfg, tmp_path / "out")
    data = json.loads((src / "tokenizer.json").read_text())
    data["added_tokens"][-1]["content"] = "<|other|>"
    (src / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(streammerge.StreamMergeError, match="tokenizer.json changed"):
        streammerge.merge(cfg, tmp_path / "out")


def test_one_dimensional_vocabulary_tensors_follow_the_same_rows(tmp_path):
    """lm_head.bias (dim 0 the vocabulary, no other dim) is permuted and filled like the weights."""
    from safetensors.torch import save_file

    folders = {}
    for k in ("base", "a", "b"):
        folders[k] = tmp_path / k
        shutil.copytree(TOK[k], folders[k])
        t = load_folder(folders[k])
        t["lm_head.bias"] = torch.arange(t["lm_head.weight"].shape[0], dtype=torch.float32) + 100 * ord(k[0])
        save_file(t, folders[k] / "model.safetensors", metadata={"format": "pt"})
    cfg = {"merge_method": "linear", "dtype": "float32", "base_model": str(folders["base"]),
           "models": [{"model": str(folders["base"]), "parameters": {"weight": 0.0}},
                      {"model": str(folders["b"]), "parameters": {"weight": 1.0}},
                      {"model": str(folders["a"]), "parameters": {"weight": 0.0}}],
           "tokenizer": {"source": "union", "pad_to_multiple_of": 8}}
    streammerge.merge(cfg, tmp_path / "out")
    out = load_folder(tmp_path / "out")
    w, bias = out["lm_head.weight"], out["lm_head.bias"]
    raw = {k: load_folder(folders[k]) for k in folders}
    for t in range(w.shape[0]):  # the bias row t comes from the same model and row as the weight row t
        hits = [(k, r) for k in raw for r in range(raw[k]["lm_head.weight"].shape[0])
                if torch.equal(raw[k]["lm_head.weight"][r], w[t])]
        if hits:
            k, r = hits[0]
            assert bias[t] == raw[k]["lm_head.bias"][r], t
        else:  # a padding row: the mean
            n = len(_vocab(tmp_path / "out"))
            assert t >= n and torch.isclose(bias[t], bias[:n].double().mean().float())


@pytest.mark.parametrize("source, expected", [("union", "BASE"), ("model_b", "B"), ("model_a", None)])
def test_the_chat_template_travels_with_the_tokenizer(tmp_path, source, expected):
    folders = {k: tmp_path / k for k in TOK}
    for k, f in folders.items():
        shutil.copytree(TOK[k], f)
    (folders["base"] / "chat_template.jinja").write_text("BASE")
    (folders["b"] / "chat_template.jinja").write_text("B")
    src = {"union": "union", "model_b": f"model:{folders['b']}", "model_a": f"model:{folders['a']}"}[source]
    cfg = _ta(tokenizer_source=src, base_model=str(folders["base"]),
              models=[{"model": str(folders["a"]), "parameters": {"weight": 0.5}},
                      {"model": str(folders["b"]), "parameters": {"weight": 0.7}}])
    streammerge.merge(cfg, tmp_path / "out")
    template = tmp_path / "out" / "chat_template.jinja"
    assert (template.read_text() if template.exists() else None) == expected
