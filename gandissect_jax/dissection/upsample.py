"""Bilinear upsampling of feature maps to the segmentation size.

Dissection compares a unit's ``h x w`` feature map with an ``H x W`` segmentation, so the map
is first upsampled bilinearly with half-pixel centres and border clamping. Per axis, output
pixel ``t`` samples the source coordinate

    src(t) = clip((t + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)

and interpolates linearly between ``floor(src)`` and ``min(floor(src) + 1, n_in - 1)``. This is
the reference's ``upsample_grid`` + ``grid_sample(padding_mode='border')`` under PyTorch 0.4
(``align_corners=True``), ``F.interpolate(mode='bilinear', align_corners=False)`` and
``jax.image.resize(..., 'bilinear')`` for upsampling.

The operator is separable: ``up = A_y @ f @ A_x^T`` with the ``(n_out, n_in)`` matrices of
:func:`bilinear_matrix`, each row holding at most two non-zero weights. :func:`upsample_bilinear`
applies it as two-tap gathers (``f[i0] * w0 + f[i1] * w1`` per axis) rather than as dense
matrix products: the float32 rounding is then the same for every batch size and device count,
which keeps thresholded counts bit-identical across shardings.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class BilinearTaps(NamedTuple):
    """Two-tap interpolation along one axis: ``out[t] = in[index0[t]] * weight0[t] + in[index1[t]] * weight1[t]``.

    ``index0``, ``index1``: int32 (n_out,); ``weight0``, ``weight1``: float32 (n_out,).
    """

    index0: np.ndarray
    index1: np.ndarray
    weight0: np.ndarray
    weight1: np.ndarray


def bilinear_taps(n_in: int, n_out: int) -> BilinearTaps:
    """Return the two-tap form of half-pixel, border-clamped bilinear resampling from n_in to n_out."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"bilinear_taps needs positive sizes, got n_in={n_in}, n_out={n_out}")
    t = np.arange(n_out, dtype=np.float64)
    src = np.clip((t + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    index0 = np.floor(src).astype(np.int64)
    index1 = np.minimum(index0 + 1, n_in - 1)
    frac = src - index0
    return BilinearTaps(
        index0.astype(np.int32),
        index1.astype(np.int32),
        (1.0 - frac).astype(np.float32),
        frac.astype(np.float32),
    )


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Return the dense float64 (n_out, n_in) matrix A with ``out = A @ in`` along one axis."""
    t = np.arange(n_out, dtype=np.float64)
    src = np.clip((t + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    index0 = np.floor(src).astype(np.int64)
    index1 = np.minimum(index0 + 1, n_in - 1)
    frac = src - index0
    matrix = np.zeros((n_out, n_in), np.float64)
    np.add.at(matrix, (np.arange(n_out), index0), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), index1), frac)
    return matrix


def _apply_taps(x: jax.Array, taps: BilinearTaps, axis: int) -> jax.Array:
    first = jnp.take(x, jnp.asarray(taps.index0), axis=axis)
    second = jnp.take(x, jnp.asarray(taps.index1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    w0 = jnp.asarray(taps.weight0).reshape(shape)
    w1 = jnp.asarray(taps.weight1).reshape(shape)
    return first * w0 + second * w1


def upsample_bilinear(features: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Upsample NHWC float32 features (N, h, w, U) to (N, H, W, U), size = (H, W).

    Rows are interpolated first, then columns, each with two taps in float32. When (h, w)
    already equals size the input is returned unchanged.
    """
    height, width = int(size[0]), int(size[1])
    if features.ndim != 4:
        raise ValueError(f"upsample_bilinear expects NHWC features (N, h, w, U), got shape {features.shape}")
    features = jnp.asarray(features, jnp.float32)
    if features.shape[1] != height:
        features = _apply_taps(features, bilinear_taps(features.shape[1], height), axis=1)
    if features.shape[2] != width:
        features = _apply_taps(features, bilinear_taps(features.shape[2], width), axis=2)
    return features


def upsample_bilinear_unit_major(features: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Upsample NHWC float32 features (N, h, w, U) to unit-major (U, N, H, W).

    Same values as ``upsample_bilinear(features, size)`` moved to (U, N, H, W), but the small
    input is transposed instead of the large output, so consumers that loop over units read
    contiguous memory.
    """
    height, width = int(size[0]), int(size[1])
    if features.ndim != 4:
        raise ValueError(f"upsample_bilinear expects NHWC features (N, h, w, U), got shape {features.shape}")
    units_first = jnp.transpose(jnp.asarray(features, jnp.float32), (3, 0, 1, 2))  # (U, N, h, w)
    if units_first.shape[2] != height:
        units_first = _apply_taps(units_first, bilinear_taps(units_first.shape[2], height), axis=2)
    if units_first.shape[3] != width:
        units_first = _apply_taps(units_first, bilinear_taps(units_first.shape[3], width), axis=3)
    return units_first
