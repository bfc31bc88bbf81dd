"""Building blocks of the dissection engine against independent numpy computations."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from gandissect_jax.dissection import quantiles as qt
from gandissect_jax.dissection import statistics as st
from gandissect_jax.dissection.scoring import score_counts
from gandissect_jax.dissection.upsample import (bilinear_matrix, bilinear_taps, upsample_bilinear,
                                                upsample_bilinear_unit_major)

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"


def golden():
    return np.load(FIXTURES / "dissect_golden.npz")


# ----------------------------------------------------------------------------- upsampling


def reference_upsample_float64(features: np.ndarray, size) -> np.ndarray:
    """The README's formula, written directly: src = clip((t + .5) * n_in / n_out - .5, 0, n_in - 1)."""
    def axis_weights(n_in, n_out):
        w = np.zeros((n_out, n_in))
        for t in range(n_out):
            src = min(max((t + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            i = int(np.floor(src))
            j = min(i + 1, n_in - 1)
            w[t, i] += 1 - (src - i)
            w[t, j] += src - i
        return w

    wy = axis_weights(features.shape[1], size[0])
    wx = axis_weights(features.shape[2], size[1])
    return np.einsum("yh,nhwu,xw->nyxu", wy, features.astype(np.float64), wx)


def test_bilinear_matrix_matches_formula_and_taps():
    for n_in, n_out in [(8, 32), (7, 30), (4, 4), (5, 3), (1, 6)]:
        matrix = bilinear_matrix(n_in, n_out)
        taps = bilinear_taps(n_in, n_out)
        dense = np.zeros((n_out, n_in))
        np.add.at(dense, (np.arange(n_out), taps.index0), taps.weight0)
        np.add.at(dense, (np.arange(n_out), taps.index1), taps.weight1)
        np.testing.assert_allclose(dense, matrix, atol=1e-7)
        np.testing.assert_allclose(matrix.sum(1), 1.0, atol=1e-12)
        expected = reference_upsample_float64(np.eye(n_in)[None, :, :1, None].repeat(1, 2), (n_out, 1))[0, :, 0, 0]
        np.testing.assert_allclose(matrix[:, 0], expected, atol=1e-12)


def test_upsample_matches_float64_formula_and_jax_resize():
    data = golden()
    features = data["features"].transpose(0, 2, 3, 1)
    up = np.asarray(jax.jit(lambda f: upsample_bilinear(f, (32, 32)))(features))
    exact = reference_upsample_float64(features, (32, 32))
    assert np.abs(up - exact).max() < 1.5e-6
    resized = np.asarray(jax.image.resize(features, (60, 32, 32, 24), "bilinear"))
    assert np.abs(up - resized).max() < 2e-6
    rng = np.random.RandomState(3)
    odd = rng.randn(2, 7, 5, 3).astype(np.float32)
    np.testing.assert_allclose(np.asarray(upsample_bilinear(odd, (30, 23))), reference_upsample_float64(odd, (30, 23)),
                               atol=2e-6)
    # the border copies the edge row (interpolated along the other axis only)
    np.testing.assert_allclose(up[:, 0], up[:, 1], atol=0)


def test_upsample_is_independent_of_batch_size():
    rng = np.random.RandomState(0)
    features = rng.randn(12, 7, 5, 6).astype(np.float32)
    fn = jax.jit(lambda f: upsample_bilinear(f, (30, 23)))
    full = np.asarray(fn(features))
    pieces = np.concatenate([np.asarray(fn(features[i:i + 4])) for i in range(0, 12, 4)])
    assert np.array_equal(full, pieces)
    # the unit-major variant used by the passes gives the very same values
    unit_major = np.asarray(jax.jit(lambda f: upsample_bilinear_unit_major(f, (30, 23)))(features))
    assert np.array_equal(unit_major, full.transpose(3, 0, 1, 2))


# ----------------------------------------------------------------------------- exact quantiles


def run_radix(values: np.ndarray, q, batch=7, unit_chunk=2, bits=(16, 8, 8)):
    n, m, units = values.shape
    plan = qt.RadixQuantiles(units, q, bits)
    stages = 0
    while not plan.done:
        stage = plan.stage()
        stat = qt.radix_histogram(units, stage, unit_chunk)
        state = stat.init()
        tables = tuple(jnp.asarray(t) for t in stage.tables)
        update = jax.jit(stat.update)
        for start in range(0, n, batch):
            block = np.zeros((batch, m, units), np.float32)
            valid = np.zeros(batch, bool)
            chunk = values[start:start + batch]
            block[:len(chunk)] = chunk
            block[len(chunk):] = 1e30  # padding must be ignored
            valid[:len(chunk)] = True
            state = update(state, (tables, jnp.asarray(block.transpose(2, 0, 1))), jnp.asarray(valid))
        plan.observe(stat.finalize(state))
        stages += 1
    return plan, stages


def test_radix_quantiles_are_exact_numpy_hazen():
    rng = np.random.RandomState(0)
    values = rng.randn(40, 37, 6).astype(np.float32)
    values[..., 1] = np.round(values[..., 1])  # many ties
    values[..., 2] = np.maximum(values[..., 2], 0)  # half exactly zero
    values[..., 3] = -np.abs(values[..., 3]) * 1e-30  # tiny negatives
    values[:5, :, 4] = -0.0  # negative zeros
    values[..., 5] = 7.25  # constant
    q = np.concatenate([1 - np.logspace(-3, 0, 100), [0.5, 0.995, 0.0, 1.0]])
    plan, stages = run_radix(values, q)
    assert stages == 3
    expected = np.quantile(values.reshape(-1, 6), q, axis=0, method="hazen").T
    np.testing.assert_array_equal(plan.quantiles(), expected.astype(np.float32))
    # the order statistics are the exact sorted values
    ranks = plan._ranks[0]
    np.testing.assert_array_equal(plan.order_statistics(), np.sort(values.reshape(-1, 6), axis=0)[ranks].T)


def test_radix_quantile_rank_error_on_golden_features():
    data = golden()
    raw = data["features"].transpose(0, 2, 3, 1).reshape(60, 64, 24)
    q = data["quantile_q"]
    plan, _ = run_radix(raw, q, batch=16)
    got = plan.quantiles()
    np.testing.assert_allclose(got, data["exact_quantiles_hazen"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[:, 3], data["exactq_levels"], atol=1e-5)
    flat = raw.transpose(2, 0, 1).reshape(24, -1)
    for u in range(24):
        for j, quantile in enumerate(q):
            below = np.mean(flat[u] < got[u, j])
            at_most = np.mean(flat[u] <= got[u, j])
            # the estimate's rank lies within 1e-3 of q (here it is exact up to the interpolation step)
            assert below - 1e-3 <= quantile <= at_most + 1e-3 + 1.0 / flat.shape[1]


def test_float_keys_order_and_roundtrip():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-37, 2.0, np.inf], np.float32)
    keys = np.asarray(qt.float_to_key(jnp.asarray(values)))
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    assert keys[3] == keys[4]  # -0.0 folds onto +0.0
    np.testing.assert_array_equal(keys, qt.float_to_key_np(values))
    back = qt.key_to_float(keys)
    np.testing.assert_array_equal(back[np.isfinite(values)], np.where(values == 0, 0.0, values)[np.isfinite(values)])


# ----------------------------------------------------------------------------- top-k


def test_topk_streams_and_merges_exactly():
    rng = np.random.RandomState(1)
    scores = rng.randn(50, 5).astype(np.float32)
    scores[:, 4] = np.round(scores[:, 4])  # ties: lower sample index first
    stat = st.top_k(5, 7)
    update = jax.jit(stat.update)
    halves = []
    for part in (range(0, 25), range(25, 50)):
        state = stat.init()
        idx = np.array(list(part))
        for start in range(0, len(idx), 6):
            chunk = idx[start:start + 6]
            block = np.zeros((6, 5), np.float32)
            block[:len(chunk)] = scores[chunk]
            index = np.zeros(6, np.int32)
            index[:len(chunk)] = chunk
            valid = np.arange(6) < len(chunk)
            state = update(state, (jnp.asarray(block), jnp.asarray(index)), jnp.asarray(valid))
        halves.append(jax.tree_util.tree_map(np.asarray, state))
    merged = stat.merge(halves[1], halves[0])
    values, indices = stat.finalize(merged)
    for u in range(5):
        order = np.lexsort((np.arange(50), -scores[:, u]))[:7]
        np.testing.assert_array_equal(indices[u], order)
        np.testing.assert_array_equal(values[u], scores[order, u])


# ----------------------------------------------------------------------------- counts at levels


def brute_force_counts(up, labels, levels, num_labels, label_category, num_categories):
    """Independent per-image loops, as the reference's collect_bincounts (one level per unit)."""
    n, H, W, U = up.shape
    label_counts = np.zeros(num_labels, np.int64)
    total = np.zeros(num_categories, np.int64)
    cc = np.zeros((num_categories, U), np.int64)
    ic = np.zeros((num_labels, U), np.int64)
    for i in range(n):
        bc = np.bincount(labels[i].reshape(-1), minlength=num_labels)
        label_counts += bc
        present = np.flatnonzero(bc)
        cats = sorted({label_category[l] for l in present})
        active = up[i] > levels
        for c in cats:
            total[c] += H * W
            cc[c] += active.reshape(-1, U).sum(0)
        for l in present:
            if l == 0:
                continue
            mask = (labels[i] == l).any(-1)
            ic[l] += (active & mask[..., None]).reshape(-1, U).sum(0)
    return label_counts, total, cc, ic


def test_level_counts_match_brute_force_at_every_level():
    rng = np.random.RandomState(5)
    n, H, W, U, D, L, C = 9, 6, 5, 4, 3, 8, 2
    label_category = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    up = rng.randn(n, H, W, U).astype(np.float32)
    up[..., 3] = np.round(up[..., 3] * 2) / 2  # values exactly on levels
    labels = rng.randint(0, L, size=(n, H, W, D)).astype(np.int32)
    labels[..., 1] = np.where(rng.rand(n, H, W) < 0.3, labels[..., 0], labels[..., 1])  # repeats across channels
    labels[2] = 0
    levels = np.sort(rng.randn(U, 5).astype(np.float32), axis=1)
    levels[3] = [-1.0, -0.5, 0.0, 0.5, 0.5]
    stat = st.level_counts(U, L, 5, C, unit_chunk=2)
    labstat = st.label_statistics(L, C)
    valid = jnp.ones(n, bool)
    flat = jnp.asarray(labels.reshape(n, -1, D))
    presence = st.image_label_presence(flat, valid, L)
    categories = st.image_category_presence(presence, jnp.asarray(label_category), C, valid)
    dedup = st.dedup_channels(flat)
    unit_major = jnp.asarray(up.reshape(n, -1, U).transpose(2, 0, 1))
    state = stat.update(stat.init(), (unit_major, jnp.asarray(levels), dedup, categories), valid)
    lstate = labstat.update(labstat.init(), (flat, dedup, categories), valid)
    counts = stat.finalize(state)
    lab = labstat.finalize(lstate)
    category_above = st.suffix_counts(counts.category)
    label_above = st.suffix_counts(counts.label)
    for j in range(5):
        lc, total, cc, ic = brute_force_counts(up, labels, levels[:, j], L, label_category, C)
        np.testing.assert_array_equal(lab.label_counts, lc)
        np.testing.assert_array_equal(lab.image_counts[:C] * H * W, total)
        np.testing.assert_array_equal(category_above[:C, :, j], cc)
        np.testing.assert_array_equal(label_above[:, :, j].T, ic)
        np.testing.assert_array_equal(category_above[C, :, j], (up > levels[:, j]).reshape(-1, U).sum(0))
    for l in range(1, L):
        assert lab.label_pixels[l] == (labels == l).any(-1).sum()


def test_label_signatures_number_the_distinct_label_tuples():
    rng = np.random.RandomState(3)
    rows = rng.randint(-1, 4, size=(200, 3)).astype(np.int32)
    rows[::7] = -1  # pixels with no label at all
    for capacity in (8, 64, 200):
        ids, table, count = jax.jit(st.label_signatures, static_argnums=1)(jnp.asarray(rows), capacity)
        ids, table = np.asarray(ids), np.asarray(table)
        unique = np.unique(rows, axis=0)  # lexicographic, as the ids
        assert int(count) == len(unique)
        np.testing.assert_array_equal(unique[ids], rows)  # ids follow the lexicographic order
        shown = min(capacity, len(unique))
        np.testing.assert_array_equal(table[:shown], unique[:shown])
        assert (table[shown:] == -1).all()


@functools.lru_cache(maxsize=None)
def _level_count_program(num_units, num_labels, num_levels, num_categories, max_signatures):
    stat = st.level_counts(num_units, num_labels, num_levels, num_categories, unit_chunk=2,
                           max_signatures=max_signatures)
    return stat, jax.jit(stat.update)  # one compile per configuration, not per example


def _level_count_states(up, levels, labels, label_category, num_labels, num_categories, max_signatures, valid):
    n, U = up.shape[0], up.shape[-1]
    stat, update = _level_count_program(U, num_labels, levels.shape[1], num_categories, max_signatures)
    flat = jnp.asarray(labels.reshape(n, -1, labels.shape[-1]))
    valid = jnp.asarray(valid)
    presence = st.image_label_presence(flat, valid, num_labels)
    categories = st.image_category_presence(presence, jnp.asarray(label_category), num_categories, valid)
    unit_major = jnp.asarray(up.reshape(n, -1, U).transpose(2, 0, 1))
    state = update(stat.init(), (unit_major, jnp.asarray(levels), st.dedup_channels(flat), categories), valid)
    return stat.finalize(state)


@settings(max_examples=12, deadline=None)
@given(seed=hs.integers(0, 2**31 - 1), distinct=hs.integers(2, 12), capacity=hs.sampled_from([1, 4, 16, 64]))
def test_level_counts_per_signature_equal_per_pixel(seed, distinct, capacity):
    """The per-signature count (whether every image fits ``capacity`` signatures or the batch falls
    back to per pixel) equals the per-pixel count, array for array, on any labels."""
    rng = np.random.RandomState(seed)
    n, H, W, U, D, L, C, J = 4, 6, 5, 4, 3, 10, 2, 5
    up = rng.randn(n, H, W, U).astype(np.float32)
    levels = np.sort(rng.randn(U, J).astype(np.float32), axis=1)
    up[..., 0] = levels[0, rng.randint(0, J, size=(n, H, W))]  # values exactly on levels
    labels = rng.randint(0, distinct, size=(n, H, W, D)).astype(np.int32) * rng.randint(0, 2, size=(1, 1, 1, D))
    labels[..., 1] = np.where(rng.rand(n, H, W) < 0.3, labels[..., 0], labels[..., 1])  # repeats across channels
    labels[labels >= L] = L - 1
    labels[0, 0, 0, 0] = 1
    label_category = rng.randint(0, C, size=L)
    valid = np.array([True, True, False, True])
    pixel = _level_count_states(up, levels, labels, label_category, L, C, 0, valid)
    signature = _level_count_states(up, levels, labels, label_category, L, C, capacity, valid)
    np.testing.assert_array_equal(signature.category, pixel.category)
    np.testing.assert_array_equal(signature.label, pixel.label)
    assert pixel.label.sum() > 0


def test_level_counts_take_the_signature_path_when_every_image_fits(monkeypatch):
    """At run time, a batch whose images each have at most K label signatures is counted per
    signature only, and a batch with one image of more per pixel only (without recompiling): each
    path is wrapped to mark the label histogram with the loop steps it ran."""
    def marked(function, weight):
        def wrapper(label, *args, **kwargs):
            steps = args[-1]
            per_image, label = function(label, *args, **kwargs)
            return per_image, label.at[0].add(weight * steps)
        return wrapper

    U, L, J, C, K, n, P = 4, 10, 3, 2, 8, 3, 64
    rng = np.random.RandomState(0)
    up = jnp.asarray(rng.randn(U, n, P).astype(np.float32))
    levels = jnp.asarray(np.sort(rng.randn(U, J).astype(np.float32), axis=1))
    categories = jnp.ones((n, C + 1), jnp.int32)
    valid = jnp.ones((n,), bool)
    few = rng.randint(1, 4, size=(n, P, 2)).astype(np.int32)
    few[..., 1] = few[..., 0]  # 3 signatures per image
    many = few.copy()
    many[1, :, 1] = np.arange(P) % L  # image 1: 30 > K signatures
    cases = [(jnp.asarray(few), U // 2, 0), (jnp.asarray(many), 0, U // 2)]
    unmarked = st.level_counts(U, L, J, C, unit_chunk=2, max_signatures=0)
    want = [np.asarray(jax.jit(unmarked.update)(unmarked.init(), (up, levels, labels, categories), valid).label)
            for labels, _, _ in cases]
    monkeypatch.setattr(st, "_count_per_pixel", marked(st._count_per_pixel, 1))
    monkeypatch.setattr(st, "_count_per_signature", marked(st._count_per_signature, 1000))
    stat = st.level_counts(U, L, J, C, unit_chunk=2, max_signatures=K)
    update = jax.jit(stat.update)
    for (labels, signature_steps, pixel_steps), expected in zip(cases, want):
        got = np.asarray(update(stat.init(), (up, levels, labels, categories), valid).label)
        assert got[0] - expected[0] == 1000 * signature_steps + pixel_steps
        np.testing.assert_array_equal(got[1:], expected[1:])
    assert update._cache_size() == 1


def test_level_counts_per_signature_hold_no_second_label_histogram():
    """The per-signature path and its per-pixel fallback update the label histogram in place: the
    compiled update's temporaries do not hold a copy of it (a lax.cond did: +358 MB at LSUN scale)."""
    U, L, J, n, P, D = 32, 400, 20, 4, 64 * 64, 3
    histogram_bytes = U * L * (J + 1) * 4
    temp = {}
    for max_signatures in (0, 64):
        stat = st.level_counts(U, L, J, 3, max_signatures=max_signatures)
        args = (jax.eval_shape(stat.init),
                (jax.ShapeDtypeStruct((U, n, P), jnp.float32), jax.ShapeDtypeStruct((U, J), jnp.float32),
                 jax.ShapeDtypeStruct((n, P, D), jnp.int32), jax.ShapeDtypeStruct((n, 4), jnp.int32)),
                jax.ShapeDtypeStruct((n,), bool))
        compiled = jax.jit(stat.update, donate_argnums=0).lower(*args).compile()
        temp[max_signatures] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[64] < temp[0] + histogram_bytes // 2, (temp, histogram_bytes)


def test_level_counts_choose_signatures_where_they_pay():
    assert st.signature_capacity(128 * 128, 101) == st.MAX_SIGNATURES  # the paper's IQR search
    assert st.signature_capacity(64 * 64, 101) == 162  # 4 x pixels / buckets
    assert st.signature_capacity(64 * 64, 2) == st.MAX_SIGNATURES  # fixed levels
    assert st.signature_capacity(8 * 8, 101) == 0  # too few pixels to be worth it
    with pytest.raises(ValueError, match="max_signatures"):
        st.level_counts(4, 10, 5, 2, max_signatures=-1)


def test_level_counts_signature_steps_keep_int32_indices():
    """The signature path's flat (unit, image, signature, bucket) indices stay below INT32_MAX: fewer
    units per step where a step's would not fit, per pixel where one unit's does not."""
    assert st.signature_unit_chunk(512, 64, 32, 256, 101) == 64  # the paper's IQR search on a GPU
    big = st.INT32_MAX // (256 * 101 * 64) + 1  # images per device where 64 units per step overflow
    chunk = st.signature_unit_chunk(512, 64, big, 256, 101)
    assert 0 < chunk < 64 and 512 % chunk == 0 and chunk * big * 256 * 101 <= st.INT32_MAX
    assert st.signature_unit_chunk(512, 64, st.INT32_MAX // (256 * 101) + 1, 256, 101) == 0
    # and a batch of that many images is compiled per pixel only (shapes alone, nothing allocated)
    U, L, J, C, P, D, K = 2, 3, 1, 1, 1, 1, 256
    stat = st.level_counts(U, L, J, C, unit_chunk=2, max_signatures=K)
    for images, signature_sorts in ((st.INT32_MAX // (K * (J + 1)) + 1, 0), (8, 1)):
        inputs = (jax.ShapeDtypeStruct((U, images, P), jnp.float32), jax.ShapeDtypeStruct((U, J), jnp.float32),
                  jax.ShapeDtypeStruct((images, P, D), jnp.int32), jax.ShapeDtypeStruct((images, C + 1), jnp.int32))
        valid = jax.ShapeDtypeStruct((images,), bool)
        text = jax.jit(stat.update).lower(jax.eval_shape(stat.init), inputs, valid).as_text()
        assert text.count("stablehlo.sort") == signature_sorts, images  # label_signatures' sort


def test_score_counts_reproduce_reference_scores():
    data = golden()
    label_category = [0] + [0] * 7 + [2, 2] + [1] * 3
    for prefix in ("", "iqrmode_", "exactq_", "exactq_iqrmode_"):
        iou, iqr = score_counts(label_category, data["total_counts"], data["label_counts"],
                                data[prefix + "category_activation_counts"], data[prefix + "intersection_counts"])
        np.testing.assert_allclose(iou, data[prefix + "iou_scores"], atol=1e-12)
        np.testing.assert_allclose(iqr[1:], data[prefix + "iqr_scores"][1:], atol=1e-12)


def test_overflow_bound():
    assert st.samples_before_overflow(128 * 128, 5) == (2**31 - 1) // (128 * 128 * 5)
    with pytest.raises(ValueError):
        qt.RadixQuantiles(3, [0.5], bits=(16, 8))


# ----------------------------------------------------------------------------- threshold search


def scalar_iqr(isect, pred, label, label_pixels, total, pixels):
    """One cell of the search, written out with Python floats."""
    import math

    truth = label / pixels
    isects = (isect / label_pixels if label_pixels else 0.0) * truth
    preds = pred / total
    unions = truth + preds - isects
    cells = [[isects, preds - isects], [truth - isects, 1 - unions]]
    cells = [[min(max(c, 0.0), 1.0) for c in row] for row in cells]
    rows = [sum(row) for row in cells]
    cols = [cells[0][k] + cells[1][k] for k in range(2)]
    mi = je = 0.0
    for j in range(2):
        for k in range(2):
            p = cells[j][k]
            if p > 0:
                mi += p * math.log(p / (rows[j] * cols[k]))
                je -= p * math.log(p)
    mi, je = max(mi, 0.0), max(je, 0.0)
    return mi, je, isects + cells[1][1], isects / unions if unions else 0.0


def test_iqr_search_against_scalar_loops():
    from gandissect_jax.dissection.threshold_search import search_iqr_thresholds

    rng = np.random.RandomState(11)
    U, L, F, C = 3, 5, 6, 2
    pixels = 10000
    label_category = np.array([0, 0, 1, 1, 0])
    label_counts = np.array([9000, 2500, 800, 5, 1200])  # label 3 is rare (< 1e-3 of the pixels)
    label_pixels = label_counts.copy()
    total_counts = np.array([10000, 6000, 10000])
    levels = np.sort(rng.randn(U, F).astype(np.float32), axis=1)[:, ::-1].copy()  # candidates by falling level
    levels[2] = -np.abs(levels[2])  # unit 2: no positive level
    category_above = np.sort(rng.randint(0, 3000, size=(C + 1, U, F)), axis=2)
    label_above = np.minimum(np.sort(rng.randint(0, 2500, size=(U, L, F)), axis=2), label_counts[None, :, None])
    result = search_iqr_thresholds(label_above, category_above, label_counts, label_pixels, total_counts,
                                   label_category, pixels, levels, fractions=np.linspace(0.1, 1, F), label_chunk=2)
    for l in range(L):
        for u in range(U):
            scores = []
            for f in range(F):
                mi, je, agreement, iou = scalar_iqr(label_above[u, l, f], category_above[label_category[l], u, f],
                                                    label_counts[l], label_pixels[l], total_counts[label_category[l]],
                                                    pixels)
                if f == F - 1 or label_counts[l] / pixels < 1e-3 or l == 0:
                    mi = 0.0
                iqr = mi / je if je > 0 else 0.0
                if agreement <= 0.8 or levels[u, f] <= 0:
                    iqr = 0.0
                scores.append((iqr, iou, agreement))
            best = int(np.argmax([s[0] for s in scores]))
            assert result.max_iqr[l, u] == pytest.approx(scores[best][0], abs=1e-12)
            if max(s[0] for s in scores) > 0:
                assert result.candidate[l, u] == best
                assert result.level[l, u] == levels[u, best]
                assert result.iou[l, u] == pytest.approx(scores[best][1], abs=1e-12)
    assert np.all(result.max_iqr[[0, 3]] == 0) and np.all(result.max_iqr[:, 2] == 0)
    assert result.max_iqr.max() > 0
