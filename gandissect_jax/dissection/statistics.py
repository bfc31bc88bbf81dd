"""Streaming statistics as pure init / update / merge / finalize functions, and the integer counts of dissection.

Every statistic is a :class:`StreamingStatistic`, in the style of optax's
``GradientTransformation``: a NamedTuple of pure functions

- ``init() -> state``: a pytree of zero-filled device arrays;
- ``update(state, inputs, valid) -> state``: adds one batch. ``inputs`` is whatever pytree the
  statistic consumes (the entry of :func:`~gandissect_jax.dissection.engine.tally`'s ``compute``
  output under the statistic's name), with the batch of n samples on its sample axis; ``valid``
  is bool (n,), False for padding samples, which must not count. Pure and jit-able, no Python
  loop over units, labels or levels on the hot path;
- ``merge(a, b) -> state``: combines two states on the host in numpy. It must not depend on the
  order of merges (associative and commutative), so per-device states reduce to the same result
  whatever the sharding. Integer merges may update ``a`` in place (host accumulators);
- ``finalize(state) -> result``: host-side numpy readout;
- ``capacity(inputs_shape) -> int | None`` (optional): how many samples one device may add
  before its state must be drained into the host (int32 counters that could overflow, fixed
  buffers), from the ``jax.ShapeDtypeStruct`` pytree of one device's ``inputs``; None = no limit.

Counts live on device as int32. One sample adds at most (pixels x channels) to any counter
(:func:`samples_before_overflow`), so the engine drains device states into int64 host
accumulators (via ``merge``) before a counter could overflow. No statistic grows with the
number of samples.

Statistics here: :func:`top_k` (the k samples with the largest per-sample value per unit; exact,
ties to the lower sample number), :func:`nonfinite_counts` (NaN / inf per unit),
:func:`label_statistics` (per-label pixel counts, per-category presence totals) and
:func:`level_counts` (per unit, histograms of the upsampled activations over the intervals
between J sorted thresholds, per category over the images where it is present and per label over
its pixels; suffix sums give the exact activation and intersection counts at every threshold).
Exact quantiles are in :mod:`.quantiles`, float moments (mean, variance, covariance) in
:mod:`.moments`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

INT32_MAX = np.iinfo(np.int32).max


class StreamingStatistic(NamedTuple):
    """A streaming statistic as pure functions (see the module docstring)."""

    init: Callable[[], Any]
    update: Callable[[Any, Any, jax.Array], Any]
    merge: Callable[[Any, Any], Any]
    finalize: Callable[[Any], Any]
    capacity: Callable[[Any], int | None] | None = None


# ----------------------------------------------------------------------------- helpers


def add_counts(a, b):
    """Exact host-side merge of integer count pytrees: a + b as int64.

    A leaf of ``a`` that is already a writeable int64 numpy array (a host accumulator) is updated
    in place; any other leaf is copied once to int64 and then updated in place, and ``b`` is added
    as it is, so a merge holds one int64 array per leaf (no int64 copy of ``b``, no third array).
    """

    def add(x, y):
        if not (isinstance(x, np.ndarray) and x.dtype == np.int64 and x.flags.writeable):
            x = np.array(x, np.int64)
        np.add(x, np.asarray(y), out=x, casting="unsafe")
        return x

    return jax.tree_util.tree_map(add, a, b)


def unit_chunk_size(num_units: int, requested: int) -> int:
    """Largest divisor of num_units that is <= requested (>= 1)."""
    requested = max(1, min(int(requested), num_units))
    for size in range(requested, 0, -1):
        if num_units % size == 0:
            return size
    return 1


def default_unit_chunk() -> int:
    """Units per scatter step: small on CPU (cache locality), large on accelerators (parallelism)."""
    return 1 if jax.default_backend() == "cpu" else 64


def scatter_per_unit(hist: jax.Array, num_units: int, unit_chunk: int, index_fn) -> jax.Array:
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


def max_count_per_sample(pixels: int, channels: int) -> int:
    """Largest amount any int32 counter of these statistics can grow by per sample."""
    return int(pixels) * max(1, int(channels))


def samples_before_overflow(pixels: int, channels: int) -> int:
    """How many samples a device may accumulate before an int32 counter could overflow."""
    return max(1, INT32_MAX // max_count_per_sample(pixels, channels))


# ----------------------------------------------------------------------------- top-k


class TopKState(NamedTuple):
    """values: float32 (U, k), descending; indices: int32 (U, k) sample numbers (INT32_MAX = empty)."""

    values: Any
    indices: Any


def merge_top_k(a: TopKState, b: TopKState, k: int) -> TopKState:
    """Exact host merge of two top-k states: the k best of both, ties to the lower sample number."""
    values = np.concatenate([np.asarray(a.values, np.float32), np.asarray(b.values, np.float32)], axis=1)
    indices = np.concatenate([np.asarray(a.indices, np.int64), np.asarray(b.indices, np.int64)], axis=1)
    order = np.lexsort((indices, -values.astype(np.float64)), axis=1)[:, :k]
    return TopKState(np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1).astype(np.int32))


def top_k(num_units: int, k: int) -> StreamingStatistic:
    """Top-k samples per unit by a per-sample score (e.g. the maximum of the unit's map).

    inputs: (scores float32 (n, U), sample_index int32 (n,)) -- the engine's ``batch["index"]``.
    finalize -> (values float32 (U, k'), indices int64 (U, k')), k' = min(k, samples seen),
    sorted by value descending, ties by sample index ascending.
    """

    def init():
        return TopKState(
            jnp.full((num_units, k), -jnp.inf, jnp.float32),
            jnp.full((num_units, k), INT32_MAX, jnp.int32),
        )

    def update(state, inputs, valid):
        scores, sample_index = inputs
        scores = jnp.where(valid[:, None], scores.astype(jnp.float32), -jnp.inf)
        index = jnp.where(valid, sample_index.astype(jnp.int32), INT32_MAX)
        values = jnp.concatenate([state.values, scores.T], axis=1)
        indices = jnp.concatenate([state.indices, jnp.broadcast_to(index[None, :], (num_units, index.shape[0]))], axis=1)
        neg_sorted, idx_sorted = lax.sort((-values, indices), dimension=1, num_keys=2)
        return TopKState(-neg_sorted[:, :k], idx_sorted[:, :k])

    def merge(a, b):
        return merge_top_k(a, b, k)

    def finalize(state):
        values = np.asarray(state.values, np.float32)
        indices = np.asarray(state.indices, np.int64)
        filled = int((indices[0] != INT32_MAX).sum()) if num_units else 0
        return values[:, :filled], indices[:, :filled]

    return StreamingStatistic(init, update, merge, finalize)


def nonfinite_counts(num_units: int) -> StreamingStatistic:
    """NaN / inf values per unit. inputs: float (n, m, U); finalize -> int64 (U,)."""

    def init():
        return jnp.zeros((num_units,), jnp.int32)

    def update(state, values, valid):
        bad = ~jnp.isfinite(values) & valid[:, None, None]
        return state + jnp.sum(bad, axis=(0, 1), dtype=jnp.int32)

    def capacity(values):
        return samples_before_overflow(values.shape[1], 1)

    return StreamingStatistic(init, update, add_counts, lambda state: np.asarray(state, np.int64), capacity)



def nonfinite_samples() -> StreamingStatistic:
    """How many samples are flagged bad (e.g. a generated image with NaN / inf) and the first one.

    inputs: (bad bool (n,), sample_index int32 (n,)); finalize -> (count int64, first sample
    number int64, INT32_MAX when none)."""

    def init():
        return jnp.zeros((), jnp.int32), jnp.full((), INT32_MAX, jnp.int32)

    def update(state, inputs, valid):
        bad, index = inputs
        bad = bad & valid
        first = jnp.min(jnp.where(bad, index.astype(jnp.int32), INT32_MAX))
        return state[0] + jnp.sum(bad, dtype=jnp.int32), jnp.minimum(state[1], first)

    def merge(a, b):
        return np.int64(a[0]) + np.int64(b[0]), min(np.int64(a[1]), np.int64(b[1]))

    return StreamingStatistic(init, update, merge, lambda state: (np.int64(state[0]), np.int64(state[1])))


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

    inputs: (labels int32 (n, P, D), dedup int32 (n, P, D) from :func:`dedup_channels`,
    categories int32 (n, C + 1) from :func:`image_category_presence`).
    finalize -> LabelState of int64 arrays.
    """

    def init():
        return LabelState(jnp.zeros((num_labels,), jnp.int32), jnp.zeros((num_labels,), jnp.int32),
                          jnp.zeros((num_categories + 1,), jnp.int32), jnp.zeros((), jnp.int32))

    def update(state, inputs, valid):
        labels, dedup, categories = inputs
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

    def capacity(inputs):
        return samples_before_overflow(inputs[0].shape[1], inputs[0].shape[2])

    return StreamingStatistic(init, update, add_counts, finalize, capacity)


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


#: Distinct label signatures per image that :func:`level_counts`' signature path holds.
MAX_SIGNATURES = 256


def label_signatures(labels: jax.Array, max_signatures: int):
    """Number the distinct label tuples (signatures) of one image's pixels.

    labels: int32 (P, D), -1 for no label. Returns (ids int32 (P,) in [0, count), table int32
    (max_signatures, D): the tuple of each id (-1 rows past ``count``; ids >= max_signatures are
    not written), count int32 ()). Ids follow the tuples' lexicographic order.
    """
    pixels, channels = labels.shape
    keys = lax.sort(tuple(labels[:, d] for d in range(channels)) + (jnp.arange(pixels, dtype=jnp.int32),),
                    num_keys=channels)
    order = keys[-1]
    keys = keys[:-1]
    new = jnp.zeros((pixels,), bool).at[0].set(True)
    for key in keys:
        new = new | jnp.concatenate([jnp.ones((1,), bool), key[1:] != key[:-1]])
    group = jnp.cumsum(new.astype(jnp.int32)) - 1  # id of each pixel, in sorted order
    ids = jnp.zeros((pixels,), jnp.int32).at[order].set(group)
    table = jnp.full((max_signatures, channels), -1, jnp.int32)
    table = table.at[jnp.where(new, group, max_signatures)].set(jnp.stack(keys, axis=-1), mode="drop")
    return ids, table, group[-1] + 1


def signature_capacity(pixels: int, buckets: int, max_signatures: int = MAX_SIGNATURES) -> int:
    """Signatures per image for which counting per label signature beats counting per pixel, or 0.

    Per image and unit, the signature path adds K x buckets contiguous counts per channel where
    the pixel path scatters one count per pixel and channel; a contiguous add costs about a tenth
    of a scatter on CPU (128 x 128 pixels, 101 buckets, 256 signatures, 5 channels: 2.7x faster
    count step), so K may reach about 4 x pixels / buckets. Returns min(max_signatures, that), or
    0 when it is under 16 (too few to be worth it).
    """
    capacity = min(int(max_signatures), (4 * int(pixels)) // int(buckets))
    return capacity if capacity >= 16 else 0


def signature_unit_chunk(num_units: int, unit_chunk: int, images: int, max_signatures: int, buckets: int) -> int:
    """Units per step of :func:`level_counts`' signature path, or 0 when it cannot run.

    A step holds an int32 (units, images, max_signatures, buckets) histogram indexed flat: its
    units are the largest divisor of ``num_units`` that is <= ``unit_chunk`` and keeps those
    indices below INT32_MAX; 0 when one unit's histogram alone does not fit int32 indices.
    """
    per_unit = int(images) * int(max_signatures) * int(buckets)
    if per_unit >= INT32_MAX:
        return 0
    return unit_chunk_size(num_units, min(int(unit_chunk), INT32_MAX // per_unit))


def _unit_buckets(upsampled, levels, first, size):
    """int32 (G, n, P) buckets of units first .. first + size of upsampled (U, n, P) at levels (U, J)."""
    values = lax.dynamic_slice_in_dim(upsampled, first, size, axis=0)  # (G, n, P)
    return jax.vmap(bucketize)(values, lax.dynamic_slice_in_dim(levels, first, size, axis=0))  # (G, n, P)


def _count_per_pixel(label, upsampled, levels, labels, steps, *, num_labels: int, buckets: int, chunk: int):
    """:func:`level_counts`' per-pixel path over ``steps`` (traced) chunks of ``chunk`` units.

    label: int32 (U * L * buckets,) histogram; upsampled float32 (U, n, P); levels (U, J); labels int32
    (n, P, D), -1 = none. Returns (per-image bucket histogram int32 (n, U, buckets), updated label).
    """
    num_units, n = upsampled.shape[:2]
    label_size = num_labels * buckets
    image_offset = (jnp.arange(n, dtype=jnp.int32) * num_units * buckets)[:, None]  # (n, 1)

    # One loop over unit chunks does everything per unit: the loop keeps XLA from fusing the
    # upsampling into each of the J comparisons, and keeps each scatter in a small region.
    def body(step, carry):
        per_image, label, checksum = carry
        first = step * chunk
        units = first + jnp.arange(chunk, dtype=jnp.int32)
        bucket = jnp.moveaxis(_unit_buckets(upsampled, levels, first, chunk), 0, -1)  # (n, P, G)
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
    per_image, label, _ = lax.fori_loop(0, steps, body, (per_image, label, jnp.int32(0)))
    return per_image.reshape(n, num_units, buckets), label


def _count_per_signature(label, upsampled, levels, ids, table, steps, *, num_labels: int, buckets: int, chunk: int):
    """:func:`level_counts`' per-signature path over ``steps`` (traced) chunks of ``chunk`` units.

    label: int32 (U * L * buckets,); upsampled float32 (U, n, P); levels (U, J); ids int32 (n, P) and
    table int32 (n, K, D) from :func:`label_signatures`. Returns (int32 (n, U, buckets), updated label).
    """
    num_units = upsampled.shape[0]
    n, max_sig = table.shape[:2]
    size = n * max_sig * buckets  # one unit's (image, signature, bucket) histogram
    offset = (jnp.arange(n, dtype=jnp.int32) * max_sig * buckets)[:, None] + ids * buckets  # (n, P)
    # table (n, K, D) -> per channel, the label row of each (image, signature); -1 = none
    targets = [table[:, :, d].reshape(-1) for d in range(table.shape[-1])]
    rows_total = num_units * num_labels

    def body(step, carry):
        per_image, label = carry
        first = step * chunk
        units = first + jnp.arange(chunk, dtype=jnp.int32)
        bucket = _unit_buckets(upsampled, levels, first, chunk)  # (G, n, P)
        key = bucket + offset[None] + (jnp.arange(chunk, dtype=jnp.int32) * size)[:, None, None]
        hist = jnp.zeros((chunk * size,), jnp.int32).at[key.reshape(-1)].add(1)  # cache-sized
        hist = hist.reshape(chunk, n * max_sig, buckets)
        per_image = lax.dynamic_update_slice_in_dim(
            per_image, hist.reshape(chunk, n, max_sig, buckets).sum(axis=2), first, axis=0)
        for target in targets:  # each signature's histogram onto its label in channel d
            rows = jnp.where(target >= 0, units[:, None] * num_labels + target, rows_total)  # (G, n * K)
            label = label.at[rows.reshape(-1)].add(hist.reshape(-1, buckets), mode="drop")
        return per_image, label

    per_image = jnp.zeros((num_units, n, buckets), jnp.int32)
    label = label.reshape(rows_total, buckets)
    per_image, label = lax.fori_loop(0, steps, body, (per_image, label))
    return jnp.transpose(per_image, (1, 0, 2)), label.reshape(-1)


def level_counts(num_units: int, num_labels: int, num_levels: int, num_categories: int,
                 unit_chunk: int | None = None, max_signatures: int | None = None) -> StreamingStatistic:
    """Exact activation and intersection histograms at J sorted per-unit levels.

    inputs: (upsampled float32 (U, n, P) unit-major, levels float32 (U, J) sorted ascending per unit,
    dedup int32 (n, P, D) labels, categories int32 (n, C + 1)).
    finalize -> LevelCountState of int64 arrays, category (C + 1, U, J + 1), label (U, L, J + 1).

    Two ways to count, with identical results. Per pixel: every (pixel, channel) label scatters
    one count per unit into (label, bucket). Per label signature: each image's pixels are grouped
    by their tuple of D labels (:func:`label_signatures`), one count per pixel and unit goes into
    a cache-sized (signature, bucket) histogram, and each signature's bucket histogram is added to
    its D labels as contiguous rows, so the per-label work grows with the signatures (about 64
    per image in the paper-scale benchmark's scenes), not with the pixels. ``max_signatures`` bounds the signatures
    per image: None = automatic (at most :data:`MAX_SIGNATURES`, and only where it pays:
    :func:`signature_capacity`), 0 = always per pixel, a positive K = per signature with room for
    K (tests). A batch with an image of more signatures than the bound is counted per pixel
    (decided at run time, no recompilation); so is every batch where one unit's (image, signature,
    bucket) histogram would not fit int32 indices (:func:`signature_unit_chunk`, which also bounds
    the units per step of the signature path). ValueError for a negative ``max_signatures``.
    """
    buckets = num_levels + 1
    if num_units * num_labels * buckets >= INT32_MAX:
        raise ValueError(f"{num_units} units x {num_labels} labels x {buckets} buckets = "
                         f"{num_units * num_labels * buckets} counters do not fit int32 indices (at most "
                         f"{INT32_MAX - 1}): count fewer units at a time (the memory plan's unit groups do)")
    chunk = unit_chunk_size(num_units, unit_chunk or default_unit_chunk())
    if max_signatures is not None and (isinstance(max_signatures, bool) or int(max_signatures) < 0):
        raise ValueError(f"max_signatures must be an integer >= 0 or None, got {max_signatures!r}")

    def init():
        return LevelCountState(jnp.zeros((num_categories + 1, num_units, buckets), jnp.int32),
                               jnp.zeros((num_units * num_labels * buckets,), jnp.int32))

    def update(state, inputs, valid):
        upsampled, levels, dedup, categories = inputs
        n, pixels, _ = dedup.shape
        if n * num_units * buckets >= INT32_MAX:  # the per-pixel path's flat (image, unit, bucket) index
            raise ValueError(f"{n} images x {num_units} units x {buckets} buckets per step do not fit int32 "
                             f"indices: count fewer units or images per step (the memory plan's unit groups do)")
        labels = jnp.where(valid[:, None, None] & (dedup > 0) & (dedup < num_labels), dedup, -1)  # (n, P, D)
        max_sig = signature_capacity(pixels, buckets) if max_signatures is None else int(max_signatures)
        steps = num_units // chunk
        sig_chunk = signature_unit_chunk(num_units, chunk, n, max_sig, buckets) if max_sig > 0 else 0
        if sig_chunk > 0:
            ids, table, count = jax.vmap(lambda rows: label_signatures(rows, max_sig))(labels)
            fits = jnp.all(count <= max_sig)
            # Both loops run, one of them for 0 steps (runtime trip counts, no recompilation): a
            # lax.cond would hold a second copy of the label histogram; a loop updates it in place.
            by_signature, label = _count_per_signature(state.label, upsampled, levels, ids, table,
                                                       jnp.where(fits, num_units // sig_chunk, 0),
                                                       num_labels=num_labels, buckets=buckets, chunk=sig_chunk)
            by_pixel, label = _count_per_pixel(label, upsampled, levels, labels, jnp.where(fits, 0, steps),
                                               num_labels=num_labels, buckets=buckets, chunk=chunk)
            per_image = jnp.where(fits, by_signature, by_pixel)
        else:
            per_image, label = _count_per_pixel(state.label, upsampled, levels, labels, steps,
                                                num_labels=num_labels, buckets=buckets, chunk=chunk)
        # weight each image's histogram by the categories present in it (last column: every image)
        category = state.category + jnp.sum(categories[:, :, None, None] * per_image[:, None], axis=0)
        return LevelCountState(category, label)

    def finalize(state):
        return LevelCountState(np.asarray(state.category, np.int64),
                               np.asarray(state.label, np.int64).reshape(num_units, num_labels, buckets))

    def capacity(inputs):
        dedup = inputs[2]
        return samples_before_overflow(dedup.shape[1], dedup.shape[2])

    return StreamingStatistic(init, update, add_counts, finalize, capacity)


def suffix_counts(histogram: np.ndarray) -> np.ndarray:
    """Counts above each level from a bucket histogram (..., J + 1) -> (..., J) int64.

    Entry j is the number of values v with v > levels[j], i.e. in buckets j + 1 .. J.
    """
    histogram = np.asarray(histogram, np.int64)
    reverse = np.cumsum(histogram[..., ::-1], axis=-1)[..., ::-1]
    return reverse[..., 1:]


__all__ = [
    "StreamingStatistic", "add_counts", "TopKState", "top_k", "merge_top_k", "nonfinite_counts", "nonfinite_samples", "LabelState",
    "label_statistics", "dedup_channels", "image_label_presence", "image_category_presence", "LevelCountState",
    "level_counts", "label_signatures", "signature_capacity", "signature_unit_chunk", "MAX_SIGNATURES", "bucketize", "suffix_counts", "samples_before_overflow", "max_count_per_sample",
    "default_unit_chunk", "unit_chunk_size", "scatter_per_unit", "INT32_MAX",
]
