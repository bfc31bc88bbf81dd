"""The reference's --maxiou selection: the largest IoU over the IQR search's candidate levels, found in
the search's own pass (float32 argmax, float64 value from exact counts); the label rule 'maxiou'; its
fields in scores.npz and dissect.json; refusing it without the IQR search before any work."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gandissect_jax.cli import main
from gandissect_jax.dissection import (IQR_FRACTIONS, DissectConfig, LayerDissection, dissect_features, label_units,
                                       read_dissect_json, search_iqr_thresholds)
from gandissect_jax.dissection.schema import UNIT_MAX_IOU, upgrade

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
    for l in range(L):
        for u in range(U):
            best = first_max(iou[l, u])
            assert result.max_iou_candidate[l, u] == best, (l, u)
            assert result.max_iou[l, u] == iou[l, u, best], (l, u)  # exact, float64
            assert result.max_iou_level[l, u] == levels[u, best]
            assert result.max_iou_quantile[l, u] == IQR_FRACTIONS[best]
    assert result.max_iou.dtype == np.float64 and result.max_iou_candidate.dtype == np.int64
    assert result.max_iou_level.dtype == np.float32 and result.max_iou_quantile.dtype == np.float32
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


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The labelling toy (units 0-7 respond to sky, tree, road; 8-15 noise) under the IQR rule, with
    the default label rule and with 'maxiou', and its dissect.json."""
    feats, seg = toy(120)
    outdir = tmp_path_factory.mktemp("maxiou")
    kwargs = dict(threshold="iqr", progress=False, make_images=False)
    default = dissect_features(feats, seg, TOY_LABELS, make_report=False, **kwargs)["features"]
    maxiou = dissect_features(feats, seg, TOY_LABELS, label_rule="maxiou", outdir=str(outdir), **kwargs)["features"]
    return feats, seg, default, maxiou, outdir


def test_maxiou_rule_names_each_unit_by_its_largest_max_iou(toy_run):
    _, _, default, maxiou, _ = toy_run
    assert maxiou.label_rule == "maxiou"
    scores = np.where(np.isfinite(maxiou.max_iou), maxiou.max_iou, 0.0)
    scores[0] = 0
    expected = np.array([first_max(scores[:, u]) for u in range(maxiou.num_units)])
    np.testing.assert_array_equal(maxiou.unit_label, expected)
    np.testing.assert_array_equal(maxiou.unit_label[:8], 1 + np.arange(8) % 3)  # the tied units' own labels
    units = np.arange(maxiou.num_units)
    np.testing.assert_array_equal(maxiou.interpretable(0.05),
                                  (expected > 0) & (maxiou.max_iou[expected, units] >= 0.05))
    assert maxiou.interpretable(0.05)[:8].all()
    np.testing.assert_array_equal(maxiou.concept_ranking()[0], expected)
    # the rule changes labels only: levels and every score array are those of the default rule
    for name in ("levels", "iou", "iqr", "max_iqr", "max_iou", "max_iou_level", "max_iou_quantile",
                 "intersection_counts"):
        np.testing.assert_array_equal(getattr(maxiou, name), getattr(default, name), err_msg=name)
    np.testing.assert_array_equal(maxiou.unit_iou, maxiou.iou[expected, units])
    relabelled = label_units(default, "maxiou")
    np.testing.assert_array_equal(relabelled.unit_label, maxiou.unit_label)
    # top_units by max IoU: a concept's units by their max IoU, lower unit first on ties
    top = maxiou.top_units("sky", k=4, score="max_iou")
    assert top.tolist() == sorted(units, key=lambda u: (-maxiou.max_iou[1, u], u))[:4]
    assert set(top[:3].tolist()) == {0, 3, 6}


def test_maxiou_fields_in_dissect_json_and_scores_npz(toy_run):
    _, _, _, maxiou, outdir = toy_run
    document = read_dissect_json(str(outdir / "dissect.json"))
    [layer] = document["layers"]
    assert layer["label_rule"] == "maxiou" and document["settings"]["label_rule"] == "maxiou"
    for unit in layer["units"]:
        u, best = unit["unit"], unit["max_iou_labelnum"]
        assert best == maxiou.unit_label[u] == unit["labelnum"]
        assert unit["max_iou"] == maxiou.max_iou[best, u]
        assert unit["max_iou_label"] == TOY_LABELS["labels"][best][0]
        assert unit["max_iou_category"] == TOY_LABELS["labels"][best][1]
        assert unit["max_iou_level"] == float(maxiou.max_iou_level[best, u])
        assert unit["max_iou_quantile"] == float(maxiou.max_iou_quantile[best, u])
    page = (outdir / "dissect.html").read_text()
    assert 'data-sort="max_iou"' in page and "max IoU \u2265 0.05" in page


