"""Spreading ACE over every device of every process: whole batches per device for the corpus search and the curves, micro-batches per device for the fit, with the bits of one device (the fit: of any 2 or more).

ACE's work is per sample: the corpus search segments ``search_size`` generated images (and as
many again with a unit vector inserted at each probed location), the ablation curves segment
every sample once per count, and a fit step sums per-sample terms of the objective and their
gradients. This module spreads that work over a 1-D mesh of ``jax.devices()`` (every device of
every process of a multi-host run, :mod:`gandissect_jax.dissection.distributed`):

- :func:`map_batches` gives each device one whole batch per call and gathers the per-batch
  outputs on every process;
- the fit (:func:`gandissect_jax.ace.fit.ace_step`) gives each device whole micro-batches of a
  step, and all-gathers their per-micro-batch sums (objective, gradient) before adding them up in
  an order fixed by the number of micro-batches.

Either way every batch or micro-batch is computed by the same per-device program at the same
shape whatever the number of devices, and the cross-device sums are taken in a fixed order.
Shown on CPU for 1, 2, 3 and 4 devices of one process and 2 processes of 2 devices. The
corpus search and the curves (forward passes) return the bits of a run on one device on any mesh.
The fit returns the same bits on any mesh of 2 or more devices, of one process or many; on a
single device XLA compiles the unpartitioned step differently (the generator's backward pass) and
alpha agrees to float32 rounding (1.5e-8 measured; ``tests/test_ace_sharded.py``,
``tests/test_ace_multihost.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gandissect_jax.dissection import distributed

AXIS = "devices"


def ace_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh (axis ``"devices"``) over ``devices``, default ``jax.devices()``: every device
    of every process."""
    return Mesh(np.array(list(jax.devices() if devices is None else devices)), (AXIS,))


def global_array(array: np.ndarray, mesh: Mesh, spec: P = P()) -> jax.Array:
    """``array`` (the same numpy array on every process) as a global array of ``mesh`` laid out
    by ``spec`` (default: replicated); each process places only its own devices' shards."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec), lambda index: array[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` (numpy or jax arrays, the same values on every process) replicated
    on every device of ``mesh``."""
    return jax.tree_util.tree_map(lambda leaf: global_array(np.asarray(leaf), mesh), tree)


def stacked(tree: Any, batch_size: int) -> Any:
    """Every leaf (N, ...) of ``tree`` as batches (ceil(N / batch_size), batch_size, ...), the last
    zero-padded (so every batch has one shape and one compiled program), for :func:`map_batches`."""
    def stack(leaf):
        leaf = np.asarray(leaf)
        batches = -(-len(leaf) // batch_size)
        padded = np.zeros((batches * batch_size, *leaf.shape[1:]), leaf.dtype)
        padded[: len(leaf)] = leaf
        return padded.reshape(batches, batch_size, *leaf.shape[1:])

    return jax.tree_util.tree_map(stack, tree)


def unstacked(tree: Any, count: int) -> Any:
    """The inverse of :func:`stacked` on outputs: leaves (nb, B, ...) as (count, ...)."""
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf).reshape(-1, *leaf.shape[2:])[:count], tree)


def progress_bar(total: int, show: bool, desc: str):
    """A tqdm bar of ``total`` batches on process 0 when ``show``, else None (for :func:`map_batches`)."""
    if not show or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch")


@functools.lru_cache(maxsize=64)
def _batch_program(fn: Callable, static: tuple, mesh: Mesh) -> Callable:
    """jit(shard_map): device d computes ``fn(consts, *batch_d, **static)`` of its own batch."""

    def body(consts, *batches):
        out = fn(consts, *jax.tree_util.tree_map(lambda b: b[0], batches), **dict(static))
        return jax.tree_util.tree_map(lambda leaf: leaf[None], out)

    def program(consts, *batches):
        specs = (P(),) + (P(AXIS),) * len(batches)
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False)(consts, *batches)

    return jax.jit(program)


def map_batches(fn: Callable, batches: Sequence[np.ndarray], consts: Any, *, mesh: Mesh | None = None,
                static: tuple = (), progress: Any = None) -> Any:
    """``fn(consts, *(b[i] for b in batches), **dict(static))`` of every batch ``i``, spread over
    the devices of ``mesh``, gathered on every process.

    Args:
      fn: a module-level jittable function of ``consts`` (a pytree of arrays, the same for every
        batch: parameters, inserted values) and one batch of each array; returns a pytree of
        arrays. The same ``fn`` and ``static`` reuse the compiled program.
      batches: numpy arrays (or pytrees of them, e.g. a generator's side inputs, possibly empty)
        (nb, B, ...) with a leading batch-number axis, the same on every process (e.g. z stacked
        in batches, the last one zero-padded).
      consts: replicated on every device (numpy or jax arrays).
      mesh: default :func:`ace_mesh` (all devices of all processes).
      static: ``(name, value)`` pairs of hashable static keyword arguments of ``fn``.
      progress: None or a tqdm-like bar, ``update``-d by the number of batches finished.

    Returns:
      The pytree ``fn`` returns, each leaf a numpy array with a leading axis of nb (entry i is
      batch i's output). Each call gives every device one whole batch at the shape of one batch,
      so the outputs are bit-identical for any number of devices and processes. Every process of
      a multi-host run must call it with the same arguments.

    Raises:
      ValueError when ``batches`` is empty, holds no batch, or their leading axes differ.
    """
    mesh = ace_mesh() if mesh is None else mesh
    leaves, treedef = jax.tree_util.tree_flatten(list(batches))
    leaves = [np.asarray(leaf) for leaf in leaves]
    if not leaves or len({len(leaf) for leaf in leaves}) != 1:
        raise ValueError(f"batches must be arrays of one leading length, got {[leaf.shape for leaf in leaves]}")
    count, devices = len(leaves[0]), mesh.devices.size
    if count == 0:
        raise ValueError("batches hold no batch (leading length 0): nothing to map")
    program = _batch_program(fn, tuple(static), mesh)
    consts = replicate(consts, mesh)
    outputs: list = []
    pending = None  # the previous call's outputs: fetched after the next call is dispatched

    def fetch(item):
        out, real = item
        host = jax.tree_util.tree_map(distributed.to_host, out)
        outputs.append(jax.tree_util.tree_map(lambda leaf: leaf[:real], host))
        if progress is not None:
            progress.update(real)

    for start in range(0, count, devices):
        index = np.minimum(np.arange(start, start + devices), count - 1)  # the last call repeats a batch
        placed = jax.tree_util.tree_unflatten(treedef, [global_array(leaf[index], mesh, P(AXIS)) for leaf in leaves])
        out = program(consts, *placed)
        if pending is not None:
            fetch(pending)
        pending = (out, min(devices, count - start))
    if pending is not None:
        fetch(pending)
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts, 0), *outputs)


__all__ = ["AXIS", "ace_mesh", "global_array", "replicate", "map_batches", "stacked", "unstacked", "progress_bar"]
