"""Quality benchmark: does each merge method keep its experts' skills, on real (tiny) training runs?

    python scripts/bench_quality.py                  # the full run (CPU; docs/quality/results.md + .png)
    python scripts/bench_quality.py --smoke --out-dir /tmp/q --work-dir /tmp/qw    # toy scale, ~1 min
    python scripts/bench_quality.py --pretrained [--seeds 1]     # the pretrained encoder (quality/pretrained.py)

The default run is the strong-interference stress case: a tiny Llama trained from scratch.

Steps, all seeded: (1) synthetic capabilities (``quality/tasks.py``), (2) pretrain a tiny
``LlamaForCausalLM`` on one half of every capability (a mediocre base), (3) fine-tune one expert per
capability three ways from that base (full FT with AdamW, keeping Adam's second moments; PEFT LoRA;
PEFT OFT), (4) merge them with every method of the table in ``quality/merges.py`` through
``python -m streammerge.cli merge`` on files, (5) evaluate base, experts and merges on every task's
held-out test split (exact match of greedy generation) and write markdown, JSON and a PNG.

The streammerge under test is the checkout this script lives in (``--package-root`` to point at
another); methods it does not have yet appear as "not available". ``--reuse`` keeps the trained
models of an earlier run with the same settings in ``--work-dir`` and redoes merges and evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import resource
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from quality import merges as merge_table
from quality import report
from quality.diagnostics import task_vector_lines
from quality.evaluate import accuracies
from quality.tasks import TASK_NAMES, make_tasks
from quality.training import (
    ModelSize,
    RunSpec,
    finetune_full,
    finetune_lora,
    finetune_oft,
    load_model,
    new_model,
    save_model,
    train,
)


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...] = tuple(TASK_NAMES)
    seed: int = 0
    n_train: int = 20000  # per task and pool (pretraining half, full distribution)
    n_val: int = 200
    n_test: int = 500
    size: ModelSize = field(default_factory=ModelSize)
    pretrain: RunSpec = field(default_factory=lambda: RunSpec(steps=2000, lr=3e-3))
    full: RunSpec = field(default_factory=lambda: RunSpec(steps=300, lr=1e-3))
    lora: RunSpec = field(default_factory=lambda: RunSpec(steps=300, lr=3e-3))
    lora_rank: int = 8
    lora_alpha: int = 16
    oft: RunSpec = field(default_factory=lambda: RunSpec(steps=300, lr=3e-3))
    oft_block_size: int = 32
    multitask: bool = True  # also fine-tune one full model on every task (a reference, not a merge)


SMOKE = Settings(
    tasks=("idx", "shift"), n_train=2000, n_val=40, n_test=60,
    size=ModelSize(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1),
    pretrain=RunSpec(steps=40, lr=3e-3, batch=32, warmup=5), full=RunSpec(steps=8, lr=1e-3, batch=32, warmup=2),
    lora=RunSpec(steps=8, lr=3e-3, batch=32, warmup=2), oft=RunSpec(steps=8, lr=3e-3, batch=32, warmup=2),
    lora_rank=4, lora_alpha=8, oft_block_size=8, multitask=False,
)

TASK_TEXT = {
    "sub": "`sub` (6 letters through one of two fixed substitution tables)",
    "idx": "`idx` (the letter at a queried position of 8)",
    "sort": "`sort` (6 digits, ascending or descending)",
    "shift": "`shift` (6 digits plus k, mod 10)",
}
DESCRIPTION = """\
**Setup.** Synthetic capabilities (`scripts/quality/tasks.py`): {tasks}. A {size} `LlamaForCausalLM` is pretrained on
one half of every
capability (table A only, positions 0–3, ascending sorts, k < 5), so it scores about 50 % on each task's
full test distribution. One expert per capability is fine-tuned from it on that task's full
distribution three ways: full fine-tuning ({full}), PEFT LoRA ({lora}), PEFT OFT ({oft}). Every
merge runs `python -m streammerge.cli merge CONFIG OUT` on those files; "folded" means the PEFT
adapter merged into the base weights (`merge_and_unload`) so model-level methods can take it.
Accuracy: exact match of the greedily generated answer on {n_test} held-out test prompts per task
({n_val} validation prompts per task choose λ). Seed {seed}; CPU, {threads} thread(s)."""


def describe(s: Settings, threads: int) -> str:
    z = s.size
    size = f"{z.layers}-layer, hidden {z.hidden}, MLP {z.intermediate}, {z.heads} heads ({z.kv_heads} KV)"

    def run(r: RunSpec, extra: str = "") -> str:
        return f"AdamW, {r.steps} steps × {r.batch}, lr {r.lr:g}{extra}"

    return (
        DESCRIPTION.format(
            tasks=", ".join(TASK_TEXT[t] for t in s.tasks),
            size=size,
            full=run(s.full),
            lora=run(s.lora, f", r {s.lora_rank}, α {s.lora_alpha}, all projections"),
            oft=run(s.oft, f", block {s.oft_block_size}, all projections"),
            n_test=s.n_test,
            n_val=s.n_val,
            seed=s.seed,
            threads=threads,
        )
        .replace("\n", " ")
        .replace("  ", " ")
    )


class Clock:
    """Wall and CPU seconds per stage; CPU counts this process and its finished children (the CLI)."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float, float]] = []
        self._t0 = time.perf_counter()
        self._c0 = self._cpu()

    @staticmethod
    def _cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), self._cpu()
        self.stages.append((name, t - self._t0, c - self._c0))
        print(f"[{name}] {t - self._t0:.0f} s wall, {c - self._c0:.0f} s CPU", flush=True)
        self._t0, self._c0 = t, c

    def total(self) -> tuple[float, float]:
        return sum(s[1] for s in self.stages), sum(s[2] for s in self.stages)