def test_report_shows_max_iou_and_the_rule(toy_run, tmp_path):
    from test_dissect_cli import render

    _, _, _, maxiou, outdir = toy_run
    dom = render(outdir / "dissect.html", tmp_path)
    assert "label rule: <b>max IoU over the IQR candidates (max IoU \u2265 0.05)</b>" in dom
    legend = dom[dom.index('id="legend"'):dom.index("</details>")]
    assert "<dt>max IoU</dt>" in legend and "--maxiou" in legend
    assert f"{int(maxiou.interpretable(0.05).sum())} of 16 units interpretable (max IoU \u2265 0.05, max-IoU" in dom
    rows = dict(re.findall(r'<div class="unit(?: interp)?" id="unit-(\d+)">(.*?)</div>', dom))
    assert len(rows) == 16
    for u in range(8):  # the tied units: their max IoU, concept and top fraction in the row
        label = TOY_LABELS["labels"][maxiou.unit_label[u]][0]
        assert f"max IoU {maxiou.max_iou[maxiou.unit_label[u], u]:.3f} {label} at top " in rows[str(u)], rows[str(u)]
    loaded = LayerDissection.load_npz(str(outdir / "features" / "scores.npz"))
    assert loaded.label_rule == "maxiou"
    for name in ("max_iou", "max_iou_level", "max_iou_quantile", "unit_label"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(maxiou, name), err_msg=name)


def test_scores_npz_written_before_max_iou_still_loads(toy_run, tmp_path):
    _, _, default, _, _ = toy_run
    default.save_npz(str(tmp_path / "new.npz"))
    with np.load(tmp_path / "new.npz") as data:
        old = {name: data[name] for name in data.files if not name.startswith("max_iou")}
    np.savez_compressed(tmp_path / "old.npz", **old)
    loaded = LayerDissection.load_npz(str(tmp_path / "old.npz"))
    assert loaded.max_iou is None and loaded.max_iou_level is None and loaded.max_iou_quantile is None
    assert loaded.label_rule == "significant"
    np.testing.assert_array_equal(loaded.unit_label, default.unit_label)
    np.testing.assert_array_equal(label_units(loaded, "reference").unit_label, label_units(default, "reference").unit_label)
    with pytest.raises(ValueError, match="'maxiou' needs max_iou"):
        label_units(loaded, "maxiou")
    with pytest.raises(ValueError, match="needs the IQR threshold search"):
        loaded.top_units("sky", score="max_iou")
    # an IQR run's dissect.json written before: its units read back with null max IoU fields
    document = {"schema": 2, "layers": [{"label_rule": "reference", "units": [{"unit": 0, "max_iqr": 0.2}]},
                                        {"label_rule": "reference", "units": [{"unit": 0}]}]}
    upgraded = upgrade(document)
    assert upgraded["layers"][0]["units"][0] == {"unit": 0, "max_iqr": 0.2, **UNIT_MAX_IOU}
    assert upgraded["layers"][1]["units"][0] == {"unit": 0}  # no IQR search: nothing to say


def test_quantile_rule_with_the_search_can_use_maxiou(toy_run):
    feats, seg, _, maxiou, _ = toy_run
    result = dissect_features(feats, seg, TOY_LABELS, threshold="quantile", search_iqr=True, label_rule="maxiou",
                              progress=False, make_images=False, make_report=False)["features"]
    np.testing.assert_array_equal(result.max_iou, maxiou.max_iou)  # same candidates, same search
    np.testing.assert_array_equal(result.unit_label, maxiou.unit_label)


@pytest.mark.parametrize("settings_, message", [
    (dict(threshold="quantile"), "but threshold is 'quantile'"),
    (dict(threshold="iqr", search_iqr=False), "but search_iqr is False"),
    (dict(make_labels=False), "but make_labels is False"),
])
def test_config_refuses_maxiou_without_the_search(settings_, message):
    with pytest.raises(ValueError, match=f"label_rule 'maxiou' needs the IQR search.*{message}"):
        DissectConfig(label_rule="maxiou", **settings_)


def test_maxiou_without_the_search_is_refused_before_any_work(tmp_path, capsys):
    feats, seg = toy(8)
    # dissect_features' default rule is 'quantile': refused before the output directory is touched
    with pytest.raises(ValueError, match="label_rule 'maxiou' needs the IQR search.*threshold is 'quantile'"):
        dissect_features(feats, seg, TOY_LABELS, label_rule="maxiou", progress=False, outdir=str(tmp_path / "api"))
    assert not (tmp_path / "api").exists()
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "s.npy", seg)
    (tmp_path / "labels.json").write_text(json.dumps(TOY_LABELS))
    features = ["--features", str(tmp_path / "f.npy"), "--segmentations", str(tmp_path / "s.npy"),
                "--labels", str(tmp_path / "labels.json")]
    for argv, got in [(features, "--threshold quantile (the default with --features)"),
                      (features + ["--threshold", "quantile"], "--threshold quantile"),
                      (features + ["--levels", str(tmp_path / "missing.npy")], "--levels"),
                      (["--model", "no-such-model", "--threshold", "quantile"], "--threshold quantile"),
                      (["--no-labels"], "--no-labels")]:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as stop:  # a usage error: the command line alone decides
            main(["dissect", *argv, "--label-rule", "maxiou", "--outdir", str(out), "--quiet"])
        assert stop.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("gandissect-jax dissect: error: --label-rule maxiou needs the IQR search's candidate "
                               "levels, --threshold iqr"), line
        assert f"not {got};" in line and "--label-rule must be significant or reference" in line, line
        assert not out.exists()
    assert main(["dissect", *features, "--threshold", "iqr", "--label-rule", "maxiou", "--outdir",
                 str(tmp_path / "ok"), "--quiet", "--no-images", "--batch-size", "4"]) == 0
    assert "units interpretable (max IoU >= 0.05)" in capsys.readouterr().out
    assert LayerDissection.load_npz(str(tmp_path / "ok" / "features" / "scores.npz")).label_rule == "maxiou"
