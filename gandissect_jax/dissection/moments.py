"""Running mean, variance and covariance of feature vectors, bit-identical for any device count and batch size.

Float sums depend on the order of additions, and the order in which a sharded pass meets its
samples depends on the device count and the batch size. These statistics fix the order by design:

1. **Per sample, on device.** Each sample's partial moments (row count, mean, sum of squared
   deviations or co-moment) are computed from that sample alone, with a fixed summation order
   (:func:`pairwise_sum`: a balanced binary tree of elementwise float32 additions over the
   sample's rows; :func:`ordered_outer_sum`: a sequential loop over rows). No reduction spans two
   samples, so a sample's partials do not depend on which samples share its batch or device.
   (Like the bilinear upsampling of :mod:`.upsample`, this rests on elementwise float32
   arithmetic giving the same result for every element whatever the array's shape.)
2. **Buffered, not summed.** The device state is a buffer of ``buffer`` slots holding per-sample
   partials and their sample numbers; the engine drains it into the host before it is full.
3. **Folded in sample order, on the host, in float64.** ``merge`` collects the buffered partials
   and folds every sample whose number is the next one expected (Chan, Golub and LeVeque's
   pairwise update); samples that arrive early wait in the state until their predecessors have
   been folded. The result is the sequential float64 fold over samples 0, 1, 2, ... whatever the
   sharding, batch size or drain schedule, and a resumed pass continues the same fold.

:func:`sample_ordered` is the general mechanism: give it a per-sample partial function and a
host fold, and any float statistic becomes deterministic the same way. Inputs must carry the
engine's sample numbers (``batch["index"]``), and a tally's samples are numbered 0 .. N - 1.
The reference's ``runningstats`` (davidbau/dissect) has the same statistics (``Mean``,
``Variance``, ``CrossCovariance``); their variances divide by count - 1, as here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .statistics import INT32_MAX, StreamingStatistic

_BUFFER_BYTES = 32 << 20


class OrderedState(NamedTuple):
    """State of a :func:`sample_ordered` statistic.

    samples: () samples folded into ``total`` (the next one to fold is sample number ``samples``);
    total: the fold's accumulator (float64 on the host; float32 zeros on device, unused there);
    index: (B,) int32 sample numbers of the buffered partials (INT32_MAX = empty slot);
    partial: pytree of (B, ...) per-sample partials; fill: () int32 next free buffer slot.
    """

    samples: Any
    total: Any
    index: Any
    partial: Any
    fill: Any


def pairwise_sum(x: jax.Array, axis: int = 1) -> jax.Array:
    """Sum over ``axis`` as a balanced binary tree of elementwise additions (zero-padded to a power of 2).

    Every output element is the same expression of its inputs whatever the other axes' sizes,
    so per-sample sums are bit-identical for any batch size or sharding.
    """
    size = x.shape[axis]
    width = 1 << max(0, (size - 1).bit_length())
    if width != size:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, width - size)
        x = jnp.pad(x, pad)
    while width > 1:
        width //= 2
        x = lax.slice_in_dim(x, 0, width, axis=axis) + lax.slice_in_dim(x, width, 2 * width, axis=axis)
    return jnp.squeeze(x, axis)


def ordered_outer_sum(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per sample, sum over rows of outer products: a (n, m, P), b (n, m, Q) -> (n, P, Q) float32,
    accumulated row after row (a fixed order for every sample, unlike a matrix product)."""

    def body(row, total):
        return total + a[:, row, :, None] * b[:, row, None, :]

    total = jnp.zeros((a.shape[0], a.shape[2], b.shape[2]), jnp.float32)
    return lax.fori_loop(0, a.shape[1], body, total)


