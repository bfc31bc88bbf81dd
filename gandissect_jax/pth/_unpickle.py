"""Restricted unpickling of checked pickles: sealed stand-ins for torch storages and tensors, validated tensor views."""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from ._common import (
    BFLOAT16,
    Budget,
    FileReader,
    KEY_PATTERN,
    MAX_DEPTH,
    MAX_ELEMENTS,
    MAX_NDIM,
    MAX_PICKLE_BYTES,
    PickleSlice,
    Refused,
    STORAGE_DTYPES,
    clip,
    describe,
    error_text,
)
from ._pickle_check import check_pickle

# --------------------------------------------------------------------------------------------
# Objects the unpickler hands to the object pickle


class _Sealed:
    """Base of every object the unpickler hands to a pickle: its state cannot be set (BUILD)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise Refused(f"the pickle tries to set the state of a {type(self).__name__.strip('_')}")


class _StorageType(_Sealed):
    """Stand-in for a ``torch.*Storage`` class named in a pickle."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES.get(name, np.dtype("<u2"))  # bfloat16: widened on read


class Storage(_Sealed):
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

    def __init__(self, root: Storage, start: int, length: int):
        self.root, self.start, self.length = root, start, length


def _index(value: Any, what: str) -> int:
    """A non-negative int (not bool) at most ``MAX_ELEMENTS``, else :class:`Refused`."""
    if type(value) is not int or not 0 <= value <= MAX_ELEMENTS:
        raise Refused(f"{what} is {describe(value)}, not an int in [0, {MAX_ELEMENTS}]")
    return value


