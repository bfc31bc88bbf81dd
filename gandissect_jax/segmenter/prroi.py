"""Precise RoI pooling (Jiang et al. 2018) as separable weight matrices; runs on any backend.

The feature map ``F[h, w]`` is read as samples at integer coordinates of the bilinear interpolant
``f(y, x) = sum_{h,w} F[h, w] tri(y - h) tri(x - w)`` with ``tri(t) = max(0, 1 - |t|)`` and zero
outside the map. Each output bin is the exact integral of ``f`` over the bin divided by the bin
area (0 for an empty bin). The integral factorises over the two axes::

    out[i, j] = sum_{h,w} Wy[i, h] F[h, w] Wx[j, w]
    Wy[i, h]  = (T(y_end_i - h) - T(y_start_i - h)) / bin_height

where ``T`` is the antiderivative of ``tri``. So pooling is two small matrices and an einsum,
differentiable with respect to the features (and, through the matrices, the RoI coordinates).
This replaces the reference's CUDA-only extension (``prroi_pool.PrRoIPool2D``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["tri_antiderivative", "prroi_axis_weights", "whole_map_weights", "prroi_pool",
           "whole_map_prroi_pool"]

HIGHEST = jax.lax.Precision.HIGHEST


def tri_antiderivative(t, xp=jnp):
    """``T(t) = integral_{-inf}^{t} max(0, 1 - |s|) ds``: 0, ``(t+1)^2/2``, ``1-(1-t)^2/2``, 1."""
    t = xp.clip(t, -1.0, 1.0)
    return xp.where(t <= 0, 0.5 * (t + 1.0) ** 2, 1.0 - 0.5 * (1.0 - t) ** 2)


def prroi_axis_weights(start, end, pooled: int, size: int, xp=jnp):
    """Weights ``(pooled, size)`` of one axis: bin ``i`` of ``[start, end]`` against sample ``h``.

    Args:
      start, end: scalar RoI bounds along the axis, already multiplied by the spatial scale.
      pooled: number of bins.
      size: number of feature samples along the axis.
      xp: ``jax.numpy`` (traceable, differentiable) or ``numpy`` (float64, static).
    """
    extent = xp.maximum(end - start, 0.0)
    bin_size = extent / pooled
    bin_start = start + bin_size * xp.arange(pooled, dtype=xp.result_type(bin_size))
    bin_end = bin_start + bin_size
    samples = xp.arange(size, dtype=xp.result_type(bin_size))
    mass = (tri_antiderivative(bin_end[:, None] - samples[None, :], xp)
            - tri_antiderivative(bin_start[:, None] - samples[None, :], xp))
    safe = xp.where(bin_size > 0, bin_size, 1.0)
    return xp.where(bin_size > 0, mass / safe, 0.0)


@functools.lru_cache(maxsize=64)
def _whole_map_weights_cached(pooled: int, size: int) -> np.ndarray:
    weights = prroi_axis_weights(np.float64(0.0), np.float64(size), pooled, size, xp=np)
    weights = np.asarray(weights, np.float64)
    weights.setflags(write=False)
    return weights


def whole_map_weights(pooled: int, size: int) -> np.ndarray:
    """float64 ``(pooled, size)`` weights of the whole-map RoI ``[0, size]`` (spatial scale 1).

    The window reaches coordinate ``size``, one past the last sample, so the last sample keeps
    full weight while the first gets half (the interpolant ramps to the zero padding).
    """
    return _whole_map_weights_cached(int(pooled), int(size))


def whole_map_prroi_pool(features: jax.Array, pooled: int | tuple[int, int]) -> jax.Array:
    """PrRoI pooling of every whole map (RoI ``[b, 0, 0, W, H]``, scale 1), as UPerNet's PPM does.

    Args:
      features: float ``(N, H, W, C)``.
      pooled: number of bins ``s`` or ``(s_h, s_w)``.

    Returns:
      ``(N, s_h, s_w, C)`` in ``features``' dtype.
    """
    pooled_h, pooled_w = (pooled, pooled) if isinstance(pooled, int) else pooled
    wy = jnp.asarray(whole_map_weights(pooled_h, features.shape[1]), features.dtype)
    wx = jnp.asarray(whole_map_weights(pooled_w, features.shape[2]), features.dtype)
    return jnp.einsum("ph,nhwc,qw->npqc", wy, features, wx, precision=HIGHEST)


def prroi_pool(features: jax.Array, rois: jax.Array, pooled: int | tuple[int, int],
               spatial_scale: float = 1.0) -> jax.Array:
    """General precise RoI pooling.

    Args:
      features: float ``(N, H, W, C)``.
      rois: float ``(K, 5)`` rows ``[batch_index, x0, y0, x1, y1]`` in input coordinates
        (multiplied by ``spatial_scale``); boxes may be fractional, empty or leave the map.
      pooled: bins ``s`` or ``(s_h, s_w)``.
      spatial_scale: factor from RoI coordinates to feature-map coordinates.

    Returns:
      ``(K, s_h, s_w, C)`` in ``features``' dtype; differentiable in features and RoI corners.
    """
    pooled_h, pooled_w = (pooled, pooled) if isinstance(pooled, int) else pooled
    rois = jnp.asarray(rois, features.dtype)
    batch_index = rois[:, 0].astype(jnp.int32)
    boxes = rois[:, 1:] * spatial_scale
    height, width = features.shape[1], features.shape[2]
    wy = jax.vmap(lambda a, b: prroi_axis_weights(a, b, pooled_h, height))(boxes[:, 1], boxes[:, 3])
    wx = jax.vmap(lambda a, b: prroi_axis_weights(a, b, pooled_w, width))(boxes[:, 0], boxes[:, 2])
    # An RoI is empty when either side is: the reference returns 0 for a zero-area window.
    return jnp.einsum("kph,khwc,kqw->kpqc", wy, features[batch_index], wx, precision=HIGHEST)
