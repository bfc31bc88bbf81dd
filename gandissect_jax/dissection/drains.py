"""Draining device states into host states: one device's copy at a time, exact across the processes of a multi-host mesh."""

from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .statistics import StreamingStatistic

AXIS = "devices"


@functools.lru_cache(maxsize=64)
def init_states(names: tuple[str, ...], statistics: tuple[StreamingStatistic, ...], mesh: Mesh):
    """A jitted function making fresh device states, one per device along the leading axis."""
    count = mesh.devices.size

    def make():
        return {name: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (count,) + x.shape), stat.init())
                for name, stat in zip(names, statistics)}

    return jax.jit(make, out_shardings=NamedSharding(mesh, P(AXIS)))


def _per_device(state: Any) -> Iterator[Any]:
    """Host copies of each device's state, one device at a time (so a drain holds one device's copy),
    from a state with a leading (sharded) device axis."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    shards = [sorted(leaf.addressable_shards, key=lambda s: s.index[0].start or 0) for leaf in leaves]
    # explicit transfers (jax.device_get), so the pass also runs under jax.transfer_guard("disallow")
    for d in range(len(shards[0]) if shards else 0):
        yield jax.tree_util.tree_unflatten(treedef, [jax.device_get(shards[i][d].data)[0] for i in range(len(leaves))])


def _bits(x):
    """``x`` as unsigned integers of the same width (bool as uint8): exact under a sum with zeros."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
    return x


def _unbits(bits, dtype):
    if dtype == jnp.bool_:
        return bits.astype(jnp.bool_)
    if jnp.issubdtype(dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(bits, dtype)
    return bits


@functools.lru_cache(maxsize=16)
def _from_device(mesh: Mesh):
    """jit(shard_map): the state of device ``d`` (a replicated scalar), replicated on every device
    of every process. Each device contributes its state's bits where it is ``d`` and zeros
    elsewhere, summed over the mesh: an exact copy, whatever the dtype."""

    def body(state, d):
        me = jax.lax.axis_index(AXIS)

        def pick(x):
            x = x[0]
            bits = _bits(x)
            total = jax.lax.psum(jnp.where(me == d, bits, jnp.zeros_like(bits)), AXIS)
            return _unbits(total, x.dtype)

        return jax.tree_util.tree_map(pick, state)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(), check_vma=False))


def _per_device_global(state: Any, mesh: Mesh) -> Iterator[Any]:
    """Host copies of each device's state in mesh order, on every process of a multi-host mesh
    (each device's state is sent to all hosts in turn, so a drain holds one device's copy)."""
    fetch = _from_device(mesh)
    replicated = NamedSharding(mesh, P())
    for d in range(mesh.devices.size):
        copy = fetch(state, jax.device_put(np.int32(d), replicated))
        yield jax.tree_util.tree_map(lambda x: jax.device_get(x.addressable_data(0)), copy)
        del copy


def drain(statistics: Mapping[str, StreamingStatistic], host: dict, states: dict, mesh: Mesh | None = None) -> dict:
    """Merge every device's state into the host states (on every process when the mesh spans several)."""
    spans_processes = mesh is not None and not all(d.process_index == jax.process_index() for d in mesh.devices.flat)
    for name, stat in statistics.items():
        copies = _per_device_global(states[name], mesh) if spans_processes else _per_device(states[name])
        for device_state in copies:
            host[name] = stat.merge(host[name], device_state)
            del device_state
    return host


def drain_some(statistics: Mapping[str, StreamingStatistic], names: list[str], host: dict, states: dict,
                mesh: Mesh) -> dict:
    """Drain the device states of statistics ``names`` into ``host`` and return the device states
    with fresh ones in their place (the others untouched)."""
    chosen = {name: statistics[name] for name in names}
    drain(chosen, host, states, mesh)
    fresh = init_states(tuple(chosen), tuple(chosen.values()), mesh)()
    states = dict(states)
    for name in names:
        states[name] = fresh[name]
    return states


__all__ = ["AXIS", "init_states", "drain", "drain_some"]
