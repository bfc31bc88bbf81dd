"""Model calls at a fixed micro-batch, and the compute dtype the generator and the segmenter run in.

A source that runs models (:class:`~.sources.GeneratorSource`) cuts every device's share of a
batch into micro-batches (:func:`micro_batched`), so a sample's results do not depend on how
samples are grouped; ``compute_dtype='bfloat16'`` casts the models inside the jitted programs.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# ============================================================================ compute dtype

COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(compute_dtype) -> str:
    """The compute dtype's name; ValueError unless it is one of COMPUTE_DTYPES."""
    name = getattr(compute_dtype, "name", None) or getattr(compute_dtype, "__name__", None) or compute_dtype
    if str(name) not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    return str(name)


def cast_floats(tree: Any, dtype) -> Any:
    """``tree`` with its floating-point leaves cast to ``dtype`` (integer leaves unchanged)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def in_dtype(head: Callable, tail: Callable, dtype) -> tuple[Callable, Callable]:
    """(head, tail) computing in ``dtype``: parameters and inputs cast to it, the layer's features
    and the image returned as float32 (the statistics stay float32; the segmenter casts again)."""

    def low_head(params, z):
        r, side = head(cast_floats(params, dtype), z.astype(dtype))
        return r.astype(jnp.float32), side

    def low_tail(params, r, side):
        return tail(cast_floats(params, dtype), r.astype(dtype), side).astype(jnp.float32)

    return low_head, low_tail


# ============================================================================ micro-batches

# Samples per generator / segmenter call on each device (benchmarks/README.md, "Micro-batch").
DEFAULT_MICRO_BATCH = 32


def default_micro_batch(segmenter) -> int:
    """The micro-batch a dissection with ``segmenter`` uses unless told: the segmenter's
    ``dissection_micro_batch`` attribute when it has one (the unified-parsing UPerNet: 4, where a
    larger batch costs memory and gains no speed), else :data:`DEFAULT_MICRO_BATCH`."""
    value = getattr(segmenter, "dissection_micro_batch", None)
    return DEFAULT_MICRO_BATCH if value is None else check_micro_batch(value)


def check_micro_batch(micro_batch) -> int:
    """``micro_batch`` as an int >= 1; ValueError naming the setting otherwise."""
    if not (isinstance(micro_batch, numbers.Integral) and not isinstance(micro_batch, bool) and micro_batch >= 1):
        raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    return int(micro_batch)


def micro_batched(fn: Callable, micro_batch: int) -> Callable:
    """``fn(*params, x)`` run on consecutive chunks of ``micro_batch`` samples of ``x``, one after another.

    fn: jittable, ``x`` (m, ...) -> a pytree of arrays with leading axis m. Returns
    ``run(*params, x)`` for x (n, ...) with n a multiple of ``micro_batch`` (ValueError otherwise),
    which reshapes x to (n / m, m, ...), applies fn to each chunk with ``lax.map`` (one compiled
    body of fixed shape) and returns the outputs reshaped to (n, ...). Every kernel inside fn
    then sees the same shapes whatever n is, so a sample's result does not depend on how many
    samples share its batch or device: XLA's CPU and GPU kernels (convolutions, matrix
    products) choose their blocking, and with it the order of float additions, by shape.
    """
    micro_batch = check_micro_batch(micro_batch)

    def run(*args):
        *params, x = args
        n = x.shape[0]
        if n % micro_batch:
            raise ValueError(f"{n} samples are not a whole number of micro-batches of {micro_batch}")
        chunks = x.reshape((n // micro_batch, micro_batch) + x.shape[1:])
        out = lax.map(lambda chunk: fn(*params, chunk), chunks)
        return jax.tree_util.tree_map(lambda y: y.reshape((n,) + y.shape[2:]), out)

    return run


def pad_to_multiple(indices: np.ndarray, multiple: int) -> np.ndarray:
    """indices padded with copies of the last one to a multiple of ``multiple`` entries."""
    indices = np.asarray(indices)
    extra = -indices.size % multiple
    return np.concatenate([indices, np.full(extra, indices[-1], indices.dtype)]) if extra else indices


__all__ = ["COMPUTE_DTYPES", "check_compute_dtype", "cast_floats", "DEFAULT_MICRO_BATCH", "default_micro_batch",
           "check_micro_batch", "micro_batched", "in_dtype", "pad_to_multiple"]
