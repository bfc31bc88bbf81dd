"""The engine: ``tally`` streams a source through any jittable computation into streaming statistics, sharded over local devices.

``tally(compute, source, statistics)`` reads samples 0 .. N - 1 of ``source`` in batches, splits
each batch over a 1-D mesh of local devices, and on every device runs, in one jitted
``shard_map`` step, ``outputs = compute(params, batch)`` and
``state[name] = statistics[name].update(state[name], outputs[name], batch["valid"])``. Nothing is
communicated between devices while the pass runs: each accumulates its own state. Before any
device state could overflow (``capacity``, decided on the host from sample counts alone) and at
the end, device states are drained into host states with ``merge``, which is exact and
order-independent, so the results are identical for any device count and batch size. With
``checkpoint_dir``, the host states are saved every ``checkpoint_every`` seconds and a rerun
continues from the last save. Ctrl-C (SIGINT) stops the pass at the end of the running batch:
the states are saved (with ``checkpoint_dir``) and :class:`Interrupted` says where a rerun
continues; a second Ctrl-C stops at once. With several processes (multi-host), the mesh spans the
devices of every host and each drain sends every device's state to every host (:mod:`.distributed`).

This is davidbau/dissect's ``tally`` in JAX form, with optax's ``init``/``update`` composition
for the statistics (:mod:`.statistics`, :mod:`.quantiles`, :mod:`.moments`, or your own).
"""

from __future__ import annotations

import contextlib
import functools
import io
import numbers
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import distributed, resume
from .config import MAX_BATCH, MAX_CHECKPOINT_SECONDS
from .drains import AXIS, drain, drain_some, init_states
from .statistics import StreamingStatistic

CHECKPOINT_NAME = "tally.npz"
IN_FLIGHT = 4  # steps the host may queue ahead of the devices


class Source(Protocol):
    """What :func:`tally` reads: a fixed number of samples, fetched by sample number.

    ``fetch(indices, sharding)`` returns a dict of arrays whose leading axis is ``len(indices)``,
    placed with ``sharding`` (split over the mesh along that axis). Numbers past the end may be
    asked for (padding of the last batch); return any sample for them, they are masked out.
    ``identity()`` returns a JSON-able description of the data (for resume checks).

    Optional: ``micro_batch`` (int): :func:`tally` makes every device's share of a batch a
    multiple of it (:func:`per_device_batch`), for sources that compute samples in fixed-size
    chunks; ``batch_invariant`` (bool): the source's arrays for a sample are the same bits
    whatever batch and device it is fetched in, so that, with the exact merges of the
    statistics, a tally's results do not depend on the batch size or the device count.
    """

    num_samples: int

    def fetch(self, indices: np.ndarray, sharding) -> dict[str, jax.Array]: ...

    def identity(self) -> dict: ...


class PassProgress(Protocol):
    """What ``tally(progress=...)`` may also be given instead of True/False: a display that makes
    the bar of each pass (e.g. :class:`gandissect_jax.dissection.progress.RunProgress`, which
    also keeps an overall bar over all passes). ``bar(desc, total, initial)`` returns an object
    with ``update(n)`` and ``close()``, as a tqdm bar."""

    def bar(self, desc: str, total: int, initial: int) -> Any: ...