class _PendingTensor(_Sealed):
    """A validated tensor whose storage bytes are not read yet (legacy files store them last)."""

    __slots__ = ("storage", "offset", "size", "stride", "numel")

    def __init__(self, storage, offset, size, stride):
        if type(storage) is not _StorageRef:
            raise Refused(f"a tensor's storage is {describe(storage)}, not a persistent id")
        key = storage.root.key
        offset = _index(offset, f"the storage offset of a tensor on storage {key!r}")
        for name, value in (("size", size), ("stride", stride)):
            if type(value) not in (tuple, list) or len(value) > MAX_NDIM:
                raise Refused(f"a tensor's {name} on storage {key!r} is {describe(value)}, not "
                               f"a tuple of at most {MAX_NDIM} ints")
        if len(size) != len(stride):
            raise Refused(f"a tensor on storage {key!r} has {len(size)} sizes but "
                           f"{len(stride)} strides")
        size = tuple(_index(n, f"a tensor size on storage {key!r}") for n in size)
        stride = tuple(_index(s, f"a tensor stride on storage {key!r}") for s in stride)
        bound = 1
        for n in size:
            bound *= max(n, 1)
        if bound > MAX_ELEMENTS:
            raise Refused(f"a tensor of size {size} on storage {key!r} exceeds {MAX_ELEMENTS} "
                           "elements")
        numel = bound if all(size) else 0
        if numel:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.length:
                raise Refused(
                    f"a tensor of size {size}, stride {stride} at offset {offset} reaches element "
                    f"{last} of storage {key!r}, which holds {storage.length}: forged or corrupt "
                    "metadata")
        self.storage, self.offset, self.size, self.stride, self.numel = (
            storage, offset, size, stride, numel)

    def materialize(self, budget: Budget) -> np.ndarray:
        ref = self.storage
        root = ref.root
        data = root.data
        if data is None:
            raise Refused(f"storage {root.key!r} is missing from the file")
        is_bf16 = root.storage_type.name == BFLOAT16
        itemsize = 4 if is_bf16 else data.dtype.itemsize
        budget.charge(self.numel * itemsize, f"tensor of size {self.size} on storage {root.key!r}")
        if not self.numel:
            array = np.zeros(self.size, dtype=data.dtype)
        else:
            start = ref.start + self.offset
            last = start + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= data.size or ref.start + ref.length > data.size:  # checked twice on purpose
                raise Refused(f"storage {root.key!r} holds {data.size} elements but a tensor "
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
        raise Refused(f"collections.OrderedDict called with {len(args)} arguments")
    return collections.OrderedDict()


def _rebuild_tensor(storage=None, storage_offset=None, size=None, stride=None, *rest):
    """``torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride[, requires_grad,
    backward_hooks[, metadata]])``: validated here, materialized after the storages are read."""
    if len(rest) > 3 or (rest and type(rest[0]) is not bool):
        raise Refused("_rebuild_tensor_v2 called with unexpected arguments")
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data=None, requires_grad=None, backward_hooks=None, *rest):
    """``torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)``: the tensor."""
    if type(data) is not _PendingTensor or rest:
        raise Refused(f"_rebuild_parameter called on {describe(data)}, not a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _Callable("OrderedDict", _ordered_dict),
    ("torch._utils", "_rebuild_tensor"): _Callable("_rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable("_rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Callable("_rebuild_parameter", _rebuild_parameter),
    **{("torch", name): _StorageType(name) for name in [*STORAGE_DTYPES, BFLOAT16]},
}


class LiteralUnpickler(pickle.Unpickler):
    """Unpickler for the header pickles: no global, no persistent id."""

    def find_class(self, module: str, name: str):
        raise Refused(f"refusing to unpickle global {clip(f'{module}.{name}', 120)} in a "
                       "header pickle")

    def persistent_load(self, pid):
        raise Refused("a persistent id in a header pickle")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuilding globals and storage persistent ids."""

    def __init__(self, file: BinaryIO, storages: dict[str, Storage], legacy: bool):
        super().__init__(file, fix_imports=False, encoding="utf-8")
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise Refused(
                f"refusing to unpickle global {clip(f'{module}.{name}', 120)}: a checkpoint "
                "should hold only tensors and containers")
        return found

    def persistent_load(self, pid):
        length = 6 if self._legacy else 5
        if type(pid) is not tuple or len(pid) != length or type(pid[0]) is not str \
                or pid[0] != "storage":
            raise Refused(f"persistent id {describe(pid)} is not ('storage', type, key, "
                           f"location, numel{', view' if self._legacy else ''})")
        storage_type, key, location, numel = pid[1:5]
        if type(storage_type) is not _StorageType:
            raise Refused(f"persistent id names {describe(storage_type)}, not a storage type")
        if type(key) is not str or not KEY_PATTERN.fullmatch(key):
            raise Refused(f"storage key {describe(key)} is not [0-9A-Za-z_]{{1,64}}")
        if type(location) is not str:
            raise Refused(f"storage {key!r}: location {describe(location)} is not a string")
        numel = _index(numel, f"the element count of storage {key!r}")
        root = self._storages.get(key)
        if root is None:
            root = self._storages[key] = Storage(storage_type, key, numel)
        elif root.storage_type is not storage_type or root.numel != numel:
            raise Refused(f"storage {key!r} is named twice with different types or sizes")
        view = pid[5] if self._legacy else None
        if view is None:
            return _StorageRef(root, 0, numel)
        # legacy storage views: (view key, offset, size), in elements of the root storage
        if type(view) is not tuple or len(view) != 3 or type(view[0]) is not str:
            raise Refused(f"storage {key!r}: view {describe(view)} is not (key, offset, size)")
        start = _index(view[1], f"the view offset on storage {key!r}")
        length = _index(view[2], f"the view size on storage {key!r}")
        if start + length > numel:
            raise Refused(f"a view [{start}, {start + length}) of storage {key!r} runs past its "
                           f"{numel} elements")
        return _StorageRef(root, start, length)


def unpickle(data: bytes, unpickler_type, what: str, *args) -> Any:
    try:
        if unpickler_type is LiteralUnpickler:
            return LiteralUnpickler(io.BytesIO(data), fix_imports=False, encoding="utf-8").load()
        return unpickler_type(io.BytesIO(data), *args).load()
    except Refused:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a checked pickle means corrupt data
        raise Refused(f"corrupt {what} pickle: {error_text(err)}") from err


def read_legacy_pickle(reader: FileReader, what: str, allow_objects: bool) -> bytes:
    """Check the pickle at the reader's position and return its bytes (reader moves past it)."""
    limit = min(reader.remaining(), MAX_PICKLE_BYTES)
    stream = PickleSlice(reader, limit)
    try:
        check_pickle(stream, limit, what, allow_objects)
    except Refused as err:
        if limit == MAX_PICKLE_BYTES and stream.tell() >= limit:
            raise Refused(f"the {what} pickle is longer than {MAX_PICKLE_BYTES} bytes") from err
        raise
    return b"".join(stream.chunks)


# --------------------------------------------------------------------------------------------
# Materializing the unpickled object


class Materializer:
    """Replace every pending tensor by a numpy array; admit only plain containers and literals."""

    _SCALARS = (type(None), bool, int, float, str, bytes)

    def __init__(self, budget: Budget):
        self._budget = budget
        self._done: dict[int, Any] = {}  # id -> result: shared objects stay shared, cycles end

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        kind = type(obj)
        if kind in self._SCALARS:
            return obj
        if id(obj) in self._done:
            return self._done[id(obj)]
        if depth >= MAX_DEPTH:
            raise Refused(f"the object nests more than {MAX_DEPTH} containers deep")
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
            raise Refused(f"the object holds {describe(obj)}, not a tensor, container or literal")
        self._done[id(obj)] = out
        return out
