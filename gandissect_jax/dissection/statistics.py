"""Streaming unit statistics, accumulated on device under jit over any number of samples.

Every statistic is a :class:`StreamingStatistic`, in the style of optax's
``GradientTransformation``: a NamedTuple of pure functions

- ``init() -> state``: a pytree of zero-filled device arrays;
- ``update(state, ...) -> state``: adds one batch (pure, jit-able, no Python loop over units,
  labels or levels on the hot path);
- ``merge(a, b) -> state``: combines two states exactly, on the host in numpy. It is associative
  and commutative, so per-device states reduce to the same result whatever the sharding;
- ``finalize(state) -> result``: host-side numpy readout.

Counts live on device as int32. One sample adds at most (pixels x channels) to any counter
(:func:`samples_before_overflow`), so the pipeline drains device states into int64 host
accumulators (via ``merge``) before a counter could overflow. No statistic grows with the
number of samples.

Statistics here:

- :func:`top_k`: the k samples with the largest per-sample value per unit (exact; ties go to
  the lower sample index).
- :func:`radix_histogram` with :class:`RadixQuantiles`: exact per-unit quantiles by histogram
  refinement over the 32-bit order-preserving key of float32 values, 16 + 8 + 8 bits in three
  passes. The result is the exact order statistic, read out with numpy's ``'hazen'`` rule.
- :func:`label_statistics`: per-label pixel counts (with and without the multiplicity of
  segmentation channels), per-category presence totals.
- :func:`level_counts`: per unit, histograms of the upsampled activations over the
  intervals between J sorted thresholds, (a) per category, summed over the images where the
  category is present, and (b) per label, over the pixels carrying that label. Suffix sums of
  these histograms give the exact activation and intersection counts at every threshold.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

INT32_MAX = np.iinfo(np.int32).max


class StreamingStatistic(NamedTuple):
    """A streaming statistic as pure functions (see the module docstring)."""

    init: Callable[[], Any]
    update: Callable[..., Any]
    merge: Callable[[Any, Any], Any]
    finalize: Callable[[Any], Any]


# ----------------------------------------------------------------------------- helpers


def _add_counts(a, b):
    """Exact host-side merge of integer count pytrees (int64 result)."""
    return jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.int64) + np.asarray(y, np.int64), a, b)


def _unit_chunk(num_units: int, requested: int) -> int:
    """Largest divisor of num_units that is <= requested (>= 1)."""
    requested = max(1, min(int(requested), num_units))
    for size in range(requested, 0, -1):
        if num_units % size == 0:
            return size
    return 1


def default_unit_chunk() -> int:
    """Units per scatter step: small on CPU (cache locality), large on accelerators (parallelism)."""
    return 1 if jax.default_backend() == "cpu" else 64


def _scatter_per_unit(hist: jax.Array, num_units: int, unit_chunk: int, index_fn) -> jax.Array:
    """Scatter-add ones into a flat (num_units * M) int32 histogram, unit chunk by unit chunk.

    ``index_fn(first_unit, chunk)`` returns int32 indices of any shape whose last axis has
    ``chunk`` entries, one per unit ``first_unit + g``, each in [0, M) or -1 (dropped). Looping over
    unit chunks keeps each scatter inside a cache-sized region of the histogram.
    """
    size = hist.shape[0] // num_units

    def body(step, hist):
        first = step * unit_chunk
        index = index_fn(first, unit_chunk)
        offset = (first + jnp.arange(unit_chunk, dtype=jnp.int32)) * size
        flat = jnp.where(index >= 0, index + offset, hist.shape[0])
        return hist.at[flat.reshape(-1)].add(1, mode="drop")

    return lax.fori_loop(0, num_units // unit_chunk, body, hist)


# ----------------------------------------------------------------------------- float keys


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


# ----------------------------------------------------------------------------- top-k


class TopKState(NamedTuple):
    """values: float32 (U, k), descending; indices: int32 (U, k) sample numbers (INT32_MAX = empty)."""

    values: Any
    indices: Any


def _topk_merge_np(a: TopKState, b: TopKState, k: int) -> TopKState:
    values = np.concatenate([np.asarray(a.values, np.float32), np.asarray(b.values, np.float32)], axis=1)
    indices = np.concatenate([np.asarray(a.indices, np.int64), np.asarray(b.indices, np.int64)], axis=1)
    order = np.lexsort((indices, -values.astype(np.float64)), axis=1)[:, :k]
    return TopKState(np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1).astype(np.int32))


def top_k(num_units: int, k: int) -> StreamingStatistic:
    """Top-k samples per unit by a per-sample score (e.g. the maximum of the unit's map).

    update(state, scores float32 (n, U), sample_index int32 (n,), valid bool (n,)).
    finalize -> (values float32 (U, k'), indices int64 (U, k')), k' = min(k, samples seen),
    sorted by value descending, ties by sample index ascending.
    """

    def init():
        return TopKState(
            jnp.full((num_units, k), -jnp.inf, jnp.float32),
            jnp.full((num_units, k), INT32_MAX, jnp.int32),
        )

    def update(state, scores, sample_index, valid):
        scores = jnp.where(valid[:, None], scores.astype(jnp.float32), -jnp.inf)
        index = jnp.where(valid, sample_index.astype(jnp.int32), INT32_MAX)
        values = jnp.concatenate([state.values, scores.T], axis=1)
        indices = jnp.concatenate([state.indices, jnp.broadcast_to(index[None, :], (num_units, index.shape[0]))], axis=1)
        neg_sorted, idx_sorted = lax.sort((-values, indices), dimension=1, num_keys=2)
        return TopKState(-neg_sorted[:, :k], idx_sorted[:, :k])

    def merge(a, b):
        return _topk_merge_np(a, b, k)

    def finalize(state):
        values = np.asarray(state.values, np.float32)
        indices = np.asarray(state.indices, np.int64)
        filled = int((indices[0] != INT32_MAX).sum()) if num_units else 0
        return values[:, :filled], indices[:, :filled]

    return StreamingStatistic(init, update, merge, finalize)


# ----------------------------------------------------------------------------- exact quantiles


class RadixStage(NamedTuple):
    """One refinement pass of :class:`RadixQuantiles`.

    bits: the key bits resolved before this stage (per earlier stage) and by this one (last entry).
    tables: for each earlier stage t, int32 (U, S_t, 2**bits[t]) mapping (slot, key chunk) to the
    slot of the next stage, -1 when no target lies there. num_slots: S of this stage.
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

    update(state, tables, values float32 (U, n, m) unit-major, valid bool (n,)): counts each value
    whose key matches a target prefix of an earlier stage into (slot, next key chunk). ``tables`` are the
    stage's lookup tables as device arrays (passed in, so they are not baked into the program).
    State: int32 (U * S * 2**bits[-1],). finalize -> int64 (U, S, 2**bits[-1]).
    """
    depth = len(stage.bits) - 1
    bins = 1 << stage.bits[-1]
    chunk = _unit_chunk(num_units, unit_chunk or default_unit_chunk())
    size = stage.num_slots * bins

    def init():
        return jnp.zeros((num_units * size,), jnp.int32)

    def update(state, tables, values, valid):
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
                slot = jnp.where(slot >= 0, flat_table[jnp.maximum(lookup, 0)], -1)
            index = slot * bins + _key_chunk(k, stage.bits, depth)
            index = jnp.where((slot >= 0) & valid[:, None, None], index, -1)
            return index

        return _scatter_per_unit(state, num_units, chunk, index_fn)

    def finalize(state):
        return np.asarray(state, np.int64).reshape(num_units, stage.num_slots, bins)

    return StreamingStatistic(init, update, _add_counts, finalize)


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
        # Rows (unit, slot) of the cumulative histogram, offset so that the flat array is sorted.
        cumulative = np.cumsum(histogram.reshape(U * self._num_slots, num_bins), axis=1)
        stride = int(cumulative[:, -1].max()) + 1 if cumulative.size else 1
        row_of_target = np.arange(U)[:, None] * self._num_slots + self._slot  # (U, R)
        cumulative += (np.arange(U * self._num_slots, dtype=np.int64) * stride)[:, None]
        flat = cumulative.reshape(-1)
        query = self._residual + row_of_target * stride
        # first bin whose cumulative count exceeds the residual rank
        position = np.searchsorted(flat, query, side="right")
        bins = position - row_of_target * num_bins
        if np.any(bins >= num_bins) or np.any(bins < 0):
            raise ValueError("histogram refinement lost values (were the passes fed different data?)")
        before = np.where(bins > 0, flat[np.maximum(position - 1, 0)] - row_of_target * stride, 0)
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
        num_slots = int(next_slot[:, -1].max()) + 1 if R else 1
        table = np.full((U, self._num_slots, 1 << width), -1, np.int32)
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


# ----------------------------------------------------------------------------- labels


class LabelState(NamedTuple):
    """label_counts: (L,) entries per label over all channels (label 0 counts zeros);
    label_pixels: (L,) pixels carrying the label in any channel; image_counts: (C + 1,) images in
    which each category is present (last entry: all images); bad_labels: () entries outside [0, L)."""

    label_counts: Any
    label_pixels: Any
    image_counts: Any
    bad_labels: Any


def dedup_channels(labels: jax.Array) -> jax.Array:
    """labels int32 (n, P, D) -> same with repeats of an earlier channel's label at a pixel set to 0."""
    channels = [labels[..., 0]]
    for d in range(1, labels.shape[-1]):
        repeated = jnp.zeros(labels.shape[:-1], bool)
        for e in range(d):
            repeated = repeated | (labels[..., d] == labels[..., e])
        channels.append(jnp.where(repeated, 0, labels[..., d]))
    return jnp.stack(channels, axis=-1)


def image_label_presence(labels: jax.Array, valid: jax.Array, num_labels: int) -> jax.Array:
    """int32 (n, L): 1 where the label occurs in the image (any channel, label 0 included)."""
    n = labels.shape[0]
    in_range = (labels >= 0) & (labels < num_labels)
    key = jnp.where(in_range & valid[:, None, None], labels + (jnp.arange(n, dtype=jnp.int32) * num_labels)[:, None, None], -1)
    counts = jnp.zeros((n * num_labels,), jnp.int32).at[key.reshape(-1)].add(1, mode="drop")
    return (counts.reshape(n, num_labels) > 0).astype(jnp.int32)


def image_category_presence(presence: jax.Array, label_category: jax.Array, num_categories: int,
                            valid: jax.Array) -> jax.Array:
    """int32 (n, C + 1): category c present when any of its labels is (label 0 counts toward its
    own category, as in the reference); the last column is 1 for every valid image."""
    onehot = (label_category[:, None] == jnp.arange(num_categories)[None, :]).astype(jnp.int32)
    per_category = (presence @ onehot > 0).astype(jnp.int32)
    return jnp.concatenate([per_category, valid.astype(jnp.int32)[:, None]], axis=1) * valid.astype(jnp.int32)[:, None]


def label_statistics(num_labels: int, num_categories: int) -> StreamingStatistic:
    """Label pixel counts and category presence totals.

    update(state, labels int32 (n, P, D), dedup int32 (n, P, D) from :func:`dedup_channels`,
    categories int32 (n, C + 1) from :func:`image_category_presence`, valid bool (n,)).
    """

    def init():
        return LabelState(jnp.zeros((num_labels,), jnp.int32), jnp.zeros((num_labels,), jnp.int32),
                          jnp.zeros((num_categories + 1,), jnp.int32), jnp.zeros((), jnp.int32))

    def update(state, labels, dedup, categories, valid):
        ok = valid[:, None, None]
        in_range = (labels >= 0) & (labels < num_labels)
        bad = jnp.sum((~in_range) & ok, dtype=jnp.int32)
        counts = state.label_counts.at[jnp.where(in_range & ok, labels, num_labels).reshape(-1)].add(1, mode="drop")
        pixels = state.label_pixels.at[jnp.where(in_range & ok & (dedup > 0), dedup, num_labels).reshape(-1)].add(
            1, mode="drop")
        # label 0 pixels: any channel is 0
        zero_pixels = jnp.sum(jnp.any(labels == 0, axis=-1) & valid[:, None], dtype=jnp.int32)
        pixels = pixels.at[0].add(zero_pixels)
        images = state.image_counts + categories.sum(0)
        return LabelState(counts, pixels, images, state.bad_labels + bad)

    def finalize(state):
        return LabelState(*(np.asarray(x, np.int64) for x in state))

    return StreamingStatistic(init, update, _add_counts, finalize)


# ----------------------------------------------------------------------------- counts at levels


class LevelCountState(NamedTuple):
    """category: (C + 1, U, J + 1) per category (last: all images) and per unit, the number of
    upsampled pixels in each interval between the J sorted levels, summed over the images where
    the category is present; label: flat (U * L * (J + 1),) the same per label over the pixels
    carrying the label (any channel; label 0 is not counted)."""

    category: Any
    label: Any


def bucketize(values: jax.Array, levels: jax.Array) -> jax.Array:
    """int32 #levels strictly below each value: values (..., ) with levels (J,) sorted ascending.

    ``value > levels[j]`` holds exactly for ``j < bucketize(value)``. Unrolled comparisons fuse
    into one elementwise kernel (fast on CPU and GPU alike).
    """
    count = jnp.zeros(values.shape, jnp.int32)
    for j in range(levels.shape[0]):
        count = count + (values > levels[j]).astype(jnp.int32)
    return count


def level_counts(num_units: int, num_labels: int, num_levels: int, num_categories: int,
                 unit_chunk: int | None = None) -> StreamingStatistic:
    """Exact activation and intersection histograms at J sorted per-unit levels.

    update(state, upsampled float32 (U, n, P) unit-major, levels float32 (U, J) sorted ascending per unit,
    dedup int32 (n, P, D) labels, categories int32 (n, C + 1), valid bool (n,)).
    finalize -> LevelCountState of int64 arrays, category (C + 1, U, J + 1), label (U, L, J + 1).
    """
    buckets = num_levels + 1
    if num_labels * buckets >= INT32_MAX:
        raise ValueError(f"{num_labels} labels x {buckets} buckets do not fit int32 indices")
    chunk = _unit_chunk(num_units, unit_chunk or default_unit_chunk())

    def init():
        return LevelCountState(jnp.zeros((num_categories + 1, num_units, buckets), jnp.int32),
                               jnp.zeros((num_units * num_labels * buckets,), jnp.int32))

    def update(state, upsampled, levels, dedup, categories, valid):
        n = upsampled.shape[1]
        labels = jnp.where(valid[:, None, None] & (dedup > 0) & (dedup < num_labels), dedup, -1)  # (n, P, D)
        label_size = num_labels * buckets
        image_offset = (jnp.arange(n, dtype=jnp.int32) * num_units * buckets)[:, None]  # (n, 1)

        # One loop over unit chunks does everything per unit: the loop keeps XLA from fusing the
        # upsampling into each of the J comparisons, and keeps each scatter in a small region.
        def body(step, carry):
            per_image, label, checksum = carry
            first = step * chunk
            units = first + jnp.arange(chunk, dtype=jnp.int32)
            values = lax.dynamic_slice_in_dim(upsampled, first, chunk, axis=0)  # (G, n, P)
            bucket = jax.vmap(bucketize)(values, lax.dynamic_slice_in_dim(levels, first, chunk, axis=0))
            bucket = jnp.moveaxis(bucket, 0, -1)  # (n, P, G)
            # Reducing `bucket` into a carried value makes XLA materialize it once; otherwise the J
            # comparisons are fused into, and repeated by, each scatter's index computation (2x slower).
            checksum = checksum + jnp.sum(bucket, dtype=jnp.int32)
            # (a) per image and unit, the histogram of buckets
            key = bucket + (image_offset + units[None, :] * buckets)[:, None, :]
            per_image = per_image.at[key.reshape(-1)].add(1)
            # (b) per label: (label, bucket) of every labelled pixel
            index = labels[..., None] * buckets + bucket[:, :, None, :] + units * label_size  # (n, P, D, G)
            index = jnp.where(labels[..., None] >= 0, index, label.shape[0])
            label = label.at[index.reshape(-1)].add(1, mode="drop")
            return per_image, label, checksum

        per_image = jnp.zeros((n * num_units * buckets,), jnp.int32)
        per_image, label, _ = lax.fori_loop(0, num_units // chunk, body, (per_image, state.label, jnp.int32(0)))
        per_image = per_image.reshape(n, num_units, buckets)
        # weight each image's histogram by the categories present in it (last column: every image)
        category = state.category + jnp.sum(categories[:, :, None, None] * per_image[:, None], axis=0)
        return LevelCountState(category, label)

    def finalize(state):
        return LevelCountState(np.asarray(state.category, np.int64),
                               np.asarray(state.label, np.int64).reshape(num_units, num_labels, buckets))

    return StreamingStatistic(init, update, _add_counts, finalize)


def suffix_counts(histogram: np.ndarray) -> np.ndarray:
    """Counts above each level from a bucket histogram (..., J + 1) -> (..., J) int64.

    Entry j is the number of values v with v > levels[j], i.e. in buckets j + 1 .. J.
    """
    histogram = np.asarray(histogram, np.int64)
    reverse = np.cumsum(histogram[..., ::-1], axis=-1)[..., ::-1]
    return reverse[..., 1:]


def max_count_per_sample(pixels: int, channels: int) -> int:
    """Largest amount any int32 counter of these statistics can grow by per sample."""
    return int(pixels) * max(1, int(channels))


def samples_before_overflow(pixels: int, channels: int) -> int:
    """How many samples a device may accumulate before an int32 counter could overflow."""
    return max(1, INT32_MAX // max_count_per_sample(pixels, channels))


__all__ = [
    "StreamingStatistic", "TopKState", "top_k", "RadixStage", "RadixQuantiles", "radix_histogram",
    "hazen_ranks", "float_to_key", "float_to_key_np", "key_to_float", "LabelState", "label_statistics",
    "dedup_channels", "image_label_presence", "image_category_presence", "LevelCountState", "level_counts",
    "bucketize", "suffix_counts", "samples_before_overflow", "default_unit_chunk",
]
