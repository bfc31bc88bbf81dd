"""Parity with the PyTorch reference's numbers (tests/fixtures/dissect, see its README) and with an
independent exact numpy IQR threshold search."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from gandissect_jax.dissection import IQR_FRACTIONS, dissect_features, upsample_bilinear

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"
LEVEL_SETS = {  # levels -> the reference's outputs at those levels
    "levels": "",
    "iqrmode_levels": "iqrmode_",
    "exactq_levels": "exactq_",
    "exactq_iqrmode_levels": "exactq_iqrmode_",
}


@pytest.fixture(scope="module")
def data():
    golden = np.load(FIXTURES / "dissect_golden.npz")
    labels = json.loads((FIXTURES / "labels.json").read_text())
    return {
        "golden": golden,
        "labels": labels,
        "features": golden["features"].transpose(0, 2, 3, 1),
        "segs": golden["segs"].transpose(0, 2, 3, 1),
    }


def run(data, **kwargs):
    """The reference's labelling (label_rule='reference'): parity with its labels and interpretable units."""
    return dissect_features(data["features"], data["segs"], data["labels"], batch_size=16, progress=False,
                            label_rule="reference", **kwargs)["features"]


@pytest.fixture(scope="module")
def iqr_result(data):
    return run(data, threshold="iqr")


@pytest.mark.parametrize("level_name", sorted(LEVEL_SETS))
def test_counts_and_scores_at_reference_levels(data, level_name):
    golden = data["golden"]
    prefix = LEVEL_SETS[level_name]
    result = run(data, levels=golden[level_name])
    np.testing.assert_array_equal(result.label_counts, golden["label_counts"])
    np.testing.assert_array_equal(result.total_counts, golden["total_counts"])
    np.testing.assert_array_equal(result.levels, golden[level_name])
    cc, ic = golden[prefix + "category_activation_counts"], golden[prefix + "intersection_counts"]
    iou, iqr = golden[prefix + "iou_scores"], golden[prefix + "iqr_scores"]
    if level_name == "exactq_iqrmode_levels":
        # 8 upsampled values lie within 1e-6 of these levels: float32 rounding moves up to 2 pixels
        assert np.abs(result.category_activation_counts - cc).max() <= 2
        assert np.abs(result.intersection_counts - ic).max() <= 2
        np.testing.assert_allclose(result.iou, iou, atol=1e-3)
        np.testing.assert_allclose(result.iqr[1:], iqr[1:], atol=1e-3)
    else:
        np.testing.assert_array_equal(result.category_activation_counts, cc)
        np.testing.assert_array_equal(result.intersection_counts, ic)
        np.testing.assert_allclose(result.iou, iou, atol=1e-6, rtol=0)
        np.testing.assert_allclose(result.iqr[1:], iqr[1:], atol=1e-6, rtol=0)
        scores = iou.copy()
        scores[0] = 0
        np.testing.assert_array_equal(result.unit_label, np.argmax(scores, axis=0))
    if prefix in ("", "exactq_"):
        np.testing.assert_array_equal(result.unit_label, golden[prefix + "iou_best_label"])
        np.testing.assert_allclose(result.unit_iou, golden[prefix + "iou_best_score"], atol=1e-6)


def test_topk_is_exact(data, iqr_result):
    golden = data["golden"]
    np.testing.assert_array_equal(iqr_result.topk_values, golden["topk_values"])
    ordinary = np.arange(24) != 16  # unit 16 is constant: its tie order is implementation-defined
    np.testing.assert_array_equal(iqr_result.topk_indices[ordinary], golden["topk_indices"][ordinary])


def test_quantile_mode_uses_exact_quantiles(data):
    golden = data["golden"]
    result = run(data, threshold="quantile", quantile=0.005)
    raw = data["features"].reshape(-1, 24)
    exact = np.quantile(raw, 0.995, axis=0, method="hazen").astype(np.float32)
    np.testing.assert_array_equal(result.levels, exact)
    # the reference rounds q to float32 (0.99500000477), which moves the level by <= 2.9e-6
    np.testing.assert_allclose(result.levels, golden["exactq_levels"], atol=1e-5)
    np.testing.assert_allclose(result.raw_quantiles[:, :4], golden["exact_quantiles_hazen"], atol=1e-6)
    np.testing.assert_array_equal(result.intersection_counts, golden["exactq_intersection_counts"])
    np.testing.assert_allclose(result.iou, golden["exactq_iou_scores"], atol=1e-6)
    np.testing.assert_array_equal(result.unit_label, golden["exactq_iou_best_label"])


# ----------------------------------------------------------------------------- IQR search


