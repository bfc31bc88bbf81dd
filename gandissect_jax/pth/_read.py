"""Reading legacy and zip .pth containers into numpy arrays: read_pth and read_state_dict."""

from __future__ import annotations

import collections
import io
import os
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from ._common import (
    PthError,
    Budget,
    FileReader,
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    MAX_PICKLE_BYTES,
    Refused,
    ZIP_SIGNATURE,
    describe,
    error_text,
)
from ._pickle_check import check_pickle
from ._unpickle import (
    LiteralUnpickler,
    Materializer,
    RestrictedUnpickler,
    Storage,
    read_legacy_pickle,
    unpickle,
)

# --------------------------------------------------------------------------------------------
# The two formats


def _load_legacy(reader: FileReader, budget: Budget) -> Any:
    def literal(what: str) -> Any:
        return unpickle(read_legacy_pickle(reader, what, False), LiteralUnpickler, what)

    try:
        magic = literal("magic number")
    except Refused as err:
        raise Refused(f"not a PyTorch checkpoint (neither a zip archive nor a legacy-format "
                       f"pickle): {err}") from err
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise Refused(f"not a PyTorch checkpoint: bad magic number {describe(magic)}")
    protocol = literal("protocol version")
    if type(protocol) is not int or protocol != LEGACY_PROTOCOL:
        raise Refused(f"unsupported legacy protocol {describe(protocol)} "
                       f"(expected {LEGACY_PROTOCOL})")
    sys_info = literal("system info")
    if type(sys_info) is not dict:
        raise Refused(f"the system info is {describe(sys_info)}, not a dict")
    if sys_info.get("little_endian", True) is not True:
        raise Refused("big-endian checkpoints are not supported")
    storages: dict[str, Storage] = {}
    data = read_legacy_pickle(reader, "object", True)
    obj = unpickle(data, RestrictedUnpickler, "object", storages, True)
    keys = literal("storage key list")
    if type(keys) is not list or any(type(k) is not str for k in keys):
        raise Refused(f"the storage key list is {describe(keys)}, not a list of strings")
    if len(set(keys)) != len(keys):
        raise Refused("the storage key list names a storage twice")
    unlisted = sorted(set(storages) - set(keys))
    if unlisted:
        raise Refused(f"storage {describe(unlisted[0])} is referenced but missing from the file")
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise Refused(f"storage {describe(key)} is listed but never referenced")
        (count,) = struct.unpack("<q", reader.read_exact(8, f"the header of storage {key!r}"))
        if count != storage.numel:
            raise Refused(f"storage {key!r} is stored with {count} elements but the pickle says "
                           f"{storage.numel}")
        nbytes = count * storage.storage_type.dtype.itemsize
        if nbytes > reader.remaining():
            raise Refused(f"storage {key!r} needs {nbytes} bytes but only {reader.remaining()} "
                           "are left in the file: it is truncated or corrupt")
        budget.charge(nbytes, f"storage {key!r}")
        storage.data = np.frombuffer(reader.read_exact(nbytes, f"storage {key!r}"),
                                     dtype=storage.storage_type.dtype)
    return Materializer(budget)(obj)


def _member_name_is_plain(name: str) -> bool:
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    return not (name.startswith("/") or "\\" in name or "\0" in name
                or any(part in ("", ".", "..") for part in parts))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, expected: int) -> bytes:
    """Read one member whose declared size was checked; refuse unbounded decompression."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise Refused(f"member {info.filename!r} uses compression method {info.compress_type}; "
                       "only stored (PyTorch's) and deflated members are read")
    try:
        with archive.open(info) as member:
            data = member.read(expected + 1)
    except Exception as err:  # noqa: BLE001 - bad CRC, bad header, truncated archive, ...
        raise Refused(f"corrupt zip member {info.filename!r}: {error_text(err)}") from err
    if len(data) != expected:
        raise Refused(f"member {info.filename!r} holds {len(data)} bytes, expected {expected}")
    return data


def _load_zip(reader: FileReader, budget: Budget) -> Any:
    try:
        archive = zipfile.ZipFile(reader)
    except Exception as err:  # noqa: BLE001
        raise Refused(f"corrupt zip archive: {error_text(err)}") from err
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise Refused(f"the zip archive holds member {describe(dup)} twice")
        weird = [n for n in names if not _member_name_is_plain(n)]
        if weird:
            raise Refused(f"the zip archive holds a member with an unsafe name: "
                           f"{describe(weird[0])}")
        by_name = dict(zip(names, infos))
        pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl")
                                                           and n.count("/") == 1)]
        if len(pickles) != 1:
            if not pickles:
                raise Refused("a zip archive without a data.pkl record: not a PyTorch checkpoint")
            raise Refused(f"the zip archive holds {len(pickles)} data.pkl records")
        root = pickles[0][: -len("data.pkl")]
        order = by_name.get(root + "byteorder")
        if order is not None:
            if order.file_size > 16 or _read_member(archive, order, order.file_size).strip() \
                    != b"little":
                raise Refused("big-endian (or unreadable byteorder) checkpoints are not supported")
        info = by_name[pickles[0]]
        if info.file_size > MAX_PICKLE_BYTES:
            raise Refused(f"{info.filename} declares {info.file_size} bytes, more than the "
                           f"{MAX_PICKLE_BYTES}-byte limit for a pickle")
        budget.charge(info.file_size, info.filename)
        data = _read_member(archive, info, info.file_size)
        check_pickle(io.BytesIO(data), len(data), "data.pkl", True)
        storages: dict[str, Storage] = {}
        obj = unpickle(data, RestrictedUnpickler, "data.pkl", storages, False)
        for key, storage in storages.items():
            name = f"{root}data/{key}"
            member = by_name.get(name)
            if member is None:
                raise Refused(f"storage file {name} is missing")
            nbytes = storage.numel * storage.storage_type.dtype.itemsize
            if member.file_size != nbytes:
                raise Refused(f"storage file {name} declares {member.file_size} bytes but the "
                               f"pickle says {storage.numel} elements x "
                               f"{storage.storage_type.dtype.itemsize} bytes = {nbytes}")
            budget.charge(nbytes, f"storage file {name}")
            storage.data = np.frombuffer(_read_member(archive, member, nbytes),
                                         dtype=storage.storage_type.dtype)
    return Materializer(budget)(obj)


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
            reader = FileReader(file, os.fstat(file.fileno()).st_size)
            budget = Budget(reader.size)
            is_zip = reader.read(4) == ZIP_SIGNATURE
            reader.seek(0)
            return _load_zip(reader, budget) if is_zip else _load_legacy(reader, budget)
        except Refused as err:
            raise PthError(f"{path}: {err}") from err
        except Exception as err:  # noqa: BLE001 - defence in depth: every failure names the file
            raise PthError(f"{path}: unreadable checkpoint ({error_text(err)})") from err


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
        raise PthError(f"{os.fspath(path)} holds {describe(obj)}, not a state dict")
    bad = [describe(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise PthError(f"{os.fspath(path)}: entries {', '.join(bad[:5])} are not tensors: not a "
                       "state dict")
    return collections.OrderedDict((str(k), v) for k, v in obj.items())
