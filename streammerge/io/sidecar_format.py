"""The streammerge sidecar: one model's Adam second moments (``exp_avg_sq``), compact, random access.

Format, version 1 (integers little-endian):

    [16 bytes]  head:   magic b"\\x89SIDECAR" (8), u32 version = 1, u32 flags = 0 (readers refuse others)
    [frames]    zstd frames, back to back from byte 16: each holds elements of exactly one tensor
    [L bytes]   index:  UTF-8 JSON, below
    [32 bytes]  footer: u64 index_offset, u64 L, u32 crc32(index), u32 version, magic (8)

Index: {"format": "streammerge-sidecar", "version": 1, "frame_elements": F,
        "metadata": {"source": str|null, "optimizer": str|null, "step": int|null, "beta2": float|null, ...},
        "tensors": [{"name": str, "shape": [int, ...], "repr": "exact"|"rank1"|"rank-k", "rank": int,
                     "dtype": "F32"|"BF16"|"F16", "total": float|null, "step": int|null,
                     "frames": [[offset, length, crc32], ...]}, ...]}

A tensor's *payload* is its parts (``second_moment_factors.part_shapes``: exact ``v`` in the tensor's
shape; rank1 ``r`` (m,), ``c`` (n,); rank-k ``a`` (m, k), ``b`` (k, n), with (m, n) = (shape[0],
prod(shape[1:]))), each flattened row-major, concatenated in that order and stored as ``dtype``. The
payload is cut into frames of F elements (the last may be shorter); frame j is one zstd frame (with
content size and zstd's own content checksum) of payload elements [j·F, (j+1)·F), and ``crc32`` is
zlib's CRC-32 of the frame's compressed bytes. ``offset`` is absolute; the frames of all tensors tile
[16, index_offset) exactly. ``total`` (rank1 only) is Σv in fp64: v̂ = r·cᵀ / total. ``rank`` is k for
rank-k, 1 for rank1, 0 for exact; v̂ = max(a·b, 0) for rank-k. ``step`` is Adam's step count for
that tensor when known. 1-D tensors and tensors with a dimension of 1 are always exact.

One tensor (or one frame of it, for flat ranges of an exact tensor) is read and decoded without
touching any other byte of the file. Readers check everything above and raise ``CheckpointError``
naming the file and tensor; writers stream one tensor at a time and write the index last, to a
temporary name that is renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import zstandard

from ..errors import CheckpointError, OutputError
from .paths import regular_file
from .second_moment_factors import Factored, matrix_view, part_shapes

MAGIC = b"\x89SIDECAR"
VERSION = 1
FORMAT = "streammerge-sidecar"
HEAD = struct.Struct("<8sII")  # magic, version, flags
FOOTER = struct.Struct("<QQII8s")  # index_offset, index_length, index crc32, version, magic
FRAME_ELEMENTS = 1 << 22  # 4 Mi elements per frame: matches the engine's default chunk
MAX_INDEX_BYTES = 1 << 30
ZSTD_LEVEL = 3

StorageDtype = Literal["F32", "BF16", "F16"]
STORAGE_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
REPRESENTATIONS = ("exact", "rank1", "rank-k")


@dataclass(frozen=True)
class TensorRecord:
    """One tensor's index entry."""

    name: str
    shape: tuple[int, ...]
    representation: str
    rank: int
    dtype: str
    total: float | None
    step: int | None
    frames: tuple[tuple[int, int, int], ...]  # (absolute offset, compressed length, crc32)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def parts(self) -> dict[str, tuple[int, ...]]:
        return part_shapes(self.representation, self.shape, self.rank)

    @property
    def payload_elements(self) -> int:
        return sum(math.prod(s) for s in self.parts.values())

    @property
    def stored_bytes(self) -> int:
        """Compressed bytes on disk (frames only)."""
        return sum(length for _, length, _ in self.frames)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "repr": self.representation, "rank": self.rank,
                "dtype": self.dtype, "total": self.total, "step": self.step, "frames": [list(f) for f in self.frames]}


def _is_int(x: object, low: int = 0) -> bool:
    return type(x) is int and x >= low


