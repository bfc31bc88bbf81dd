"""Precise RoI pooling: golden vectors of the reference's pooling and an independent Riemann sum."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.segmenter.prroi import (prroi_axis_weights, prroi_pool, whole_map_prroi_pool,
                                            whole_map_weights)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "segmenter")


@pytest.fixture(scope="module")
def cases():
    return np.load(os.path.join(FIXTURES, "prroi_cases.npz"))


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("pooled", [1, 2, 3, 6])
def test_whole_map_matches_golden(cases, pooled):
    features = jnp.asarray(nhwc(cases["whole_features"]))
    expected = nhwc(cases[f"whole_pool{pooled}"])
    np.testing.assert_allclose(whole_map_prroi_pool(features, pooled), expected, atol=1e-6)
    # the general op with the explicit whole-map RoIs gives the same numbers
    general = prroi_pool(features, cases["whole_rois"], pooled)
    np.testing.assert_allclose(general, expected, atol=1e-6)
    np.testing.assert_allclose(whole_map_weights(pooled, 4), cases[f"whole_weights_y_pool{pooled}"],
                               atol=1e-12 if pooled < 3 else 3e-7)


def test_general_rois_match_golden(cases):
    # fractional boxes, boxes partly outside the map, a zero-width box, batch indices 0 and 1
    out = prroi_pool(jnp.asarray(nhwc(cases["general_features"])), cases["general_rois"], (3, 4))
    expected = nhwc(cases["general_pool3x4_scale1"])
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.all(np.asarray(out)[3] == 0)  # zero-width RoI -> 0, as the reference


def test_one_bin_closed_form():
    # 1x1 bin of the whole map: first row/column half weight, the rest full, divided by H*W
    rng = np.random.RandomState(0)
    f = rng.standard_normal((1, 5, 7, 2)).astype(np.float32)
    cy = np.array([0.5, 1, 1, 1, 1]); cx = np.array([0.5, 1, 1, 1, 1, 1, 1])
    expected = np.einsum("h,w,nhwc->nc", cy, cx, f.astype(np.float64)) / 35
    np.testing.assert_allclose(np.asarray(whole_map_prroi_pool(jnp.asarray(f), 1))[:, 0, 0],
                               expected, atol=1e-6)


def _riemann(feature, box, pooled_h, pooled_w, samples=200):
    """Midpoint Riemann sum of the zero-padded bilinear interpolant over each bin (float64)."""
    height, width = feature.shape
    x0, y0, x1, y1 = box
    out = np.zeros((pooled_h, pooled_w))
    bh, bw = max(y1 - y0, 0) / pooled_h, max(x1 - x0, 0) / pooled_w
    if bh == 0 or bw == 0:
        return out
    tri = lambda t: np.maximum(0.0, 1 - np.abs(t))  # noqa: E731
    for i in range(pooled_h):
        ys = y0 + bh * (i + (np.arange(samples) + 0.5) / samples)
        wy = tri(ys[:, None] - np.arange(height)[None])  # (samples, H)
        for j in range(pooled_w):
            xs = x0 + bw * (j + (np.arange(samples) + 0.5) / samples)
            wx = tri(xs[:, None] - np.arange(width)[None])
            out[i, j] = (wy @ feature @ wx.T).mean()
    return out


def test_against_riemann_sum():
    rng = np.random.RandomState(3)
    feature = rng.standard_normal((6, 8))
    boxes = [(0.0, 0.0, 8.0, 6.0), (-1.3, 0.7, 4.2, 7.5), (2.25, 1.5, 2.75, 5.0), (5.0, -2.0, 11.0, 3.0)]
    rois = np.array([[0, *b] for b in boxes], np.float32)
    out = np.asarray(prroi_pool(jnp.asarray(feature[None, :, :, None], jnp.float32), rois, (3, 2)))
    for k, box in enumerate(boxes):
        np.testing.assert_allclose(out[k, :, :, 0], _riemann(feature, box, 3, 2), atol=2e-4)


def test_spatial_scale_identity_of_reference_unit_test():
    # The reference's own test: 7x7 bins of 14-pixel RoIs at scale 0.5 equal avg_pool2d(2, stride 1).
    rng = np.random.RandomState(1)
    f = rng.uniform(size=(2, 24, 32, 3)).astype(np.float32)
    rois = np.array([[0, 0, 0, 14, 14], [1, 14, 14, 28, 28]], np.float32)
    out = np.asarray(prroi_pool(jnp.asarray(f), rois, 7, spatial_scale=0.5))
    avg = (f[:, :-1, :-1] + f[:, 1:, :-1] + f[:, :-1, 1:] + f[:, 1:, 1:]) / 4
    np.testing.assert_allclose(out[0], avg[0, :7, :7], atol=1e-6)
    np.testing.assert_allclose(out[1], avg[1, 7:14, 7:14], atol=1e-6)


def test_differentiable_in_features_and_rois():
    rng = np.random.RandomState(2)
    f = jnp.asarray(rng.standard_normal((1, 5, 6, 2)), jnp.float32)
    rois = jnp.asarray([[0, 0.5, 0.25, 4.5, 3.75]], jnp.float32)

    @jax.jit
    def loss(f, rois):
        return jnp.sum(prroi_pool(f, rois, 2) ** 2)

    gf, gr = jax.grad(loss, argnums=(0, 1))(f, rois)
    assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gr))
    eps = 1e-3
    for col in (1, 4):
        step = jnp.zeros_like(rois).at[0, col].set(eps)
        fd = (loss(f, rois + step) - loss(f, rois - step)) / (2 * eps)
        np.testing.assert_allclose(gr[0, col], fd, rtol=2e-2, atol=1e-3)


def test_axis_weights_rows_sum_to_covered_mass():
    # a bin fully inside [0, size-1] integrates the partition of unity: its row sums to 1
    w = np.asarray(prroi_axis_weights(np.float64(0.5), np.float64(3.5), 3, 6, xp=np))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