def train_all(s: Settings, tasks, work: Path, sidecar_module: str | None, clock: Clock) -> dict[str, dict]:
    """Base, experts (three ways) and the multi-task reference, as folders under ``work``."""
    seq_len = max(t.seq_len for t in tasks.values())
    base = work / "base"
    model = new_model(s.size, s.seed)
    train(model, [t.pretrain for t in tasks.values()], s.pretrain, seq_len, s.seed)
    save_model(model, base)
    clock.lap("pretrain base")
    files: dict[str, dict] = {"full": {}, "lora": {}, "oft": {}}
    for i, (name, task) in enumerate(tasks.items()):
        seed = s.seed + 1 + i
        out = work / "full" / name
        moments = finetune_full(base, task.train, s.full, seq_len, seed, out, sidecar_module)
        files["full"][name] = {"path": str(out), "second_moments": moments}
    clock.lap("full fine-tuning")
    for i, (name, task) in enumerate(tasks.items()):
        seed = s.seed + 1 + i
        finetune_lora(
            base,
            task.train,
            s.lora,
            seq_len,
            seed,
            work / "lora" / name,
            work / "lora-folded" / name,
            s.lora_rank,
            s.lora_alpha,
        )
        files["lora"][name] = {"path": str(work / "lora" / name), "folded": str(work / "lora-folded" / name)}
    clock.lap("LoRA fine-tuning")
    for i, (name, task) in enumerate(tasks.items()):
        seed = s.seed + 1 + i
        finetune_oft(
            base, task.train, s.oft, seq_len, seed, work / "oft" / name, work / "oft-folded" / name, s.oft_block_size
        )
        files["oft"][name] = {"path": str(work / "oft" / name), "folded": str(work / "oft-folded" / name)}
    clock.lap("OFT fine-tuning")
    if s.multitask:
        mt = load_model(base)
        steps = dataclasses.replace(s.full, steps=s.full.steps * len(tasks))  # as many examples as all experts
        train(mt, [t.train for t in tasks.values()], steps, seq_len, s.seed + 100)
        save_model(mt, work / "multitask")
        clock.lap("multi-task reference")
    return files


def expert_inputs(files: dict, expert_set: str, base: Path) -> merge_table.MergeInputs:
    family = report.FAMILY[expert_set]
    experts = []
    for task, f in files[family].items():
        path = Path(f["folded"] if expert_set.endswith("-folded") else f["path"])
        moments = {}
        for name in f.get("second_moments", []):
            key = "raw" if name == "exp_avg_sq.safetensors" else "rank1" if "rank1" in name else "exact"
            moments[key] = path / name
        experts.append(merge_table.Expert(task, path, moments))
    return merge_table.MergeInputs(base, experts)


