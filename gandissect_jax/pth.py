"""Read (and write) PyTorch ``.pth`` checkpoints without PyTorch.

A ``.pth`` file is a pickle of tensors whose bytes live in separate "storages". Two container
formats exist:

- **legacy** (PyTorch <= 1.5, and every checkpoint released with GAN Dissection): a series of
  pickles in one file -- magic number, protocol version, system info, the object (tensors
  pickled as calls to ``torch._utils._rebuild_tensor_v2`` whose storage is a persistent id),
  the list of storage keys -- followed by each storage as an int64 element count and raw
  little-endian bytes;
- **zip** (PyTorch >= 1.6): a zip archive holding ``<root>/data.pkl`` (the same object pickle)
  and one raw file ``<root>/data/<key>`` per storage.

Both are read here with a restricted unpickler that admits only the handful of globals needed to
rebuild tensors (``collections.OrderedDict``, the ``torch._utils._rebuild_*`` functions and the
``torch.*Storage`` types) and never executes anything else, so an untrusted file cannot run code.
Tensors come back as ``numpy.ndarray`` in their stored layout (PyTorch's, e.g. OIHW conv weights).

:func:`write_legacy_pth` writes a mapping of arrays in the legacy format, so tests can build files
exactly like the released checkpoints without PyTorch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, BinaryIO, Mapping

import numpy as np

__all__ = ["PthError", "read_pth", "read_state_dict", "write_legacy_pth"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

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


class PthError(ValueError):
    """Raised when a file is not a readable PyTorch checkpoint."""


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class named in a pickle."""

    def __init__(self, name: str):
        self.name = name
        if name in _STORAGE_DTYPES:
            self.dtype = _STORAGE_DTYPES[name]
        elif name == _BFLOAT16:
            self.dtype = np.dtype("<u2")  # widened to float32 on read
        else:
            raise PthError(f"unsupported storage type torch.{name}")


class _Storage:
    """A storage referenced by the pickle; its bytes are attached after unpickling."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.data: np.ndarray | None = None


class _PendingTensor:
    """A tensor whose storage bytes are not read yet (legacy files store them after the pickle)."""

    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def materialize(self) -> np.ndarray:
        root, base_offset = self.storage
        data = root.data
        if data is None:
            raise PthError(f"storage {root.key!r} is missing from the file")
        offset = base_offset + self.offset
        needed = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0) + 1
        if self.size and min(self.size) == 0:
            needed = 0
        if needed > data.size:
            raise PthError(
                f"storage {root.key!r} holds {data.size} elements but a tensor of size {self.size} "
                f"needs {needed}: the file is truncated or corrupt"
            )
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[offset:] if data.size else data,
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
        )
        array = np.array(view, copy=True)
        if root.storage_type.name == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuilding globals and storage persistent ids."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise PthError(
            f"refusing to unpickle global {module}.{name}: a checkpoint should hold only tensors "
            "and containers"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise PthError(f"unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise PthError(f"persistent id names no storage type: {pid!r}")
        root = self._storages.get(key)
        if root is None:
            root = self._storages[key] = _Storage(storage_type, key, numel)
        if view_metadata is not None:  # legacy storage views: (view key, offset, size)
            _view_key, view_offset, _view_size = view_metadata
            return (root, int(view_offset))
        return (root, 0)


def _materialize(obj: Any) -> Any:
    """Replace every pending tensor inside containers by a numpy array."""
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, collections.OrderedDict):
        out = collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
        out.__dict__.update(getattr(obj, "__dict__", {}))
        return out
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    return obj


def _read_exact(file: BinaryIO, count: int, what: str) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise PthError(f"file ends inside {what}: wanted {count} bytes, got {len(data)}")
    return data


def _load_legacy(file: BinaryIO, path: str) -> Any:
    try:
        magic = pickle.load(file)
    except Exception as err:  # noqa: BLE001 - any failure means "not a checkpoint"
        raise PthError(f"{path} is not a PyTorch checkpoint (neither zip nor legacy pickle): {err}")
    if magic != _LEGACY_MAGIC:
        raise PthError(f"{path} is not a PyTorch checkpoint: bad magic number {magic!r}")
    try:
        protocol = pickle.load(file)
        sys_info = pickle.load(file)
    except Exception as err:  # noqa: BLE001
        raise PthError(f"{path}: corrupt header: {err}")
    if protocol != _LEGACY_PROTOCOL:
        raise PthError(f"{path}: unsupported legacy protocol {protocol!r}")
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise PthError(f"{path}: big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    try:
        obj = _RestrictedUnpickler(file, storages).load()
        keys = pickle.load(file)
    except PthError:
        raise
    except Exception as err:  # noqa: BLE001
        raise PthError(f"{path}: corrupt or truncated object pickle: {err}")
    for key in keys:
        key = str(key)
        storage = storages.get(key)
        if storage is None:
            raise PthError(f"{path}: storage {key!r} is listed but never referenced")
        (count,) = struct.unpack("<q", _read_exact(file, 8, f"the header of storage {key!r}"))
        dtype = storage.storage_type.dtype
        raw = _read_exact(file, count * dtype.itemsize, f"storage {key!r}")
        storage.data = np.frombuffer(raw, dtype=dtype)
    return _materialize(obj)


def _load_zip(path: str) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise PthError(f"{path}: corrupt zip checkpoint: {err}")
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise PthError(f"{path} is a zip file but holds no data.pkl: not a PyTorch checkpoint")
        root = pickles[0][: -len("data.pkl")]
        byteorder_name = root + "byteorder"
        if byteorder_name in names and archive.read(byteorder_name).strip() != b"little":
            raise PthError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        try:
            obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        except PthError:
            raise
        except Exception as err:  # noqa: BLE001
            raise PthError(f"{path}: corrupt object pickle: {err}")
        for key, storage in storages.items():
            member = f"{root}data/{key}"
            if member not in names:
                raise PthError(f"{path}: storage file {member} is missing")
            storage.data = np.frombuffer(archive.read(member), dtype=storage.storage_type.dtype)
    return _materialize(obj)


def read_pth(path: str | os.PathLike) -> Any:
    """Read a ``.pth`` file (legacy or zip format) without PyTorch.

    Args:
      path: the checkpoint file.

    Returns:
      The pickled object with every tensor replaced by a ``numpy.ndarray`` of the stored dtype and
      shape (usually an ``OrderedDict[str, ndarray]``, possibly wrapped, e.g. ``{'state_dict': ...}``).

    Raises:
      FileNotFoundError: the file does not exist.
      PthError: the file is not a PyTorch checkpoint, is truncated, or pickles anything but tensors
        and containers.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as file:
        return _load_legacy(file, path)


def read_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a ``.pth`` state dict: unwraps ``{'state_dict': ...}`` and checks every value is a tensor.

    Returns:
      ``OrderedDict`` name -> ``numpy.ndarray``, in the file's order.
    """
    obj = read_pth(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise PthError(f"{os.fspath(path)} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise PthError(f"{os.fspath(path)}: entries {bad[:5]} are not tensors: not a state dict")
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
