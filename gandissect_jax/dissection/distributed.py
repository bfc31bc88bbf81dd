"""Multi-host dissection: start JAX's distributed runtime, and let process 0 decide and broadcast what it read.

A dissection can run as N cooperating processes (one per host of a TPU pod slice or per node of
a GPU cluster) on JAX's multi-controller runtime. Every process runs the same program over a
global mesh of ``jax.devices()``; each computes the samples of its own devices, and the device
states are reduced exactly across all hosts (:func:`gandissect_jax.dissection.engine.tally`).
**Only process 0 touches the output directory**: it takes the lock, checks the run's identity,
reads and writes checkpoints, and writes ``scores.npz``, ``dissect.json``, the strips and the
report. What it reads there (the identity check's verdict, which layers are finished, a pass's
checkpoint, the quantile plan) it broadcasts to the others with :func:`leader_bytes`, so every
process agrees on what is finished; an error process 0 raises there is raised on every process.
The run ends the same way: every process returns only once process 0 has written the outputs
(a last :func:`leader_json`), and an error of process 0 while writing is raised on every process.
The other processes need no outdir, no shared file system, only the models and data.

With one process (the default) nothing here changes what a dissection does.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

ENV_COORDINATOR = "GANDISSECT_COORDINATOR"
ENV_NUM_PROCESSES = "GANDISSECT_NUM_PROCESSES"
ENV_PROCESS_ID = "GANDISSECT_PROCESS_ID"
# The other processes wait (in the dissection's last collective) while process 0 writes the strips
# and the report alone, then at JAX's shutdown barrier (JAX's default, 300 s, is too short for a
# large run). A process that dies is found by the heartbeat (100 s) long before, so this delays
# nothing when something fails.
SHUTDOWN_TIMEOUT = 6 * 3600


class RemoteError(OSError):
    """An error raised on process 0 while it read or checked the output directory, re-raised on
    the other processes (``kind`` is the original exception's class name)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"process 0: {kind}: {message}")
        self.kind = kind


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> bool:
    """Join JAX's distributed runtime (``jax.distributed.initialize``) before any JAX computation.

    coordinator ("HOST:PORT" of process 0), num_processes, process_id: explicit settings; each
    missing one is read from ``GANDISSECT_COORDINATOR`` / ``GANDISSECT_NUM_PROCESSES`` /
    ``GANDISSECT_PROCESS_ID``. When none is given anywhere and ``auto`` is True,
    ``jax.distributed.initialize()`` runs with no arguments (TPU pods, SLURM, Open MPI: JAX
    detects the cluster). When none is given and ``auto`` is False, nothing happens (one process).
    On CPU the cross-process collectives use gloo. Processes wait up to ``SHUTDOWN_TIMEOUT`` (6 h)
    at exit for process 0 to write the outputs. Returns True when the runtime was joined.
    ValueError naming the setting when only some are given or they are out of range
    (:func:`process_settings`).
    """
    settings = process_settings(coordinator, num_processes, process_id)
    if settings is None:
        if not auto:
            return False
        _cpu_collectives()
        jax.distributed.initialize(shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
        return True
    coordinator, num_processes, process_id = settings
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
    return True


def process_settings(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> tuple[str, int, int] | None:
    """``(coordinator, num_processes, process_id)`` of a multi-host run, each missing one read from
    its environment variable (see :func:`initialize`), or None when none is given anywhere.
    Nothing is started. ValueError naming the setting when only some are given, the coordinator
    is not HOST:PORT with a port in [1, 65535], or the numbers are out of range."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(value is None for value in given.values()):
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(f"multi-host needs --coordinator, --num-processes and --process-id together "
                         f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing {missing}")
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT with a port in [1, 65535], got {coordinator!r}")
    if not (isinstance(num_processes, int) and num_processes >= 1):
        raise ValueError(f"--num-processes must be an integer >= 1, got {num_processes!r}")
    if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
        raise ValueError(f"--process-id must be an integer in [0, {num_processes - 1}], got {process_id!r}")
    return str(coordinator), int(num_processes), int(process_id)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _cpu_collectives() -> None:
    """Cross-process collectives on CPU devices need an implementation (gloo); harmless elsewhere."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # an older or newer jax without the option: its default applies
        pass


def multiprocess() -> bool:
    """True when this program runs as one of several JAX processes."""
    return jax.process_count() > 1


def is_leader() -> bool:
    """True on process 0, the one that reads and writes the output directory."""
    return jax.process_index() == 0


def _broadcast(array: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(array))


def leader_bytes(read: Callable[[], bytes | None]) -> bytes | None:
    """Process 0 runs ``read()`` (bytes or None); every process returns its result.

    An exception raised by ``read`` on process 0 is raised there as it was and on every other
    process as a ValueError (for ValueErrors, e.g. an identity mismatch or a busy outdir), a
    KeyboardInterrupt (Ctrl-C on process 0) or a :class:`RemoteError`, all saying "process 0
    ...", so that no process waits for one that failed. With one process this is ``read()``.
    """
    if not multiprocess():
        return read()
    status, payload, error = 0, b"", None
    if is_leader():
        try:
            value = read()
            status, payload = (1, b"") if value is None else (2, bytes(value))
        except BaseException as err:  # told to every process, then raised here as it was (Ctrl-C too:
            error = err              # the others must not wait for process 0 in this collective)
            status, payload = 3, json.dumps([type(err).__name__, str(err)]).encode()
    header = _broadcast(np.array([status, len(payload)], np.int64))
    status, size = int(header[0]), int(header[1])
    body = np.frombuffer(payload, np.uint8) if is_leader() else np.zeros(size, np.uint8)
    if size:
        body = _broadcast(body)
    if error is not None:
        raise error
    if status == 3:
        kind, message = json.loads(body.tobytes().decode())
        if kind in ("ValueError", "IdentityMismatch", "MemoryBudgetError"):
            raise ValueError(f"process 0: {message}")
        if kind in ("KeyboardInterrupt", "Interrupted", "RunInterrupted"):
            raise KeyboardInterrupt(f"process 0 was interrupted: {message}")
        raise RemoteError(kind, message)
    return None if status == 1 else body.tobytes()


def leader_json(decide: Callable[[], Any]) -> Any:
    """Process 0 runs ``decide()`` (a JSON-able value); every process returns it (errors as :func:`leader_bytes`)."""
    data = leader_bytes(lambda: json.dumps(decide()).encode())
    return json.loads(data.decode())


def leader_file(path: str | None) -> bytes | None:
    """The bytes of ``path`` as process 0 reads them (None when process 0 has no such file)."""

    def read():
        if not path or not os.path.exists(path):
            return None
        with open(path, "rb") as handle:
            return handle.read()

    return leader_bytes(read)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is True on any process (every process must call it)."""
    if not multiprocess():
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))).any())


@contextlib.contextmanager
def fail_together(what: str = "before the passes"):
    """Multi-host: a block every process runs before its next collective. When it raises on one
    process, the others raise a ValueError saying so instead of waiting for that process in the
    next collective (JAX's shutdown barrier would hold a failed process for hours). No-op with
    one process. The block itself must not call collectives."""
    if not multiprocess():
        yield
        return
    try:
        yield
    except Exception:
        any_process(True)
        raise
    if any_process(False):
        raise ValueError(f"another process of this run stopped {what} (its error says why); fix that and "
                         f"relaunch every process")


def check_same_inputs(identity: Mapping[str, Any], may_differ: Sequence[tuple[str, ...]] = ()) -> None:
    """Every process of a run must be given the same inputs and settings (the same command).

    identity: a JSON-able run identity (data content and parameter digests, samples, seed,
    settings); ``may_differ``: key paths left out of the comparison (the names or paths a model
    was given by may differ between hosts when its parameter digest is compared). Process 0's
    identity is broadcast and compared on every process; ValueError on every process, naming
    what differs on the processes where it differs, before any work. No-op with one process.
    """
    if not multiprocess():
        return
    from .resume import describe_change, json_normalize

    def comparable(value):
        value = json_normalize(value)
        for path in may_differ:
            node = value
            for key in path[:-1]:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(path[-1], None)
        return value

    mine = comparable(identity)
    leader = comparable(leader_json(lambda: json_normalize(identity)))
    differs = leader != mine
    if any_process(differs):
        if differs:
            raise ValueError(f"this process was given other inputs or settings than process 0 "
                             f"({describe_change(leader, mine)}; 'was' is process 0's, 'now' this process's); run "
                             f"the same command, with the same models and data, on every process")
        raise ValueError("another process of this run was given other inputs or settings than process 0 (its "
                         "error says what differs); run the same command, with the same models and data, on every "
                         "process")


def agree(stop: bool, due: bool) -> tuple[bool, bool]:
    """(``stop`` on any process, process 0's ``due``), in one exchange (every process must call it)."""
    if not multiprocess():
        return bool(stop), bool(due)
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.array([int(bool(stop)), int(bool(due))], np.int32)))
    flags = flags.reshape(-1, 2)
    return bool(flags[:, 0].any()), bool(flags[0, 1])


def to_host(array: jax.Array) -> np.ndarray:
    """A numpy copy of the whole of ``array``, also when its shards lie on other processes (every
    process must call it then)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


__all__ = ["initialize", "multiprocess", "is_leader", "leader_bytes", "leader_json", "leader_file", "any_process",
           "agree", "to_host", "RemoteError", "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID"]
