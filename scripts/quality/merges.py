"""The merges the benchmark runs: one ``MergeEntry`` per table row, run through the real CLI.

An entry names the ``merge_method``, the expert set it merges and a config builder
``(inputs, lam) -> dict`` (a mergekit YAML as a dict). ``lam`` is the entry's scale λ when it has one
(``lambdas`` lists the candidates; the benchmark picks one on the validation split) and None for
methods without one (linear, OTA, OrthoMerge on OFT: weighted means by design).

To add or adjust a row, edit ``entries()``: e.g. a new OTA variant is one ``MergeEntry`` whose builder
is ``_ota(...)`` with other parameters. A method the installed streammerge does not know (the CLI says
"unknown merge_method") is recorded as "not available", not as a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# λ candidates are these multiples of the rule's λ (the paper's or mergekit's default for the method).
LAMBDA_MULTIPLIERS = (1.0, 0.5, 1.5, 2.0)  # the rule's own value first: it wins ties on validation


@dataclass(frozen=True)
class Expert:
    task: str
    path: Path  # what goes in ``models:``: a model folder or a PEFT adapter folder
    second_moments: dict[str, Path] = field(default_factory=dict)  # "exact" / "rank1" / "raw" -> file


@dataclass(frozen=True)
class MergeInputs:
    base: Path
    experts: list[Expert]


Builder = Callable[[MergeInputs, float | None], dict]


@dataclass(frozen=True)
class MergeEntry:
    name: str  # the row's label
    method: str  # merge_method, for the "not available" check
    expert_set: str  # key of the expert set it merges: full, lora, lora-folded, oft, oft-folded
    build: Builder
    hyper: str  # the hyper-parameters in words, for the table
    lambda_rule: float | None = None  # None: the method has no scale to choose
    multipliers: tuple[float, ...] = LAMBDA_MULTIPLIERS  # λ candidates: these times lambda_rule

    def lambdas(self) -> list[float | None]:
        if self.lambda_rule is None:
            return [None]
        return [round(m * self.lambda_rule, 6) for m in self.multipliers]


def _config(method: str, inputs: MergeInputs, model_params: dict | None = None, params: dict | None = None,
            extra: Callable[[Expert], dict] | None = None, seed: int | None = None, base: bool = True) -> dict:
    models = []
    for e in inputs.experts:
        entry: dict = {"model": str(e.path)}
        if extra:
            entry.update(extra(e))
        if model_params:
            entry["parameters"] = dict(model_params)
        models.append(entry)
    cfg: dict = {"merge_method": method, **({"base_model": str(inputs.base)} if base else {}), "models": models}
    if params:
        cfg["parameters"] = params
    cfg["dtype"] = "float32"
    if seed is not None:
        cfg["seed"] = seed
    return cfg


# --- builders --------------------------------------------------------------------------------------


def _linear(inputs, lam):
    # no base_model: mergekit 0.1.5 would make the base a linear input and refuse it without a weight
    return _config("linear", inputs, {"weight": 1.0}, {"normalize": True}, base=False)


def _task_arithmetic(inputs, lam):
    return _config("task_arithmetic", inputs, {"weight": 1.0}, {"lambda": lam, "normalize": False})


def _ties(density: float) -> Builder:
    return lambda inputs, lam: _config("ties", inputs, {"weight": 1.0, "density": density},
                                       {"lambda": lam, "normalize": True})


def _dare(method: str, density: float, normalize: bool, seed: int) -> Builder:
    return lambda inputs, lam: _config(method, inputs, {"weight": 1.0, "density": density},
                                       {"lambda": lam, "normalize": normalize}, seed=seed)


def _breadcrumbs(method: str, density: float, gamma: float) -> Builder:
    return lambda inputs, lam: _config(method, inputs, {"weight": 1.0, "density": density, "gamma": gamma},
                                       {"lambda": lam})


def _della(method: str, density: float, epsilon: float, seed: int) -> Builder:
    return lambda inputs, lam: _config(method, inputs, {"weight": 1.0, "density": density, "epsilon": epsilon},
                                       {"lambda": lam}, seed=seed)


class MissingInput(Exception):
    """A file the row needs was not produced (e.g. no sidecar API in the streammerge under test)."""


def _ota(representation: str, ffg_density: float | None = None) -> Builder:
    def build(inputs, lam):
        def sidecar(e: Expert) -> dict:
            path = e.second_moments.get(representation)
            if path is None and representation == "exact":
                path = e.second_moments.get("raw")  # name-keyed exp_avg_sq: exact v, the authors' format
            if path is None:
                raise MissingInput(f"no {representation} second moments for {e.task} "
                                   f"(streammerge.sidecar.export unavailable?)")
            return {"sidecar": str(path)}

        per_model = {"density": ffg_density} if ffg_density is not None else None
        return _config("ota", inputs, per_model, {"power": 0.5, "fallback_to_base": True}, extra=sidecar)

    return build


def _ord(variant: str, residual: str, density: float | None = None) -> Builder:
    def build(inputs, lam):
        params = {"variant": variant, "residual_method": residual, "lambda": lam}
        if density is not None:
            params["density"] = density
        return _config("orthomerge", inputs, None, params)

    return build


def _orthomerge_oft(inputs, lam):
    return _config("orthomerge", inputs, None, {"norm_aggregate": "mean", "output": "model"})


# --- the table ---------------------------------------------------------------------------------------


def entries(n_experts: int, seed: int, smoke: bool = False) -> list[MergeEntry]:
    """Every merge of the benchmark, in table order. Hyper-parameter rules (stated in the output):

    - weights 1 per expert; averaging methods (linear, OTA) have no λ;
    - sums of task vectors (task_arithmetic, dare_linear, ORD with task-arithmetic residuals): λ rule
      1/N (the mean task vector; the OrthoMerge paper's choice), candidates ×{0.5, 1, 1.5, 2};
    - disjoint means (ties, dare_ties with normalize): λ rule 1 (TIES paper), same candidates;
    - TIES / DARE density 0.5 (mergekit's examples; within the TIES paper's 0.2..0.8 sweep);
      ORD's TIES residuals: top 20 % (the OrthoMerge paper);
    - OTA: power 0.5, the method's default epsilon, fallback to base; FFG densities 0.1 / 0.3 / 0.6.
    The λ of each row is chosen on the validation split (best mean accuracy), never on test.
    """
    inv = 1.0 / n_experts
    if smoke:
        return [
            MergeEntry("linear", "linear", "full", _linear, "mean of experts"),
            MergeEntry("task_arithmetic", "task_arithmetic", "full", _task_arithmetic, "w=1", inv, (1.0, 0.5)),
            MergeEntry("ties", "ties", "lora-folded", _ties(0.5), "density 0.5", 1.0, (1.0,)),
            MergeEntry("ota", "ota", "full", _ota("exact"), "power 0.5, exact v"),
        ]
    model_level = [
        ("linear", "linear", _linear, "mean of experts", None),
        ("task_arithmetic", "task_arithmetic", _task_arithmetic, "w=1", inv),
        ("ties", "ties", _ties(0.5), "density 0.5", 1.0),
        ("dare_linear", "dare_linear", _dare("dare_linear", 0.5, False, seed), "density 0.5, l1 rescale", inv),
        ("dare_ties", "dare_ties", _dare("dare_ties", 0.5, True, seed), "density 0.5, l1 rescale", 1.0),
    ]
    rows = [MergeEntry(n, m, "full", b, h, lam) for n, m, b, h, lam in model_level]
    rows += [
        MergeEntry("ota", "ota", "full", _ota("exact"), "power 0.5, exact v"),
        MergeEntry("ota (rank-1 v)", "ota", "full", _ota("rank1"), "power 0.5, rank-1 sidecar"),
        *(MergeEntry(f"ota+ffg {d}", "ota", "full", _ota("exact", d), f"FFG density {d}, exact v")
          for d in (0.1, 0.3, 0.6)),
        MergeEntry("ord G + TA", "orthomerge", "full", _ord("G", "task_arithmetic"), "variant G, TA residuals", inv),
        MergeEntry("ord C + TA", "orthomerge", "full", _ord("C", "task_arithmetic"), "variant C, TA residuals", inv),
        MergeEntry("ord G + TIES", "orthomerge", "full", _ord("G", "ties", 0.2), "variant G, TIES residuals 0.2", 1.0),
    ]
    rows += [MergeEntry(n, m, "lora-folded", b, h, lam) for n, m, b, h, lam in model_level]
    rows += [
        MergeEntry("ord G + TA", "orthomerge", "lora", _ord("G", "task_arithmetic"), "variant G, TA residuals", inv),
        MergeEntry("ord C + TA", "orthomerge", "lora", _ord("C", "task_arithmetic"), "variant C, TA residuals", inv),
    ]
    rows += [MergeEntry(n, m, "oft-folded", b, h, lam) for n, m, b, h, lam in model_level]
    rows += [MergeEntry("orthomerge", "orthomerge", "oft", _orthomerge_oft, "Lie-algebra mean, norm mean")]
    return rows


# --- running one merge ---------------------------------------------------------------------------------


@dataclass
class MergeRun:
    ok: bool
    not_available: bool
    message: str
    seconds: float


def run_cli(config: dict, cfg_path: Path, out: Path, package_root: Path, threads: int) -> MergeRun:
    """``python -m streammerge.cli merge CFG OUT --quiet`` in a child process, as a user would."""
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "streammerge.cli", "merge", str(cfg_path), str(out), "--quiet", "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=cfg_path.parent)
    return cli_result(proc.returncode, (proc.stderr or proc.stdout).strip(), time.perf_counter() - t0)


def cli_result(code: int, err: str, seconds: float) -> MergeRun:
    """A merge command's exit code and error text as a row's outcome (its last line as the message)."""
    if code == 0:
        return MergeRun(True, False, "", seconds)
    last = err.splitlines()[-1] if err else f"exit {code}"
    return MergeRun(False, "unknown merge_method" in err, last, seconds)
