"""Linear resampling of NHWC maps as separable interpolation matrices.

Every resize used by the segmenter is linear and separable, so it is written as two small
matrices (one per spatial axis) built in float64 numpy from the static shapes and applied with
``einsum`` at full float32 precision. This matches PyTorch exactly in semantics:

- :func:`bilinear_matrix`: ``F.interpolate(mode="bilinear", align_corners=False)`` with **no
  antialiasing** when shrinking (unlike ``jax.image.resize``'s default).
- :func:`adaptive_avg_pool_matrix`: ``torch.nn.AdaptiveAvgPool2d`` (windows may overlap).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "bilinear_matrix",
    "adaptive_avg_pool_matrix",
    "apply_separable",
    "resize_bilinear",
    "adaptive_avg_pool",
]

HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=256)
def _bilinear_matrix_cached(in_size: int, out_size: int) -> np.ndarray:
    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for d in range(out_size):
        src = max(0.0, (d + 0.5) * scale - 0.5)
        i0 = min(int(np.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        t = src - i0
        matrix[d, i0] += 1.0 - t
        matrix[d, i1] += t
    matrix.setflags(write=False)
    return matrix


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float64 ``(out_size, in_size)`` matrix of a 1-D bilinear resize, align_corners=False.

    Output index ``d`` samples ``src = max(0, (d + 0.5) * in / out - 0.5)`` between the two
    nearest inputs (clamped at the end); no antialiasing filter when shrinking.
    """
    return _bilinear_matrix_cached(int(in_size), int(out_size))


@functools.lru_cache(maxsize=256)
def _adaptive_avg_pool_matrix_cached(in_size: int, out_size: int) -> np.ndarray:
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        matrix[i, start:end] = 1.0 / (end - start)
    matrix.setflags(write=False)
    return matrix


def adaptive_avg_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float64 ``(out_size, in_size)`` matrix of 1-D adaptive average pooling (PyTorch rule).

    Output cell ``i`` averages inputs ``floor(i * in / out)`` .. ``ceil((i + 1) * in / out) - 1``.
    """
    return _adaptive_avg_pool_matrix_cached(int(in_size), int(out_size))


def apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """Apply ``rows`` (h', H) along axis 1 and ``cols`` (w', W) along axis 2 of NHWC ``x``.

    Returns ``(N, h', w', C)`` in ``x``'s dtype (float32 math at HIGHEST precision).
    """
    rows = jnp.asarray(rows, x.dtype)
    cols = jnp.asarray(cols, x.dtype)
    y = jnp.einsum("ph,nhwc->npwc", rows, x, precision=HIGHEST)
    return jnp.einsum("qw,npwc->npqc", cols, y, precision=HIGHEST)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to ``size = (h, w)`` like ``F.interpolate(align_corners=False)``.

    Identity (no op) when the size is unchanged, exactly as PyTorch.
    """
    height, width = int(size[0]), int(size[1])
    if (x.shape[1], x.shape[2]) == (height, width):
        return x
    return apply_separable(
        x, bilinear_matrix(x.shape[1], height), bilinear_matrix(x.shape[2], width)
    )


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d(size)`` of NHWC ``x`` -> ``(N, h, w, C)``."""
    height, width = int(size[0]), int(size[1])
    return apply_separable(
        x,
        adaptive_avg_pool_matrix(x.shape[1], height),
        adaptive_avg_pool_matrix(x.shape[2], width),
    )
