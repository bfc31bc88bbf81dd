"""Read (and write) PyTorch ``.pth`` checkpoints without PyTorch, safely whatever the file holds.

A ``.pth`` file is a pickle of tensors whose bytes live in separate "storages". Two container
formats exist (source: PyTorch's ``torch/serialization.py``, ``_legacy_save``/``_legacy_load`` and
``_save``/``_load``, and ``torch/_utils.py`` for the rebuild functions):

- **legacy** (PyTorch <= 1.5, and every checkpoint released with GAN Dissection): five pickles in
  one file -- magic number, protocol version, system info, the object (tensors pickled as calls to
  ``torch._utils._rebuild_tensor_v2`` whose storage is a persistent id
  ``('storage', torch.<T>Storage, key, location, numel, view_metadata)``), the list of storage keys
  -- followed, for each key in that list, by an int64 element count and the raw little-endian
  bytes of the storage;
- **zip** (PyTorch >= 1.6, recognised as torch does by a leading ``PK\\x03\\x04``): a zip archive
  holding ``<root>/data.pkl`` (the object pickle, persistent ids
  ``('storage', torch.<T>Storage, key, location, numel)``) and one raw member ``<root>/data/<key>``
  per storage.

Files come from strangers, so reading one never executes anything from it, never reads outside
a buffer and never allocates more than the limits below; any file that breaks a rule raises
:class:`PthError` whose message starts with the file's path. What is guaranteed:

- **Every pickle is checked before it runs.** Each pickle (the legacy file's magic number,
  protocol, system info, object and key list; the zip's ``data.pkl``) is first walked opcode by
  opcode (``pickletools.genops``) with a model of the unpickler's stack, and refused unless it
  uses only protocol-2+ binary opcodes for literals (None, bool, int, float, str, bytes), the
  containers list / tuple / dict / set / frozenset, marks and the memo. The four header pickles
  admit nothing else: no global at all. The object pickle may also use ``GLOBAL`` /
  ``STACK_GLOBAL`` for exactly ``collections.OrderedDict`` (called with no arguments),
  ``torch._utils._rebuild_tensor``, ``torch._utils._rebuild_tensor_v2``,
  ``torch._utils._rebuild_parameter`` and the ``torch.<T>Storage`` types listed in
  ``_STORAGE_DTYPES`` (plus ``BFloat16Storage``); ``REDUCE`` on those; ``BUILD`` with a dict
  state on what they return (torch sets ``state_dict()._metadata`` so; the reader's own tensor,
  storage and global stand-ins refuse it); and ``BINPERSID`` for storages. Never admitted: any
  other global, ``INST`` / ``OBJ`` / ``NEWOBJ`` / ``NEWOBJ_EX``, extension codes, text-argument
  opcodes other than ``GLOBAL``, out-of-band buffers. The checked bytes are then unpickled by a
  restricted :class:`pickle.Unpickler` that enforces the same list (``find_class``), so a check
  that missed something still runs nothing.
- **Pickle resources are bounded before they are used:** at most ``_MAX_PICKLE_BYTES`` (32 MiB)
  and ``_MAX_PICKLE_OPS`` (2**21) opcodes per pickle; every length prefix fits in the bytes that
  are left; memo indices are dense (so the memo never grows past the opcode count); ints have at
  most ``_MAX_INT_BITS`` (1024) bits; dict keys and set elements are str, bytes, bool, None or
  ints below 2**61 in magnitude (no tuple keys: hashing a deep tuple crashes CPython; no crafted
  hash collisions); the object returned nests at most ``_MAX_DEPTH`` (100) containers deep.
- **Persistent ids and rebuild calls are type-checked:** the id has the format's exact shape, a
  known storage type, a key of ``[0-9A-Za-z_]{1,64}``, a non-negative element count, and a legacy
  view inside its storage; a key used twice names the same type and count. ``_rebuild_tensor*``
  takes a storage from a persistent id, a non-negative int offset, and size and stride sequences
  of equal length (at most ``_MAX_NDIM``, 32) of non-negative ints; every offset, size, stride and
  element count is at most ``_MAX_ELEMENTS`` (2**40).
- **Tensor metadata is validated before any view is made:** offset + sum((size - 1) * stride)
  lies inside the storage (or view) the tensor names; the product of the sizes is at most
  ``_MAX_ELEMENTS`` (2**40). The view is made with ``as_strided`` only after this check (and it is
  re-checked against the bytes actually read), and copied into an independent array.
- **Storage sizes match the file before they are read:** legacy: the key list names exactly the
  storages the object references, each once; each int64 element count equals the count in the
  pickle and its bytes fit in what is left of the file, checked before reading. Zip: member names
  are unique and plain (no ``..``, absolute or backslash paths), there is exactly one
  ``data.pkl``, and a member is only read after its declared uncompressed size has been checked
  (``data.pkl`` at most 32 MiB; each storage exactly element count x item size) and its
  compression is stored or deflated (methods with unbounded decompression are refused).
- **Total allocation is bounded by the file:** storage bytes read plus arrays returned stay
  within ``_ALLOCATION_FACTOR`` (8) x the file size + ``_ALLOCATION_SLACK`` (64 MiB), which covers
  shared views and expanded (stride-0) tensors of real checkpoints, but not a zip bomb or a forged
  10**12-element tensor. No read asks the OS for more bytes than the file has left.

Tensors come back as ``numpy.ndarray`` in their stored layout (PyTorch's, e.g. OIHW conv weights;
bfloat16 widened to float32; bool bytes other than 0/1 read as True).

:func:`write_legacy_pth` writes a mapping of arrays in the legacy format, so tests can build files
exactly like the released checkpoints without PyTorch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from typing import Any, BinaryIO, Mapping

import numpy as np

__all__ = ["PthError", "read_pth", "read_state_dict", "write_legacy_pth"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_SIGNATURE = b"PK\x03\x04"  # torch.serialization._is_zipfile

# torch storage class name -> numpy dtype
_STORAGE_DTYPES = {
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
_BFLOAT16 = "BFloat16Storage"

# Limits (see the module docstring).
_MAX_PICKLE_BYTES = 32 << 20
_MAX_PICKLE_OPS = 1 << 21
_MAX_INT_BITS = 1024
_MAX_DEPTH = 100
_MAX_NDIM = 32
_MAX_ELEMENTS = 1 << 40
_ALLOCATION_FACTOR = 8
_ALLOCATION_SLACK = 64 << 20
_MAX_SMALL_INT = (1 << 61) - 2  # |k| <= this: hash(k) == k (no crafted collisions), except -1
_KEY_PATTERN = re.compile(r"[0-9A-Za-z_]{1,64}")


class PthError(ValueError):
    """A file is not a readable, safe PyTorch checkpoint; the message starts with its path."""


class _Refused(Exception):
    """A rule broken inside the reader; :func:`read_pth` re-raises it as PthError with the path."""


def _describe(value: Any) -> str:
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


def _clip(text: str, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters (control characters escaped)."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def _error_text(err: BaseException) -> str:
    try:
        text = str(err)
    except Exception:  # noqa: BLE001 - str() of an exception holding hostile data may fail
        text = ""
    return _clip(f"{type(err).__name__}: {text}" if text else type(err).__name__)


# --------------------------------------------------------------------------------------------
# Bounded reading


class _FileReader:
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
            raise _Refused(f"file ends inside {what}: wanted {count} bytes, got {len(data)}")
        return data


class _PickleSlice:
    """What ``pickletools.genops`` reads a legacy pickle through: bounded, and keeps the bytes."""

    def __init__(self, reader: _FileReader, limit: int):
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


class _Budget:
    """Bytes this read may still allocate for storages and returned arrays."""

    def __init__(self, file_size: int):
        self.limit = _ALLOCATION_FACTOR * file_size + _ALLOCATION_SLACK
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.limit - self.used:
            raise _Refused(
                f"{what} needs {nbytes} bytes, beyond this file's allocation limit ({self.limit} "
                f"bytes = {_ALLOCATION_FACTOR} x file size + {_ALLOCATION_SLACK >> 20} MiB, "
                f"{self.used} already used): a forged size or a decompression bomb"
            )
        self.used += nbytes


# --------------------------------------------------------------------------------------------
# Pickle check (before anything is unpickled)

# opcode name -> kind of the value it pushes
_LITERAL_OPS = {
    "NONE": "none", "NEWTRUE": "bool", "NEWFALSE": "bool",
    "BININT": "int", "BININT1": "int", "BININT2": "int",
    "BINFLOAT": "float",
    "BINSTRING": "str", "SHORT_BINSTRING": "str",  # Python 2 str, decoded as UTF-8 (like torch)
    "BINUNICODE": "str", "SHORT_BINUNICODE": "str", "BINUNICODE8": "str",
    "BINBYTES": "bytes", "SHORT_BINBYTES": "bytes", "BINBYTES8": "bytes",
    "EMPTY_LIST": "list", "EMPTY_DICT": "dict", "EMPTY_TUPLE": "tuple", "EMPTY_SET": "set",
}
_KEY_KINDS = {"none", "bool", "int", "str", "bytes"}  # hashable without recursion or collisions
_OBJECT_OPS = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID"}
_ALLOWED_GLOBAL_NAMES = (
    {"collections OrderedDict", "torch._utils _rebuild_tensor", "torch._utils _rebuild_tensor_v2",
     "torch._utils _rebuild_parameter", f"torch {_BFLOAT16}"}
    | {f"torch {name}" for name in _STORAGE_DTYPES}
)


def _check_pickle(stream: Any, size_limit: int, what: str, allow_objects: bool) -> None:
    """Walk one pickle's opcodes without executing any; raise :class:`_Refused` unless it is safe.

    Models the C unpickler's stack (with its marks and "fence": no opcode may pop below the last
    mark) holding the *kind* of each value, so that dict keys / set elements, ``REDUCE`` /
    ``BUILD`` operands and memo indices can be checked. Stops after ``STOP``.
    """
    stack: list[str] = []
    marks: list[int] = []
    memo: dict[int, str] = {}

    def refuse(message: str, pos: Any) -> _Refused:
        return _Refused(f"{what} pickle at byte {pos}: {message}")

    def fence() -> int:
        return marks[-1] if marks else 0

    def pop(pos) -> str:
        if len(stack) <= fence():
            raise refuse("pops an empty stack", pos)
        return stack.pop()

    def top(pos) -> str:
        if len(stack) <= fence():
            raise refuse("works on an empty stack", pos)
        return stack[-1]

    def pop_mark(pos) -> list[str]:
        if not marks:
            raise refuse("pops to a mark that was never set", pos)
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def check_keys(kinds, pos) -> None:
        for kind in kinds:
            if kind not in _KEY_KINDS:
                raise refuse(f"a dict key or set element is a {kind}; only str, bytes, bool, "
                             f"None and ints below 2**61 are admitted", pos)

    count = 0
    try:
        for opcode, arg, pos in pickletools.genops(stream):
            count += 1
            if count > _MAX_PICKLE_OPS:
                raise refuse(f"more than {_MAX_PICKLE_OPS} opcodes", pos)
            name = opcode.name
            if name in _LITERAL_OPS:
                stack.append(_LITERAL_OPS[name])
            elif name in ("LONG1", "LONG4"):
                if arg.bit_length() > _MAX_INT_BITS:
                    raise refuse(f"an int of {arg.bit_length()} bits (limit {_MAX_INT_BITS})", pos)
                stack.append("int" if abs(arg) <= _MAX_SMALL_INT else "bigint")
            elif name == "PROTO":
                if not 2 <= arg <= pickle.HIGHEST_PROTOCOL:
                    raise refuse(f"unsupported pickle protocol {arg}", pos)
            elif name == "FRAME":
                if arg > size_limit - stream.tell():
                    raise refuse(f"a frame of {arg} bytes runs past the end of the data", pos)
            elif name == "STOP":
                if marks or len(stack) != 1:
                    raise refuse("ends with a malformed stack", pos)
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop(pos)
            elif name == "POP_MARK":
                pop_mark(pos)
            elif name == "DUP":
                stack.append(top(pos))
            elif name in ("LIST", "TUPLE"):
                pop_mark(pos)
                stack.append(name.lower())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                for _ in range(int(name[-1])):
                    pop(pos)
                stack.append("tuple")
            elif name == "DICT":
                items = pop_mark(pos)
                if len(items) % 2:
                    raise refuse("DICT with an odd number of items", pos)
                check_keys(items[0::2], pos)
                stack.append("dict")
            elif name == "FROZENSET":
                check_keys(pop_mark(pos), pos)
                stack.append("frozenset")
            elif name in ("APPEND", "APPENDS"):
                pop(pos) if name == "APPEND" else pop_mark(pos)
                if top(pos) != "list":
                    raise refuse(f"{name} to a {top(pos)}", pos)
            elif name in ("SETITEM", "SETITEMS"):
                if name == "SETITEM":
                    pop(pos)
                    check_keys([pop(pos)], pos)
                else:
                    items = pop_mark(pos)
                    if len(items) % 2:
                        raise refuse("SETITEMS with an odd number of items", pos)
                    check_keys(items[0::2], pos)
                if top(pos) not in ("dict", "object"):
                    raise refuse(f"{name} on a {top(pos)}", pos)
            elif name == "ADDITEMS":
                check_keys(pop_mark(pos), pos)
                if top(pos) != "set":
                    raise refuse(f"ADDITEMS to a {top(pos)}", pos)
            elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else arg
                if index > len(memo):  # the pickler numbers memo entries densely from 0
                    raise refuse(f"memo index {index} skips past {len(memo)}", pos)
                memo[index] = top(pos)
            elif name in ("BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise refuse(f"memo index {arg} was never set", pos)
                stack.append(memo[arg])
            elif name in _OBJECT_OPS and allow_objects:
                if name == "GLOBAL":
                    if arg not in _ALLOWED_GLOBAL_NAMES:
                        raise _Refused(
                            f"refusing to unpickle global {_clip(arg.replace(' ', '.'), 120)} "
                            f"in the {what} pickle: a checkpoint should hold only tensors and "
                            "containers")
                    stack.append("global")
                elif name == "STACK_GLOBAL":
                    if (pop(pos), pop(pos)) != ("str", "str"):
                        raise refuse("STACK_GLOBAL of a non-string", pos)
                    stack.append("global")
                elif name == "REDUCE":
                    args, function = pop(pos), pop(pos)
                    if (function, args) != ("global", "tuple"):
                        raise refuse(f"REDUCE calls a {function} with a {args}", pos)
                    stack.append("object")
                elif name == "BUILD":
                    state = pop(pos)
                    if (top(pos), state) != ("object", "dict"):
                        raise refuse(f"BUILD sets a {top(pos)} from a {state}", pos)
                elif name == "BINPERSID":
                    if pop(pos) != "tuple":
                        raise refuse("a persistent id that is not a tuple", pos)
                    stack.append("object")
            elif name in _OBJECT_OPS:
                raise _Refused(
                    f"refusing to unpickle the {what} pickle: it uses {name} at byte {pos}, but "
                    "it may hold only plain literals (no global, call or object)")
            else:
                raise _Refused(
                    f"refusing to unpickle the {what} pickle: opcode {name} at byte {pos} is not "
                    "admitted in a checkpoint")
    except _Refused:
        raise
    except Exception as err:  # noqa: BLE001 - genops: truncated data, unknown opcode, bad text
        raise _Refused(f"corrupt or truncated {what} pickle: {_error_text(err)}") from err


# --------------------------------------------------------------------------------------------
# Objects the unpickler hands to the object pickle


class _Sealed:
    """Base of every object the unpickler hands to a pickle: its state cannot be set (BUILD)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"the pickle tries to set the state of a {type(self).__name__.strip('_')}")