def numpy_exact_iqr_search(up, segs, label_category, num_labels, num_categories, fractions):
    """Independent exact-count version of the reference's collect_iqr (steps 3-7 of the README);
    also every candidate's unguarded IoU (L, U, F), the reference's collect_maxiou (NaN -> 0, row 0 = 0)."""
    n, H, W, U = up.shape
    pixels = n * H * W
    flat = up.reshape(-1, U)
    levels = np.quantile(flat, 1.0 - fractions.astype(np.float64), axis=0, method="hazen").T.astype(np.float32)
    label_counts = np.bincount(segs.reshape(-1), minlength=num_labels)
    truth = label_counts / pixels
    label_masks = np.stack([(segs == l).any(-1).reshape(-1) for l in range(num_labels)])  # (L, P)
    per_image = np.stack([np.bincount(segs[i].reshape(-1), minlength=num_labels) > 0 for i in range(n)])
    cat_masks = []
    for c in range(num_categories):
        present = per_image[:, label_category == c].any(1)
        cat_masks.append(np.repeat(present, H * W))
    cat_masks = np.stack(cat_masks)  # (C, P)
    best_iqr = np.zeros((num_labels, U))
    best_f = np.zeros((num_labels, U), np.int64)
    second = np.zeros((num_labels, U))
    iou = np.zeros((num_labels, U, len(fractions)))
    for u in range(U):
        above = (flat[:, u, None] > levels[u][None, :]).astype(np.float64)  # (P, F)
        isect_counts = label_masks.astype(np.float64) @ above  # (L, F)
        pred_counts = cat_masks.astype(np.float64) @ above  # (C, F)
        with np.errstate(divide="ignore", invalid="ignore"):
            cond = np.nan_to_num(isect_counts / label_masks.sum(1, keepdims=True))
            isects = cond * truth[:, None]
            preds = pred_counts[label_category] / (cat_masks.sum(1)[label_category][:, None])
            unions = truth[:, None] + preds - isects
            arr = np.clip(np.array([[isects, preds - isects], [truth[:, None] - isects, 1 - unions]]), 0, 1)
            mi = np.zeros_like(isects)
            je = np.zeros_like(isects)
            for j in range(2):
                for k in range(2):
                    term = arr[j, k] * np.log(arr[j, k] / (arr[j].sum(0) * arr[:, k].sum(0)))
                    mi += np.nan_to_num(term, nan=0.0, posinf=0.0, neginf=0.0)
                    term = arr[j, k] * np.log(arr[j, k])
                    je += np.nan_to_num(term, nan=0.0, posinf=0.0, neginf=0.0)
            mi, je = np.maximum(mi, 0), np.maximum(-je, 0)
            mi[:, -1] = 0
            mi[truth < 1e-3] = 0
            mi[0] = 0  # label 0 is not a concept
            iqr = np.nan_to_num(mi / je)
            iou[:, u] = np.nan_to_num(isects / unions, nan=0.0, posinf=np.inf)
        iou[0, u] = 0
        agreement = isects + arr[1, 1]
        iqr[agreement <= 0.8] = 0
        iqr[:, levels[u] <= 0] = 0
        best_f[:, u] = np.argmax(iqr, axis=1)
        best_iqr[:, u] = iqr.max(1)
        second[:, u] = np.sort(iqr, axis=1)[:, -2]
    return levels, best_iqr, best_f, second, iou


@pytest.fixture(scope="module")
def numpy_search(data):
    up = np.asarray(jax.jit(lambda f: upsample_bilinear(f, (32, 32)))(data["features"]))
    label_category = np.array(data["labels"]["label_category"])
    return numpy_exact_iqr_search(up, data["segs"], label_category, 13, 3, IQR_FRACTIONS)


def test_iqr_search_matches_independent_exact_numpy(data, iqr_result, numpy_search):
    golden = data["golden"]
    levels, best_iqr, best_f, second, _ = numpy_search
    # the candidate levels are the exact hazen quantiles of the upsampled activations
    np.testing.assert_array_equal(iqr_result.candidate_levels, levels)
    np.testing.assert_allclose(iqr_result.max_iqr, best_iqr, atol=1e-6, rtol=1e-5)
    clear = best_iqr - second > 1e-4
    assert clear.sum() >= 40
    np.testing.assert_array_equal(iqr_result.max_iqr_level[clear], levels[np.nonzero(clear)[1], best_f[clear]])
    np.testing.assert_array_equal(iqr_result.max_iqr_quantile[clear], IQR_FRACTIONS[best_f[clear]])
    # unit labels: argmax over labels of the best IQR
    np.testing.assert_array_equal(iqr_result.unit_label, np.argmax(best_iqr, axis=0))
    # against the reference's own exact-quantile run (interpolated CDFs instead of counts): within 2e-3
    assert np.abs(iqr_result.max_iqr - golden["exactq_max_iqr"]).max() < 2e-3
    np.testing.assert_array_equal(iqr_result.unit_label, golden["exactq_iqrmode_label"])


