"""Run OTA configs through streammerge and through the OTA authors' fork, and compare the tensors.

    python scripts/compare_ota_authors.py --venv /work/ota-venv [CONFIG.yml ...]

The authors' fork (github pmahdavi/ota-merge, a mergekit fork) must be installed in ``--venv``
(``python3 -m venv --system-site-packages V && V/bin/pip install "transformers<5" -e ota-merge/``).
Default configs: fixtures/configs/ota-authors/*.yml (the authors' 8 OTA configs with local paths, and
extra cases). Each is rewritten with absolute paths (mergekit resolves paths against the working
directory) and without ``tokenizer_source`` (the fixtures share one vocabulary and have no tokenizer
files), merged by both tools on the CPU, and every output tensor compared as bf16: the table gives the
share of entries equal, within 1 bf16 ulp, and the largest distance in ulps. Not part of the test suite
(the fork is not a dependency); tests/test_ota_authors.py checks the same configs against formulas
transcribed from the fork's code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "fixtures" / "configs" / "ota-authors"


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers whose difference counts ulps (sign-magnitude -> two's complement order)."""
    b = t.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int64)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """(entries, equal, within 1 ulp, max ulps) over the tensors both hold; raises if names differ."""
    if set(a) != set(b):
        raise SystemExit(f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}")
    n = eq = one = worst = 0
    for name in a:
        d = (ordered_bits(a[name]) - ordered_bits(b[name])).abs()
        n += d.numel()
        eq += int((d == 0).sum())
        one += int((d <= 1).sum())
        worst = max(worst, int(d.max()) if d.numel() else 0)
    return n, eq, one, worst


def localized(config: Path, tmp: Path, keep_tokenizer: bool) -> Path:
    text = config.read_text().replace("../../ota-authors/", f"{ROOT / 'fixtures' / 'ota-authors'}/")
    if not keep_tokenizer:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("tokenizer_source"))
    out = tmp / config.name
    out.write_text(text + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, required=True, help="venv with the authors' fork installed")
    ap.add_argument("configs", nargs="*", type=Path)
    args = ap.parse_args()
    configs = args.configs or sorted(CONFIGS.glob("*.yml"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for config in configs:
            cfg = localized(config, tmp, keep_tokenizer=False)
            theirs, ours = tmp / f"{config.stem}-fork", tmp / f"{config.stem}-streammerge"
            fork = [str(args.venv / "bin" / "mergekit-yaml"), str(cfg), str(theirs), "--no-copy-tokenizer"]
            subprocess.run(fork, check=True, capture_output=True)
            subprocess.run([sys.executable, "-c", "import sys; from streammerge.cli import main; main()", "merge",
                            str(cfg), str(ours), "--quiet"], check=True, capture_output=True,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            n, eq, one, worst = compare(load_dir(theirs), load_dir(ours))
            rows.append((config.name, n, eq / n, one / n, worst))
    print("| config | entries | equal | within 1 bf16 ulp | max ulps |\n| --- | ---: | ---: | ---: | ---: |")
    for name, n, eq, one, worst in rows:
        print(f"| {name} | {n} | {eq:.4%} | {one:.4%} | {worst} |")


if __name__ == "__main__":
    main()
