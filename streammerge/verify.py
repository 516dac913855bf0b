"""``streammerge verify OUT_DIR``: re-read every output tensor and check it against the journal.

Checks: every shard's safetensors header is valid (offsets cover the data exactly, byte lengths
match dtype x shape); the index names exactly the tensors the shards hold; each tensor sits in
the shard and byte range the journal recorded and the CRC-32 of its bytes equals the recorded one;
the journal is complete and the output holds exactly the tensors it records. A folder without a
journal (not written by streammerge, or journal deleted) gets the header and index checks only,
and says so. Nothing is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputError, StreamMergeError
from .io.journal import read_journal
from .io.safetensors_format import TensorEntry, parse_header
from .io.writer import INDEX_NAME, crc32_of_range


@dataclass
class VerifyReport:
    checked: int = 0  # tensors whose bytes were checked
    bad: list[tuple[str, str]] = field(default_factory=list)  # (tensor or file, why)
    notes: list[str] = field(default_factory=list)
    journal: bool = False


def _shard_names(out_dir: Path, report: VerifyReport) -> dict[str, str] | None:
    """The index's weight_map (tensor -> shard file), or None for a single-file model."""
    index = out_dir / INDEX_NAME
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.bad.append((INDEX_NAME, f"unreadable index ({e})"))
        return {}
    return weight_map


def _headers(out_dir: Path, files: set[str], report: VerifyReport) -> dict[str, dict[str, TensorEntry]]:
    headers = {}
    for name in sorted(files):
        path = out_dir / name
        if os.sep in name or name.startswith("..") or not path.is_file():
            report.bad.append((name, "shard file is missing"))
            continue
        try:
            with open(path, "rb") as f:
                entries, _ = parse_header(f.read(8), f.read, os.fstat(f.fileno()).st_size, str(path))
        except StreamMergeError as e:
            report.bad.append((name, str(e)))
            continue
        headers[name] = entries
    return headers


def verify_output(out_dir: Path) -> VerifyReport:
    """Check ``out_dir`` as the module docstring says."""
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: no such folder")
    state = read_journal(out_dir)
    if state is not None and not state.complete:
        raise OutputError(
            f"{out_dir}: the merge is not finished ({len(state.records)} of {state.summary.get('tensors', '?')} "
            f"tensors done); re-run the same merge command to finish it"
        )
    report = VerifyReport(journal=state is not None)
    weight_map = _shard_names(out_dir, report)
    files = set(weight_map.values()) if weight_map is not None else {"model.safetensors"}
    if state is not None:
        files |= {r.shard for r in state.records.values()}
    headers = _headers(out_dir, files, report)
    found = {t: shard for shard, entries in headers.items() for t in entries}
    if weight_map is not None:
        for t, shard in sorted(weight_map.items()):
            if shard in headers and t not in headers[shard]:
                report.bad.append((t, f"the index puts it in {shard}, whose header does not have it"))
        for t in sorted(set(found) - set(weight_map)):
            report.bad.append((t, f"in {found[t]} but not in the index"))
    if state is None:
        report.checked = len(found)
        report.notes.append(f"{out_dir}: no streammerge journal; checked headers only, not contents")
        return report
    for t, rec in state.records.items():
        entries = headers.get(rec.shard)
        if entries is None:
            continue  # the shard itself is already reported
        entry = entries.get(t)
        if entry is None:
            report.bad.append((t, f"recorded in the journal but missing from the output ({rec.shard})"))
        elif (entry.begin, entry.end) != (rec.offset, rec.offset + rec.length):
            report.bad.append((t, f"recorded at bytes {rec.offset}+{rec.length} of {rec.shard}, "
                                  f"found at {entry.begin}+{entry.nbytes}"))
        else:
            report.checked += 1
            if crc32_of_range(out_dir / rec.shard, rec.offset, rec.length) != rec.crc32:
                report.bad.append((t, f"bytes in {rec.shard} do not match the recorded checksum"))
    for t in sorted(set(found) - set(state.records)):
        report.bad.append((t, f"in {found[t]} but not recorded in the merge journal"))
    return report