class _StorageType(_Sealed):
    """Stand-in for a ``torch.*Storage`` class named in a pickle."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES.get(name, np.dtype("<u2"))  # bfloat16: widened on read


class _Storage(_Sealed):
    """A storage referenced by the pickle; its bytes are attached after unpickling."""

    __slots__ = ("storage_type", "key", "numel", "data")

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.data: np.ndarray | None = None


class _StorageRef(_Sealed):
    """What a persistent id unpickles to: elements ``[start, start + length)`` of a storage."""

    __slots__ = ("root", "start", "length")

    def __init__(self, root: _Storage, start: int, length: int):
        self.root, self.start, self.length = root, start, length


def _index(value: Any, what: str) -> int:
    """A non-negative int (not bool) at most ``_MAX_ELEMENTS``, else :class:`_Refused`."""
    if type(value) is not int or not 0 <= value <= _MAX_ELEMENTS:
        raise _Refused(f"{what} is {_describe(value)}, not an int in [0, {_MAX_ELEMENTS}]")
    return value


class _PendingTensor(_Sealed):
    """A validated tensor whose storage bytes are not read yet (legacy files store them last)."""

    __slots__ = ("storage", "offset", "size", "stride", "numel")

    def __init__(self, storage, offset, size, stride):
        if type(storage) is not _StorageRef:
            raise _Refused(f"a tensor's storage is {_describe(storage)}, not a persistent id")
        key = storage.root.key
        offset = _index(offset, f"the storage offset of a tensor on storage {key!r}")
        for name, value in (("size", size), ("stride", stride)):
            if type(value) not in (tuple, list) or len(value) > _MAX_NDIM:
                raise _Refused(f"a tensor's {name} on storage {key!r} is {_describe(value)}, not "
                               f"a tuple of at most {_MAX_NDIM} ints")
        if len(size) != len(stride):
            raise _Refused(f"a tensor on storage {key!r} has {len(size)} sizes but "
                           f"{len(stride)} strides")
        size = tuple(_index(n, f"a tensor size on storage {key!r}") for n in size)
        stride = tuple(_index(s, f"a tensor stride on storage {key!r}") for s in stride)
        bound = 1
        for n in size:
            bound *= max(n, 1)
        if bound > _MAX_ELEMENTS:
            raise _Refused(f"a tensor of size {size} on storage {key!r} exceeds {_MAX_ELEMENTS} "
                           "elements")
        numel = bound if all(size) else 0
        if numel:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.length:
                raise _Refused(
                    f"a tensor of size {size}, stride {stride} at offset {offset} reaches element "
                    f"{last} of storage {key!r}, which holds {storage.length}: forged or corrupt "
                    "metadata")
        self.storage, self.offset, self.size, self.stride, self.numel = (
            storage, offset, size, stride, numel)

    def materialize(self, budget: _Budget) -> np.ndarray:
        ref = self.storage
        root = ref.root
        data = root.data
        if data is None:
            raise _Refused(f"storage {root.key!r} is missing from the file")
        is_bf16 = root.storage_type.name == _BFLOAT16
        itemsize = 4 if is_bf16 else data.dtype.itemsize
        budget.charge(self.numel * itemsize, f"tensor of size {self.size} on storage {root.key!r}")
        if not self.numel:
            array = np.zeros(self.size, dtype=data.dtype)
        else:
            start = ref.start + self.offset
            last = start + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= data.size or ref.start + ref.length > data.size:  # checked twice on purpose
                raise _Refused(f"storage {root.key!r} holds {data.size} elements but a tensor "
                               f"reaches element {last}")
            view = np.lib.stride_tricks.as_strided(
                data[start:], shape=self.size,
                strides=tuple(s * data.dtype.itemsize for s in self.stride), writeable=False)
            array = np.array(view, copy=True)
        if root.storage_type.dtype.kind == "b":
            array = np.not_equal(array.view(np.uint8), 0, out=np.empty(array.shape, np.bool_))
        if is_bf16:
            array = np.left_shift(array.astype(np.uint32), 16).view(np.float32).reshape(self.size)
        return np.asarray(array)


class _Callable(_Sealed):
    """An admitted global: calls ``function`` with positional arguments only."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function):
        self.name, self.function = name, function

    def __call__(self, *args):
        return self.function(*args)


