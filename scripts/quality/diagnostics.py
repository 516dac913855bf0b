"""Why merges do (not) keep skills: each full-FT expert's task vector measured on its own.

For expert i with task vector τᵢ = θᵢ − θ₀: its own-task test accuracy at θ₀ + λτᵢ for a few λ
(how much of τᵢ the skill needs: an average of N experts gives each 1/N of its vector), ‖τᵢ‖/‖θ₀‖,
and the cosine between the task vectors (interference is not about direction alone: near-orthogonal
vectors can still break each other's skills in a small network).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .evaluate import exact_match
from .tasks import TaskData
from .training import load_model

SCALES = (0.25, 0.5, 0.75, 1.0)


def task_vector_lines(base: Path, experts: dict[str, Path], tasks: dict[str, TaskData]) -> list[str]:
    model = load_model(base)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    tau = {t: {k: v - theta0[k] for k, v in load_model(p).state_dict().items()} for t, p in experts.items()}
    base_norm = torch.cat([v.flatten() for v in theta0.values()]).norm()
    flat = {t: torch.cat([v.flatten() for v in tv.values()]) for t, tv in tau.items()}
    lines = [
        "| full-FT expert | ‖τ‖ / ‖θ₀‖ | " + " | ".join(f"own task at θ₀ + {s:g}·τ" for s in SCALES) + " |",
        "| --- | ---: |" + " ---: |" * len(SCALES),
    ]
    for t, tv in tau.items():
        accs = []
        for s in SCALES:
            model.load_state_dict({k: theta0[k] + s * tv[k] for k in theta0})
            accs.append(exact_match(model, tasks[t].test))
        ratio = float(flat[t].norm() / base_norm)
        lines.append(f"| {t} | {ratio:.3f} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
    names = list(tau)
    lines += ["", "Cosine between full-FT task vectors:", "",
              "| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for a in names:
        cells = [f"{float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0)):.3f}" for b in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines
