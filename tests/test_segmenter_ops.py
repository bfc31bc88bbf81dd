"""Resize matrices and on-device quad division against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

import jax.numpy as jnp

from gandissect_jax.segmenter.quad import connected_components, quad_divide
from gandissect_jax.segmenter.resize import (adaptive_avg_pool, adaptive_avg_pool_matrix,
                                             bilinear_matrix, resize_bilinear)

# ------------------------------------------------------------------------------------ resize


def _bilinear_1d(x, out):
    """Direct per-sample bilinear (align_corners=False, no antialias) of a 1-D signal."""
    n = len(x)
    y = np.zeros(out)
    for d in range(out):
        src = max(0.0, (d + 0.5) * n / out - 0.5)
        i0 = int(np.floor(src)); i1 = min(i0 + 1, n - 1); t = src - i0
        y[d] = (1 - t) * x[i0] + t * x[i1]
    return y


@pytest.mark.parametrize("n_in,n_out", [(6, 4), (6, 3), (32, 64), (4, 4), (3, 7), (1, 5)])
def test_bilinear_matrix_matches_direct_formula(n_in, n_out):
    x = np.random.RandomState(n_in * 10 + n_out).standard_normal(n_in)
    np.testing.assert_allclose(bilinear_matrix(n_in, n_out) @ x, _bilinear_1d(x, n_out), atol=1e-12)


def test_bilinear_shrink_has_no_antialiasing():
    # 6 -> 3 samples src = 0.5, 2.5, 4.5: averages of neighbour pairs only (no wider filter)
    np.testing.assert_allclose(bilinear_matrix(6, 3),
                               [[.5, .5, 0, 0, 0, 0], [0, 0, .5, .5, 0, 0], [0, 0, 0, 0, .5, .5]])


def test_resize_bilinear_nhwc_is_separable_and_identity_at_same_size():
    x = np.random.RandomState(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    out = np.asarray(resize_bilinear(jnp.asarray(x), (4, 9)))
    expected = np.einsum("ph,nhwc,qw->npqc", bilinear_matrix(5, 4), x, bilinear_matrix(7, 9))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_array_equal(resize_bilinear(jnp.asarray(x), (5, 7)), x)


@pytest.mark.parametrize("n_in,n_out", [(128, 96), (10, 4), (7, 3), (5, 5)])
def test_adaptive_avg_pool_windows(n_in, n_out):
    m = adaptive_avg_pool_matrix(n_in, n_out)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, int(np.ceil((i + 1) * n_in / n_out))
        row = np.zeros(n_in); row[start:end] = 1 / (end - start)
        np.testing.assert_allclose(m[i], row)
    x = np.random.RandomState(1).standard_normal((1, n_in, n_in, 2)).astype(np.float32)
    out = np.asarray(adaptive_avg_pool(jnp.asarray(x), (n_out, n_out)))
    i = n_out - 1
    start, end = (i * n_in) // n_out, n_in
    np.testing.assert_allclose(out[0, i, i], x[0, start:end, start:end].mean(axis=(0, 1)), atol=1e-5)

# -------------------------------------------------------------------------------------- quad


def _components_scipy(labels):
    """First-pixel row-major index of each pixel's 8-connected equal-value component (scipy)."""
    h, w = labels.shape
    out = np.full((h, w), h * w, np.int64)
    for value in np.unique(labels[labels > 0]):
        lab, num = scipy.ndimage.label(labels == value, structure=np.ones((3, 3)))
        for k in range(1, num + 1):
            flat = np.flatnonzero(lab == k)
            out.reshape(-1)[flat] = flat.min()
    return out


