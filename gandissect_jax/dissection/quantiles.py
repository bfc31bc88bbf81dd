"""Exact per-unit quantiles of float32 values by radix histogram refinement (16 + 8 + 8 bits, three passes).

Every float32 value maps to a 32-bit key with the same order (:func:`float_to_key`). Stage 0
histograms the top ``bits[0]`` key bits of every value; each later stage histograms the next
``bits[s]`` bits, but only of the values whose key prefix matches a wanted order statistic
(per-unit lookup tables). After the last stage every wanted order statistic is known exactly,
and :meth:`RadixQuantiles.quantiles` reads quantiles out with numpy's ``'hazen'`` rule.
:func:`radix_histogram` is the device side (a :class:`~.statistics.StreamingStatistic`),
:class:`RadixQuantiles` the host-side planner.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .statistics import (StreamingStatistic, add_counts, default_unit_chunk, samples_before_overflow,
                         scatter_per_unit, unit_chunk_size)


def float_to_key(values: jax.Array) -> jax.Array:
    """Map float32 values to uint32 keys with the same order (-0.0 is folded onto +0.0)."""
    values = jnp.where(values == 0, jnp.zeros((), values.dtype), values)
    bits = lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def key_to_float(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_to_key` on the host: uint32 keys -> float32 values."""
    keys = np.asarray(keys, np.uint32)
    bits = np.where(keys >> 31 == 1, keys & np.uint32(0x7FFFFFFF), ~keys).astype(np.uint32)
    return bits.view(np.float32)


def float_to_key_np(values: np.ndarray) -> np.ndarray:
    """Host version of :func:`float_to_key`."""
    values = np.where(np.asarray(values, np.float32) == 0, np.float32(0), values).astype(np.float32)
    bits = values.view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


# Lookup tables map (slot, key chunk) -> next slot; slots number at most the wanted ranks (a few
# hundred), so int16 halves the largest host and device arrays of the later stages.
TABLE_DTYPE = np.int16


def table_dtype(num_slots: int) -> np.dtype:
    """int16 for tables whose slots fit it (the normal case), else int32."""
    return np.dtype(TABLE_DTYPE if num_slots < np.iinfo(TABLE_DTYPE).max else np.int32)


class RadixStage(NamedTuple):
    """One refinement pass of :class:`RadixQuantiles`.

    bits: the key bits resolved before this stage (per earlier stage) and by this one (last entry).
    tables: for each earlier stage t, int16 or int32 (U, S_t, 2**bits[t]) (:func:`table_dtype`) mapping
    (slot, key chunk) to the slot of the next stage, -1 when no target lies there. num_slots: S of
    this stage.
    """

    bits: tuple[int, ...]
    tables: tuple[np.ndarray, ...]
    num_slots: int


def _key_chunk(keys: jax.Array, bits: Sequence[int], stage: int) -> jax.Array:
    end = sum(bits[: stage + 1])
    width = bits[stage]
    return ((keys >> jnp.uint32(32 - end)) & jnp.uint32((1 << width) - 1)).astype(jnp.int32)


def radix_histogram(num_units: int, stage: RadixStage, unit_chunk: int | None = None) -> StreamingStatistic:
    """Per-unit histogram of float32 values over one refinement stage of the radix key.

    inputs: (tables, values float32 (U, n, m) unit-major): counts each value whose key matches a
    target prefix of an earlier stage into (slot, next key chunk). ``tables`` are the stage's
    lookup tables as device arrays (passed in, so they are not baked into the program).
    State: int32 (U * S * 2**bits[-1],). finalize -> int64 (U, S, 2**bits[-1]).
    """
    depth = len(stage.bits) - 1
    bins = 1 << stage.bits[-1]
    chunk = unit_chunk_size(num_units, unit_chunk or default_unit_chunk())
    size = stage.num_slots * bins

    def init():
        return jnp.zeros((num_units * size,), jnp.int32)

    def update(state, inputs, valid):
        tables, values = inputs
        # unit-major input, so that each unit chunk reads contiguous memory
        keys = jnp.where(valid[None, :, None], float_to_key(values), jnp.uint32(0))  # (U, n, m)

        def index_fn(first, count):
            k = jnp.moveaxis(lax.dynamic_slice_in_dim(keys, first, count, axis=0), 0, -1)  # (n, m, G)
            slot = jnp.zeros(k.shape, jnp.int32)
            for t in range(depth):
                table = lax.dynamic_slice_in_dim(tables[t], first, count, axis=0)  # (G, S_t, B_t)
                width = table.shape[1] * table.shape[2]
                flat_table = table.reshape(count * width)
                lookup = slot * table.shape[2] + _key_chunk(k, stage.bits, t)
                lookup = lookup + jnp.arange(count, dtype=jnp.int32) * width
                slot = jnp.where(slot >= 0, flat_table[jnp.maximum(lookup, 0)].astype(jnp.int32), -1)
            index = slot * bins + _key_chunk(k, stage.bits, depth)
            index = jnp.where((slot >= 0) & valid[:, None, None], index, -1)
            return index

        return scatter_per_unit(state, num_units, chunk, index_fn)

    def finalize(state):
        return np.asarray(state, np.int64).reshape(num_units, stage.num_slots, bins)

    def capacity(inputs):
        return samples_before_overflow(inputs[1].shape[2], 1)

    return StreamingStatistic(init, update, add_counts, finalize, capacity)


