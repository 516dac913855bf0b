"""One ``torch.save``d tensor inside a byte range of a file, read straight into its slice of a larger tensor.

torch.distributed.checkpoint's ``FileSystemWriter`` stores each tensor chunk as a whole ``torch.save``
archive at ``(offset, length)`` in a ``.distcp`` file. A ``torch.save`` archive is a zip (entries stored,
not compressed) of ``PREFIX/data.pkl`` (the tensor's dtype, storage key, storage offset, size and
stride), ``PREFIX/byteorder`` and ``PREFIX/data/KEY`` (the storage's raw bytes). DCP's own reader
``torch.load``s each chunk into a fresh buffer and then copies it into the destination; this module reads
the zip's directory and ``data.pkl`` (through an unpickler that only records what the pickle names and
never calls anything) and ``readinto``s the raw bytes directly into the destination's memory: one copy,
no intermediate buffer.

Anything it does not recognise (a tensor subclass, compressed or big-endian records, non-contiguous
strides, a chunk that is not a row slab of the destination) goes through ``torch.load(weights_only=True)``
of the byte range and a copy, as DCP itself does.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import sys
import zipfile
from typing import Any, BinaryIO, NamedTuple

import torch

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
_STORAGE_DTYPES = {  # torch.save pickles a storage's dtype as the legacy typed-storage class name
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
}


class Unrecognised(Exception):
    """The chunk is not a plain tensor archive this module reads directly; use ``torch.load``."""


class _Storage(NamedTuple):
    dtype: torch.dtype
    key: str
    numel: int  # elements of the stored storage


class _TensorRecord(NamedTuple):
    storage: _Storage
    storage_offset: int  # elements
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _record_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorRecord:
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records its arguments, builds nothing."""
    if not (isinstance(storage, _Storage) and isinstance(storage_offset, int) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride))):
        raise Unrecognised("unexpected _rebuild_tensor_v2 arguments")
    return _TensorRecord(storage, storage_offset, size, stride)


class _RecordUnpickler(pickle.Unpickler):
    """Reads a one-tensor ``data.pkl`` into a ``_TensorRecord``; any other global is ``Unrecognised``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _record_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise Unrecognised(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            return _Storage(pid[1], pid[2], pid[4])
        raise Unrecognised("unexpected persistent id")


class Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a seekable stream of their own."""

    def __init__(self, f: BinaryIO, start: int, length: int):
        self._f, self.start, self.length, self._pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos + (0, self._pos, self.length)[whence])
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.length - self._pos))
        self._f.seek(self.start + self._pos)
        got = self._f.readinto(view[:n]) if n else 0
        self._pos += got or 0
        return got or 0


def _read_exactly(f: BinaryIO, at: int, dest: memoryview) -> None:
    f.seek(at)
    done = 0
    while done < len(dest):  # one os.read returns at most ~2 GiB
        got = f.readinto(dest[done:])
        if not got:
            raise EOFError(f"file ends {len(dest) - done} bytes early")
        done += got


def _direct(f: BinaryIO, window: Window, dest: torch.Tensor) -> None:
    """Read the archive in ``window`` into the contiguous ``dest``, or raise ``Unrecognised``."""
    with zipfile.ZipFile(window) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise Unrecognised("no single data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        names = set(zf.namelist())
        order = zf.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
        if order != sys.byteorder.encode():
            raise Unrecognised(f"byte order {order!r}")
        rec = _RecordUnpickler(io.BytesIO(zf.read(pkl[0]))).load()
        if not isinstance(rec, _TensorRecord):
            raise Unrecognised("data.pkl is not one tensor")
        dtype, itemsize = rec.storage.dtype, rec.storage.dtype.itemsize
        info = zf.getinfo(prefix + "data/" + rec.storage.key)
    if rec.size != tuple(dest.shape) or dtype != dest.dtype:
        raise ValueError(f"holds a {dtype} tensor of shape {list(rec.size)}, the metadata says {dest.dtype} "
                         f"{list(dest.shape)}")
    contiguous = all(st == math.prod(rec.size[i + 1 :]) for i, (n, st) in enumerate(zip(rec.size, rec.stride,
                                                                                        strict=True)) if n > 1)
    if not contiguous or info.compress_type != zipfile.ZIP_STORED:
        raise Unrecognised("strided or compressed record")
    numel = math.prod(rec.size)
    if info.file_size != rec.storage.numel * itemsize or rec.storage_offset + numel > rec.storage.numel:
        raise ValueError(f"storage record of {info.file_size} bytes does not hold the tensor")
    header = bytearray(_LOCAL_HEADER.size)
    window.seek(info.header_offset)
    if window.readinto(header) != len(header) or header[:4] != b"PK\x03\x04":
        raise ValueError("zip local header missing")
    *_, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    data = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + rec.storage_offset * itemsize
    if data + numel * itemsize > window.length:
        raise ValueError("tensor bytes run past the chunk")
    if numel:
        flat = dest.reshape(-1).view(torch.uint8)  # dest is contiguous: a view of its bytes
        _read_exactly(f, window.start + data, memoryview(flat.numpy()).cast("B"))


def read_chunk_into(f: BinaryIO, offset: int, length: int | None, dest: torch.Tensor) -> bool:
    """Fill ``dest`` (shape and dtype as saved) from the ``torch.save`` archive at ``f[offset:offset+length]``
    (``length`` None: to the end of ``f``).

    Returns True when the bytes were read straight from the file (into ``dest`` itself when it is
    contiguous, e.g. a row slab, else into one chunk-sized buffer copied into it), False when the archive
    took ``torch.load(weights_only=True)`` and a copy. Raises ``ValueError``, ``OSError``, ``EOFError`` or
    pickle/zip errors for a chunk that is not the tensor the caller expects.
    """
    if length is None:
        length = f.seek(0, io.SEEK_END) - offset
    window = Window(f, offset, length)
    target = dest if dest.is_contiguous() else torch.empty(dest.shape, dtype=dest.dtype)
    try:
        _direct(f, window, target)
        if target is not dest:
            dest.copy_(target)
        return True
    except (Unrecognised, pickle.UnpicklingError, zipfile.BadZipFile):
        window.seek(0)
    tensor = torch.load(io.BufferedReader(window), map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(dest.shape):
        raise ValueError(f"holds {type(tensor).__name__} {list(getattr(tensor, 'shape', []))}, the metadata says "
                         f"{list(dest.shape)}")
    dest.copy_(tensor)
    return False


__all__ = ["Window", "read_chunk_into"]
