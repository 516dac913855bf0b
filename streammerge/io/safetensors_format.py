"""The safetensors file format: header parsing (validated) and header building (byte-exact).

Format (https://github.com/huggingface/safetensors, README "Format"):

    [8 bytes]  N, little-endian u64: length of the JSON header
    [N bytes]  JSON: {name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]},
                      "__metadata__": {str: str}}   (optional)
    [rest]     data; offsets are relative to the first byte after the header

The reference writer (``safetensors.torch.save``) orders tensors by dtype rank (descending, see
``DTYPE_RANK``) then by name, packs them without gaps, serialises the JSON without spaces with
``__metadata__`` first and pads the header with spaces to a multiple of 8 bytes.
``build_header`` reproduces that byte for byte, so a file written slot by slot equals ``save_file``'s.
(The reference emits ``__metadata__`` keys in Rust HashMap order, which varies per run; with the one
key streammerge writes, ``{"format": "pt"}``, the bytes are fixed. We sort keys.)
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Order of the Rust `Dtype` enum (safetensors 0.4-0.8); the writer sorts by it, descending.
DTYPE_RANK: dict[str, int] = {
    name: rank
    for rank, name in enumerate(
        ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
         "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
    )
}

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, torch dtype and shape: all the planner and writer need to lay it out."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry. ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


MAX_TENSOR_BYTES = (1 << 63) - 1  # torch sizes are int64: no tensor (or dimension) can be larger


class _DuplicateKey(ValueError):
    pass


def strict_json_object_pairs(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` that refuses a key given twice (``json`` would silently keep the last)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def decode_json(raw: bytes, path: str, what: str) -> object:
    """Parse untrusted JSON bytes (strict UTF-8, no duplicate keys); any failure is a ``CheckpointError``.

    ``json.loads`` alone lets through UTF-16/32 (it sniffs the encoding), raises ``RecursionError`` on
    deeply nested input and a plain ``ValueError`` on integers of more than 4300 digits; all of those
    become one message naming ``path`` here.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text (byte {e.start}); the file is corrupt") from e
    try:
        return json.loads(text, object_pairs_hook=strict_json_object_pairs)
    except _DuplicateKey as e:
        raise CheckpointError(
            f"{path}: {what} names {_short(e.args[0], 200)} twice; the file is corrupt or was tampered with"
        ) from e
    except RecursionError as e:
        raise CheckpointError(
            f"{path}: {what} is JSON nested too deeply to be a checkpoint; the file is corrupt"
        ) from e
    except ValueError as e:  # JSONDecodeError, and int() of a number with too many digits
        raise CheckpointError(f"{path}: {what} is not valid JSON ({str(e)[:200]}); the file is corrupt") from e
    except MemoryError as e:
        raise CheckpointError(f"{path}: {what} ({len(raw)} bytes) is too large to parse in the memory available") from e


def is_utf8(text: str) -> bool:
    """False for strings holding lone surrogates (JSON ``"\\ud800"``), which no file name or UTF-8 file can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_header(
    raw_len: bytes, read_header, file_size: int, path: str
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate and parse a safetensors header.

    ``raw_len`` is the first 8 bytes; ``read_header(n)`` returns the next ``n`` bytes. Every check the
    spec implies is made here, so later reads can trust offsets: the data section must be covered
    exactly, with no holes or overlaps, and every entry's byte length must match dtype x shape.
    Stricter than the reference reader in one respect: a tensor name given twice is refused (the
    reference keeps the last one).
    """
    if len(raw_len) < 8:
        raise CheckpointError(f"{path}: file is {file_size} bytes, too short to be safetensors (truncated?)")
    (n,) = struct.unpack("<Q", raw_len)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte limit (corrupt file)")
    if 8 + n > file_size:
        raise CheckpointError(f"{path}: header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    raw = read_header(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: header of {n} bytes could not be read in full (file changed or truncated?)")
    header = decode_json(raw, path, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) and is_utf8(k) and is_utf8(v) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _parse_entry(name, info, data_start, path)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    cursor = data_start
    for begin, end, name in spans:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else f"leaves a hole of {begin - cursor} bytes"
            raise CheckpointError(f"{path}: tensor {_short(name, 200)} {kind} (corrupt header)")
        cursor = end
    if cursor != file_size:
        if cursor > file_size:
            raise CheckpointError(f"{path}: data runs to byte {cursor} but the file has {file_size} bytes (truncated?)")
        raise CheckpointError(
            f"{path}: {file_size - cursor} bytes after the last tensor are not covered by the header (corrupt file)"
        )
    return entries, metadata


def bounded_numel(shape: list[int], limit: int) -> int | None:
    """The product of ``shape``, or None once it passes ``limit``.

    Stops early: ``math.prod`` of a million-entry shape of large numbers in a hostile header would
    build a multi-megabit integer and take minutes.
    """
    if 0 in shape:
        return 0
    numel = 1
    for d in shape:
        numel *= d
        if numel > limit:
            return None
    return numel


def _parse_entry(name: str, info: object, data_start: int, path: str) -> TensorEntry:
    where = f"{path}: tensor {_short(name, 200)}"
    if not is_utf8(name):
        raise CheckpointError(
            f"{path}: tensor name {_short(name, 200)} is not valid Unicode (lone surrogate); the file is corrupt"
        )
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry is not an object (corrupt header)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= MAX_TENSOR_BYTES for d in shape):
        raise CheckpointError(
            f"{where}: shape {_short(shape)} is not a list of non-negative 64-bit integers (corrupt header)"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            f"{where}: data_offsets {_short(offsets)} is not [begin, end] with 0 <= begin <= end (corrupt header)"
        )
    size = itemsize(dtype)
    numel = bounded_numel(shape, MAX_TENSOR_BYTES // size)
    if numel is None:
        raise CheckpointError(f"{where}: shape {_short(shape)} holds more than 2^63 bytes of {dtype} (corrupt header)")
    expected = numel * size
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{where}: {dtype} {_short(shape)} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}"
            " (corrupt header)"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _short(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: a hostile value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sort_for_writing(tensors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Order ``(name, dtype)`` pairs as the reference writer lays them out."""
    return sorted(tensors, key=lambda t: (-DTYPE_RANK[t[1]], t[0]))


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) and each tensor's absolute ``(begin, end)`` byte slot.

    ``tensors`` are ``(name, dtype, shape)``; they are laid out in the reference writer's order.
    """
    shapes = {name: shape for name, _, shape in tensors}
    order = sort_for_writing([(name, dtype) for name, dtype, _ in tensors])
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    relative: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, dtype in order:
        nbytes = math.prod(shapes[name]) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        relative[name] = (offset, offset + nbytes)
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    slots = {name: (len(prefix) + b, len(prefix) + e) for name, (b, e) in relative.items()}
    return prefix, slots
