"""Writing state dicts in PyTorch's legacy .pth format with hand-assembled pickle opcodes (no torch needed)."""

from __future__ import annotations

import os
import pickle
import struct
import sys
from typing import Mapping

import numpy as np

from ._common import LEGACY_MAGIC, LEGACY_PROTOCOL, STORAGE_DTYPES

# --------------------------------------------------------------------------------------------
# Writing the legacy format (hand-assembled pickle opcodes: no torch needed to name its globals)

_DTYPE_STORAGES = {v: k for k, v in STORAGE_DTYPES.items()}


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
    sys_info = {"protocol_version": LEGACY_PROTOCOL, "little_endian": sys.byteorder == "little",
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    keys = sorted(str(i) for i in range(len(arrays)))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            out.write(pickle.dumps(LEGACY_MAGIC, protocol=2))
            out.write(pickle.dumps(LEGACY_PROTOCOL, protocol=2))
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