def _default_buffer(bytes_per_sample: int) -> int:
    return int(max(8, min(1024, _BUFFER_BYTES // max(1, bytes_per_sample))))


def sample_ordered(partial: Callable[[Any], Any], fold: Callable[[Any, Any], Any], total: Callable[[], Any],
                   partial_shapes: Any, finalize: Callable[[Any, int], Any], buffer: int) -> StreamingStatistic:
    """A float statistic that is folded sample by sample in sample-number order (module docstring).

    partial(values) -> tuple of per-sample partials, each (n, ...) float32 (device, jit-able);
    fold(total, one_partial) -> total: adds one sample's partials (host, float64 numpy);
    total() -> the empty host accumulator (a pytree of numpy values); partial_shapes: tuple of the
    per-sample shapes of the partials; finalize(total, samples) -> result; buffer: per-sample
    slots on each device (the engine drains the state before they run out).
    The statistic's inputs are ``(values, sample_index int32 (n,))``.
    """
    buffer = int(buffer)
    if buffer < 1:
        raise ValueError(f"buffer must be >= 1 samples, got {buffer}")

    def init():
        device_total = jax.tree_util.tree_map(lambda x: jnp.zeros(np.shape(x), jnp.float32), total())
        slots = tuple(jnp.zeros((buffer,) + tuple(shape), jnp.float32) for shape in partial_shapes)
        return OrderedState(jnp.zeros((), jnp.int32), device_total, jnp.full((buffer,), INT32_MAX, jnp.int32),
                            slots, jnp.zeros((), jnp.int32))

    def update(state, inputs, valid):
        values, sample_index = inputs
        parts = partial(values)
        index = jnp.where(valid, sample_index.astype(jnp.int32), INT32_MAX)
        slots = tuple(lax.dynamic_update_slice_in_dim(buf, p.astype(buf.dtype), state.fill, axis=0)
                      for buf, p in zip(state.partial, parts))
        return state._replace(index=lax.dynamic_update_slice_in_dim(state.index, index, state.fill, axis=0),
                              partial=slots, fill=state.fill + index.shape[0])

    def merge(a, b):
        if int(a.samples) and int(b.samples):
            raise ValueError("cannot merge two states that both hold folded samples; merge device states "
                             "(or one host state) into a host state")
        base = b if int(b.samples) else a
        samples = int(base.samples)
        acc = jax.tree_util.tree_map(lambda x: np.array(x, np.float64), base.total) if samples else total()
        index = np.concatenate([np.asarray(a.index, np.int64), np.asarray(b.index, np.int64)])
        parts = tuple(np.concatenate([np.asarray(x), np.asarray(y)]) for x, y in zip(a.partial, b.partial))
        keep = index != INT32_MAX
        order = np.flatnonzero(keep)[np.argsort(index[keep], kind="stable")]
        index = index[order]
        parts = tuple(x[order] for x in parts)
        if np.any(index < samples) or np.any(np.diff(index) == 0):
            raise ValueError("a sample was merged twice into a sample-ordered statistic")
        done = 0
        while done < index.size and index[done] == samples:
            acc = fold(acc, tuple(x[done].astype(np.float64) for x in parts))
            samples += 1
            done += 1
        rest = tuple(x[done:] for x in parts)
        return OrderedState(np.int64(samples), acc, index[done:].astype(np.int32), rest, np.int32(index.size - done))

    def final(state):
        if np.asarray(state.index).size and np.any(np.asarray(state.index) != INT32_MAX):
            missing = int(state.samples)
            raise ValueError(f"sample {missing} never arrived, so later samples could not be folded")
        samples = int(state.samples)
        acc = jax.tree_util.tree_map(lambda x: np.array(x, np.float64), state.total) if samples else total()
        return finalize(acc, samples)

    return StreamingStatistic(init, update, merge, final, lambda inputs: buffer)


# ----------------------------------------------------------------------------- mean and variance


class Moments(NamedTuple):
    """count: rows seen (float); mean, variance (count - 1 in the denominator; NaN below 2 rows): float64 (U,)."""

    count: float
    mean: np.ndarray
    variance: np.ndarray


def _rows(values: jax.Array) -> jax.Array:
    """(n, U) or (n, m, U) -> (n, m, U) float32."""
    values = jnp.asarray(values, jnp.float32)
    return values[:, None, :] if values.ndim == 2 else values.reshape(values.shape[0], -1, values.shape[-1])


def running_moments(num_features: int, buffer: int | None = None) -> StreamingStatistic:
    """Mean and variance of every feature over all rows of all samples (davidbau/dissect's ``Variance``).

    inputs: (values float (n, U) or (n, ..., U) -- each sample's rows, e.g. the pixels of a
    feature map (N, h, w, U) -- and sample_index int32 (n,)). finalize -> :class:`Moments`.
    Bit-identical for any device count and batch size (module docstring).
    """
    U = int(num_features)

    def partial(values):
        rows = _rows(values)
        count = jnp.full((rows.shape[0],), rows.shape[1], jnp.float32)
        mean = pairwise_sum(rows) / jnp.float32(rows.shape[1])
        m2 = pairwise_sum(jnp.square(rows - mean[:, None, :]))
        return count, mean, m2

    def fold(total, part):
        count_t, mean_t, m2_t = total
        count_i, mean_i, m2_i = part
        count = count_t + count_i
        delta = mean_i - mean_t
        return count, mean_t + delta * (count_i / count), m2_t + m2_i + delta * delta * (count_t * count_i / count)

    def empty():
        return np.float64(0.0), np.zeros(U), np.zeros(U)

    def finalize(total, samples):
        count, mean, m2 = total
        with np.errstate(invalid="ignore", divide="ignore"):
            variance = m2 / (count - 1) if count > 1 else np.full(U, np.nan)
        return Moments(float(count), mean if samples else np.full(U, np.nan), variance)

    return sample_ordered(partial, fold, empty, ((), (U,), (U,)), finalize, buffer or _default_buffer(8 * U + 4))


# ----------------------------------------------------------------------------- covariance


class Covariance(NamedTuple):
    """count: rows seen; mean_a (P,), mean_b (Q,), covariance (P, Q) (count - 1 in the denominator): float64."""

    count: float
    mean_a: np.ndarray
    mean_b: np.ndarray
    covariance: np.ndarray

    def correlation(self) -> np.ndarray:
        """Pearson correlation (P, Q) float64; only for ``running_covariance(P)`` of one variable."""
        std = np.sqrt(np.diag(self.covariance))
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.covariance / np.outer(std, std)


def running_covariance(num_a: int, num_b: int | None = None, buffer: int | None = None) -> StreamingStatistic:
    """Covariance between the features of two variables observed at the same rows (davidbau/dissect's
    ``CrossCovariance``), or of one variable with itself (``num_b=None``, its ``Covariance``).

    inputs: ((a float (n, ..., P), b float (n, ..., Q)) -- or a alone when num_b is None -- and
    sample_index int32 (n,)); a and b have the same rows per sample (e.g. two layers' maps
    upsampled to one size). finalize -> :class:`Covariance`. Bit-identical for any device count
    and batch size (module docstring).
    """
    P = int(num_a)
    Q = P if num_b is None else int(num_b)
    same = num_b is None

    def partial(values):
        a, b = (values, values) if same else values
        a, b = _rows(a), _rows(b)
        if a.shape[:2] != b.shape[:2]:
            raise ValueError(f"running_covariance: a and b need the same samples and rows, got {a.shape} and {b.shape}")
        count = jnp.full((a.shape[0],), a.shape[1], jnp.float32)
        mean_a = pairwise_sum(a) / jnp.float32(a.shape[1])
        mean_b = pairwise_sum(b) / jnp.float32(b.shape[1])
        comoment = ordered_outer_sum(a - mean_a[:, None, :], b - mean_b[:, None, :])
        return count, mean_a, mean_b, comoment

    def fold(total, part):
        count_t, mean_a_t, mean_b_t, c_t = total
        count_i, mean_a_i, mean_b_i, c_i = part
        count = count_t + count_i
        delta_a = mean_a_i - mean_a_t
        delta_b = mean_b_i - mean_b_t
        weight = count_t * count_i / count
        return (count, mean_a_t + delta_a * (count_i / count), mean_b_t + delta_b * (count_i / count),
                c_t + c_i + np.outer(delta_a, delta_b) * weight)

    def empty():
        return np.float64(0.0), np.zeros(P), np.zeros(Q), np.zeros((P, Q))

    def finalize(total, samples):
        count, mean_a, mean_b, c = total
        covariance = c / (count - 1) if count > 1 else np.full((P, Q), np.nan)
        return Covariance(float(count), mean_a, mean_b, covariance)

    shapes = ((), (P,), (Q,), (P, Q))
    return sample_ordered(partial, fold, empty, shapes, finalize, buffer or _default_buffer(4 * (P * Q + P + Q + 1)))


__all__ = ["OrderedState", "sample_ordered", "pairwise_sum", "ordered_outer_sum", "Moments", "running_moments",
           "Covariance", "running_covariance"]
