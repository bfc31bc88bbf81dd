"""Output schema 2: one name per thing, a version number, and schema-1 files still read.

The schema-1 fixture was written by the code before the schema change (fixtures/dissect/schema1),
so these tests also show that the numbers did not change with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gandissect_jax.dissection import LayerDissection, dissect_features, read_dissect_json
from gandissect_jax.dissection.schema import SCHEMA, UNIT_MAX_IOU, upgrade

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"
V1 = FIXTURES / "schema1"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The fixture's dissection, rerun now: units 0-5 of the golden data, IQR rule, batch 16, labelled by
    the reference's rule as the fixture was."""
    data = np.load(FIXTURES / "dissect_golden.npz")
    labels = json.loads((FIXTURES / "labels.json").read_text())
    outdir = tmp_path_factory.mktemp("schema2")
    result = dissect_features(data["features"].transpose(0, 2, 3, 1)[:, :, :, :6], data["segs"].transpose(0, 2, 3, 1),
                              labels, threshold="iqr", batch_size=16, progress=False, make_images=False,
                              title="v1 fixture", outdir=str(outdir), label_rule="reference")
    return result["features"], outdir


def test_schema_1_scores_load_and_equal_todays_numbers(fresh):
    result, outdir = fresh
    old = LayerDissection.load_npz(str(V1 / "scores.npz"))
    with np.load(V1 / "scores.npz") as v1, np.load(outdir / "features" / "scores.npz") as v2:
        assert "schema" not in v1.files and int(v2["schema"]) == SCHEMA
        # added since: the schema number, the label rule with the chance IoU and significance arrays, and
        # the IQR search's max IoU
        assert set(v2.files) - set(v1.files) == {"schema", "label_rule", "fdr", "category_images", "chance_iou",
                                                 "p_value", "q_value", "significant", "max_iou", "max_iou_level",
                                                 "max_iou_quantile", "max_iou_fraction"}
        for name in v1.files:
            assert v1[name].dtype == v2[name].dtype and np.array_equal(v1[name], v2[name]), name
    for field in ("levels", "iou", "iqr", "unit_label", "max_iqr", "topk_indices", "candidate_levels"):
        np.testing.assert_array_equal(getattr(old, field), getattr(result, field), err_msg=field)
    assert old.threshold == "iqr" and old.quantile is None and old.label_names == result.label_names


def test_schema_1_dissect_json_reads_as_schema_2(fresh):
    _, outdir = fresh
    raw = json.loads((V1 / "dissect.json").read_text())
    assert "schema" not in raw and "threshold" in raw["layers"][0]["units"][0]
    upgraded = read_dissect_json(str(V1 / "dissect.json"))
    current = json.loads((outdir / "dissect.json").read_text())
    assert upgraded["schema"] == current["schema"] == 2
    # the same document, field for field, except the run format's version, the source's identity
    # (version 3 records a sha256 of all the data and the layout instead of a digest of two samples)
    # and the statistics added with label rules and the max IoU fields, which a schema-1 document reads as null
    assert upgraded["settings"].pop("version") == 1 and current["settings"].pop("version") == 3
    old_source, new_source = upgraded["settings"].pop("source"), current["settings"].pop("source")
    assert old_source.pop("digest") and set(new_source.pop("content")) == {"features", "segmentations"}
    assert new_source.pop("layout") == "nhwc" and old_source == new_source
    layer = current["layers"][0]
    # added with the intervention commands: the layer's per-label unit rankings (gandissect_jax.dissection.rankings)
    rankings = layer.pop("rankings")
    assert isinstance(rankings, list) and all(r["metric"] == "iou" and r["units"] for r in rankings)
    assert upgraded["layers"][0]["label_rule"] == layer["label_rule"] == "reference"
    assert upgraded["layers"][0]["fdr"] is None and layer["fdr"] == 0.05
    layer["fdr"] = None
    for unit in layer["units"]:
        assert 0 <= unit["chance_iou"] <= 1 and 0 <= unit["q_value"] <= 1 and isinstance(unit["significant"], bool)
        unit.update(chance_iou=None, p_value=None, q_value=None, significant=None, second=None)
        assert 0 <= unit["max_iou"] <= 1 and unit["max_iou_label"] == current["labels"][unit["max_iou_labelnum"]][0]
        unit.update(UNIT_MAX_IOU)
    assert upgraded == current
    unit = upgraded["layers"][0]["units"][3]
    assert unit["level"] == raw["layers"][0]["units"][3]["threshold"]
    assert unit["activation_fraction"] == raw["layers"][0]["units"][3]["quantile"]


def test_schema_2_names_each_thing_once(fresh):
    result, outdir = fresh
    for path in (outdir / "dissect.json", outdir / "features" / "dissect.json"):
        document = json.loads(path.read_text())
        assert document["schema"] == 2
        layer = document["layers"][0]
        assert layer["threshold"] == "iqr" and layer["quantile"] is None  # the rule and its parameter
        for unit in layer["units"]:
            assert {"level", "activation_fraction"} <= set(unit) and not {"threshold", "quantile"} & set(unit)
            assert unit["level"] == float(result.levels[unit["unit"]])
    settings = json.loads((outdir / "dissect.json").read_text())["settings"]
    assert settings["topk"] == 10 and "k" not in settings


def test_newer_or_broken_documents_are_refused(tmp_path):
    with pytest.raises(ValueError, match="schema 3"):
        upgrade({"schema": 3, "layers": []})
    bad = tmp_path / "dissect.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        read_dissect_json(str(bad))
    bad.write_text('{"title": "x"}')
    with pytest.raises(ValueError, match="no \"layers\""):
        read_dissect_json(str(bad))
