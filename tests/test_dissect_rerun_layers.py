"""A rerun with fewer layers into the same outdir keeps the layers earlier runs of the same inputs
finished there in the top-level dissect.json and report; layers of other inputs are never listed
(a rerun with other inputs is refused before any work, and ``restart`` removes the old layers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gandissect_jax.dissection import dissect_features, dissect_generator
from gandissect_jax.dissection.resume import IdentityMismatch
from test_dissect_pipeline import TinyGenerator, TinySegmenter
from test_dissect_runs import LABELS, toy

OPTIONS = dict(size=24, seed=3, topk=4, progress=False, batch_size=8)


def _document(outdir):
    return json.loads((outdir / "dissect.json").read_text())


def _layers(document):
    return [record["layer"] for record in document["layers"]]


def test_a_rerun_with_fewer_layers_keeps_the_finished_layers_in_the_report(tmp_path):
    first = dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1", "layer2"], outdir=str(tmp_path),
                              **OPTIONS)
    before = _document(tmp_path)
    assert _layers(before) == ["layer1", "layer2"]
    layer2_scores = (tmp_path / "layer2" / "scores.npz").read_bytes()

    again = dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1"], outdir=str(tmp_path), **OPTIONS)
    assert list(again) == ["layer1"]  # the API returns what was asked for
    np.testing.assert_array_equal(again["layer1"].iou, first["layer1"].iou)
    after = _document(tmp_path)
    assert _layers(after) == ["layer1", "layer2"]
    # layer2's record is the first run's, strips included (it was not measured again)
    assert after["layers"][1] == before["layers"][1]
    assert after["layers"][1]["units"][0]["image"] == "layer2/image/0-top.jpg"
    assert (tmp_path / "layer2" / "image" / "0-top.jpg").exists()
    assert (tmp_path / "layer2" / "scores.npz").read_bytes() == layer2_scores
    html = (tmp_path / "dissect.html").read_text()
    assert "layer2/image/0-top.jpg" in html  # the page shows layer2's units with their strips

    # a rerun with images off lists both layers without strips (as the flag asks)
    dissect_generator(TinyGenerator(), TinySegmenter(), ["layer2"], outdir=str(tmp_path), make_images=False,
                      **OPTIONS)
    document = _document(tmp_path)
    assert _layers(document) == ["layer1", "layer2"]  # the generator's layer order, whatever was rerun
    assert all("image" not in unit for record in document["layers"] for unit in record["units"])


def test_a_rerun_with_other_inputs_never_lists_layers_of_the_earlier_inputs(tmp_path):
    dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1", "layer2"], outdir=str(tmp_path), **OPTIONS)
    report = {name: (tmp_path / name).read_bytes() for name in ("dissect.json", "dissect.html")}
    # other inputs (another seed): refused before any work, the report untouched
    with pytest.raises(IdentityMismatch, match=r"source\.seed was 3, now 4"):
        dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1"], outdir=str(tmp_path),
                          **{**OPTIONS, "seed": 4})
    assert {name: (tmp_path / name).read_bytes() for name in report} == report
    # restart: the earlier run's outputs go, and the report lists only the new run's layer
    dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1"], outdir=str(tmp_path), restart=True,
                      **{**OPTIONS, "seed": 4})
    assert _layers(_document(tmp_path)) == ["layer1"]
    assert not (tmp_path / "layer2" / "scores.npz").exists()
    assert "layer2" not in (tmp_path / "dissect.html").read_text()


def test_a_kept_layer_whose_scores_were_changed_is_left_out_of_the_report(tmp_path, capsys):
    dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1", "layer2"], outdir=str(tmp_path),
                      make_images=False, **OPTIONS)
    scores = tmp_path / "layer1" / "scores.npz"
    (tmp_path / "layer2" / "scores.npz").write_bytes(scores.read_bytes())  # another layer's scores
    dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1"], outdir=str(tmp_path), make_images=False,
                      **OPTIONS)
    assert _layers(_document(tmp_path)) == ["layer1"]
    assert "layer2 is left out of the report" in capsys.readouterr().err


def test_features_rerun_with_fewer_layers_is_refused_and_keeps_the_outdir(tmp_path):
    """Precomputed features: every layer's array is part of the run's identity, so a rerun given
    fewer arrays is another input, refused before any work (nothing is dropped from the report)."""
    feats, seg = toy()
    features = {"a": feats, "b": feats[..., ::-1].copy()}
    dissect_features(features, seg, LABELS, outdir=str(tmp_path), progress=False, make_images=False)
    before = (tmp_path / "dissect.json").read_bytes()
    with pytest.raises(IdentityMismatch, match=r"source\.features\.b is gone"):
        dissect_features({"a": feats}, seg, LABELS, outdir=str(tmp_path), progress=False, make_images=False)
    assert (tmp_path / "dissect.json").read_bytes() == before
    assert _layers(json.loads(before)) == ["a", "b"]
