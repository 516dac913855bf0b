"""The results as markdown tables and a PNG plot. Input: the ``results.json`` dict of bench_quality."""

from __future__ import annotations

from pathlib import Path

EXPERT_SETS = {
    "full": "full FT",
    "lora": "LoRA adapters",
    "lora-folded": "LoRA, folded",
    "oft": "OFT adapters",
    "oft-folded": "OFT, folded",
}
FAMILY = {"full": "full", "lora": "lora", "lora-folded": "lora", "oft": "oft", "oft-folded": "oft"}
FAMILY_LABEL = {"full": "full FT", "lora": "LoRA", "oft": "OFT"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _lam(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def models_table(results: dict) -> list[str]:
    """Base, experts (each on every task: the diagonal is its own task) and the multi-task reference."""
    tasks = results["tasks"]
    lines = ["| model | " + " | ".join(tasks) + " | avg |", "| --- |" + " ---: |" * (len(tasks) + 1)]

    def row(label: str, acc: dict[str, float], own: str | None = None) -> str:
        cells = [f"**{_pct(acc[t])}**" if t == own else _pct(acc[t]) for t in tasks]
        return f"| {label} | " + " | ".join(cells) + f" | {_pct(sum(acc.values()) / len(acc))} |"

    lines.append(row("base", results["base"]["test"]))
    for family, experts in results["experts"].items():
        for task, acc in experts.items():
            lines.append(row(f"{FAMILY_LABEL[family]} expert: {task}", acc["test"], own=task))
    if results.get("multitask"):
        lines.append(row("multi-task full FT (reference, not a merge)", results["multitask"]["test"]))
    return lines


def merges_table(results: dict) -> list[str]:
    tasks = results["tasks"]
    head = ["merge", "experts", "hyper-parameters", *tasks, "avg", "norm. avg", "λ (val)", "avg at rule λ", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | --- |" + " ---: |" * (len(tasks) + 5)]
    for r in results["merges"]:
        lead = f"| {r['name']} | {EXPERT_SETS[r['experts']]} | {r['hyper']} |"
        if r["status"] != "ok":
            why = "not available" if r["status"] == "not available" else f"failed: {r['message']}"
            lines.append(lead + f" {why} |" + " |" * (len(tasks) + 4))
            continue
        accs = " | ".join(_pct(r["test"][t]) for t in tasks)
        lines.append(f"{lead} {accs} | **{_pct(r['avg'])}** | {_ratio(r['norm_avg'])} | {_lam(r['lambda'])} | "
                     f"{_pct(r.get('rule_avg'))} | {r['seconds']:.1f} |")
    return lines


def write_markdown(results: dict, path: Path, notes: list[str]) -> str:
    s = results["settings"]
    text = [
        "# Merge quality on synthetic capabilities",
        "",
        f"Reproduce: `{s['command']}` ({s['timing']}).",
        "",
        s["description"],
        "",
        "## Base and experts (test exact-match accuracy, %; bold: the expert's own task)",
        "",
        *models_table(results),
        "",
        "## Merges (test exact-match accuracy, %)",
        "",
        ("`norm. avg`: mean over tasks of the merge's accuracy divided by the accuracy of that task's "
         "expert of the same fine-tuning way (1.00 = every expert's skill kept). `λ (val)`: the scale "
         "chosen on the validation split among the rule's value ×{0.5, 1, 1.5, 2}; `avg at rule λ`: test "
         "average at the rule's value. `–`: the method has no λ."),
        "",
        *merges_table(results),
        "",
        *(["## Diagnostics: each full-FT task vector alone (test accuracy, %)", "", *results["diagnostics"], ""]
          if results.get("diagnostics") else []),
        *notes,
    ]
    out = "\n".join(text).rstrip() + "\n"
    path.write_text(out)
    return out


def write_plot(results: dict, path: Path) -> str | None:
    """Horizontal bars: each merge's test average, coloured by fine-tuning way, with the base and the
    experts' mean as lines. Returns None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'streammerge[bench]'): plot skipped"
    rows = results["merges"]
    if not any(r["status"] == "ok" for r in rows):
        return "no merge succeeded: plot skipped"
    colours = {"full": "tab:blue", "lora": "tab:orange", "oft": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.6))
    labels = [f"{r['name']}  [{EXPERT_SETS[r['experts']]}]" for r in rows]
    ys = range(len(rows))[::-1]
    ax.barh(list(ys), [100 * r["avg"] if r["status"] == "ok" else 0 for r in rows],
            color=[colours[FAMILY[r["experts"]]] for r in rows])
    for y, r in zip(ys, rows, strict=False):
        if r["status"] != "ok":
            ax.text(
                1, y, r["status"] if r["status"] == "not available" else "failed", va="center", fontsize=7, color="gray"
            )
    ax.set_yticks(list(ys), labels, fontsize=8)
    base = 100 * sum(results["base"]["test"].values()) / len(results["tasks"])
    ax.axvline(base, color="black", linestyle="--", linewidth=1, label=f"base ({base:.1f})")
    for family, experts in results["experts"].items():
        own = 100 * sum(e["test"][t] for t, e in experts.items()) / len(experts)
        ax.axvline(
            own,
            color=colours[family],
            linestyle=":",
            linewidth=1.5,
            label=f"{FAMILY_LABEL[family]} experts on own task ({own:.1f})",
        )
    if results.get("multitask"):
        mt = 100 * sum(results["multitask"]["test"].values()) / len(results["tasks"])
        ax.axvline(mt, color="gray", linestyle="-.", linewidth=1, label=f"multi-task full FT ({mt:.1f})")
    ax.set_xlabel("test exact-match accuracy, mean over tasks (%)")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Merges of one expert per capability (bars coloured by fine-tuning way)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
