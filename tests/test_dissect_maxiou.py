"""The reference's --maxiou fields: the largest IoU over the IQR search's candidate levels, found in
the search's own pass (float32 argmax, float64 value from exact counts), with the measured share
of pixels above its level; recorded in scores.npz and dissect.json beside the unit's label, never
used to label it (the label rule 'maxiou' was withdrawn and is refused like any unknown rule)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gandissect_jax.cli import main
from gandissect_jax.dissection import (IQR_FRACTIONS, LABEL_RULES, DissectConfig, LayerDissection, dissect_features,
                                       label_units, read_dissect_json, search_iqr_thresholds, upsample_bilinear)
from gandissect_jax.dissection.report import layer_record
from gandissect_jax.dissection.schema import UNIT_MAX_IOU, upgrade
from gandissect_jax.dissection.threshold_search import best_label_by_max_iou

from test_dissect_labelling import TOY_LABELS, toy


def brute_force_iou(label_above, category_above, label_counts, label_pixels, total_counts, label_category, pixels):
    """float64 (L, U, F) IoU of every label, unit and candidate from the counts, one scalar at a time:
    truth = label / pixels, isects = above / label pixels * truth (0 when not finite), preds =
    category above / category pixels (0 when not finite), IoU = isects / (truth + preds - isects),
    NaN -> 0, row 0 (no label) 0. The reference's collect_maxiou on exact counts."""
    U, L, F = label_above.shape
    iou = np.zeros((L, U, F))
    with np.errstate(divide="ignore", invalid="ignore"):
        for l in range(1, L):
            truth = np.float64(label_counts[l]) / np.float64(pixels)
            for u in range(U):
                for f in range(F):
                    cond = np.float64(label_above[u, l, f]) / np.float64(label_pixels[l])
                    isects = (cond if np.isfinite(cond) else 0.0) * truth
                    preds = (np.float64(category_above[label_category[l], u, f])
                             / np.float64(total_counts[label_category[l]]))
                    preds = preds if np.isfinite(preds) else 0.0
                    value = isects / (truth + preds - isects)
                    iou[l, u, f] = 0.0 if np.isnan(value) else value
    return iou


def first_max(row) -> int:
    best = 0
    for f, value in enumerate(row):
        if value > row[best]:
            best = f
    return best