def run_merges(entries, files, base: Path, tasks, experts_acc, work: Path, args) -> list[dict]:
    for stale in ("configs", "merges"):  # from an earlier run with --reuse
        shutil.rmtree(work / stale, ignore_errors=True)
    rows = []
    unavailable: dict[str, str] = {}
    for k, entry in enumerate(entries):
        row = {
            "name": entry.name,
            "method": entry.method,
            "experts": entry.expert_set,
            "hyper": entry.hyper,
            "lambda_rule": entry.lambda_rule,
            "status": "ok",
            "message": "",
            "seconds": 0.0,
        }
        rows.append(row)
        if entry.method in unavailable:
            row.update(status="not available", message=unavailable[entry.method])
            continue
        inputs = expert_inputs(files, entry.expert_set, base)
        val: dict[str, float] = {}  # λ -> mean validation accuracy
        merged: dict[str, Path] = {}
        for lam in entry.lambdas():
            tag = f"{k:02d}-{entry.expert_set}-{entry.name}".replace(" ", "_").replace("+", "p") + (
                f"-l{lam:g}" if lam else ""
            )
            out = work / "merges" / tag
            shutil.rmtree(out, ignore_errors=True)
            try:
                config = entry.build(inputs, lam)
            except merge_table.MissingInput as e:
                row.update(status="not available", message=str(e))
                break
            run = merge_table.run_cli(config, work / "configs" / f"{tag}.yaml", out, args.package_root, args.threads)
            row["seconds"] += run.seconds
            if not run.ok:
                row.update(status="not available" if run.not_available else "failed", message=run.message)
                if run.not_available:
                    unavailable[entry.method] = run.message
                break
            merged[str(lam)] = out
            if len(entry.lambdas()) > 1:
                acc = accuracies(load_model(out, base), tasks, "val")
                val[str(lam)] = sum(acc.values()) / len(acc)
        if row["status"] != "ok":
            print(f"  {entry.name} [{entry.expert_set}]: {row['status']} ({row['message']})", flush=True)
            continue
        best = max(val, key=val.get) if val else str(entry.lambdas()[0])  # first (the rule) wins ties
        test = accuracies(load_model(merged[best], base), tasks, "test")
        row.update(
            test=test,
            avg=sum(test.values()) / len(test),
            val_by_lambda=val,
            **{"lambda": None if entry.lambda_rule is None else float(best)},
        )
        family = report.FAMILY[entry.expert_set]
        norm = {
            t: (test[t] / experts_acc[family][t]["test"][t] if experts_acc[family][t]["test"][t] > 0 else None)
            for t in tasks
        }
        row["normalized"] = norm
        row["norm_avg"] = None if None in norm.values() else sum(norm.values()) / len(norm)
        if entry.lambda_rule is not None:
            rule = str(entry.lambdas()[0])
            rule_test = test if rule == best else accuracies(load_model(merged[rule], base), tasks, "test")
            row["rule_avg"] = sum(rule_test.values()) / len(rule_test)
        print(
            f"  {entry.name} [{entry.expert_set}]: avg {100 * row['avg']:.1f}"
            + (f" (λ {row['lambda']:g})" if row["lambda"] is not None else ""),
            flush=True,
        )
    return rows