def _quad_reference_loop(objects, n_obj, skip_last=True):
    """Reimplementation of the reference's loop: components numbered by first pixel, bbox split."""
    out = np.zeros(objects.shape + (2,), np.int64)
    for i, image in enumerate(objects):
        comp = _components_scipy(image)
        roots = sorted(set(comp[image > 0].ravel()))
        ch3 = image.copy(); ch4 = image.copy()
        for root in (roots[:-1] if skip_last else roots):
            mask = comp == root
            rows = np.flatnonzero(mask.any(axis=1)); cols = np.flatnonzero(mask.any(axis=0))
            vmid = (rows[0] + rows[-1] + 1) // 2; hmid = (cols[0] + cols[-1] + 1) // 2
            r = np.arange(image.shape[0])[:, None]; c = np.arange(image.shape[1])[None, :]
            ch3 += mask * np.where(r < vmid, n_obj, 3 * n_obj)
            ch4 += mask * np.where(c < hmid, 2 * n_obj, 4 * n_obj)
        ch3[ch3 <= n_obj] = 0; ch4[ch4 <= n_obj] = 0
        out[i, ..., 0] = ch3; out[i, ..., 1] = ch4
    return out


def _random_label_maps(seed, n=3, size=(23, 31), values=4):
    rng = np.random.RandomState(seed)
    noise = rng.uniform(size=(n,) + size)
    smooth = scipy.ndimage.gaussian_filter(noise, sigma=(0, 1.5, 1.5))
    return np.digitize(smooth, np.quantile(smooth, np.linspace(0, 1, values + 1)[1:-1])).astype(
        np.int32)


def test_connected_components_match_scipy():
    maps = _random_label_maps(0)
    # a spiral (long geodesic path) and a checkerboard (diagonal-only connectivity)
    spiral = np.zeros((23, 31), np.int32)
    top, left, bottom, right = 0, 0, 22, 30
    while top <= bottom and left <= right:
        spiral[top, left:right + 1] = 2; spiral[top:bottom + 1, right] = 2
        spiral[bottom, left:right + 1] = 2
        if top + 2 <= bottom:
            spiral[top + 2:bottom + 1, left] = 2
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    checker = (np.indices((23, 31)).sum(0) % 2 + 1).astype(np.int32)
    maps = np.concatenate([maps, spiral[None], checker[None]])
    got = np.asarray(connected_components(maps))
    for image, comps in zip(maps, got):
        np.testing.assert_array_equal(comps, _components_scipy(image))


@pytest.mark.parametrize("skip_last", [True, False])
def test_quad_divide_matches_reference_loop(skip_last):
    maps = _random_label_maps(5, n=4, values=6)
    maps[0, :5] = 0  # some background
    got = np.asarray(quad_divide(maps, 10, skip_last_component=skip_last))
    np.testing.assert_array_equal(got, _quad_reference_loop(maps, 10, skip_last))


def test_quad_skip_last_affects_only_last_component():
    maps = _random_label_maps(7, n=2, values=5)
    quirk = np.asarray(quad_divide(maps, 10, True))
    fixed = np.asarray(quad_divide(maps, 10, False))
    for image, q, f in zip(maps, quirk, fixed):
        comp = _components_scipy(image)
        last = comp == comp[image > 0].max()
        assert np.all(q[last] == 0) and np.all(f[last] > 10)
        np.testing.assert_array_equal(q[~last], f[~last])

# ------------------------------------------------------------------------ fusion convolution


def test_resized_concat_conv_equals_conv_of_resized_concat():
    import jax

    from gandissect_jax.segmenter.upernet import ResizedConcatConv

    rng = np.random.RandomState(4)
    levels = [jnp.asarray(rng.standard_normal((2, s, s + 1, 5)), jnp.float32) for s in (12, 6, 3)]
    module = ResizedConcatConv(features=7)
    params = module.init(jax.random.PRNGKey(0), levels)
    kernel = np.asarray(params["params"]["kernel"])
    assert kernel.shape == (3, 3, 15, 7)
    size = levels[0].shape[1:3]
    concat = np.concatenate([np.asarray(levels[0])] + [
        np.einsum("ph,nhwc,qw->npqc", bilinear_matrix(x.shape[1], size[0]), np.asarray(x),
                  bilinear_matrix(x.shape[2], size[1])) for x in levels[1:]], axis=-1)
    padded = np.pad(concat, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = sum(np.einsum("nhwc,co->nhwo", padded[:, dy:dy + size[0], dx:dx + size[1]],
                             kernel[dy, dx]) for dy in range(3) for dx in range(3))
    np.testing.assert_allclose(module.apply(params, levels), expected, atol=1e-5)