def _ordered_dict(*args):
    if args:  # items as arguments would be hashed unchecked; torch pickles OrderedDict()
        raise _Refused(f"collections.OrderedDict called with {len(args)} arguments")
    return collections.OrderedDict()


def _rebuild_tensor(storage=None, storage_offset=None, size=None, stride=None, *rest):
    """``torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride[, requires_grad,
    backward_hooks[, metadata]])``: validated here, materialized after the storages are read."""
    if len(rest) > 3 or (rest and type(rest[0]) is not bool):
        raise _Refused("_rebuild_tensor_v2 called with unexpected arguments")
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data=None, requires_grad=None, backward_hooks=None, *rest):
    """``torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)``: the tensor."""
    if type(data) is not _PendingTensor or rest:
        raise _Refused(f"_rebuild_parameter called on {_describe(data)}, not a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _Callable("OrderedDict", _ordered_dict),
    ("torch._utils", "_rebuild_tensor"): _Callable("_rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable("_rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Callable("_rebuild_parameter", _rebuild_parameter),
    **{("torch", name): _StorageType(name) for name in [*_STORAGE_DTYPES, _BFLOAT16]},
}


class _LiteralUnpickler(pickle.Unpickler):
    """Unpickler for the header pickles: no global, no persistent id."""

    def find_class(self, module: str, name: str):
        raise _Refused(f"refusing to unpickle global {_clip(f'{module}.{name}', 120)} in a "
                       "header pickle")

    def persistent_load(self, pid):
        raise _Refused("a persistent id in a header pickle")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuilding globals and storage persistent ids."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file, fix_imports=False, encoding="utf-8")
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(
                f"refusing to unpickle global {_clip(f'{module}.{name}', 120)}: a checkpoint "
                "should hold only tensors and containers")
        return found

    def persistent_load(self, pid):
        length = 6 if self._legacy else 5
        if type(pid) is not tuple or len(pid) != length or type(pid[0]) is not str \
                or pid[0] != "storage":
            raise _Refused(f"persistent id {_describe(pid)} is not ('storage', type, key, "
                           f"location, numel{', view' if self._legacy else ''})")
        storage_type, key, location, numel = pid[1:5]
        if type(storage_type) is not _StorageType:
            raise _Refused(f"persistent id names {_describe(storage_type)}, not a storage type")
        if type(key) is not str or not _KEY_PATTERN.fullmatch(key):
            raise _Refused(f"storage key {_describe(key)} is not [0-9A-Za-z_]{{1,64}}")
        if type(location) is not str:
            raise _Refused(f"storage {key!r}: location {_describe(location)} is not a string")
        numel = _index(numel, f"the element count of storage {key!r}")
        root = self._storages.get(key)
        if root is None:
            root = self._storages[key] = _Storage(storage_type, key, numel)
        elif root.storage_type is not storage_type or root.numel != numel:
            raise _Refused(f"storage {key!r} is named twice with different types or sizes")
        view = pid[5] if self._legacy else None
        if view is None:
            return _StorageRef(root, 0, numel)
        # legacy storage views: (view key, offset, size), in elements of the root storage
        if type(view) is not tuple or len(view) != 3 or type(view[0]) is not str:
            raise _Refused(f"storage {key!r}: view {_describe(view)} is not (key, offset, size)")
        start = _index(view[1], f"the view offset on storage {key!r}")
        length = _index(view[2], f"the view size on storage {key!r}")
        if start + length > numel:
            raise _Refused(f"a view [{start}, {start + length}) of storage {key!r} runs past its "
                           f"{numel} elements")
        return _StorageRef(root, start, length)


def _unpickle(data: bytes, unpickler_type, what: str, *args) -> Any:
    try:
        if unpickler_type is _LiteralUnpickler:
            return _LiteralUnpickler(io.BytesIO(data), fix_imports=False, encoding="utf-8").load()
        return unpickler_type(io.BytesIO(data), *args).load()
    except _Refused:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a checked pickle means corrupt data
        raise _Refused(f"corrupt {what} pickle: {_error_text(err)}") from err


def _read_legacy_pickle(reader: _FileReader, what: str, allow_objects: bool) -> bytes:
    """Check the pickle at the reader's position and return its bytes (reader moves past it)."""
    limit = min(reader.remaining(), _MAX_PICKLE_BYTES)
    stream = _PickleSlice(reader, limit)
    try:
        _check_pickle(stream, limit, what, allow_objects)
    except _Refused as err:
        if limit == _MAX_PICKLE_BYTES and stream.tell() >= limit:
            raise _Refused(f"the {what} pickle is longer than {_MAX_PICKLE_BYTES} bytes") from err
        raise
    return b"".join(stream.chunks)


# --------------------------------------------------------------------------------------------
# Materializing the unpickled object


class _Materializer:
    """Replace every pending tensor by a numpy array; admit only plain containers and literals."""

    _SCALARS = (type(None), bool, int, float, str, bytes)

    def __init__(self, budget: _Budget):
        self._budget = budget
        self._done: dict[int, Any] = {}  # id -> result: shared objects stay shared, cycles end

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        kind = type(obj)
        if kind in self._SCALARS:
            return obj
        if id(obj) in self._done:
            return self._done[id(obj)]
        if depth >= _MAX_DEPTH:
            raise _Refused(f"the object nests more than {_MAX_DEPTH} containers deep")
        if kind is _PendingTensor:
            out = obj.materialize(self._budget)
        elif kind is list:
            out = self._done[id(obj)] = []
            out.extend(self(v, depth + 1) for v in obj)
        elif kind is dict or kind is collections.OrderedDict:
            out = self._done[id(obj)] = kind()
            for key, value in obj.items():
                out[key] = self(value, depth + 1)
            if kind is collections.OrderedDict:  # attributes set by BUILD: state_dict()._metadata
                for key, value in obj.__dict__.items():
                    out.__dict__[key] = self(value, depth + 1)
        elif kind is tuple:
            out = tuple(self(v, depth + 1) for v in obj)
        elif kind is set or kind is frozenset:
            out = kind(obj)  # elements are checked key kinds (scalars)
        else:
            raise _Refused(f"the object holds {_describe(obj)}, not a tensor, container or literal")
        self._done[id(obj)] = out
        return out


# --------------------------------------------------------------------------------------------
# The two formats


def _load_legacy(reader: _FileReader, budget: _Budget) -> Any:
    def literal(what: str) -> Any:
        return _unpickle(_read_legacy_pickle(reader, what, False), _LiteralUnpickler, what)

    try:
        magic = literal("magic number")
    except _Refused as err:
        raise _Refused(f"not a PyTorch checkpoint (neither a zip archive nor a legacy-format "
                       f"pickle): {err}") from err
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise _Refused(f"not a PyTorch checkpoint: bad magic number {_describe(magic)}")
    protocol = literal("protocol version")
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
        raise _Refused(f"unsupported legacy protocol {_describe(protocol)} "
                       f"(expected {_LEGACY_PROTOCOL})")
    sys_info = literal("system info")
    if type(sys_info) is not dict:
        raise _Refused(f"the system info is {_describe(sys_info)}, not a dict")
    if sys_info.get("little_endian", True) is not True:
        raise _Refused("big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    data = _read_legacy_pickle(reader, "object", True)
    obj = _unpickle(data, _RestrictedUnpickler, "object", storages, True)
    keys = literal("storage key list")
    if type(keys) is not list or any(type(k) is not str for k in keys):
        raise _Refused(f"the storage key list is {_describe(keys)}, not a list of strings")
    if len(set(keys)) != len(keys):
        raise _Refused("the storage key list names a storage twice")
    unlisted = sorted(set(storages) - set(keys))
    if unlisted:
        raise _Refused(f"storage {_describe(unlisted[0])} is referenced but missing from the file")
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise _Refused(f"storage {_describe(key)} is listed but never referenced")
        (count,) = struct.unpack("<q", reader.read_exact(8, f"the header of storage {key!r}"))
        if count != storage.numel:
            raise _Refused(f"storage {key!r} is stored with {count} elements but the pickle says "
                           f"{storage.numel}")
        nbytes = count * storage.storage_type.dtype.itemsize
        if nbytes > reader.remaining():
            raise _Refused(f"storage {key!r} needs {nbytes} bytes but only {reader.remaining()} "
                           "are left in the file: it is truncated or corrupt")
        budget.charge(nbytes, f"storage {key!r}")
        storage.data = np.frombuffer(reader.read_exact(nbytes, f"storage {key!r}"),
                                     dtype=storage.storage_type.dtype)
    return _Materializer(budget)(obj)


def _member_name_is_plain(name: str) -> bool:
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    return not (name.startswith("/") or "\\" in name or "\0" in name
                or any(part in ("", ".", "..") for part in parts))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, expected: int) -> bytes:
    """Read one member whose declared size was checked; refuse unbounded decompression."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _Refused(f"member {info.filename!r} uses compression method {info.compress_type}; "
                       "only stored (PyTorch's) and deflated members are read")
    try:
        with archive.open(info) as member:
            data = member.read(expected + 1)
    except Exception as err:  # noqa: BLE001 - bad CRC, bad header, truncated archive, ...
        raise _Refused(f"corrupt zip member {info.filename!r}: {_error_text(err)}") from err
    if len(data) != expected:
        raise _Refused(f"member {info.filename!r} holds {len(data)} bytes, expected {expected}")
    return data


def _load_zip(reader: _FileReader, budget: _Budget) -> Any:
    try:
        archive = zipfile.ZipFile(reader)
    except Exception as err:  # noqa: BLE001
        raise _Refused(f"corrupt zip archive: {_error_text(err)}") from err
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise _Refused(f"the zip archive holds member {_describe(dup)} twice")
        weird = [n for n in names if not _member_name_is_plain(n)]
        if weird:
            raise _Refused(f"the zip archive holds a member with an unsafe name: "
                           f"{_describe(weird[0])}")
        by_name = dict(zip(names, infos))
        pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl")
                                                           and n.count("/") == 1)]
        if len(pickles) != 1:
            if not pickles:
                raise _Refused("a zip archive without a data.pkl record: not a PyTorch checkpoint")
            raise _Refused(f"the zip archive holds {len(pickles)} data.pkl records")
        root = pickles[0][: -len("data.pkl")]
        order = by_name.get(root + "byteorder")
        if order is not None:
            if order.file_size > 16 or _read_member(archive, order, order.file_size).strip() \
                    != b"little":
                raise _Refused("big-endian (or unreadable byteorder) checkpoints are not supported")
        info = by_name[pickles[0]]
        if info.file_size > _MAX_PICKLE_BYTES:
            raise _Refused(f"{info.filename} declares {info.file_size} bytes, more than the "
                           f"{_MAX_PICKLE_BYTES}-byte limit for a pickle")
        budget.charge(info.file_size, info.filename)
        data = _read_member(archive, info, info.file_size)
        _check_pickle(io.BytesIO(data), len(data), "data.pkl", True)
        storages: dict[str, _Storage] = {}
        obj = _unpickle(data, _RestrictedUnpickler, "data.pkl", storages, False)
        for key, storage in storages.items():
            name = f"{root}data/{key}"
            member = by_name.get(name)
            if member is None:
                raise _Refused(f"storage file {name} is missing")
            nbytes = storage.numel * storage.storage_type.dtype.itemsize
            if member.file_size != nbytes:
                raise _Refused(f"storage file {name} declares {member.file_size} bytes but the "
                               f"pickle says {storage.numel} elements x "
                               f"{storage.storage_type.dtype.itemsize} bytes = {nbytes}")
            budget.charge(nbytes, f"storage file {name}")
            storage.data = np.frombuffer(_read_member(archive, member, nbytes),
                                         dtype=storage.storage_type.dtype)
    return _Materializer(budget)(obj)


def read_pth(path: str | os.PathLike) -> Any:
    """Read a ``.pth`` file (legacy or zip format) without PyTorch, safely (see the module doc).

    Args:
      path: the checkpoint file.

    Returns:
      The pickled object with every tensor replaced by a ``numpy.ndarray`` of the stored dtype
      (bfloat16 widened to float32) and shape (usually an ``OrderedDict[str, ndarray]``, possibly
      wrapped, e.g. ``{'state_dict': ...}``). Only None / bool / int / float / str / bytes, lists,
      tuples, dicts, ``OrderedDict``, sets and frozensets can occur around the arrays.

    Raises:
      FileNotFoundError: the path is not an existing regular file.
      OSError: the file cannot be opened (e.g. ``PermissionError``; the message names it).
      PthError: the file is not a PyTorch checkpoint, is truncated or corrupt, pickles anything
        but tensors and containers, or breaks a limit of the module docstring; the message
        starts with the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as file:
        try:
            reader = _FileReader(file, os.fstat(file.fileno()).st_size)
            budget = _Budget(reader.size)
            is_zip = reader.read(4) == _ZIP_SIGNATURE
            reader.seek(0)
            return _load_zip(reader, budget) if is_zip else _load_legacy(reader, budget)
        except _Refused as err:
            raise PthError(f"{path}: {err}") from err
        except Exception as err:  # noqa: BLE001 - defence in depth: every failure names the file
            raise PthError(f"{path}: unreadable checkpoint ({_error_text(err)})") from err


def read_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a ``.pth`` state dict: unwraps ``{'state_dict': ...}``, checks every value is a tensor.

    Returns:
      ``OrderedDict`` name -> ``numpy.ndarray``, in the file's order.

    Raises:
      FileNotFoundError, PthError: as :func:`read_pth`; PthError also when the object is not a
        mapping of tensors.
    """
    obj = read_pth(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise PthError(f"{os.fspath(path)} holds {_describe(obj)}, not a state dict")
    bad = [_describe(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise PthError(f"{os.fspath(path)}: entries {', '.join(bad[:5])} are not tensors: not a "
                       "state dict")
    return collections.OrderedDict((str(k), v) for k, v in obj.items())


# --------------------------------------------------------------------------------------------
# Writing the legacy format (hand-assembled pickle opcodes: no torch needed to name its globals)

_DTYPE_STORAGES = {v: k for k, v in _STORAGE_DTYPES.items()}


def _op_unicode(text: str) -> bytes:
    data = text.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _op_int(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if -(2**31) <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    encoded = pickle.encode_long(value)
    return pickle.LONG1 + bytes([len(encoded)]) + encoded


def _op_tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def write_legacy_pth(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write ``state_dict`` as a legacy (PyTorch-0.4 style) ``.pth`` file, atomically.

    Args:
      path: destination file.
      state_dict: name -> array (float32/float64/float16/int64/int32/int16/int8/uint8/bool),
        written in PyTorch layout as given (e.g. OIHW conv weights), one storage per tensor.
    """
    path = os.fspath(path)
    arrays = [(str(k), np.asarray(v, order="C")) for k, v in state_dict.items()]
    body = [pickle.PROTO + bytes([2]), _op_global("collections", "OrderedDict"),
            pickle.EMPTY_TUPLE, pickle.REDUCE, pickle.MARK]
    for index, (name, array) in enumerate(arrays):
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        storage_name = _DTYPE_STORAGES.get(np.dtype(dtype))
        if storage_name is None:
            raise ValueError(f"cannot write tensor {name!r} of dtype {array.dtype}")
        strides = [s // array.itemsize for s in array.strides] if array.size else [1] * array.ndim
        persistent_id = _op_tuple([
            _op_unicode("storage"), _op_global("torch", storage_name), _op_unicode(str(index)),
            _op_unicode("cpu"), _op_int(int(array.size)), pickle.NONE,
        ]) + pickle.BINPERSID
        body += [
            _op_unicode(name),
            _op_global("torch._utils", "_rebuild_tensor_v2"),
            _op_tuple([
                persistent_id, _op_int(0), _op_tuple([_op_int(int(n)) for n in array.shape]),
                _op_tuple([_op_int(int(s)) for s in strides]), pickle.NEWFALSE,
                _op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE,
            ]),
            pickle.REDUCE,
        ]
    body += [pickle.SETITEMS, pickle.STOP]
    sys_info = {"protocol_version": _LEGACY_PROTOCOL, "little_endian": sys.byteorder == "little",
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    keys = sorted(str(i) for i in range(len(arrays)))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            out.write(pickle.dumps(_LEGACY_MAGIC, protocol=2))
            out.write(pickle.dumps(_LEGACY_PROTOCOL, protocol=2))
            out.write(pickle.dumps(sys_info, protocol=2))
            out.write(b"".join(body))
            out.write(pickle.dumps(keys, protocol=2))
            for key in keys:
                array = arrays[int(key)][1]
                out.write(struct.pack("<q", array.size))
                little = array.astype(array.dtype.newbyteorder("<"), copy=False)
                out.write(little.tobytes(order="C"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