class Interrupted(KeyboardInterrupt):
    """A pass stopped by Ctrl-C (SIGINT) at a batch boundary.

    Attributes: ``stage`` (the pass's name), ``samples_done`` and ``num_samples`` (of the pass),
    ``checkpoint`` (the file holding the state up to ``samples_done``, or None when the tally
    had no ``checkpoint_dir`` and nothing was saved). ``str()`` is a one-line summary saying
    where a rerun continues.
    """

    def __init__(self, stage: str, samples_done: int, num_samples: int, checkpoint: str | None):
        super().__init__(stage, samples_done, num_samples, checkpoint)
        self.stage, self.samples_done, self.num_samples, self.checkpoint = stage, samples_done, num_samples, checkpoint

    def __str__(self) -> str:
        where = f"{self.stage} stopped at sample {self.samples_done:,} of {self.num_samples:,}"
        if self.checkpoint is None:
            return f"interrupted: {where}; nothing was saved (no checkpoint directory)"
        return (f"interrupted: {where}; progress saved in {os.path.dirname(self.checkpoint)}: "
                f"rerun the same command to resume from there")


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """While the block runs, Ctrl-C (SIGINT) only sets a flag, read by the returned function; a
    second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread, or when SIGINT is
    not handled by Python's default handler, nothing changes (the flag stays False)."""
    requested: list[bool] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh (axis ``"devices"``) over ``devices`` (default: ``jax.devices()``, every device of
    every process: the local devices when one process runs, the global mesh of a multi-host run)."""
    devices = list(devices) if devices is not None else jax.devices()
    if not devices:
        raise ValueError("no devices")
    return Mesh(np.array(devices), (AXIS,))


@functools.lru_cache(maxsize=64)
def _step(compute: Callable, names: tuple[str, ...], statistics: tuple[StreamingStatistic, ...], mesh: Mesh):
    """jit(shard_map(...)) of one batch for every statistic; states carry a leading device axis."""

    def body(states, params, batch):
        local = jax.tree_util.tree_map(lambda x: x[0], states)
        outputs = compute(params, batch)
        valid = batch["valid"]
        updated = {name: stat.update(local[name], outputs[name], valid) for name, stat in zip(names, statistics)}
        return jax.tree_util.tree_map(lambda x: x[None], updated)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P(), P(AXIS)), out_specs=P(AXIS), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))


def per_device_batch(batch_size: int, devices: int, micro_batch: int | None = None) -> int:
    """Samples per device and step: ``batch_size`` split over ``devices``, rounded up to a multiple of
    the source's ``micro_batch`` (if any), so every device's share is whole micro-batches and, as
    batches start at multiples of the global batch, every micro-batch starts at a multiple of it."""
    per_device = -(-int(batch_size) // int(devices))
    step = int(micro_batch or 1)
    return -(-per_device // step) * step


def _signature(statistics: Mapping[str, StreamingStatistic], num_samples: int) -> dict:
    shapes = {name: [[list(x.shape), str(x.dtype)] for x in jax.tree_util.tree_leaves(jax.eval_shape(stat.init))]
              for name, stat in statistics.items()}
    return {"statistics": list(statistics), "shapes": shapes, "num_samples": int(num_samples)}


def _capacities(compute, statistics, params, batch, per_device: int) -> dict[str, int | None]:
    """{name: how many samples per device the statistic can take between drains (None: no limit)},
    from shapes only."""
    local = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((per_device,) + tuple(x.shape[1:]), x.dtype), batch)
    outputs = jax.eval_shape(compute, params, local)
    missing = [name for name in statistics if name not in outputs]
    if missing:
        raise ValueError(f"compute returned no inputs for statistic(s) {missing}; it returned {sorted(outputs)}")
    limits = {}
    for name, stat in statistics.items():
        value = stat.capacity(outputs[name]) if stat.capacity is not None else None
        limits[name] = None if value is None else max(1, int(value))
    return limits


class CheckpointMismatch(resume.ProgressFileError):
    """A pass checkpoint was written by a different tally (other statistics, shapes or number of
    samples). Not bad input: a caller must not discard the run's other progress because of it."""