def validate_metadata(metadata: object, where: str) -> dict[str, Any]:
    """Check the typed metadata keys; other keys are free-form JSON."""
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise CheckpointError(f"{where}: metadata must be a JSON object with string keys")
    for key in ("source", "optimizer"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            raise CheckpointError(f"{where}: metadata {key!r} must be a string or null, not {metadata[key]!r}")
    if metadata.get("step") is not None and not _is_int(metadata["step"]):
        raise CheckpointError(
            f"{where}: metadata 'step' must be a non-negative integer or null, not {metadata['step']!r}"
        )
    beta2 = metadata.get("beta2")
    if beta2 is not None and not (isinstance(beta2, float) and 0.0 < beta2 < 1.0):
        raise CheckpointError(f"{where}: metadata 'beta2' must be a number in (0, 1) or null, not {beta2!r}")
    return metadata


def _parse_record(entry: object, frame_elements: int, where: str) -> TensorRecord:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise CheckpointError(f"{where}: a tensor entry has no name; the index is corrupt")
    name = entry["name"]
    at = f"{where}: tensor {name!r}"
    shape, rep, rank, dtype = entry.get("shape"), entry.get("repr"), entry.get("rank"), entry.get("dtype")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise CheckpointError(f"{at}: shape {shape!r} is not a list of non-negative integers")
    shape = tuple(shape)
    if rep not in REPRESENTATIONS:
        raise CheckpointError(f"{at}: unknown representation {rep!r} (known: {', '.join(REPRESENTATIONS)})")
    if dtype not in STORAGE_DTYPES:
        raise CheckpointError(f"{at}: unknown storage dtype {dtype!r} (known: {', '.join(STORAGE_DTYPES)})")
    mn = matrix_view(shape)
    if rep != "exact" and mn is None:
        raise CheckpointError(f"{at}: {rep} is not allowed for shape {list(shape)} (only matrices with both dims > 1)")
    expected_rank = {"exact": 0, "rank1": 1}.get(rep)
    if expected_rank is not None and rank != expected_rank:
        raise CheckpointError(f"{at}: rank {rank!r} does not match representation {rep}")
    if rep == "rank-k" and not (_is_int(rank, 2) and rank < min(mn)):
        raise CheckpointError(f"{at}: rank-k needs an integer rank 2 <= k < {min(mn)}, not {rank!r}")
    total = entry.get("total")
    if rep == "rank1":
        if not isinstance(total, (int, float)) or isinstance(total, bool) or not (math.isfinite(total) and total >= 0):
            raise CheckpointError(f"{at}: rank1 needs a finite non-negative 'total', not {total!r}")
        total = float(total)
    elif total is not None:
        raise CheckpointError(f"{at}: 'total' is only valid for rank1")
    step = entry.get("step")
    if step is not None and not _is_int(step):
        raise CheckpointError(f"{at}: step {step!r} is not a non-negative integer")
    frames = entry.get("frames")
    if not isinstance(frames, list) or not all(
        isinstance(f, list) and len(f) == 3 and _is_int(f[0]) and _is_int(f[1], 1) and _is_int(f[2]) for f in frames
    ):
        raise CheckpointError(f"{at}: 'frames' must be a list of [offset, length >= 1, crc32]")
    record = TensorRecord(name, shape, rep, rank, dtype, total, step, tuple(tuple(f) for f in frames))
    if len(frames) != -(-record.payload_elements // frame_elements):
        raise CheckpointError(
            f"{at}: {len(frames)} frames for {record.payload_elements} elements at {frame_elements} per frame"
        )
    return record


def parse_index(raw: bytes, index_offset: int, where: str) -> tuple[dict[str, Any], int, dict[str, TensorRecord]]:
    """Validate the index JSON; return (metadata, frame_elements, records by name)."""
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: index is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{where}: index does not describe a {FORMAT} file")
    if index.get("version") != VERSION:
        raise CheckpointError(f"{where}: index version {index.get('version')!r}, expected {VERSION}")
    frame_elements = index.get("frame_elements")
    if not _is_int(frame_elements, 1):
        raise CheckpointError(f"{where}: frame_elements {frame_elements!r} is not a positive integer")
    metadata = validate_metadata(index.get("metadata"), where)
    tensors = index.get("tensors")
    if not isinstance(tensors, list):
        raise CheckpointError(f"{where}: index has no 'tensors' list")
    records: dict[str, TensorRecord] = {}
    for entry in tensors:
        record = _parse_record(entry, frame_elements, where)
        if record.name in records:
            raise CheckpointError(f"{where}: tensor {record.name!r} is listed twice; the index is corrupt")
        records[record.name] = record
    spans = sorted((off, off + length, r.name) for r in records.values() for off, length, _ in r.frames)
    cursor = HEAD.size
    for begin, end, name in spans:
        if begin != cursor:
            kind = "overlaps another frame" if begin < cursor else f"leaves a hole of {begin - cursor} bytes"
            raise CheckpointError(f"{where}: tensor {name!r}: a frame at byte {begin} {kind}; the index is corrupt")
        cursor = end
    if cursor != index_offset:
        raise CheckpointError(
            f"{where}: frames end at byte {cursor} but the index starts at {index_offset}; corrupt file"
        )
    return metadata, frame_elements, records


class SidecarReader:
    """Random access to one sidecar file: headers validated at open, frames decoded on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = regular_file(path, "a sidecar file")
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from e
        try:
            self.metadata, self.frame_elements, self.records = self._read_index()
        except BaseException:
            self.close()
            raise
        self._dctx = zstandard.ZstdDecompressor()

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise CheckpointError(f"{self.path}: unexpected end of file at byte {offset + len(data)} (truncated?)")
        return data

    def _read_index(self) -> tuple[dict[str, Any], int, dict[str, TensorRecord]]:
        size = os.fstat(self._fd).st_size
        if size < HEAD.size + FOOTER.size:
            raise CheckpointError(f"{self.path}: {size} bytes is too short to be a sidecar (truncated?)")
        magic, version, flags = HEAD.unpack(self._pread(0, HEAD.size))
        if magic != MAGIC:
            raise CheckpointError(f"{self.path}: not a streammerge sidecar (bad magic bytes)")
        if version != VERSION:
            raise CheckpointError(
                f"{self.path}: sidecar version {version}, this streammerge reads version {VERSION}; upgrade streammerge"
            )
        if flags != 0:
            raise CheckpointError(
                f"{self.path}: uses sidecar features this streammerge does not know "
                f"(flags {flags:#x}); upgrade streammerge"
            )
        index_offset, length, crc, tail_version, tail_magic = FOOTER.unpack(
            self._pread(size - FOOTER.size, FOOTER.size)
        )
        if tail_magic != MAGIC or tail_version != version:
            raise CheckpointError(f"{self.path}: footer missing or damaged; the file is truncated or corrupt")
        if length > MAX_INDEX_BYTES or index_offset < HEAD.size or index_offset + length + FOOTER.size != size:
            raise CheckpointError(f"{self.path}: footer points to an index outside the file; the file is corrupt")
        raw = self._pread(index_offset, length)
        if zlib.crc32(raw) != crc:
            raise CheckpointError(f"{self.path}: index checksum mismatch; the file is corrupt")
        return parse_index(raw, index_offset, str(self.path))

    def record(self, name: str) -> TensorRecord:
        try:
            return self.records[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no second moment for tensor {name!r}") from None

    def frame(self, record: TensorRecord, j: int) -> torch.Tensor:
        """Payload elements of frame ``j`` of ``record`` as a fresh fp32 1-D tensor (checksums verified)."""
        offset, length, crc = record.frames[j]
        count = min(self.frame_elements, record.payload_elements - j * self.frame_elements)
        dtype = STORAGE_DTYPES[record.dtype]
        nbytes = count * dtype.itemsize
        at = f"{self.path}: tensor {record.name!r}, frame {j}"
        data = self._pread(offset, length)
        if zlib.crc32(data) != crc:
            raise CheckpointError(f"{at}: checksum mismatch; the file is corrupt (convert the second moments again)")
        try:
            if zstandard.frame_content_size(data) != nbytes:
                raise CheckpointError(
                    f"{at}: frame holds {zstandard.frame_content_size(data)} bytes, expected {nbytes}"
                )
            raw = self._dctx.decompress(data, max_output_size=nbytes)
        except zstandard.ZstdError as e:
            raise CheckpointError(f"{at}: cannot decompress ({e}); the file is corrupt") from e
        if len(raw) != nbytes:
            raise CheckpointError(f"{at}: decompressed to {len(raw)} bytes, expected {nbytes}")
        return torch.frombuffer(bytearray(raw), dtype=dtype).to(torch.float32)

    def payload(self, record: TensorRecord) -> torch.Tensor:
        """The whole payload of ``record`` as one fp32 1-D tensor."""
        out = torch.empty(record.payload_elements, dtype=torch.float32)
        for j in range(len(record.frames)):
            lo = j * self.frame_elements
            piece = self.frame(record, j)
            out[lo : lo + piece.numel()] = piece
        return out

    def factored(self, record: TensorRecord) -> Factored:
        """The tensor's parts, decoded (fp32), in their shapes."""
        flat = self.payload(record)
        parts, lo = {}, 0
        for part, shape in record.parts.items():
            n = math.prod(shape)
            parts[part] = flat[lo : lo + n].reshape(shape)
            lo += n
        return Factored(record.representation, record.shape, parts, record.total)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


class SidecarWriter:
    """Writes a sidecar one tensor at a time; ``finish(metadata)`` writes the index and renames.

    Use as a context manager: leaving it without ``finish`` (or by an exception) deletes the partial
    file, so ``path`` either does not change or holds a complete sidecar.
    """

    def __init__(self, path: str | os.PathLike, dtype: StorageDtype = "F32", frame_elements: int = FRAME_ELEMENTS):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
        self.path = Path(path)
        self.dtype = dtype
        self.frame_elements = frame_elements
        self.records: list[TensorRecord] = []
        self._names: set[str] = set()
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
        try:
            self._file = open(self._tmp, "wb")
            self._file.write(HEAD.pack(MAGIC, VERSION, 0))
        except OSError as e:
            raise OutputError(f"{self._tmp}: cannot create ({e.strerror})") from e
        self._offset = HEAD.size

    def add(self, name: str, factored: Factored, step: int | None = None) -> TensorRecord:
        """Append one tensor (its parts in storage order), frame by frame."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        rank = {"exact": 0, "rank1": 1}.get(factored.representation)
        if rank is None:
            rank = factored.parts["a"].shape[1]
        expected = part_shapes(factored.representation, factored.shape, rank)
        parts = [factored.parts[p].reshape(-1) for p in expected]
        payload = parts[0] if len(parts) == 1 else torch.cat(parts)
        storage = STORAGE_DTYPES[self.dtype]
        frames = []
        for lo in range(0, payload.numel(), self.frame_elements):
            raw = payload[lo : lo + self.frame_elements].to(storage).contiguous().view(torch.uint8).numpy()
            data = self._cctx.compress(memoryview(raw))
            try:
                self._file.write(data)
            except OSError as e:
                raise OutputError(f"{self._tmp}: write failed ({e.strerror})") from e
            frames.append((self._offset, len(data), zlib.crc32(data)))
            self._offset += len(data)
        record = TensorRecord(
            name, factored.shape, factored.representation, rank, self.dtype, factored.total, step, tuple(frames)
        )
        self.records.append(record)
        self._names.add(name)
        return record

    def finish(self, metadata: dict[str, Any]) -> Path:
        """Write index and footer, fsync, rename into place. Returns the final path."""
        index = {
            "format": FORMAT,
            "version": VERSION,
            "frame_elements": self.frame_elements,
            "metadata": validate_metadata(dict(metadata), str(self.path)),
            "tensors": [r.to_json() for r in self.records],
        }
        raw = json.dumps(index, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        footer = FOOTER.pack(self._offset, len(raw), zlib.crc32(raw), VERSION, MAGIC)
        try:
            self._file.write(raw + footer)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot finish sidecar ({e.strerror})") from e
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SidecarWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._file.closed or self._tmp.exists():
            self.abort()