def hazen_ranks(count: int, quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order-statistic ranks and weights of numpy's 'hazen' quantile over ``count`` values.

    Returns (lower, upper, fraction): quantile = x[lower] + fraction * (x[upper] - x[lower]),
    with 0-based ranks into the sorted values.
    """
    q = np.asarray(quantiles, np.float64)
    position = np.clip(q * count - 0.5, 0.0, count - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, count - 1)
    return lower, upper, position - lower


class RadixQuantiles:
    """Host-side planner for exact per-unit quantiles by histogram refinement.

    Usage: run :meth:`stage` 0 over all values (with :func:`radix_histogram`), hand the merged
    histogram to :meth:`observe`; repeat for the later stages while :attr:`done` is False; then
    :meth:`quantiles` returns the exact numpy 'hazen' quantiles as float32 (U, Q).
    The first stage resolves the top ``bits[0]`` key bits of every target order statistic, each
    later stage the next ``bits[s]`` bits inside the target bins only, so memory is
    U * max(2**bits[0], R * 2**bits[s]) counters for R target ranks per unit.
    """

    def __init__(self, num_units: int, quantiles: Sequence[float], bits: Sequence[int] = (16, 8, 8)):
        if sum(bits) != 32:
            raise ValueError(f"radix bits must add up to 32, got {tuple(bits)}")
        self.num_units = int(num_units)
        self.q = np.asarray(quantiles, np.float64).reshape(-1)
        if np.any((self.q < 0) | (self.q > 1)) or not np.all(np.isfinite(self.q)):
            raise ValueError("quantiles must lie in [0, 1]")
        self.bits = tuple(int(b) for b in bits)
        self.stage_index = 0
        self.count: int | None = None
        self._tables: list[np.ndarray] = []
        self._num_slots = 1
        self._ranks = None  # (U, R) int64 order statistics wanted
        self._slot = None  # (U, R) current slot of each target
        self._residual = None  # (U, R) rank inside the slot
        self._keys = None  # (U, R) uint32 known key bits so far

    @property
    def done(self) -> bool:
        """True once every target order statistic is fully resolved (or there is none)."""
        return self.stage_index >= len(self.bits) or (self._ranks is not None and self._ranks.shape[1] == 0)

    def stage(self) -> RadixStage:
        """The current refinement stage (bits so far, lookup tables, number of slots)."""
        return RadixStage(self.bits[: self.stage_index + 1], tuple(self._tables), self._num_slots)

    def state_dict(self) -> dict:
        """Host arrays describing the planner, for checkpoints."""
        out = {"stage_index": np.int64(self.stage_index), "count": np.int64(-1 if self.count is None else self.count),
               "num_slots": np.int64(self._num_slots)}
        for name in ("_ranks", "_slot", "_residual", "_keys"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for i, table in enumerate(self._tables):
            out[f"table{i}"] = table
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.stage_index = int(state["stage_index"])
        count = int(state["count"])
        self.count = None if count < 0 else count
        self._num_slots = int(state["num_slots"])
        for name in ("_ranks", "_slot", "_residual", "_keys"):
            setattr(self, name, np.asarray(state[name]) if name in state else None)
        count = sum(1 for key in state if key.startswith("table"))
        self._tables = [np.asarray(state[f"table{i}"]) for i in range(count)]

    def observe(self, histogram: np.ndarray) -> None:
        """Consume the merged int64 histogram (U, S, 2**bits[stage]) of the current stage."""
        histogram = np.asarray(histogram, np.int64)
        U = self.num_units
        width = self.bits[self.stage_index]
        if histogram.shape != (U, self._num_slots, 1 << width):
            raise ValueError(f"stage {self.stage_index} histogram has shape {histogram.shape}, "
                             f"expected {(U, self._num_slots, 1 << width)}")
        if self.stage_index == 0:
            totals = histogram.reshape(U, -1).sum(1)
            if U and not np.all(totals == totals[0]):
                raise ValueError("units saw different numbers of values")
            self.count = int(totals[0]) if U else 0
            if self.count == 0:
                raise ValueError("no values were observed; cannot compute quantiles")
            lower, upper, _ = hazen_ranks(self.count, self.q)
            ranks = np.unique(np.concatenate([lower, upper]))
            self._ranks = np.broadcast_to(ranks, (U, ranks.size)).copy()
            self._slot = np.zeros_like(self._ranks)
            self._residual = self._ranks.copy()
            self._keys = np.zeros(self._ranks.shape, np.uint32)
        R = self._ranks.shape[1]
        num_bins = 1 << width
        bins = np.zeros((U, R), np.int64)
        before = np.zeros((U, R), np.int64)
        # Units in chunks, so the int64 cumulative histogram is a bounded temporary (~8 MB).
        step = max(1, (1 << 20) // max(1, self._num_slots * num_bins))
        for first in range(0, U, step):
            last = min(U, first + step)
            rows = (last - first) * self._num_slots
            # Rows (unit, slot) of the cumulative histogram, offset so that the flat array is sorted.
            cumulative = np.cumsum(histogram[first:last].reshape(rows, num_bins), axis=1)
            stride = int(cumulative[:, -1].max()) + 1 if cumulative.size else 1
            row_of_target = np.arange(last - first)[:, None] * self._num_slots + self._slot[first:last]  # (u, R)
            cumulative += (np.arange(rows, dtype=np.int64) * stride)[:, None]
            flat = cumulative.reshape(-1)
            query = self._residual[first:last] + row_of_target * stride
            # first bin whose cumulative count exceeds the residual rank
            position = np.searchsorted(flat, query, side="right")
            bins[first:last] = position - row_of_target * num_bins
            if np.any(bins[first:last] >= num_bins) or np.any(bins[first:last] < 0):
                raise ValueError("histogram refinement lost values (were the passes fed different data?)")
            before[first:last] = np.where(bins[first:last] > 0,
                                          flat[np.maximum(position - 1, 0)] - row_of_target * stride, 0)
            del cumulative, flat
        self._residual = self._residual - before
        shift = 32 - sum(self.bits[: self.stage_index + 1])
        self._keys = self._keys | (bins.astype(np.uint32) << np.uint32(shift))
        self.stage_index += 1
        if self.stage_index >= len(self.bits):
            return
        # Distinct (slot, bin) pairs become the next stage's slots. Ranks are sorted, so the pairs
        # are non-decreasing along each row and slot ids are running counts of changes.
        pair = self._slot * (1 << width) + bins
        changes = np.diff(pair, axis=1) != 0
        next_slot = np.concatenate([np.zeros((U, 1), np.int64), np.cumsum(changes, axis=1)], axis=1)
        # As many slots as wanted ranks (an upper bound of the distinct prefixes), so the next
        # stage's shapes, and with them its compiled program, do not depend on the data.
        num_slots = max(R, 1)
        table = np.full((U, self._num_slots, 1 << width), -1, table_dtype(num_slots))
        table[np.repeat(np.arange(U), R), self._slot.reshape(-1), bins.reshape(-1)] = next_slot.reshape(-1)
        self._tables.append(table)
        self._slot = next_slot
        self._num_slots = num_slots

    def order_statistics(self) -> np.ndarray:
        """float32 (U, R) exact order statistics at :attr:`ranks` (after the last stage)."""
        if self.stage_index < len(self.bits):
            raise RuntimeError("quantile refinement is not finished")
        return key_to_float(self._keys)

    def quantiles(self) -> np.ndarray:
        """float32 (U, Q): numpy 'hazen' quantiles at the requested q, from exact order statistics."""
        values = self.order_statistics().astype(np.float64)
        lower, upper, frac = hazen_ranks(self.count, self.q)
        ranks = self._ranks[0]
        lo = values[:, np.searchsorted(ranks, lower)]
        hi = values[:, np.searchsorted(ranks, upper)]
        # numpy's lerp: a + (b - a) * t, computed from the far end when t >= 0.5
        diff = hi - lo
        result = np.where(frac >= 0.5, hi - diff * (1 - frac), lo + diff * frac)
        return result.astype(np.float32)


__all__ = ["float_to_key", "float_to_key_np", "key_to_float", "RadixStage", "radix_histogram", "hazen_ranks",
           "RadixQuantiles", "TABLE_DTYPE", "table_dtype"]
