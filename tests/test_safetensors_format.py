import json
import struct

import pytest
import torch
from safetensors.torch import save

from streammerge.errors import CheckpointError
from streammerge.io.safetensors_format import TORCH_TO_ST, build_header, parse_header

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _header_of(blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[: 8 + n]


# The reference writer emits __metadata__ keys in HashMap order (random per run), so byte-identity
# is defined for at most one key: the {"format": "pt"} that streammerge writes.
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_header_matches_reference_writer(metadata):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dt in enumerate(DTYPES):
        shape = (i % 3 + 1, 5 - i % 4)
        tensors[f"t{(7 * i) % 13}.w_{i}"] = torch.randint(0, 2, shape, generator=g).to(dt)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(3.0)
    tensors["ünïcode.weight"] = torch.ones(3, dtype=torch.bfloat16)
    reference = save(tensors, metadata=metadata)
    ours, slots = build_header([(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()], metadata)
    assert ours == _header_of(reference)
    for name, (begin, end) in slots.items():
        t = tensors[name]
        assert reference[begin:end] == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert max(e for _, e in slots.values()) == len(reference)


def _file(header: dict, data: bytes = b"", declared_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared_len is None else declared_len) + text + data


def _parse(blob: bytes):
    return parse_header(blob[:8], lambda n: blob[8 : 8 + n], len(blob), "x.safetensors")


BAD = [
    ("too short", b"\x01\x02", "too short"),
    ("header past end", _file({}, declared_len=10_000), "past the end"),
    ("huge header", _file({}, declared_len=200_000_000), "limit"),
    ("bad json", struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
    ("not object", _file([1, 2]), "not a JSON object"),
    ("unknown dtype", _file({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"x"), "unknown dtype"),
    ("size mismatch", _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"xxxx"), "needs 8 bytes"),
    ("overlap", _file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                       "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"xxx"), "overlaps"),
    ("hole", _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"xx"), "hole"),
    ("past file", _file({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"xx"), "truncated"),
    ("trailing", _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"xx"), "not covered"),
    ("negative shape", _file({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}), "shape"),
    ("bad offsets", _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1]}}, b"x"), "data_offsets"),
]


@pytest.mark.parametrize("blob,needle", [(b, n) for _, b, n in BAD], ids=[c for c, _, _ in BAD])
def test_malformed_headers_are_refused_with_file_name(blob, needle):
    with pytest.raises(CheckpointError, match=needle) as e:
        _parse(blob)
    assert "x.safetensors" in str(e.value)
