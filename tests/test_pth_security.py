"""Reading a .pth file is safe whatever it holds: nothing runs, nothing is read out of bounds,
nothing huge is allocated, and every refusal is a PthError naming the file.

The files are assembled here from pickle opcodes (no torch): a valid legacy file comes from
``write_legacy_pth``, a zip-format file is laid out like ``torch.save``'s (``archive/data.pkl``,
``archive/byteorder``, ``archive/data/<key>``). Attacks that could crash or exhaust the interpreter
if the reader regressed are loaded in a worker subprocess (with an address-space limit), so a crash
fails the test instead of killing pytest. The fuzz tests (hypothesis, derandomized) feed that worker
a few hundred mutated and malicious files of both formats.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import select
import struct
import subprocess
import sys
import tempfile
import textwrap
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gandissect_jax import cli
from gandissect_jax.pth import _pickle_check as pickle_check
from gandissect_jax.pth import PthError, read_pth, read_state_dict, write_legacy_pth

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pth")
MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
STORAGE_NAMES = {"<f4": "FloatStorage", "<f8": "DoubleStorage", "<f2": "HalfStorage",
                 "<i8": "LongStorage", "<i4": "IntStorage", "<i2": "ShortStorage",
                 "|i1": "CharStorage", "|u1": "ByteStorage", "|b1": "BoolStorage"}
OUTPUT_DTYPES = set(STORAGE_NAMES)

settings.register_profile(
    "pth-fuzz", derandomize=True, database=None, deadline=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("pth-fuzz")


# --------------------------------------------------------------------------------------------
# A small pickle assembler: values and raw opcodes -> protocol-2 pickles


class Raw:
    """Opcodes pushing one value, spliced verbatim into a pickle."""

    def __init__(self, ops: bytes):
        self.ops = ops


def lit(value) -> bytes:
    """Opcodes that push ``value`` (None, bool, int, float, str, bytes, tuple, list, dict, Raw)."""
    if isinstance(value, Raw):
        return value.ops
    if value is None:
        return pickle.NONE
    if value is True or value is False:
        return pickle.NEWTRUE if value else pickle.NEWFALSE
    if isinstance(value, int):
        if 0 <= value < 256:
            return pickle.BININT1 + bytes([value])
        if -(2**31) <= value < 2**31:
            return pickle.BININT + struct.pack("<i", value)
        encoded = pickle.encode_long(value)
        return pickle.LONG1 + bytes([len(encoded)]) + encoded
    if isinstance(value, float):
        return pickle.BINFLOAT + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode("utf-8")
        return pickle.BINUNICODE + struct.pack("<I", len(data)) + data
    if isinstance(value, bytes):
        return pickle.BINBYTES + struct.pack("<I", len(value)) + value
    if isinstance(value, tuple):
        return pickle.MARK + b"".join(lit(v) for v in value) + pickle.TUPLE
    if isinstance(value, list):
        return pickle.EMPTY_LIST + pickle.MARK + b"".join(lit(v) for v in value) + pickle.APPENDS
    if isinstance(value, dict):
        items = b"".join(lit(k) + lit(v) for k, v in value.items())
        return pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS
    raise TypeError(type(value))


def dumps(value) -> bytes:
    return pickle.PROTO + b"\x02" + lit(value) + pickle.STOP


def glob(module: str, name: str) -> Raw:
    return Raw(pickle.GLOBAL + f"{module}\n{name}\n".encode())


def call(function: Raw, *args) -> Raw:
    return Raw(function.ops + lit(tuple(args)) + pickle.REDUCE)


def odict(items: dict) -> Raw:
    body = b"".join(lit(k) + lit(v) for k, v in items.items())
    return Raw(call(glob("collections", "OrderedDict")).ops + pickle.MARK + body + pickle.SETITEMS)


def persid(*fields) -> Raw:
    return Raw(lit(tuple(fields)) + pickle.BINPERSID)


def storage_pid(storage: str, key: str, numel, legacy: bool, view=None) -> Raw:
    fields = ("storage", glob("torch", storage), key, "cpu", numel)
    return persid(*fields, view) if legacy else persid(*fields)


def tensor(pid: Raw, offset, size, stride, rebuild="_rebuild_tensor_v2") -> Raw:
    return call(glob("torch._utils", rebuild), pid, offset, size, stride, False,
                call(glob("collections", "OrderedDict")))


def legacy_bytes(obj_pickle: bytes, keys, storages, *, magic=None, protocol=None, sys_info=None,
                 keys_pickle=None) -> bytes:
    """A legacy file: header pickles, the object pickle, the key list, (count, raw bytes) each."""
    parts = [magic if magic is not None else dumps(MAGIC),
             protocol if protocol is not None else dumps(1001),
             sys_info if sys_info is not None else dumps(SYS_INFO),
             obj_pickle,
             keys_pickle if keys_pickle is not None else dumps(list(keys))]
    for count, raw in storages:
        parts.append(struct.pack("<q", count) + raw)
    return b"".join(parts)


def zip_bytes(data_pkl: bytes, storages: dict, *, root="archive", extra=(),
              compression=zipfile.ZIP_STORED) -> bytes:
    """A zip-format file laid out like torch.save's."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.writestr(f"{root}/data.pkl", data_pkl)
        archive.writestr(f"{root}/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"{root}/data/{key}", raw)
        archive.writestr(f"{root}/version", "3\n")
        for name, raw in extra:
            archive.writestr(name, raw)
    return buffer.getvalue()


def state_pickle(arrays: dict, legacy: bool) -> tuple[bytes, dict]:
    """The object pickle of an OrderedDict of C-contiguous arrays, and key -> raw storage bytes."""
    entries, raws = {}, {}
    for index, (name, array) in enumerate(arrays.items()):
        array = np.asarray(array, order="C")
        key = str(index)
        pid = storage_pid(STORAGE_NAMES[array.dtype.str], key, array.size, legacy)
        strides = (tuple(s // array.itemsize for s in array.strides) if array.size
                   else (1,) * array.ndim)
        entries[name] = tensor(pid, 0, array.shape, strides)
        raws[key] = array.tobytes()
    return dumps(odict(entries)), raws


def legacy_from_arrays(arrays: dict) -> bytes:
    obj, raws = state_pickle(arrays, legacy=True)
    storages = [(arrays[name].size, raws[str(i)]) for i, name in enumerate(arrays)]
    return legacy_bytes(obj, list(raws), storages)


def zip_from_arrays(arrays: dict) -> bytes:
    obj, raws = state_pickle(arrays, legacy=False)
    return zip_bytes(obj, raws)


SMALL = collections.OrderedDict([
    ("conv.weight", np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7),
    ("bn.num_batches_tracked", np.array(5, dtype=np.int64)),
    ("mask", np.array([True, False, True])),
])


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_refused(path, match: str | None = None) -> PthError:
    """read_pth(path) raises a PthError whose message names the file (and matches ``match``)."""
    with pytest.raises(PthError) as info:
        read_pth(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    if match is not None:
        assert match in message, message
    return info.value


# --------------------------------------------------------------------------------------------
# The worker subprocess: loads files, reports each outcome as one JSON line

WORKER = textwrap.dedent(r"""
    import collections, json, os, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a runaway allocation fails fast
    import numpy as np
    from gandissect_jax.pth import read_pth

    def peak_rss_kb():
        # VmHWM belongs to this process image; ru_maxrss would include the forking parent's peak
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def summary(obj):
        arrays, types, seen, todo = [], set(), set(), collections.deque([("", obj)])
        while todo and len(seen) < 100000:
            where, value = todo.popleft()
            types.add(type(value).__name__)
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, np.ndarray):
                arrays.append({"where": where, "dtype": value.dtype.str, "shape": list(value.shape),
                               "size": int(value.size), "nbytes": int(value.nbytes),
                               "hex": value.tobytes().hex() if value.nbytes <= 65536 else None})
            elif isinstance(value, dict):
                todo.extend((f"{where}/{k}", v) for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                todo.extend((f"{where}/{i}", v) for i, v in enumerate(value))
        return {"arrays": arrays, "types": sorted(types)}

    for line in sys.stdin:
        path = json.loads(line)
        try:
            report = {"outcome": "ok", **summary(read_pth(path))}
        except BaseException as err:
            chain, e = [], err
            while e is not None and len(chain) < 20:
                chain.append(type(e).__name__)
                e = e.__cause__ or e.__context__
            report = {"outcome": "error", "type": type(err).__name__, "chain": chain,
                      "message": str(err)[:4000]}
        report["peak_rss_kb"] = peak_rss_kb()
        print(json.dumps(report), flush=True)
""")


class Worker:
    """A subprocess that loads .pth files one by one; restarted after a crash."""

    TIMEOUT_S = 60

    def __init__(self, cwd):
        self.cwd = cwd
        self.proc = None

    def _start(self):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                               os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=self.cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def load(self, path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(str(path)) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            stderr = self.proc.communicate()[1]
            code = self.proc.returncode
            self.proc = None
            pytest.fail(f"the reader crashed or hung on {path} (exit code {code}, "
                        f"{'timeout' if not ready else 'no output'}):\n{stderr[-3000:]}")
        return json.loads(line)

    def close(self):
        """Stop the worker; it must exit normally, with nothing on stderr (no traceback)."""
        if self.proc is not None:
            self.proc.stdin.close()
            stderr = self.proc.stderr.read()
            code = self.proc.wait(timeout=30)
            self.proc = None
            assert code == 0 and not stderr.strip(), (code, stderr[-3000:])


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return tmp_path_factory.mktemp("pth_security")


@pytest.fixture(scope="module")
def worker(sandbox):
    w = Worker(sandbox)
    yield w
    w.close()


def marker(sandbox):
    return sandbox / "MARKER"


def check_outcome(report: dict, path, *, must_fail=False) -> None:
    """The general property: a clean load of plain data, or a PthError naming the file."""
    if report["outcome"] == "error":
        assert report["type"] == "PthError", report
        assert report["message"].startswith(str(path)), report
        assert not {"MemoryError", "RecursionError"} & set(report["chain"]), report
        return
    assert not must_fail, f"{path} should have been refused but loaded: {report}"
    allowed = {"ndarray", "OrderedDict", "dict", "list", "tuple", "set", "frozenset", "NoneType",
               "bool", "int", "float", "str", "bytes"}
    assert set(report["types"]) <= allowed, report["types"]
    for array in report["arrays"]:
        assert array["dtype"] in OUTPUT_DTYPES, array
        assert array["size"] == int(np.prod(array["shape"], dtype=object)), array
        assert array["nbytes"] == array["size"] * np.dtype(array["dtype"]).itemsize, array
        if array["hex"] is not None:
            assert len(array["hex"]) == 2 * array["nbytes"], array


def load_in_worker(worker, sandbox, name: str, data: bytes, **expect) -> dict:
    path = sandbox / name
    path.write_bytes(data)
    report = worker.load(path)
    check_outcome(report, path, **expect)
    assert not marker(sandbox).exists(), f"{path} ran code: the marker file appeared"
    assert report["peak_rss_kb"] < 1_000_000, f"the reader used {report['peak_rss_kb']} kB"
    return report


def arrays_of(report: dict) -> dict:
    return {a["where"].lstrip("/"): np.frombuffer(bytes.fromhex(a["hex"]), a["dtype"])
            .reshape(a["shape"]) for a in report["arrays"]}


# --------------------------------------------------------------------------------------------
# Hostile payloads: each would create the marker file if it ran


def hostile_calls(target: str) -> list[Raw]:
    shell = f"touch {target}"
    return [
        call(glob("posix", "system"), shell),
        call(glob("os", "system"), shell),
        call(glob("builtins", "open"), target, "w"),
        call(glob("builtins", "exec"), f"open({target!r}, 'w')"),
        call(glob("builtins", "eval"), f"open({target!r}, 'w')"),
        call(glob("subprocess", "call"), ["touch", target]),
        call(glob("io", "open"), target, "w"),
        # the same, named with STACK_GLOBAL (protocol 4)
        Raw(lit("builtins") + lit("open") + pickle.STACK_GLOBAL + lit((target, "w"))
            + pickle.REDUCE),
        # INST and OBJ call the class / function they name
        Raw(pickle.MARK + lit(target) + lit("w") + pickle.INST + b"builtins\nopen\n"),
        Raw(pickle.MARK + glob("builtins", "open").ops + lit(target) + lit("w") + pickle.OBJ),
        # NEWOBJ on a class, and an extension code
        Raw(glob("subprocess", "Popen").ops + lit((["touch", target],)) + pickle.NEWOBJ),
        Raw(pickle.EXT1 + b"\x01"),
    ]


# --------------------------------------------------------------------------------------------
# 1. Every pickle goes through the restricted unpickler


@pytest.mark.parametrize("position", ["magic", "protocol", "sys_info", "keys"])
def test_legacy_header_pickle_cannot_run_code(tmp_path, position):
    good_obj, raws = state_pickle(SMALL, legacy=True)
    storages = [(SMALL[n].size, raws[str(i)]) for i, n in enumerate(SMALL)]
    for index, payload in enumerate(hostile_calls(str(tmp_path / "MARKER"))):
        header = {"magic": None, "protocol": None, "sys_info": None, "keys_pickle": None}
        header["keys_pickle" if position == "keys" else position] = dumps(payload)
        path = write(tmp_path, f"{position}{index}.pth",
                     legacy_bytes(good_obj, list(raws), storages, **header))
        assert_refused(path)
        assert not (tmp_path / "MARKER").exists(), (position, index)


@pytest.mark.parametrize("value", [
    call(glob("collections", "OrderedDict")), glob("torch", "FloatStorage"),
    call(glob("torch._utils", "_rebuild_tensor_v2")), persid("storage"),
])
def test_header_pickles_admit_no_globals_at_all(tmp_path, value):
    """Even the globals the object pickle may use are refused in the header pickles."""
    path = write(tmp_path, "h.pth", legacy_bytes(dumps([]), [], [], sys_info=dumps(value)))
    assert_refused(path, "system info")


@pytest.mark.parametrize("where", ["top", "value", "tensor_arg", "storage_type", "persid", "key"])
def test_legacy_object_pickle_cannot_run_code(tmp_path, where):
    for index, payload in enumerate(hostile_calls(str(tmp_path / "MARKER"))):
        obj = place_payload(payload, where, legacy=True)
        path = write(tmp_path, f"{where}{index}.pth",
                     legacy_bytes(dumps(obj), ["0"], [(4, b"\0" * 16)]))
        assert_refused(path)
        assert not (tmp_path / "MARKER").exists(), (where, index)


@pytest.mark.parametrize("where", ["top", "value", "tensor_arg", "storage_type", "persid", "key"])
def test_zip_data_pkl_cannot_run_code(tmp_path, where):
    for index, payload in enumerate(hostile_calls(str(tmp_path / "MARKER"))):
        obj = place_payload(payload, where, legacy=False)
        path = write(tmp_path, f"{where}{index}.pth", zip_bytes(dumps(obj), {"0": b"\0" * 16}))
        assert_refused(path)
        assert not (tmp_path / "MARKER").exists(), (where, index)


def place_payload(payload: Raw, where: str, legacy: bool) -> Raw:
    """An object pickle with ``payload`` at one position of a one-tensor state dict."""
    pid = storage_pid("FloatStorage", "0", 4, legacy)
    if where == "top":
        return payload
    if where == "value":
        return odict({"w": tensor(pid, 0, (4,), (1,)), "evil": payload})
    if where == "tensor_arg":
        return odict({"w": tensor(pid, payload, (4,), (1,))})
    if where == "storage_type":
        fields = ("storage", payload, "0", "cpu", 4) + ((None,) if legacy else ())
        return odict({"w": tensor(persid(*fields), 0, (4,), (1,))})
    if where == "persid":
        return odict({"w": tensor(Raw(payload.ops + pickle.BINPERSID), 0, (4,), (1,))})
    if where == "key":
        return Raw(call(glob("collections", "OrderedDict")).ops + pickle.MARK + payload.ops
                   + tensor(pid, 0, (4,), (1,)).ops + pickle.SETITEMS)
    raise ValueError(where)


@pytest.mark.parametrize("module,name", [
    ("builtins", "getattr"), ("torch", "load"), ("torch._utils", "_rebuild_from_type_v2"),
    ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("numpy", "frombuffer"),
    ("collections", "defaultdict"), ("torch", "UntypedStorage"), ("torch", "FooStorage"),
])
def test_object_pickle_admits_only_tensor_rebuild_globals(tmp_path, module, name):
    path = write(tmp_path, "g.pth", legacy_bytes(dumps(call(glob(module, name))), [], []))
    assert_refused(path, "refusing to unpickle global")


@pytest.mark.parametrize("ops", [
    pickle.MARK + pickle.INST + b"collections\nOrderedDict\n",
    pickle.MARK + glob("collections", "OrderedDict").ops + pickle.OBJ,
    glob("collections", "OrderedDict").ops + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
    glob("collections", "OrderedDict").ops + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT
    + pickle.NEWOBJ_EX,
    pickle.EXT1 + b"\x01",
    pickle.PERSID + b"0\n",
    pickle.INT + b"1\n",
    pickle.BYTEARRAY8 + struct.pack("<Q", 1) + b"x",
    pickle.NEXT_BUFFER,
])
def test_object_constructing_opcodes_are_refused(tmp_path, ops):
    """INST / OBJ / NEWOBJ / NEWOBJ_EX / extension codes / text opcodes / buffers never run."""
    data = legacy_bytes(pickle.PROTO + b"\x04" + ops + pickle.STOP, [], [])
    path = write(tmp_path, "op.pth", data)
    assert_refused(path, "refusing to unpickle")


def test_reduce_and_build_are_limited_to_what_torch_writes(tmp_path):
    pid = storage_pid("FloatStorage", "0", 4, True)
    cases = {
        # OrderedDict called with items (they would be hashed unchecked)
        "odict_args": call(glob("collections", "OrderedDict"), [("a", 1)]),
        # REDUCE whose callable is a storage type, or a persistent id
        "call_storage": call(glob("torch", "FloatStorage"), 4),
        # BUILD on a tensor (the reader's objects refuse state)
        "build_tensor": Raw(tensor(pid, 0, (4,), (1,)).ops + lit({"offset": 10**6}) + pickle.BUILD),
        # BUILD on a dict, and BUILD with a tuple (slot) state
        "build_dict": Raw(lit({}) + lit({"a": 1}) + pickle.BUILD),
        "build_slots": Raw(call(glob("collections", "OrderedDict")).ops
                           + lit((None, {"__class__": 1})) + pickle.BUILD),
    }
    for name, obj in cases.items():
        path = write(tmp_path, f"{name}.pth", legacy_bytes(dumps(obj), ["0"], [(4, b"\0" * 16)]))
        assert_refused(path)


def test_torch_metadata_build_still_loads(tmp_path):
    """state_dict()._metadata is pickled as BUILD on the OrderedDict: admitted and kept."""
    pid = storage_pid("FloatStorage", "0", 2, True)
    meta = odict({"": {"version": 1}})
    obj = Raw(odict({"w": tensor(pid, 0, (2,), (1,))}).ops + lit({"_metadata": meta})
              + pickle.BUILD)
    path = write(tmp_path, "meta.pth", legacy_bytes(dumps(obj), ["0"],
                                                    [(2, np.float32([1, 2]).tobytes())]))
    state = read_pth(path)
    np.testing.assert_array_equal(state["w"], [1, 2])
    assert state._metadata == {"": {"version": 1}}


# --------------------------------------------------------------------------------------------
# 1b. Other pickle dangers: huge memo / lengths, deep nesting, shared references, keys


BOMBS = {
    "memo_index_2e31": pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**31),
    "memo_index_max": pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 1),
    "memo_get_unset": pickle.LONG_BINGET + struct.pack("<I", 12345),
    "binunicode8_1e12": pickle.BINUNICODE8 + struct.pack("<Q", 10**12) + b"abc",
    "binbytes8_2e40": pickle.BINBYTES8 + struct.pack("<Q", 2**40) + b"abc",
    "binunicode_4g": pickle.BINUNICODE + struct.pack("<I", 2**32 - 1) + b"abc",
    "long4_2g": pickle.LONG4 + struct.pack("<i", 2**31 - 1) + b"\x01",
    "long4_bigint": pickle.LONG4 + struct.pack("<i", 4096) + b"\x01" * 4096,
    "frame_2e40": pickle.FRAME + struct.pack("<Q", 2**40) + pickle.NONE,
    # a 300,000-deep tuple as a dict key crashes (SIGSEGV) a plain pickle.loads when hashed
    "deep_tuple_key": pickle.EMPTY_DICT + pickle.BININT1 + b"\x01" + pickle.TUPLE1 * 300_000
    + pickle.BININT1 + b"\x02" + pickle.SETITEM,
    "deep_tuple": pickle.BININT1 + b"\x01" + pickle.TUPLE1 * 100_000,
    "deep_list": pickle.EMPTY_LIST * 50_000 + pickle.APPEND * 49_999,
    "deep_dict_values": (pickle.EMPTY_DICT + pickle.BININT1 + b"\x00") * 30_000 + pickle.NONE
    + pickle.SETITEM * 30_000,
    "billion_laughs": pickle.BININT1 + b"\x01" + (pickle.DUP + pickle.TUPLE2) * 150,
    "mark_storm": pickle.MARK * 100_000 + pickle.NONE,
    "colliding_int_keys": pickle.EMPTY_DICT + pickle.MARK + b"".join(
        lit(k * (2**61 - 1)) + pickle.NONE for k in range(1, 3000)) + pickle.SETITEMS,
    "float_keys": pickle.EMPTY_DICT + lit(1.5) + pickle.NONE + pickle.SETITEM,
    "stack_underflow": pickle.APPEND,
    "pop_past_mark": pickle.NONE + pickle.MARK + pickle.TUPLE2,
}


@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.parametrize("position", ["magic", "object"])
def test_pickle_bombs_are_refused_without_crash_or_memory_error(worker, sandbox, name, position):
    """Memo indices, length prefixes, nesting and keys are checked before the unpickler runs."""
    ops = pickle.PROTO + b"\x04" + BOMBS[name] + pickle.STOP
    if position == "object":
        data = legacy_bytes(ops, [], [])
    else:
        data = legacy_bytes(b"", [], [], magic=ops)
    report = load_in_worker(worker, sandbox, f"bomb_{position}_{name}.pth", data, must_fail=True)
    assert report["type"] == "PthError"


def test_shared_and_cyclic_references_load_in_linear_time(worker, sandbox):
    # a 2**60-leaf tree stored as a 60-link DAG, and a list that contains itself
    dag = pickle.BININT1 + b"\x01" + (pickle.DUP + pickle.TUPLE2) * 60
    cycle = pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.BINGET + b"\x00" + pickle.APPEND
    for name, ops in {"dag": dag, "cycle": cycle}.items():
        report = load_in_worker(worker, sandbox, f"shared_{name}.pth",
                                legacy_bytes(pickle.PROTO + b"\x02" + ops + pickle.STOP, [], []))
        assert report["outcome"] == "ok", report


def test_too_many_opcodes_are_refused(tmp_path, monkeypatch):
    """The opcode limit (2**21) caps the objects a pickle creates; checked here with 1000."""
    monkeypatch.setattr(pickle_check, "MAX_PICKLE_OPS", 1000)
    ops = pickle.PROTO + b"\x04" + pickle.EMPTY_LIST + pickle.MARK + pickle.NONE * 1000
    path = write(tmp_path, "ops.pth", legacy_bytes(ops + pickle.APPENDS + pickle.STOP, [], []))
    assert_refused(path, "more than 1000 opcodes")
    monkeypatch.setattr(pickle_check, "MAX_PICKLE_OPS", 1010)
    assert read_pth(path) == [None] * 1000  # a pickle within the limit loads


# --------------------------------------------------------------------------------------------
# 1c. Persistent ids and rebuild arguments are type-checked


@pytest.mark.parametrize("fields,legacy", [
    (("storage",), True),
    (("storage", glob("torch", "FloatStorage"), "0", "cpu", 4), True),  # legacy needs 6
    (("storage", glob("torch", "FloatStorage"), "0", "cpu", 4, None), False),  # zip needs 5
    (("module", glob("torch", "FloatStorage"), "0", "cpu", 4, None), True),
    ((b"storage", glob("torch", "FloatStorage"), "0", "cpu", 4, None), True),
    (("storage", "FloatStorage", "0", "cpu", 4, None), True),
    (("storage", glob("torch", "FloatStorage"), 0, "cpu", 4, None), True),
    (("storage", glob("torch", "FloatStorage"), "../../etc/passwd", "cpu", 4, None), True),
    (("storage", glob("torch", "FloatStorage"), "", "cpu", 4, None), True),
    (("storage", glob("torch", "FloatStorage"), "0", None, 4, None), True),
    (("storage", glob("torch", "FloatStorage"), "0", "cpu", -1, None), True),
    (("storage", glob("torch", "FloatStorage"), "0", "cpu", 4.0, None), True),
    (("storage", glob("torch", "FloatStorage"), "0", "cpu", 2**70, None), True),
    (("storage", glob("torch", "FloatStorage"), "0", "cpu", 4, ("v", 2, 3)), True),
    (("storage", glob("torch", "FloatStorage"), "0", "cpu", 4, ("v", -1, 2)), True),
    (("storage", glob("torch", "FloatStorage"), "0", "cpu", 4, [1, 2]), True),
])
def test_persistent_ids_of_the_wrong_shape_are_refused(tmp_path, fields, legacy):
    obj = odict({"w": tensor(persid(*fields), 0, (1,), (1,))})
    data = (legacy_bytes(dumps(obj), ["0"], [(4, b"\0" * 16)]) if legacy
            else zip_bytes(dumps(obj), {"0": b"\0" * 16}))
    assert_refused(write(tmp_path, "pid.pth", data))


def test_persistent_id_as_a_string_is_refused(tmp_path):
    obj = Raw(lit("storage") + pickle.BINPERSID)
    assert_refused(write(tmp_path, "pid.pth", legacy_bytes(dumps(obj), [], [])), "persistent id")


def test_storage_named_twice_with_different_sizes_is_refused(tmp_path):
    a = tensor(storage_pid("FloatStorage", "0", 4, True), 0, (4,), (1,))
    b = tensor(storage_pid("FloatStorage", "0", 400, True), 0, (400,), (1,))
    path = write(tmp_path, "twice.pth", legacy_bytes(dumps(odict({"a": a, "b": b})), ["0"],
                                                     [(4, b"\0" * 16)]))
    assert_refused(path, "named twice")


@pytest.mark.parametrize("args", [
    (persid("storage"), 0, (4,), (1,)),                     # refused in persistent_load
    (("storage", "FloatStorage", "0", "cpu", 4), 0, (4,), (1,)),  # a tuple, not a storage
    (None, 0, (4,), (1,)),
    ("PID", 0, (4,), (1,)),
    ("P", "0", (4,), (1,)),
    ("P", 1.0, (4,), (1,)),
    ("P", True, (4,), (1,)),
    ("P", -1, (4,), (1,)),
    ("P", 0, 4, (1,)),
    ("P", 0, "4", (1,)),
    ("P", 0, {4: 1}, (1,)),
    ("P", 0, (4.0,), (1,)),
    ("P", 0, ((4,),), (1,)),
    ("P", 0, (4,), (1, 1)),
    ("P", 0, (4,), None),
    ("P", 0, (1,) * 33, (1,) * 33),
    ("P", 0, (4,), (1,), "grad"),
    ("P", 0, (4,), (1,), False, None, None, None),
])
def test_rebuild_tensor_with_hostile_argument_types_is_refused(tmp_path, args):
    pid = storage_pid("FloatStorage", "0", 4, True)
    args = tuple(pid if a == "P" else a for a in args)
    obj = odict({"w": call(glob("torch._utils", "_rebuild_tensor_v2"), *args)})
    path = write(tmp_path, "args.pth", legacy_bytes(dumps(obj), ["0"], [(4, b"\0" * 16)]))
    assert_refused(path)


def test_rebuild_parameter_only_wraps_a_tensor(tmp_path):
    for data in ("x", 5, None, call(glob("collections", "OrderedDict"))):
        obj = odict({"w": call(glob("torch._utils", "_rebuild_parameter"), data, False,
                               call(glob("collections", "OrderedDict")))})
        path = write(tmp_path, "param.pth", legacy_bytes(dumps(obj), [], []))
        assert_refused(path, "_rebuild_parameter")


# --------------------------------------------------------------------------------------------
# 2. Tensor metadata is validated before any view is made


def one_tensor_file(tmp_path, name, *, offset=0, size=(4,), stride=(1,), numel=4, count=None,
                    raw=None, storage="FloatStorage", view=None, legacy=True):
    raw = np.arange(numel, dtype=np.float32).tobytes() if raw is None else raw
    obj = odict({"w": tensor(storage_pid(storage, "0", numel, legacy, view), offset, size, stride)})
    if legacy:
        data = legacy_bytes(dumps(obj), ["0"], [(numel if count is None else count, raw)])
    else:
        data = zip_bytes(dumps(obj), {"0": raw})
    return write(tmp_path, name, data)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("offset,size,stride", [
    (0, (5,), (1,)),              # one element past the end
    (1, (4,), (1,)),              # offset pushes the last element out
    (4, (1,), (1,)),              # offset at the end
    (0, (2, 2), (3, 1)),          # strides reach element 4
    (0, (2,), (2**40,)),          # a stride far outside
    (2**40, (1,), (1,)),          # an offset far outside
    (0, (3,), (2,)),
])
def test_forged_strides_cannot_read_outside_storage(tmp_path, legacy, offset, size, stride):
    path = one_tensor_file(tmp_path, "oob.pth", offset=offset, size=size, stride=stride,
                           legacy=legacy)
    assert_refused(path, "storage '0'")


@pytest.mark.parametrize("offset,size,stride", [
    (-1, (4,), (1,)), (0, (-1,), (1,)), (0, (4,), (-1,)), (0, (2, -2), (1, 1)),
])
def test_negative_offsets_sizes_and_strides_are_refused(tmp_path, offset, size, stride):
    assert_refused(one_tensor_file(tmp_path, "neg.pth", offset=offset, size=size, stride=stride))


def test_legacy_storage_view_bounds_the_tensor(tmp_path):
    # the view is elements [1, 3) of a 4-element storage: 2 elements, not 3
    assert_refused(one_tensor_file(tmp_path, "view.pth", size=(3,), view=("v", 1, 2)),
                   "storage '0'")
    state = read_pth(one_tensor_file(tmp_path, "view_ok.pth", size=(2,), view=("v", 1, 2)))
    np.testing.assert_array_equal(state["w"], [1.0, 2.0])


def test_valid_strided_views_still_load(tmp_path):
    # last element exactly at the end, a transposed view, an expanded (stride-0) tensor, empty
    cases = {((2, 2), (1, 2), 0): [[0, 2], [1, 3]], ((3,), (1,), 1): [1, 2, 3],
             ((2, 3), (0, 1), 1): [[1, 2, 3], [1, 2, 3]], ((0, 5), (5, 1), 0): np.zeros((0, 5))}
    for (size, stride, offset), expected in cases.items():
        for legacy in (True, False):
            path = one_tensor_file(tmp_path, "ok.pth", offset=offset, size=size, stride=stride,
                                   legacy=legacy)
            np.testing.assert_array_equal(read_pth(path)["w"], np.asarray(expected, np.float32))


@pytest.mark.parametrize("size,stride", [
    ((10**6, 10**6), (0, 0)),        # 10**12 elements from a 4-element storage
    ((2**20, 2**20, 2), (0, 0, 1)),  # 2**41 elements: over the element limit
    ((0, 2**39, 2**39), (1, 1, 1)),  # empty, but numpy could not even describe it
    ((2**15, 2**15), (0, 1)),        # 2**30 elements (4 GiB): over this file's allocation limit
])
def test_forged_sizes_cannot_allocate_beyond_the_limits(worker, sandbox, size, stride):
    obj = odict({"w": tensor(storage_pid("FloatStorage", "0", 2**15, True), 0, size, stride)})
    data = legacy_bytes(dumps(obj), ["0"], [(2**15, b"\0" * 2**17)])
    report = load_in_worker(worker, sandbox, "sizes.pth", data, must_fail=True)
    assert "elements" in report["message"] or "allocation limit" in report["message"], report


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("storage", ["FooStorage", "Storage", "UntypedStorage", "QInt8Storage",
                                     "ComplexFloatStorage"])
def test_unknown_storage_types_are_refused(tmp_path, legacy, storage):
    assert_refused(one_tensor_file(tmp_path, "dtype.pth", storage=storage, legacy=legacy),
                   "refusing to unpickle global")


def test_storage_count_larger_than_file_is_refused(worker, sandbox):
    # the pickle and the count agree on 2**38 elements (1 TiB): refused before any read
    obj = odict({"w": tensor(storage_pid("FloatStorage", "0", 2**38, True), 0, (4,), (1,))})
    data = legacy_bytes(dumps(obj), ["0"], [(2**38, b"\0" * 16)])
    report = load_in_worker(worker, sandbox, "count.pth", data, must_fail=True)
    assert "storage '0' needs 1099511627776 bytes but only 16 are left" in report["message"]


@pytest.mark.parametrize("count", [-1, -(2**63), 3, 5, 2**62])
def test_storage_count_must_match_the_pickle(tmp_path, count):
    assert_refused(one_tensor_file(tmp_path, "count.pth", count=count), "storage '0'")


def test_truncated_storage_is_refused(tmp_path):
    path = one_tensor_file(tmp_path, "cut.pth", raw=b"\0" * 15)
    assert_refused(path, "storage '0'")


@pytest.mark.parametrize("keys,match", [
    ([], "missing from the file"),
    (["0", "1"], "never referenced"),
    (["0", "0"], "twice"),
    ("0", "not a list"),
    ([0], "not a list of strings"),
])
def test_storage_key_list_must_match_the_references(tmp_path, keys, match):
    obj = odict({"w": tensor(storage_pid("FloatStorage", "0", 4, True), 0, (4,), (1,))})
    data = legacy_bytes(dumps(obj), [], [(4, b"\0" * 16)], keys_pickle=dumps(keys))
    assert_refused(write(tmp_path, "keys.pth", data), match)


@pytest.mark.parametrize("nbytes", [0, 15, 17, 432])
def test_zip_member_size_must_match_dtype_itemsize(tmp_path, nbytes):
    path = one_tensor_file(tmp_path, "member.pth", raw=b"\0" * nbytes, legacy=False)
    assert_refused(path, "archive/data/0")


def test_zip_missing_storage_member_is_refused(tmp_path):
    obj = odict({"w": tensor(storage_pid("FloatStorage", "0", 4, False), 0, (4,), (1,))})
    assert_refused(write(tmp_path, "missing.pth", zip_bytes(dumps(obj), {})), "is missing")


def test_zip_bomb_is_refused_before_decompressing(worker, sandbox):
    """80 MiB of deflated zeros (80 KiB on disk) exceed 8 x file size + 64 MiB: never inflated."""
    numel = 20 << 20
    obj = odict({"w": tensor(storage_pid("FloatStorage", "0", numel, False), 0, (numel,), (1,))})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", dumps(obj))
        with archive.open("archive/data/0", "w") as member:
            for _ in range(80):
                member.write(bytes(1 << 20))
    assert len(buffer.getvalue()) < 1 << 20
    report = load_in_worker(worker, sandbox, "bomb.pth", buffer.getvalue(), must_fail=True)
    assert "allocation limit" in report["message"], report


def test_zip_forged_declared_size_is_refused_before_reading(tmp_path):
    data = bytearray(zip_bytes(dumps(odict({})), {}))
    # declare 2 GiB for data.pkl in the central directory
    central = data.index(b"PK\x01\x02")
    data[central + 24:central + 28] = struct.pack("<I", 2**31)
    assert_refused(write(tmp_path, "declared.pth", bytes(data)), "declares 2147483648 bytes")


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_unbounded_compression_methods_are_refused(tmp_path, compression):
    data = zip_bytes(dumps(odict({})), {}, compression=compression)
    assert_refused(write(tmp_path, "method.pth", data), "compression method")


@pytest.mark.parametrize("extra,match", [
    ([("../evil", b"x")], "unsafe name"),
    ([("/abs/path", b"x")], "unsafe name"),
    ([("archive\\data\\0", b"x")], "unsafe name"),
    ([("archive/./x", b"x")], "unsafe name"),
    ([("other/data.pkl", b"x")], "2 data.pkl"),
])
def test_zip_member_names_must_be_plain_and_single(tmp_path, extra, match):
    data = zip_bytes(dumps(odict({})), {}, extra=extra)
    assert_refused(write(tmp_path, "names.pth", data), match)


def test_zip_duplicate_data_pkl_is_refused(tmp_path):
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = zip_bytes(dumps(odict({})), {}, extra=[("archive/data.pkl", dumps(["evil"]))])
    assert_refused(write(tmp_path, "dup.pth", data), "twice")


def test_zip_big_endian_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", dumps(odict({})))
        archive.writestr("archive/byteorder", "big")
    assert_refused(write(tmp_path, "big.pth", buffer.getvalue()), "big-endian")


# --------------------------------------------------------------------------------------------
# 3. Every error names the file; the CLI prints one line


def test_pth_error_is_a_value_error():
    assert issubclass(PthError, ValueError)


def test_errors_name_the_file_for_every_kind_of_failure(tmp_path):
    good = legacy_from_arrays(SMALL)
    for name, data in {"empty": b"", "text": b"hello\n", "zip_junk": b"PK\x03\x04junk",
                       "cut": good[:len(good) // 2], "pickle_only": dumps([1, 2])}.items():
        assert_refused(write(tmp_path, f"{name}.pth", data))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_pth(tmp_path / "missing.pth")
    with pytest.raises(PthError, match=re.escape(str(tmp_path / "list.pth"))):
        read_state_dict(write(tmp_path, "list.pth", legacy_bytes(dumps([1]), [], [])))


def test_cli_convert_prints_one_line_for_a_bad_pth(tmp_path, capsys):
    bad = write(tmp_path, "bad.pth", legacy_bytes(b"", [], [], magic=dumps(
        call(glob("posix", "system"), f"touch {tmp_path / 'MARKER'}"))))
    code = cli.main(["convert", str(bad), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(bad) in err and "refusing to unpickle" in err, err
    assert not (tmp_path / "MARKER").exists()


# --------------------------------------------------------------------------------------------
# 4. Valid files: same behaviour as before


def test_assembled_files_load_like_write_legacy_pth(tmp_path):
    write_legacy_pth(tmp_path / "w.pth", SMALL)
    for name, data in {"legacy": legacy_from_arrays(SMALL), "zip": zip_from_arrays(SMALL)}.items():
        state = read_state_dict(write(tmp_path, f"{name}.pth", data))
        reference = read_state_dict(tmp_path / "w.pth")
        assert list(state) == list(SMALL) == list(reference)
        for key in SMALL:
            np.testing.assert_array_equal(state[key], SMALL[key])
            np.testing.assert_array_equal(reference[key], SMALL[key])
            assert state[key].dtype == SMALL[key].dtype


def test_bool_storage_bytes_read_as_bool(tmp_path):
    obj = odict({"m": tensor(storage_pid("BoolStorage", "0", 3, True), 0, (3,), (1,))})
    path = write(tmp_path, "bool.pth", legacy_bytes(dumps(obj), ["0"], [(3, b"\x00\x01\x07")]))
    mask = read_pth(path)["m"]
    assert mask.dtype == np.bool_ and mask.tolist() == [False, True, True]
    assert mask.view(np.uint8).tolist() == [0, 1, 1]


# --------------------------------------------------------------------------------------------
# 5. Fuzz: a few hundred mutated and malicious files of both formats

dtypes = st.sampled_from(sorted(OUTPUT_DTYPES))


@st.composite
def small_arrays(draw):
    arrays = collections.OrderedDict()
    for index in range(draw(st.integers(1, 3))):
        dtype = np.dtype(draw(dtypes))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                             max_size=int(np.prod(shape)) * dtype.itemsize))
        array = np.frombuffer(raw, dtype).reshape(shape)
        if dtype.kind == "b":
            array = np.asarray(array.view(np.uint8) != 0)
        arrays[f"t{index}.weight"] = array
    return arrays


@st.composite
def valid_files(draw):
    arrays = draw(small_arrays())
    fmt = draw(st.sampled_from(["write_legacy_pth", "legacy", "zip"]))
    if fmt == "write_legacy_pth":
        with tempfile.TemporaryDirectory() as tmp:
            write_legacy_pth(os.path.join(tmp, "w.pth"), arrays)
            with open(os.path.join(tmp, "w.pth"), "rb") as f:
                data = f.read()
    else:
        data = legacy_from_arrays(arrays) if fmt == "legacy" else zip_from_arrays(arrays)
    return arrays, data


def _fixture_bytes(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


@st.composite
def mutated_files(draw):
    """Byte flips, overwrites with forged int64s, truncations, insertions and deletions."""
    source = draw(st.sampled_from(["valid", "torch_legacy.pth", "torch_zip.pth", "zip_pkl"]))
    if source == "zip_pkl":  # mutate data.pkl and re-zip it, so CRCs pass and the pickle is read
        obj, raws = state_pickle(SMALL, legacy=False)
        obj = draw(byte_mutations(obj))
        return zip_bytes(obj, raws)
    data = draw(valid_files())[1] if source == "valid" else _fixture_bytes(source)
    return draw(byte_mutations(data))


@st.composite
def byte_mutations(draw, data: bytes):
    data = bytearray(data)
    rng = draw(st.randoms(use_true_random=False))  # positions uniform over the file
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "flip", "int64", "truncate", "insert",
                                     "delete"]))
        at = rng.randrange(max(len(data), 1))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "int64":
            value = draw(st.sampled_from([-1, 0, 2**31, 2**32 - 1, 2**40, 2**62, -(2**63)]))
            data[at:at + 8] = struct.pack("<q", value)
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


hostile_ints = st.one_of(
    st.integers(-3, -1), st.sampled_from([2**31, 2**40, 2**40 + 1, 2**63, 10**30]))
hostile_values = st.one_of(hostile_ints, st.sampled_from([1.0, "1", None, True, b"1", (1,), [1]]))


@st.composite
def mostly(draw, valid, hostile):
    """A value of ``valid`` about four times in five, else one of ``hostile``."""
    return draw(valid if draw(st.integers(0, 4)) else hostile)


@st.composite
def forged_tensors(draw):
    """One tensor with hostile metadata, and the outcome an independent reading predicts."""
    legacy = draw(st.booleans())
    dtype = np.dtype(draw(dtypes))
    storage = draw(mostly(st.just(STORAGE_NAMES[dtype.str]),
                          st.sampled_from(["FooStorage", "UntypedStorage"])))
    n_store = draw(st.integers(0, 8))
    numel = draw(mostly(st.just(n_store), st.one_of(st.integers(0, 9), hostile_values)))
    count = draw(mostly(st.just(numel), st.one_of(st.integers(-1, 9), hostile_ints)))
    ndim = draw(st.integers(0, 3))
    index = mostly(st.integers(0, 3), hostile_values)
    size = tuple(draw(st.lists(index, min_size=ndim, max_size=ndim)))
    stride = tuple(draw(mostly(st.lists(index, min_size=ndim, max_size=ndim),
                               st.lists(st.integers(0, 3), max_size=3))))
    offset = draw(mostly(st.integers(0, 2), hostile_values))
    raw = draw(st.binary(min_size=n_store * dtype.itemsize, max_size=n_store * dtype.itemsize))
    obj = odict({"w": tensor(storage_pid(storage, "0", numel, legacy), offset, size, stride)})
    if legacy:
        count_bytes = struct.pack("<q", count) if type(count) is int and -2**63 <= count < 2**63 \
            else struct.pack("<q", -1)
        data = legacy_bytes(dumps(obj), ["0"], []) + count_bytes + raw
        count = struct.unpack("<q", count_bytes)[0]
    else:
        data = zip_bytes(dumps(obj), {"0": raw})

    def is_index(v):
        return type(v) is int and 0 <= v <= 2**40

    expected = None  # None: must be refused
    ok = (storage == STORAGE_NAMES[dtype.str] and is_index(numel) and is_index(offset)
          and len(size) == len(stride) and all(map(is_index, size + stride)))
    if ok and legacy:
        ok = count == numel and numel <= n_store  # trailing bytes after the last storage are fine
    elif ok:
        ok = numel == n_store
    if ok:
        bound = int(np.prod([max(n, 1) for n in size], dtype=object))
        elements = int(np.prod(size, dtype=object))
        ok = bound <= 2**40 and elements * dtype.itemsize <= 64 << 20
        if ok and elements:
            ok = offset + sum((n - 1) * s for n, s in zip(size, stride)) < numel
    if ok:
        storage_array = np.frombuffer(raw, dtype)[:numel]
        index = offset + sum(np.indices(size)[k] * s for k, s in enumerate(stride)) \
            if size else np.array(offset)
        expected = storage_array[index] if elements else np.zeros(size, dtype)
        if dtype.kind == "b":
            expected = storage_array.view(np.uint8)[index] != 0 if elements else expected
    return data, expected


@st.composite
def malicious_files(draw):
    """Hostile globals in each pickle position of both formats, and pickle bombs."""
    kind = draw(st.sampled_from(["header", "object", "zip", "bomb"]))
    target = "MARKER"  # relative to the worker's directory; absolute paths too long for shrinking
    payload = draw(st.sampled_from(hostile_calls(target)))
    if kind == "header":
        position = draw(st.sampled_from(["magic", "protocol", "sys_info", "keys_pickle"]))
        obj, raws = state_pickle(SMALL, legacy=True)
        storages = [(SMALL[n].size, raws[str(i)]) for i, n in enumerate(SMALL)]
        return legacy_bytes(obj, list(raws), storages, **{position: dumps(payload)})
    if kind in ("object", "zip"):
        where = draw(st.sampled_from(["top", "value", "tensor_arg", "storage_type", "persid",
                                      "key"]))
        obj = dumps(place_payload(payload, where, legacy=kind == "object"))
        if kind == "object":
            return legacy_bytes(obj, ["0"], [(4, b"\0" * 16)])
        return zip_bytes(obj, {"0": b"\0" * 16})
    bomb = BOMBS[draw(st.sampled_from(sorted(b for b in BOMBS if "deep" not in b
                                             and b != "mark_storm")))]
    ops = pickle.PROTO + b"\x04" + bomb + pickle.STOP
    where = draw(st.sampled_from(["magic", "object", "keys", "zip"]))
    if where == "zip":
        return zip_bytes(ops, {})
    if where == "object":
        return legacy_bytes(ops, [], [])
    return legacy_bytes(dumps(odict({})), [], [], **{"magic" if where == "magic" else
                                                       "keys_pickle": ops})


def _unique(sandbox, prefix):
    _unique.count = getattr(_unique, "count", 0) + 1
    return f"{prefix}{_unique.count}.pth"


@settings(FUZZ, max_examples=60)
@given(case=valid_files())
def test_fuzz_valid_files_load_equal_to_their_arrays(worker, sandbox, case):
    arrays, data = case
    report = load_in_worker(worker, sandbox, _unique(sandbox, "valid"), data)
    assert report["outcome"] == "ok", report
    loaded = arrays_of(report)
    assert list(loaded) == list(arrays)
    for key, array in arrays.items():
        assert loaded[key].dtype == array.dtype and loaded[key].shape == array.shape
        np.testing.assert_array_equal(loaded[key], array)


@settings(FUZZ, max_examples=200)
@given(data=mutated_files())
def test_fuzz_mutated_files_load_or_fail_cleanly(worker, sandbox, data):
    report = load_in_worker(worker, sandbox, _unique(sandbox, "mutated"), data)
    event(f"outcome: {report['outcome']}")


@settings(FUZZ, max_examples=150)
@given(case=forged_tensors())
def test_fuzz_forged_tensor_metadata_never_reads_outside_storage(worker, sandbox, case):
    data, expected = case
    report = load_in_worker(worker, sandbox, _unique(sandbox, "forged"), data,
                            must_fail=expected is None)
    event(f"outcome: {report['outcome']}")
    if expected is not None:
        assert report["outcome"] == "ok", report
        loaded = arrays_of(report)["w"]
        assert loaded.shape == expected.shape and loaded.dtype == expected.dtype
        np.testing.assert_array_equal(loaded, expected)


@settings(FUZZ, max_examples=150)
@given(data=malicious_files())
def test_fuzz_malicious_files_are_refused_and_run_nothing(worker, sandbox, data):
    load_in_worker(worker, sandbox, _unique(sandbox, "malicious"), data, must_fail=True)