def _quiet_libraries() -> None:
    """No progress bars or deprecation chatter from transformers/peft in the benchmark's output."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("peft").setLevel(logging.ERROR)


def _has_module(name: str, package_root: Path) -> bool:
    """Whether ``name`` comes from the checkout under test. Not just ``find_spec``: with streammerge
    installed editable from another checkout, a submodule missing here is found there instead."""
    spec = importlib.util.find_spec(name)
    return bool(spec and spec.origin and Path(spec.origin).resolve().is_relative_to(package_root / "streammerge"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy scale: 2 tasks, a 1-layer model, a few steps, 4 merges")
    ap.add_argument(
        "--out-dir", type=Path, default=ROOT / "docs" / "quality", help="results.md, results.json, results.png"
    )
    ap.add_argument("--work-dir", type=Path, default=ROOT / "bench_data" / "quality", help="models, configs, merges")
    ap.add_argument("--package-root", type=Path, default=ROOT, help="the streammerge checkout under test")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine, 2 threads ran ~5x slower per step)",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="keep trained models from an earlier run with the same settings"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="re-render results.md/.png from --out-dir/results.json (e.g. after editing quality/NOTES.md)",
    )
    ap.add_argument(
        "--only", default="", help="comma-separated substrings: run only merges whose name or experts match"
    )
    ap.add_argument(
        "--pretrained",
        action="store_true",
        help="the pretrained-encoder benchmark (all-MiniLM-L6-v2, quality/pretrained.py) instead of the tiny-Llama "
        "stress case",
    )
    ap.add_argument("--seeds", type=int, default=None, help="--pretrained: number of seeds (default 3)")
    ap.add_argument("--workers", type=int, default=None,
                    help="--pretrained: worker processes of --threads torch threads each (default 2; smoke 1)")
    args = ap.parse_args(argv)
    args.package_root = args.package_root.resolve()
    sys.path.insert(0, str(args.package_root))
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()

    if args.pretrained:
        from quality import pretrained

        if args.report_only:
            return pretrained.report_only(args.out_dir)

        work = args.work_dir if args.work_dir != ROOT / "bench_data" / "quality" else ROOT / "bench_data" / "pretrained"
        return pretrained.main(args.out_dir, work.resolve(), args.package_root, args.seeds, args.smoke, args.threads,
                               args.workers)
    if args.report_only:
        return write_report(json.loads((args.out_dir / "results.json").read_text()), args.out_dir)
    s = SMOKE if args.smoke else Settings()
    clock = Clock()
    work = args.work_dir.resolve()
    fingerprint = json.dumps(dataclasses.asdict(s), sort_keys=True, default=str)
    done_file = work / "trained.json"
    reuse = args.reuse and done_file.exists() and json.loads(done_file.read_text())["settings"] == fingerprint
    tasks = make_tasks(list(s.tasks), s.n_train, s.n_val, s.n_test, s.seed)
    clock.lap("data")
    sidecar_module = "streammerge.sidecar" if _has_module("streammerge.sidecar", args.package_root) else None
    if reuse:
        files = json.loads(done_file.read_text())["files"]
        print(f"reusing trained models in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if sidecar_module is None:
            print("streammerge.sidecar not found in the streammerge under test: raw exp_avg_sq files only", flush=True)
        files = train_all(s, tasks, work, sidecar_module, clock)
        done_file.write_text(json.dumps({"settings": fingerprint, "files": files}))
    base = work / "base"

    results: dict = {"tasks": list(s.tasks), "base": {"test": accuracies(load_model(base), tasks, "test")}}
    results["experts"] = {
        family: {t: {"test": accuracies(load_model(Path(f["path"]), base), tasks, "test")} for t, f in fam.items()}
        for family, fam in files.items()
    }
    if (work / "multitask").exists():
        results["multitask"] = {"test": accuracies(load_model(work / "multitask"), tasks, "test")}
    if not args.smoke:
        experts = {t: Path(f["path"]) for t, f in files["full"].items()}
        results["diagnostics"] = task_vector_lines(base, experts, tasks)
    clock.lap("evaluate base and experts")

    entries = merge_table.entries(len(s.tasks), s.seed, smoke=args.smoke)
    if args.only:
        keys = args.only.split(",")
        entries = [e for e in entries if any(k in e.name or k == e.expert_set for k in keys)]
    results["merges"] = run_merges(entries, files, base, tasks, results["experts"], work, args)
    clock.lap("merges (CLI) and their evaluation")

    wall, cpu = clock.total()
    command = "python scripts/bench_quality.py" + (" --smoke" if args.smoke else "")
    results["settings"] = {
        "command": command,
        "argv": shlex.join(sys.argv[1:]),
        "description": describe(s, args.threads),
        "timing": f"{wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU" + (" (training reused)" if reuse else ""),
        "stages": clock.stages,
        "reused_training": reuse,
        "settings": json.loads(fingerprint),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return write_report(results, args.out_dir)


def write_report(results: dict, out_dir: Path) -> int:
    """results.md (with quality/NOTES.md appended for the full run), results.png; print the markdown."""
    notes_file = Path(__file__).resolve().parent / "quality" / "NOTES.md"
    smoke = "--smoke" in results["settings"]["command"]
    notes = notes_file.read_text().splitlines() if notes_file.exists() and not smoke else []
    text = report.write_markdown(results, out_dir / "results.md", notes)
    print("\n" + text)
    why = report.write_plot(results, out_dir / "results.png")
    print(why or f"plot: {out_dir / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
