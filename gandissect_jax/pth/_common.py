"""Shared pieces of the safe .pth reader: limits, the error type, bounded file reads and the allocation budget."""

from __future__ import annotations

import re
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_SIGNATURE = b"PK\x03\x04"  # torch.serialization._is_zipfile

# torch storage class name -> numpy dtype
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
BFLOAT16 = "BFloat16Storage"

# Limits (see the module docstring).
MAX_PICKLE_BYTES = 32 << 20
MAX_PICKLE_OPS = 1 << 21
MAX_INT_BITS = 1024
MAX_DEPTH = 100
MAX_NDIM = 32
MAX_ELEMENTS = 1 << 40
_ALLOCATION_FACTOR = 8
_ALLOCATION_SLACK = 64 << 20
MAX_SMALL_INT = (1 << 61) - 2  # |k| <= this: hash(k) == k (no crafted collisions), except -1
KEY_PATTERN = re.compile(r"[0-9A-Za-z_]{1,64}")


class PthError(ValueError):
    """A file is not a readable, safe PyTorch checkpoint; the message starts with its path."""


class Refused(Exception):
    """A rule broken inside the reader; :func:`read_pth` re-raises it as PthError with the path."""


def describe(value: Any) -> str:
    """A short description of a value from the file (never a full repr of hostile data)."""
    kind = type(value)
    if value is None or kind is bool or kind is float:
        return repr(value)
    if kind is int:
        return repr(value) if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"
    if kind is str or kind is bytes:
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    try:
        return f"a {kind.__name__} of {len(value)} items"
    except Exception:  # noqa: BLE001 - no len(): describe by type only
        return f"a {kind.__name__}"


def clip(text: str, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters (control characters escaped)."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def error_text(err: BaseException) -> str:
    try:
        text = str(err)
    except Exception:  # noqa: BLE001 - str() of an exception holding hostile data may fail
        text = ""
    return clip(f"{type(err).__name__}: {text}" if text else type(err).__name__)


# --------------------------------------------------------------------------------------------
# Bounded reading


class FileReader:
    """Reads from an open file but never asks for more bytes than the file has left."""

    def __init__(self, file: BinaryIO, size: int):
        self._file = file
        self.size = size

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def seekable(self) -> bool:
        return True

    def remaining(self) -> int:
        return max(0, self.size - self._file.tell())

    def read(self, count: int = -1) -> bytes:
        left = self.remaining()
        if count is None or count < 0 or count > left:
            count = left
        return self._file.read(count)

    def read_exact(self, count: int, what: str) -> bytes:
        data = self.read(count)
        if len(data) != count:
            raise Refused(f"file ends inside {what}: wanted {count} bytes, got {len(data)}")
        return data


class PickleSlice:
    """What ``pickletools.genops`` reads a legacy pickle through: bounded, and keeps the bytes."""

    def __init__(self, reader: FileReader, limit: int):
        self._reader = reader
        self._start = reader.tell()
        self._left = limit
        self.chunks: list[bytes] = []

    def tell(self) -> int:
        return self._reader.tell() - self._start

    def read(self, count: int = -1) -> bytes:
        if count is None or count < 0 or count > self._left:
            count = self._left
        data = self._reader.read(count)
        self._left -= len(data)
        self.chunks.append(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        if limit is None or limit < 0 or limit > self._left:
            limit = self._left
        data = self._reader._file.readline(min(limit, self._reader.remaining()))
        self._left -= len(data)
        self.chunks.append(data)
        return data


class Budget:
    """Bytes this read may still allocate for storages and returned arrays."""

    def __init__(self, file_size: int):
        self.limit = _ALLOCATION_FACTOR * file_size + _ALLOCATION_SLACK
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.limit - self.used:
            raise Refused(
                f"{what} needs {nbytes} bytes, beyond this file's allocation limit ({self.limit} "
                f"bytes = {_ALLOCATION_FACTOR} x file size + {_ALLOCATION_SLACK >> 20} MiB, "
                f"{self.used} already used): a forged size or a decompression bomb"
            )
        self.used += nbytes