def tally(compute: Callable[[Any, dict], Mapping[str, Any]], source: Source,
          statistics: Mapping[str, StreamingStatistic] | StreamingStatistic, *, params: Any = None,
          checkpoint_dir: str | None = None, mesh: Mesh | None = None, batch_size: int = 32,
          checkpoint_every: float = 60.0, progress: bool | PassProgress = True, desc: str = "tally",
          final_checkpoint: bool = True) -> Any:
    """Stream every sample of ``source`` once through ``compute`` into ``statistics``; return their results.

    compute: jittable ``compute(params, batch) -> {name: inputs}`` run on each device's shard of
      a batch: ``batch`` is the source's dict for those samples plus ``"index"`` (int32 (n,)
      sample numbers) and ``"valid"`` (bool (n,), False for the padding of the last batch).
      ``params`` are passed explicitly (replicated on every device), never captured.
    statistics: ``{name: StreamingStatistic}``; statistic ``name`` consumes ``outputs[name]``.
      A single statistic may be given instead: ``compute`` then returns its inputs directly and
      ``tally`` returns its result alone.
    checkpoint_dir: where to save the host states (``tally.npz``) every ``checkpoint_every``
      seconds; a rerun with the same statistics and source size continues from there (a
      finished pass is not run again). ValueError when the checkpoint was written by a different
      tally. mesh: a 1-D mesh (:func:`make_mesh`; default: ``jax.devices()``). In a multi-host run
      (:mod:`.distributed`) every process calls ``tally`` alike over the global mesh: each computes
      its own devices' samples, every device's state reaches every host exactly at each drain,
      and only process 0 reads and writes ``checkpoint_dir`` (what it reads, it broadcasts).
    batch_size: samples per step over all devices (rounded up to a multiple of the device count,
      and of the device count times the source's ``micro_batch`` when it has one).
    progress: show a tqdm bar named ``desc`` (True), nothing (False), or a :class:`PassProgress`.
    final_checkpoint: also save the finished pass's states (so a rerun returns them without
      reading the data again). False when the caller keeps what it needs of the results itself
      (e.g. the dissection's quantile plan): the finished pass then writes nothing more, and a
      rerun continues from the last periodic save, if any (Ctrl-C during the last batch still saves).
    A statistic whose ``capacity`` is reached is drained alone (e.g. a buffer of images), the
    others when theirs is, and all of them at a save and at the end.

    Returns ``{name: statistics[name].finalize(state)}`` (or the single result). Results are
    identical for any device count and batch size: integer states merge exactly, top-k merges
    by (value, sample number), and :mod:`.moments` folds float partials in sample order.
    ValueError when a batch could overflow a statistic between drains (use a smaller batch).
    :class:`Interrupted` (a KeyboardInterrupt) after Ctrl-C, once the states up to the last
    finished batch are saved (with ``checkpoint_dir``).
    """
    single = isinstance(statistics, StreamingStatistic)
    if single:
        compute, statistics = _single(compute), {"result": statistics}
    statistics = dict(statistics)
    if not statistics:
        raise ValueError("no statistics to tally")
    if not (isinstance(batch_size, numbers.Integral) and 1 <= batch_size <= MAX_BATCH):
        raise ValueError(f"batch_size must be an integer in [1, {MAX_BATCH}], got {batch_size!r}")
    if not (isinstance(checkpoint_every, numbers.Real) and 0 <= float(checkpoint_every) <= MAX_CHECKPOINT_SECONDS):
        raise ValueError(f"checkpoint_every must be a number of seconds in [0, {MAX_CHECKPOINT_SECONDS:g}], "
                         f"got {checkpoint_every!r}")
    total = int(source.num_samples)
    if total < 1:
        raise ValueError("the source has no samples")
    mesh = mesh if mesh is not None else make_mesh()
    devices = mesh.devices.size
    per_device = per_device_batch(batch_size, devices, getattr(source, "micro_batch", None))
    global_batch = per_device * devices
    sharding = NamedSharding(mesh, P(AXIS))
    names, stats = tuple(statistics), tuple(statistics.values())
    step, init = _step(compute, names, stats, mesh), init_states(names, stats, mesh)
    host = {name: jax.device_get(stat.init()) for name, stat in statistics.items()}
    start = 0
    signature = _signature(statistics, total)
    checkpoint = os.path.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir else None
    multi = distributed.multiprocess()
    if multi:  # process 0 reads its checkpoint (if any) and every process resumes from it
        data = distributed.leader_file(checkpoint)
        if data is not None:
            if resume.checkpoint_meta(io.BytesIO(data)).get("signature") != resume.json_normalize(signature):
                raise CheckpointMismatch(f"checkpoint {checkpoint} was written by a different tally (other statistics, "
                                 f"shapes or number of samples); remove {checkpoint_dir} or use another "
                                 f"checkpoint_dir")
            host, meta = resume.load_checkpoint(io.BytesIO(data), host)
            start = int(meta["samples_done"])
        elif checkpoint_dir:
            os.makedirs(checkpoint_dir, exist_ok=True)
    elif checkpoint and os.path.exists(checkpoint):
        if resume.checkpoint_meta(checkpoint).get("signature") != resume.json_normalize(signature):
            raise CheckpointMismatch(f"checkpoint {checkpoint} was written by a different tally (other statistics, shapes "
                             f"or number of samples); remove {checkpoint_dir} or use another checkpoint_dir")
        host, meta = resume.load_checkpoint(checkpoint, host)
        start = int(meta["samples_done"])
    elif checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
    replicated = jax.device_put(params, NamedSharding(mesh, P()))

    if hasattr(progress, "bar"):
        bar = progress.bar(desc, total, start)
    else:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=desc, unit="sample", disable=not progress, leave=False)
    try:
        with deferred_interrupt() as stop_requested:
            states = init() if start < total else None
            limits = None
            since_drain = {name: 0 for name in statistics}
            steps_run = 0
            last_save = time.monotonic()
            position = start
            while position < total:
                indices = np.arange(position, position + global_batch)
                valid = indices < total
                batch = dict(source.fetch(indices, sharding))
                batch["index"] = jax.device_put(indices.astype(np.int32), sharding)
                batch["valid"] = jax.device_put(valid, sharding)
                if limits is None:
                    limits = _capacities(compute, statistics, replicated, batch, per_device)
                    small = {name: limit for name, limit in limits.items() if limit is not None and per_device > limit}
                    if small:
                        which, limit = min(small.items(), key=lambda item: item[1])
                        raise ValueError(f"a batch of {per_device} samples per device could overflow statistic "
                                         f"{which!r} between drains; use a batch size of at most {limit * devices}")
                # At most IN_FLIGHT steps queued: the host fetches ahead while the devices work,
                # but queued batches cannot pile up in memory, progress counts (nearly) finished
                # steps, and Ctrl-C stops within a few steps. (A wait, not a transfer.)
                steps_run += 1
                if steps_run % IN_FLIGHT == 0:
                    jax.block_until_ready(states)
                states = step(states, replicated, batch)
                position = min(total, position + global_batch)
                for name in since_drain:
                    since_drain[name] += per_device
                bar.update(int(valid.sum()))
                # several processes: every IN_FLIGHT steps they agree to stop (Ctrl-C on any) and to
                # drain and save (a checkpoint due by process 0's clock)
                if multi:
                    stopping = must_save = False
                    if steps_run % IN_FLIGHT == 0 and position < total:
                        due = checkpoint is not None and time.monotonic() - last_save >= checkpoint_every
                        stopping, must_save = distributed.agree(stop_requested(), due)
                        must_save = must_save or stopping
                else:
                    stopping = stop_requested() and position < total
                    must_save = checkpoint is not None and position < total and (
                        stopping or time.monotonic() - last_save >= checkpoint_every)
                full = [name for name, limit in limits.items()  # (after the last step: the drain below)
                        if must_save or (position < total and limit is not None
                                         and since_drain[name] + per_device > limit)]
                if full:
                    states = drain_some(statistics, full, host, states, mesh)
                    for name in full:
                        since_drain[name] = 0
                    if must_save and checkpoint is not None:
                        _save(checkpoint, host, signature, position, bar)
                        last_save = time.monotonic()
                if stopping:
                    raise Interrupted(desc, position, total, checkpoint)
            if states is not None:
                host = drain(statistics, host, states, mesh)
                del states
            # Ctrl-C during the last batch: the pass is complete and saved
            stopped = distributed.any_process(stop_requested()) if multi else stop_requested()
            if checkpoint and start < total and (final_checkpoint or stopped):
                _save(checkpoint, host, signature, total, bar)
            if stopped:
                raise Interrupted(desc, total, total, checkpoint)
    finally:
        bar.close()
    results = {name: stat.finalize(host[name]) for name, stat in statistics.items()}
    return results["result"] if single else results


def _save(path: str, host: dict, signature: dict, samples_done: int, bar=None) -> None:
    resume.save_checkpoint(path, host, {"signature": signature, "samples_done": int(samples_done)})
    saved = getattr(bar, "saved", None)  # a progress bar that follows what is on disk (interruption.py)
    if saved is not None:
        saved(int(samples_done))


@functools.lru_cache(maxsize=64)
def _single(compute: Callable) -> Callable:
    def wrapped(params, batch):
        return {"result": compute(params, batch)}

    return wrapped


__all__ = ["tally", "make_mesh", "per_device_batch", "Source", "PassProgress", "Interrupted", "deferred_interrupt",
           "AXIS"]