def random_counts(rng, U, L, F, C, pixels):
    label_category = rng.randint(0, C, L)
    label_pixels = rng.randint(1, pixels // 4, L)
    label_counts = label_pixels + rng.randint(0, 3, L) * (rng.rand(L) < 0.3)  # some labels in 2 channels
    total_counts = rng.randint(pixels // 2, pixels + 1, C + 1)
    category_above = np.sort(rng.randint(0, pixels // 2, (C + 1, U, F)), axis=2)
    label_above = np.minimum(np.sort(rng.randint(0, pixels // 4, (U, L, F)), axis=2), label_pixels[None, :, None])
    # odd data: a label with no pixels (NaN fractions), a category in no image (NaN preds), a label
    # whose every pixel is above every level of a category with nothing above (union 0: IoU inf),
    # a rare label (below the IQR's 1e-3 guard, not the IoU's)
    label_counts[[2, 3]] = label_pixels[[2, 3]] = 0
    label_above[:, [2, 3]] = 0
    label_category[[3, 4]], total_counts[C - 1] = C - 1, 0
    label_above[:, 4] = label_pixels[4]
    category_above[C - 1] = 0
    label_counts[5] = label_pixels[5] = 7
    label_above[:, 5] = np.minimum(label_above[:, 5], 7)
    levels = np.sort(rng.randn(U, F).astype(np.float32), axis=1)[:, ::-1].copy()
    return label_above, category_above, label_counts, label_pixels, total_counts, label_category, levels


@pytest.mark.parametrize("seed", [0, 1])
def test_max_iou_equals_brute_force_over_candidates(seed):
    rng = np.random.RandomState(seed)
    U, L, F, C, pixels = 4, 9, len(IQR_FRACTIONS), 3, 200_000
    counts = random_counts(rng, U, L, F, C, pixels)
    label_above, category_above, label_counts, label_pixels, total_counts, label_category, levels = counts
    result = search_iqr_thresholds(label_above, category_above, label_counts, label_pixels, total_counts,
                                   label_category, pixels, levels, label_chunk=4)  # 3 chunks, the last padded
    iou = brute_force_iou(label_above, category_above, label_counts, label_pixels, total_counts, label_category,
                          pixels)
    # labels without pixels (2, 3) and row 0 are not searched: their best candidates are the first
    assert (result.candidate[[0, 2, 3]] == 0).all() and (result.max_iqr[[0, 2, 3]] == 0).all()
    for l in range(L):
        for u in range(U):
            best = first_max(iou[l, u])
            assert result.max_iou_candidate[l, u] == best, (l, u)
            assert result.max_iou[l, u] == iou[l, u, best], (l, u)  # exact, float64
            assert result.max_iou_level[l, u] == levels[u, best]
            assert result.max_iou_quantile[l, u] == IQR_FRACTIONS[best]
            # the measured share of all pixels above the level (last row of category_above: all images)
            assert result.max_iou_fraction[l, u] == np.float64(category_above[-1, u, best]) / np.float64(pixels)
    assert result.max_iou.dtype == np.float64 and result.max_iou_candidate.dtype == np.int64
    assert result.max_iou_level.dtype == np.float32 and result.max_iou_quantile.dtype == np.float32
    assert result.max_iou_fraction.dtype == np.float64
    assert np.all(result.max_iou[0] == 0) and np.all(result.max_iou_candidate[[0, 2]] == 0)  # no label, no pixels
    assert np.all(result.max_iou[2] == 0) and np.all(result.max_iou[3] == 0)  # 0 / preds and NaN (0 / 0) -> 0
    assert np.all(np.isinf(result.max_iou[4]))  # no guards: union 0, as the reference's division
    assert np.all(result.max_iou[5] > 0) and np.all(result.max_iqr[5] == 0)  # under the IQR guard, not this one
    assert (result.max_iou[1:] >= result.iou[1:]).all()  # the IQR winner is one of the candidates
    # one chunk or many: the same numbers
    whole = search_iqr_thresholds(label_above, category_above, label_counts, label_pixels, total_counts,
                                  label_category, pixels, levels)
    for name in whole._fields:
        np.testing.assert_array_equal(getattr(whole, name), getattr(result, name), err_msg=name)


def test_search_reads_every_label_in_chunks_of_label_chunk():
    """label_above is a callable so that scoring holds one chunk of labels' suffix sums at a time
    (the memory plan's bound): labels without pixels, read for their counts at candidate 0, are
    asked for in chunks too, and the result equals the whole array's."""
    rng = np.random.RandomState(5)
    U, L, F, C, pixels = 3, 23, len(IQR_FRACTIONS), 3, 200_000
    label_above, category_above, label_counts, label_pixels, total_counts, label_category, levels = random_counts(
        rng, U, L, F, C, pixels)
    label_counts[6:20] = 0  # 15 labels (with row 0) are not searched
    label_above[:, 6:20] += 3  # inconsistent counts: pixels above the levels of a label without pixels
    asked = []

    def label_above_of(index):
        asked.append(len(index))
        return label_above[:, index]

    chunked = search_iqr_thresholds(label_above_of, category_above, label_counts, label_pixels, total_counts,
                                    label_category, pixels, levels, label_chunk=4)
    assert max(asked) <= 4 and sum(asked) == L
    whole = search_iqr_thresholds(label_above, category_above, label_counts, label_pixels, total_counts,
                                  label_category, pixels, levels, label_chunk=L)
    for name in whole._fields:
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name), err_msg=name)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), units=st.integers(1, 3), labels=st.integers(2, 6),
       candidates=st.integers(1, 12), scale=st.sampled_from([16, 1000, 10**6]))
def test_max_iou_is_the_float64_iou_of_a_best_candidate(seed, units, labels, candidates, scale):
    """Any consistent counts: the value is the exact float64 IoU at the chosen candidate, and that
    candidate is a maximum up to the float32 rounding of the search's argmax."""
    rng = np.random.RandomState(seed)
    C = 2
    pixels = 4 * scale
    label_category = rng.randint(0, C, labels)
    label_pixels = rng.randint(0, scale + 1, labels)
    total_counts = np.full(C + 1, pixels)
    category_above = np.sort(rng.randint(0, pixels + 1, (C + 1, units, candidates)), axis=2)
    label_above = np.minimum(rng.randint(0, scale + 1, (units, labels, candidates)), label_pixels[None, :, None])
    label_above = np.minimum(label_above, category_above[label_category].transpose(1, 0, 2))
    levels = np.sort(rng.randn(units, candidates).astype(np.float32), axis=1)[:, ::-1].copy()
    fractions = np.linspace(0.1, 1, candidates).astype(np.float32)
    result = search_iqr_thresholds(label_above, category_above, label_pixels, label_pixels, total_counts,
                                   label_category, pixels, levels, fractions=fractions, label_chunk=3)
    iou = brute_force_iou(label_above, category_above, label_pixels, label_pixels, total_counts, label_category,
                          pixels)
    chosen = np.take_along_axis(iou, result.max_iou_candidate[:, :, None], 2)[:, :, 0]
    np.testing.assert_array_equal(result.max_iou, chosen)
    assert (iou.max(2) - chosen <= 2e-6 * iou.max(2)).all()
    assert np.isfinite(result.max_iou).all() and (result.max_iou <= 1 + 1e-12).all()


def upsampled_toy(feats):
    """The toy's features upsampled to its 28x28 segmentations, as the dissection sees them: float32 (N, 28, 28, U)."""
    return np.asarray(jax.jit(lambda f: upsample_bilinear(f, (28, 28)))(feats))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The labelling toy (units 0-7 respond to sky, tree, road; 8-15 noise) under the IQR rule with
    the default label rule, its dissect.json and report."""
    feats, seg = toy(120)
    outdir = tmp_path_factory.mktemp("maxiou")
    result = dissect_features(feats, seg, TOY_LABELS, threshold="iqr", progress=False, make_images=False,
                              outdir=str(outdir))["features"]
    return feats, seg, result, outdir


def test_max_iou_fraction_is_the_counted_share_of_pixels_above_the_level(toy_run):
    """max_iou_fraction against a count over the upsampled pixels: the exact share above max_iou_level
    (not the candidate's target fraction max_iou_quantile), as max_iqr_fraction for the IQR winner."""
    feats, _, result, _ = toy_run
    up = upsampled_toy(feats)
    pixels = up[..., 0].size
    for u in range(result.num_units):
        values = up[..., u].ravel()
        for l in range(1, len(TOY_LABELS["labels"])):
            above = int((values > result.max_iou_level[l, u]).sum())
            assert result.max_iou_fraction[l, u] == above / pixels, (l, u)
            above = int((values > result.max_iqr_level[l, u]).sum())
            assert result.max_iqr_fraction[l, u] == above / pixels, (l, u)
    # the target and the measured share differ (ties and coarse 7x7 features), but not by much
    assert (result.max_iou_fraction != result.max_iou_quantile).any()
    np.testing.assert_allclose(result.max_iou_fraction, result.max_iou_quantile, atol=0.02)


def test_max_iou_never_labels_units(toy_run):
    """The labels and interpretability are those of the label rule alone: the max IoU fields sit beside
    them. On this toy the unguarded max IoU often lands on the last candidate (every pixel active),
    which is why it cannot name units (the reference never does)."""
    feats, seg, result, _ = toy_run
    assert result.label_rule == "significant"
    np.testing.assert_array_equal(result.unit_label, label_units(result, "significant").unit_label)
    best = best_label_by_max_iou(result.max_iou)
    units = np.arange(result.num_units)
    assert (result.max_iou_quantile[best, units] == 1).any()  # the every-pixel candidate wins somewhere
    assert not result.interpretable(0.05)[8:].any()  # noise units stay uninterpretable
    # the search without the IQR threshold rule finds the same max IoU
    quantile = dissect_features(feats, seg, TOY_LABELS, threshold="quantile", search_iqr=True, progress=False,
                                make_images=False, make_report=False)["features"]
    for name in ("max_iou", "max_iou_level", "max_iou_quantile", "max_iou_fraction"):
        np.testing.assert_array_equal(getattr(quantile, name), getattr(result, name), err_msg=name)
    # top_units by max IoU: a concept's units by their (unguarded) max IoU, lower unit first on ties
    top = result.top_units("sky", k=4, score="max_iou")
    assert top.tolist() == sorted(units, key=lambda u: (-result.max_iou[1, u], u))[:4]


def test_max_iou_fields_in_dissect_json_and_scores_npz(toy_run):
    _, _, result, outdir = toy_run
    document = read_dissect_json(str(outdir / "dissect.json"))
    [layer] = document["layers"]
    assert layer["label_rule"] == "significant" and document["settings"]["label_rule"] == "significant"
    best = best_label_by_max_iou(result.max_iou)
    for unit in layer["units"]:
        u, label = unit["unit"], int(best[unit["unit"]])
        assert unit["max_iou_labelnum"] == label and unit["labelnum"] == result.unit_label[u]
        assert unit["max_iou"] == result.max_iou[label, u]
        assert unit["max_iou_label"] == TOY_LABELS["labels"][label][0]
        assert unit["max_iou_category"] == TOY_LABELS["labels"][label][1]
        assert unit["max_iou_level"] == float(result.max_iou_level[label, u])
        assert unit["max_iou_quantile"] == float(result.max_iou_quantile[label, u])
        assert unit["max_iou_fraction"] == result.max_iou_fraction[label, u]
        assert unit["interpretable"] == bool(result.interpretable(0.05)[u])
    loaded = LayerDissection.load_npz(str(outdir / "features" / "scores.npz"))
    for name in ("max_iou", "max_iou_level", "max_iou_quantile", "max_iou_fraction", "unit_label"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name), err_msg=name)
        assert getattr(loaded, name).dtype == getattr(result, name).dtype


def test_report_page_has_no_max_iou_line_or_sort(toy_run, tmp_path):
    """The max IoU fields stay in dissect.json for scripts; the page shows none of them."""
    from test_dissect_cli import render

    _, _, _, outdir = toy_run
    page = (outdir / "dissect.html").read_text()
    assert 'data-sort="max_iou"' not in page and "max IoU" not in page and "maxiou" not in page
    dom = render(outdir / "dissect.html", tmp_path)
    rows = dict(re.findall(r'<div class="unit(?: interp)?" id="unit-(\d+)">(.*?)</div>', dom))
    assert len(rows) == 16
    assert not any("max IoU" in row for row in rows.values())
    assert "max IoU" not in dom[dom.index('id="legend"'):dom.index("</details>")]


def test_files_written_before_max_iou_still_load(toy_run, tmp_path):
    _, _, result, _ = toy_run
    result.save_npz(str(tmp_path / "new.npz"))
    with np.load(tmp_path / "new.npz") as data:
        arrays = {name: data[name] for name in data.files}
    # before max IoU: none of the fields; before max_iou_fraction: that one only
    for name, dropped in [("old", ("max_iou", "max_iou_level", "max_iou_quantile", "max_iou_fraction")),
                          ("no_fraction", ("max_iou_fraction",))]:
        np.savez_compressed(tmp_path / f"{name}.npz", **{k: v for k, v in arrays.items() if k not in dropped})
        loaded = LayerDissection.load_npz(str(tmp_path / f"{name}.npz"))
        for field in dropped:
            assert getattr(loaded, field) is None, field
        assert loaded.label_rule == "significant"
        np.testing.assert_array_equal(loaded.unit_label, result.unit_label)
        np.testing.assert_array_equal(label_units(loaded, "reference").unit_label,
                                      label_units(result, "reference").unit_label)
        record = layer_record(loaded, 0.05, has_images=False)  # the report of such a file
        assert all(("max_iou" in unit) == (loaded.max_iou is not None) for unit in record["units"])
        if loaded.max_iou is not None:
            assert all(unit["max_iou_fraction"] is None for unit in record["units"])
    with pytest.raises(ValueError, match="needs the IQR threshold search"):
        LayerDissection.load_npz(str(tmp_path / "old.npz")).top_units("sky", score="max_iou")
    # dissect.json of IQR runs written before: missing max IoU fields read as null, present ones kept
    document = {"schema": 2, "layers": [{"label_rule": "reference", "units": [{"unit": 0, "max_iqr": 0.2}]},
                                        {"label_rule": "reference", "units": [{"unit": 0}]},
                                        {"label_rule": "reference", "units": [{"unit": 0, "max_iqr": 0.2,
                                                                               "max_iou": 0.5}]}]}
    upgraded = upgrade(document)
    assert upgraded["layers"][0]["units"][0] == {"unit": 0, "max_iqr": 0.2, **UNIT_MAX_IOU}
    assert upgraded["layers"][1]["units"][0] == {"unit": 0}  # no IQR search: nothing to say
    assert upgraded["layers"][2]["units"][0] == {**UNIT_MAX_IOU, "unit": 0, "max_iqr": 0.2, "max_iou": 0.5}


def test_a_file_labelled_by_the_withdrawn_maxiou_rule_loads_and_relabels(toy_run, tmp_path):
    _, _, result, _ = toy_run
    result.save_npz(str(tmp_path / "new.npz"))
    with np.load(tmp_path / "new.npz") as data:
        arrays = {name: data[name] for name in data.files}
    arrays["label_rule"] = np.asarray("maxiou")
    np.savez_compressed(tmp_path / "maxiou.npz", **arrays)
    loaded = LayerDissection.load_npz(str(tmp_path / "maxiou.npz"))
    assert loaded.label_rule == "maxiou"
    for use in (loaded.interpretable, loaded.label_scores, loaded.concept_ranking):
        with pytest.raises(ValueError, match="label rule 'maxiou' is not one of 'significant' or 'reference'.*"
                                             "label_units"):
            use()
    np.testing.assert_array_equal(label_units(loaded, "significant").unit_label, result.unit_label)


def test_label_rule_maxiou_is_refused_like_any_unknown_rule(toy_run, tmp_path, capsys):
    feats, seg, result, _ = toy_run
    assert LABEL_RULES == ("significant", "reference")
    for rule in ("maxiou", "no-such-rule"):
        with pytest.raises(ValueError, match="label_rule must be 'significant' or 'reference'"):
            DissectConfig(label_rule=rule)
        with pytest.raises(ValueError, match=r"label_rule must be one of \('significant', 'reference'\)"):
            label_units(result, rule)
        with pytest.raises(ValueError, match="label_rule"):
            dissect_features(feats[:8], seg[:8], TOY_LABELS, label_rule=rule, progress=False,
                             outdir=str(tmp_path / "api"))
        assert not (tmp_path / "api").exists()
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as stop:  # argparse's usage error for an unknown choice
            main(["dissect", "--label-rule", rule, "--outdir", str(out), "--quiet"])
        assert stop.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument --label-rule: invalid choice: '{rule}'" in line, line
        assert "'significant'" in line and "'reference'" in line and "maxiou" not in line.split("choose from")[1], line
        assert not out.exists()