def test_max_iou_matches_independent_exact_numpy(iqr_result, numpy_search):
    """The reference's collect_maxiou (no golden output of it exists) from pixel masks in numpy: the
    largest IoU over the candidates, exact in float64 wherever the best candidate is clear."""
    levels, _, _, _, iou = numpy_search
    best_f, best_iou = iou.argmax(2), iou.max(2)
    np.testing.assert_allclose(iqr_result.max_iou, best_iou, rtol=1e-6, atol=0)
    clear = best_iou - np.sort(iou, axis=2)[:, :, -2] > 1e-6 * best_iou
    assert clear[1:].sum() >= 200  # of 12 labels x 24 units
    np.testing.assert_array_equal(iqr_result.max_iou[clear], best_iou[clear])
    np.testing.assert_array_equal(iqr_result.max_iou_level[clear], levels[np.nonzero(clear)[1], best_f[clear]])
    np.testing.assert_array_equal(iqr_result.max_iou_quantile[clear], IQR_FRACTIONS[best_f[clear]])
    assert (iqr_result.max_iou >= iqr_result.max_iqr_iou).all()  # the IQR's candidate is one of them
    assert 0.5 < iqr_result.max_iou.max() <= 1


def test_iqr_mode_levels_and_scores(data, iqr_result):
    golden = data["golden"]
    units = np.arange(24)
    np.testing.assert_array_equal(iqr_result.levels, iqr_result.max_iqr_level[iqr_result.unit_label, units])
    # the reported IoU is the IoU at the adopted level of the adopted label, as the reference reports
    np.testing.assert_allclose(iqr_result.unit_iou, iqr_result.iou[iqr_result.unit_label, units])
    reference_iou = golden["exactq_iqrmode_iou_scores"][golden["exactq_iqrmode_label"], units]
    assert np.abs(iqr_result.unit_iou - reference_iou).max() < 5e-3
    # units 6 (negative) and 16 (constant) get no IQR label, as in the reference
    assert iqr_result.unit_label[6] == 0 and iqr_result.unit_label[16] == 0
    assert np.all(iqr_result.max_iqr[:, [6, 16]] == 0)
    # the exact fraction of pixels above each adopted level
    up = np.asarray(upsample_bilinear(data["features"], (32, 32))).reshape(-1, 24)
    np.testing.assert_allclose(iqr_result.activation_fraction, (up > iqr_result.levels).mean(0), atol=1e-12)


def test_reference_rule_interpretable_units_are_the_references(data, iqr_result):
    """The reference's generate_report: interp = iou_iqr > 0.01 and iou > 0.05 (both strict), from
    its own IoU and IQR at its level for its label. Ours, from our exact counts, agree unit for unit."""
    golden = data["golden"]
    units = np.arange(24)
    label = golden["exactq_iqrmode_label"]
    iou = golden["exactq_iqrmode_iou_scores"][label, units]
    iqr = golden["exactq_iqrmode_iqr_scores"][label, units]
    expected = (label > 0) & (iqr > 0.01) & (iou > 0.05)
    assert 0 < expected.sum() < 24 and ((iou > 0.05) & ~(iqr > 0.01)).any()  # the IQR test decides some
    np.testing.assert_array_equal(iqr_result.interpretable(0.05), expected)


def test_top_units_rank_a_concepts_units_by_score(iqr_result):
    result = iqr_result
    # the label with the most interpretable units has a meaningful ranking to check
    label = int(np.bincount(result.unit_label[result.unit_label > 0]).argmax())
    name = result.label_names[label]
    for score in ("iou", "iqr", "max_iqr_iou", "max_iqr", "max_iou"):
        values = getattr(result, score)[label]
        top = result.top_units(name, k=7, score=score)
        assert top.dtype == np.int64 and top.shape == (7,)
        # independent ranking: python sort, best first, lower unit number on ties
        expected = sorted(range(values.shape[0]), key=lambda u: (-values[u], u))[:7]
        assert top.tolist() == expected
        assert (np.diff(values[top]) <= 0).all()
    with pytest.raises(ValueError, match="unknown concept"):
        result.top_units(name + "-no-such-thing")
    with pytest.raises(ValueError, match="k="):
        result.top_units(name, k=result.num_units + 1)
    with pytest.raises(ValueError, match="score"):
        result.top_units(name, score="ace")
