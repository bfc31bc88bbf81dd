"""GANPaint: rankings read from a dissection, strokes as edits, the jitted edit compiled once, the
JSON API (valid and malformed requests), photo inversion and blending, and the ``paint`` command.

One tiny dissection of the demo model (layer4, 200 samples) is made once per test session in a
temporary directory and shared with ``test_paint_browser.py``.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import gandissect_jax as gd
from gandissect_jax.paint import Stroke, apply_strokes, encode_strokes, invert, load_rankings, paint, pool_mask
from gandissect_jax.paint.edits import resize_mask
from gandissect_jax.paint.invert import blend, psnr
from compilations import compilations

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")

LAYER = "layer4"  # where the demo model draws trees (layer6 inserts orange blobs the segmenter calls tree)
SHAPE = (8, 8, 128)
TREE, BUILDING = 6, 7  # label numbers of the demo segmenter
_CACHE: dict = {}


def demo_dissection(tmp_path_factory) -> str:
    """The session's tiny demo dissection (made once, also for test_paint_browser.py)."""
    if "outdir" not in _CACHE:
        from gandissect_jax.dissection import dissect_generator

        outdir = tmp_path_factory.mktemp("paint") / "scenes64"
        dissect_generator(gd.load_generator("scenes64"), gd.load_segmenter("scenes64-segmenter"), [LAYER],
                          size=200, outdir=str(outdir), make_images=False, progress=False,
                          identity={"model": "scenes64", "segmenter": "scenes64-segmenter"})
        _CACHE["outdir"] = str(outdir)
    return _CACHE["outdir"]


@pytest.fixture(scope="session")
def outdir(tmp_path_factory):
    return demo_dissection(tmp_path_factory)


@pytest.fixture(scope="session")
def G():
    return gd.load_generator("scenes64")


@pytest.fixture(scope="session")
def S():
    return gd.load_segmenter("scenes64-segmenter")


@pytest.fixture(scope="session")
def rankings(outdir):
    return load_rankings(outdir, LAYER)


@pytest.fixture(scope="session")
def model(outdir):
    from gandissect_jax.paint.model import load_paint_model

    return load_paint_model(outdir)


@pytest.fixture(scope="session")
def client(model):
    with warnings.catch_warnings():  # starlette's note about httpx2, at import
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from gandissect_jax.paint.server import create_app

    return TestClient(create_app([model]), raise_server_exceptions=False)


def png_url(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def alpha_mask_url(mask: np.ndarray) -> str:
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., 3] = np.round(255 * mask).astype(np.uint8)
    return png_url(rgba)


def decode_labels(url: str) -> np.ndarray:
    """Label numbers of a segmentation PNG (R + 256 G)."""
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


def segment(S, images) -> np.ndarray:
    return np.asarray(S.segment(S.params, jnp.clip(jnp.asarray(images), -1, 1)))[..., 0]


# ---------------------------------------------------------------------------------- rankings


def test_iou_rankings_and_insertion_values_come_from_scores_npz(outdir, rankings):
    from gandissect_jax.dissection import LayerDissection

    scores = LayerDissection.load_npz(f"{outdir}/{LAYER}/scores.npz")
    for concept in ("tree", "building", "sky"):
        assert rankings.metric[concept] == "iou"
        np.testing.assert_array_equal(rankings.top_units(concept, 20), scores.top_units(concept, 20, "max_iqr_iou"))
    q = list(np.round(scores.raw_quantile_q, 6)).index(0.99)
    np.testing.assert_array_equal(rankings.insertion_values, scores.raw_quantiles[:, q].astype(np.float32))
    document = json.loads(open(f"{outdir}/dissect.json").read())
    listed = [c["label"] for c in document["layers"][0]["concepts"]]
    assert list(rankings.concepts) == listed and "tree" in listed
    with pytest.raises(ValueError, match="unknown concept 'unicorn'"):
        rankings.top_units("unicorn", 5)


def _copy_with_rankings(outdir, tmp_path, records):
    copy = tmp_path / "copy"
    shutil.copytree(outdir, copy)
    document = json.loads((copy / "dissect.json").read_text())
    document["layers"][0]["rankings"] = records
    (copy / "dissect.json").write_text(json.dumps(document))
    return copy


def test_ace_rankings_in_dissect_json_take_precedence(outdir, tmp_path, rankings):
    num_units = rankings.num_units
    alpha = np.random.default_rng(0).random(num_units)
    order = [int(u) for u in np.argsort(-alpha, kind="stable")]
    records = [
        {"name": "tree-ace", "concept": "tree", "metric": "ace", "score": (-alpha).tolist()},  # the reference's form
        {"name": "door-ace", "units": [5, 3, 9]},  # an explicit order, concept and metric from the name
        {"name": "grass-iou", "concept": "grass", "metric": "iou", "score": [0.0] * num_units},
        {"name": "max iou", "metric": "iou", "score": [0.0] * num_units},  # not a concept ranking
        # gandissect_jax.dissection.rankings' form: top units listed, score per unit, larger first
        {"name": "road-ace", "label": "road", "labels": [5], "metric": "ace", "units": order[:3],
         "score": alpha.tolist(), "objective": "specific_removal"},
    ]
    ace = load_rankings(_copy_with_rankings(outdir, tmp_path, records), LAYER)
    assert ace.metric["tree"] == "ace" and ace.top_units("tree", num_units).tolist() == order
    assert ace.metric["door"] == "ace" and ace.top_units("door", 4).tolist() == [5, 3, 9, 0]
    assert ace.metric["road"] == "ace" and ace.top_units("road", num_units).tolist() == order
    assert ace.concepts[:3] == ("tree", "door", "road")  # fitted concepts first in the palette
    assert ace.metric["grass"] == "iou" and ace.top_units("grass", 3).tolist() == [0, 1, 2]  # all ties: by unit
    np.testing.assert_array_equal(ace.top_units("sky", 10), rankings.top_units("sky", 10))


def _sparse_alpha(num_units: int, seed: int = 0) -> np.ndarray:
    """ACE weights as a fit with a unit budget leaves them: most exactly 0, several exactly 1."""
    rng = np.random.default_rng(seed)
    alpha = np.zeros(num_units)
    alpha[rng.choice(num_units, 30, replace=False)] = np.round(rng.random(30), 3)
    alpha[rng.choice(num_units, 5, replace=False)] = 1.0
    return alpha


def _written_record(label: str, number: int, alpha: np.ndarray, order: np.ndarray) -> dict:
    """A ranking record exactly as gandissect_jax.dissection.rankings.ranking_record writes it (intervention
    branch): the top 64 units listed, the score per unit rounded to 6 digits, larger first."""
    return {"name": f"{label}-ace", "label": label, "labels": [number], "metric": "ace",
            "units": [int(u) for u in order[:64]], "score": [round(float(v), 6) for v in alpha],
            "objective": "ace", "experiment": f"intervention/ace/{LAYER}/{label}-ace"}


def test_written_ace_ranking_is_read_in_the_writers_full_order(outdir, tmp_path, rankings):
    """Beyond the 64 listed units, equal weights (the many exact zeros) go by IoU, then unit number:
    gandissect_jax.ace.ace_ranking's order, which the ace command writes."""
    from gandissect_jax.ace import ace_ranking

    alpha = _sparse_alpha(rankings.num_units)
    expected = ace_ranking(alpha, rankings.iou[TREE])
    copy = _copy_with_rankings(outdir, tmp_path, [_written_record("tree", TREE, alpha, expected)])
    got = load_rankings(copy, LAYER)
    assert got.metric["tree"] == "ace" and got.concepts[0] == "tree"
    np.testing.assert_array_equal(got.top_units("tree", rankings.num_units), expected)
    assert not np.array_equal(expected[64:], rankings.top_units("tree", rankings.num_units)[64:])  # IoU alone differs


def test_ace_rankings_json_and_dissect_json_rankings_are_read(outdir, tmp_path, rankings):
    """The intervention module's own writer: an ACE fit recorded in intervention/rankings.json (dissect.json
    not refreshed) and the rankings augment_document puts into dissect.json are both paint's rankings."""
    from gandissect_jax.dissection import rankings as written
    from gandissect_jax.ace import ace_ranking
    from gandissect_jax.dissection import LayerDissection

    copy = tmp_path / "copy"
    shutil.copytree(outdir, copy)
    alpha = _sparse_alpha(rankings.num_units, seed=1)
    order = ace_ranking(alpha, written.iou_scores(LayerDissection.load_npz(f"{copy}/{LAYER}/scores.npz"), [TREE]))
    settings = json.loads((copy / "dissect.json").read_text())["settings"]
    # a fit of another dissection of this directory (before a --restart) is never this one's
    written.add_ranking(str(copy), LAYER, written.ranking_record("tree-ace", "tree", [TREE], "ace", order[::-1], alpha,
                                                                 objective="ace", experiment="x",
                                                                 dissection=written.dissection_digest({"other": 1})))
    assert load_rankings(copy, LAYER).metric["tree"] == "iou"
    assert written.augment_document(json.loads((copy / "dissect.json").read_text()), str(copy))["layers"][0][
        "rankings"] == written.layer_iou_rankings(LayerDissection.load_npz(f"{copy}/{LAYER}/scores.npz"))
    written.add_ranking(str(copy), LAYER, written.ranking_record("tree-ace", "tree", [TREE], "ace", order, alpha,
                                                                 objective="ace", experiment="x",
                                                                 dissection=written.dissection_digest(settings)))
    got = load_rankings(copy, LAYER)
    assert got.metric["tree"] == "ace"
    np.testing.assert_array_equal(got.top_units("tree", rankings.num_units), order)
    for concept in ("building", "sky"):  # the others by IoU, as before
        assert got.metric[concept] == "iou"
        np.testing.assert_array_equal(got.top_units(concept, 20), rankings.top_units(concept, 20))
    document = written.augment_document(json.loads((copy / "dissect.json").read_text()), str(copy))
    (copy / "intervention" / "rankings.json").unlink()
    (copy / "dissect.json").write_text(json.dumps(document))
    again = load_rankings(copy, LAYER)
    assert again.metric["tree"] == "ace" and again.metric["sky"] == "iou"
    np.testing.assert_array_equal(again.top_units("tree", rankings.num_units), order)
    np.testing.assert_array_equal(again.top_units("sky", 64), rankings.top_units("sky", 64))


@pytest.mark.parametrize("record, message", [
    ({"name": "tree-ace", "score": [1.0, 2.0]}, "one number per unit"),
    ({"name": "tree-ace", "score": ["a"] * 128}, "must hold numbers"),
    ({"name": "tree-ace", "units": "1, 2"}, "list of unit numbers"),
    ({"name": "tree-ace"}, "needs 'units'"),
    ({"name": "tree-ace", "units": [1, 1]}, "distinct unit numbers"),
    ({"name": "tree-ace", "units": [100000]}, "distinct unit numbers"),
    ("tree-ace", "is not an object"),
])
def test_malformed_rankings_are_refused_naming_the_file(outdir, tmp_path, record, message):
    copy = _copy_with_rankings(outdir, tmp_path, [record])
    with pytest.raises(ValueError, match=message) as info:
        load_rankings(copy, LAYER)
    assert "scores.npz" in str(info.value)


def test_missing_dissection_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dissect.json"):
        load_rankings(tmp_path)


# ---------------------------------------------------------------------------------- strokes


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_pool_mask_is_adaptive_max_pooling(rows, cols, k, j, seed):
    rng = np.random.default_rng(seed)
    grid = rng.random((rows, cols)).astype(np.float32)
    # a mask k times finer: pooling takes each block's maximum
    fine = rng.random((rows * k, cols * j)).astype(np.float32)
    expected = fine.reshape(rows, k, cols, j).max(axis=(1, 3))
    np.testing.assert_array_equal(pool_mask(fine, (rows, cols)), expected)
    np.testing.assert_allclose(pool_mask(fine, (rows, cols), "mean"), fine.reshape(rows, k, cols, j).mean(axis=(1, 3)),
                               rtol=1e-6)
    # a mask coarser than the grid is replicated (nearest)
    coarse = pool_mask(grid, (rows * k, cols * j))
    np.testing.assert_array_equal(coarse, np.repeat(np.repeat(grid, k, 0), j, 1))
    # one painted pixel anywhere lights the cell under its centre and only cells it overlaps
    size = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    y, x = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
    dot = np.zeros(size, np.float32)
    dot[y, x] = 1
    pooled = pool_mask(dot, (rows, cols))
    assert pooled[int((y + 0.5) * rows / size[0]), int((x + 0.5) * cols / size[1])] == 1
    reach = (-(-rows // size[0]) + 1) * (-(-cols // size[1]) + 1)
    assert 1 <= pooled.sum() <= reach


def test_apply_strokes_is_the_sequential_intervention_edit(rankings):
    rng = np.random.default_rng(3)
    r = jnp.asarray(rng.normal(size=(2, *SHAPE)).astype(np.float32))
    strokes = [Stroke(rng.random((64, 64)) > 0.7, "tree", "add", 0.8),
               Stroke(rng.random((16, 16)), "building", "remove", 1.0, top=7),
               Stroke(np.ones((3, 3)), None, "add", 0.5, units=[1, 2, 63])]
    arrays = encode_strokes(strokes, rankings, layer_shape=SHAPE, max_strokes=8)
    edited = apply_strokes(r, arrays, rankings.insertion_values)
    expected = r
    for stroke in strokes:  # independently: one intervention Edit per stroke
        if stroke.units is not None:
            units = np.asarray(stroke.units)
        else:
            units = rankings.top_units(stroke.concept, stroke.top or 20)
        on = np.zeros(SHAPE[-1], np.float32)
        on[units] = 1
        mask = pool_mask(np.asarray(stroke.mask, np.float32), SHAPE[:2])
        ablation = stroke.strength * mask[:, :, None] * on
        replacement = rankings.insertion_values * on if stroke.mode == "add" else None
        expected = gd.Edit(ablation, replacement).apply(expected)
    np.testing.assert_allclose(edited, expected, rtol=1e-6, atol=1e-6)
    assert arrays.masks.shape == (8, *SHAPE[:2]) and arrays.units[3:].sum() == 0
    # no strokes, or strength 0: r bit for bit
    empty = encode_strokes([], rankings, layer_shape=SHAPE, max_strokes=8)
    assert np.array_equal(apply_strokes(r, empty, rankings.insertion_values), r)
    zero = encode_strokes([strokes[0]._replace(strength=0.0)], rankings, layer_shape=SHAPE, max_strokes=8)
    assert np.array_equal(apply_strokes(r, zero, rankings.insertion_values), r)


@pytest.mark.parametrize("stroke, message", [
    (Stroke(np.ones((4, 4)), "unicorn"), r"strokes\[0\]: unknown concept 'unicorn'"),
    (Stroke(np.ones((4, 4)), "tree", mode="paint"), r"strokes\[0\]\.mode must be one of"),
    (Stroke(np.ones((4, 4)), "tree", strength=1.5), r"strength must be in \[0, 1\]"),
    (Stroke(np.ones((4, 4)), units=[SHAPE[-1]]), r"units \[128\] out of range"),
    (Stroke(np.ones((4, 4)), units=[]), "units is empty"),
    (Stroke(np.ones((4, 8)), "tree"), "aspect ratio"),
    (Stroke(np.full((4, 4), 2.0), "tree"), r"in \[0, 1\]"),
    (Stroke(np.full((4, 4), np.nan), "tree"), "finite"),
    (Stroke(np.ones(4), "tree"), "2-D"),
    (Stroke(np.ones((4, 4))), "needs a concept or units"),
    (Stroke(np.ones((4, 4)), "tree", top=0), "top=0 outside"),
])
def test_malformed_strokes_name_the_stroke_and_field(rankings, stroke, message):
    with pytest.raises(ValueError, match=message):
        encode_strokes([stroke], rankings, layer_shape=SHAPE, image_shape=(64, 64))


def test_paint_adds_trees_inside_the_stroke_and_removes_buildings(G, S, rankings):
    z = gd.sample_z(8, G.z_dim, seed=1)
    before = paint(G, z, [], rankings)
    np.testing.assert_array_equal(before, G.apply(G.params, jnp.asarray(z)))  # f(h(z)) == G(z), bit for bit
    mask = np.zeros((128, 128), np.float32)  # another resolution than the image: any works
    mask[64:, :64] = 1
    after = paint(G, z, [Stroke(mask, "tree", "add")], rankings)
    inside = resize_mask(mask, (64, 64))
    s0, s1 = segment(S, before), segment(S, after)
    tree_in = (s0[:, inside] == TREE).mean(), (s1[:, inside] == TREE).mean()
    tree_out = (s0[:, ~inside] == TREE).mean(), (s1[:, ~inside] == TREE).mean()
    assert tree_in[1] - tree_in[0] >= 0.3, tree_in  # measured: 0.16 -> 0.64
    assert abs(tree_out[1] - tree_out[0]) <= 0.05, tree_out
    # remove: each image's own building pixels (with windows, doors, roofs), top 20 IoU units
    owned = (s0 == BUILDING) | (s0 >= 8)
    i = int(np.argmax(owned.sum(axis=(1, 2))))  # the image with the most building
    removed = paint(G, z[i:i + 1], [Stroke(owned[i].astype(np.float32), "building", "remove")], rankings)
    s2 = segment(S, removed)[0]
    assert ((s2 == BUILDING) | (s2 >= 8))[owned[i]].mean() < 0.8  # all of it was building before


# ---------------------------------------------------------------------------------- one compiled edit


def test_every_edit_after_the_first_reuses_one_compiled_program(model):
    z = model.z_for_seed(5)
    rng = np.random.default_rng(0)
    model.edit(LAYER, [Stroke(np.ones((8, 8)), "tree")], z=z)  # compiles (once per layer)
    edits = [
        ([Stroke(rng.random((64, 64)) > 0.5, "tree", "add")], dict(z=model.z_for_seed(1))),
        ([Stroke(rng.random((256, 256)), "building", "remove", 0.5, top=3)] * 5, dict(z=model.z_for_seed(2))),
        ([Stroke(np.ones((1, 1)), None, "add", 1.0, units=[0, 5, 63])], dict(z=z)),
        ([Stroke(rng.random((17, 17)) > 0.2, c, "add", top=k) for c, k in [("sky", 1), ("grass", 64), ("road", 9)]],
         dict(z=z)),
        ([], dict(z=z)),
        ([Stroke(np.ones((64, 64)), "tree")] * model.max_strokes, dict(z=z)),
    ]
    with compilations() as compiled:
        results = [model.edit(LAYER, strokes, **kwargs) for strokes, kwargs in edits]
    assert compiled == [], f"{len(compiled)} compilations after the first edit"
    assert not np.array_equal(results[0].edited, results[0].original)
    np.testing.assert_array_equal(results[4].edited, results[4].original)  # no strokes: the original, exactly


# ---------------------------------------------------------------------------------- the JSON API


def test_api_lists_models_layers_concepts_units(client, rankings):
    models = client.get("/api/models").json()
    assert [m["name"] for m in models] == ["scenes64"]
    model = models[0]
    assert model["image_size"] == [64, 64] and model["default_layer"] == LAYER
    assert model["layers"] == [{"layer": LAYER, "shape": list(SHAPE), "num_units": SHAPE[-1],
                                "interpretable": int(rankings.interpretable.sum())}]
    assert [label["label"] for label in model["labels"]][:3] == ["-", "sky", "sun"]
    concepts = client.get(f"/api/models/scenes64/layers/{LAYER}/concepts?top=5").json()
    tree = next(c for c in concepts if c["concept"] == "tree")
    assert tree["metric"] == "iou" and tree["units"] == rankings.top_units("tree", 5).tolist()
    assert tree["iou"] == pytest.approx(rankings.iou[TREE, tree["units"]].tolist())
    units = client.get(f"/api/models/scenes64/layers/{LAYER}/units").json()
    assert len(units) == SHAPE[-1] and units[3]["label"] == rankings.unit_label_name(3)
    schema = client.get("/openapi.json").json()
    assert {"/api/models", "/api/edit", "/api/generate", "/api/photos"} <= set(schema["paths"])
    assert "StrokeIn" in schema["components"]["schemas"]
    assert client.get("/").text.startswith("<!doctype html>")
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/api/models/nope/layers/layer4/units").status_code == 404
    assert client.get("/api/models/scenes64/layers/layer9/units").status_code == 404


def test_api_edit_response_agrees_with_its_segmentation_and_the_generator(client, model, G, S):
    generated = client.post("/api/generate", json={"model": "scenes64", "seeds": [10]}).json()["images"][0]
    mask = np.zeros((256, 256), np.float32)
    mask[160:230, 150:250] = 1
    response = client.post("/api/edit", json={"model": "scenes64", "seed": 10, "strokes": [
        {"concept": "tree", "mode": "add", "mask": alpha_mask_url(mask)}]})
    assert response.status_code == 200, response.text
    result = response.json()
    z = model.z_for_seed(10)[None]
    x = np.asarray(G.apply(G.params, jnp.asarray(z)))
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["original"].split(",")[1]))))
    np.testing.assert_array_equal(original, gd.to_uint8(x)[0])
    assert generated["image"] == result["original"]
    s0, s1 = decode_labels(result["original_segmentation"]), decode_labels(result["segmentation"])
    np.testing.assert_array_equal(s0, segment(S, x)[0])
    inside = resize_mask(mask, (64, 64))
    share = {s["label"]: s for s in result["shares"]}["tree"]
    assert share["inside_before"] == pytest.approx((s0[inside] == TREE).mean())
    assert share["inside_after"] == pytest.approx((s1[inside] == TREE).mean())
    assert share["outside_after"] == pytest.approx((s1[~inside] == TREE).mean())
    assert share["after"] == pytest.approx((s1 == TREE).mean())
    assert result["region_fraction"] == pytest.approx(inside.mean())
    assert share["inside_after"] - share["inside_before"] >= 0.3
    assert [u["unit"] for u in result["strokes"][0]["units"]] == sorted(model.layers[LAYER].top_units("tree", 20))
    # a list mask at another resolution edits the same cells
    coarse = mask[::4, ::4].tolist()
    again = client.post("/api/edit", json={"model": "scenes64", "seed": 10, "strokes": [
        {"concept": "tree", "mask": coarse}]}).json()
    assert again["image"] == result["image"]


def _valid_edit(mask_url):
    return {"model": "scenes64", "seed": 1, "strokes": [{"concept": "tree", "mode": "add", "mask": mask_url}]}


def malformed_requests():
    """(name, body bytes or JSON object, expected status) for every class of bad request."""
    good = alpha_mask_url(np.ones((64, 64)))
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 20000 x 20000 in a few kB
    bomb_url = "data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode()
    edit = _valid_edit(good)
    stroke = edit["strokes"][0]
    return [
        ("bad JSON", b'{"model": "scenes64", "seed": 1, "strokes": [', 422),
        ("not an object", b"[1, 2, 3]", 422),
        ("empty body", b"", 422),
        ("unknown model", {**edit, "model": "nope"}, 404),
        ("unknown layer", {**edit, "layer": "layer9"}, 404),
        ("unknown concept", {**edit, "strokes": [{**stroke, "concept": "unicorn"}]}, 422),
        ("unknown mode", {**edit, "strokes": [{**stroke, "mode": "paint"}]}, 422),
        ("no source", {k: v for k, v in edit.items() if k != "seed"}, 422),
        ("two sources", {**edit, "photo": "abc"}, 422),
        ("unknown photo", {**{k: v for k, v in edit.items() if k != "seed"}, "photo": "abc"}, 404),
        ("z of wrong size", {**{k: v for k, v in edit.items() if k != "seed"}, "z": [0.0] * 3}, 422),
        ("negative seed", {**edit, "seed": -1}, 422),
        ("strength > 1", {**edit, "strokes": [{**stroke, "strength": 2}]}, 422),
        ("mask of wrong aspect", {**edit, "strokes": [{**stroke, "mask": alpha_mask_url(np.ones((10, 64)))}]}, 422),
        ("ragged mask", {**edit, "strokes": [{**stroke, "mask": [[0, 1], [1]]}]}, 422),
        ("mask values > 1", {**edit, "strokes": [{**stroke, "mask": [[0, 7], [1, 1]]}]}, 422),
        ("mask not an image", {**edit, "strokes": [{**stroke, "mask": "data:image/png;base64,AAAA"}]}, 422),
        ("mask not base64", {**edit, "strokes": [{**stroke, "mask": "data:image/png;base64,@@@"}]}, 422),
        ("mask not a data URL", {**edit, "strokes": [{**stroke, "mask": "http://example.com/x.png"}]}, 422),
        ("huge mask (decompression bomb)", {**edit, "strokes": [{**stroke, "mask": bomb_url}]}, 413),
        ("huge body", b'{"model": "' + b"x" * (17 * 2**20) + b'"}', 413),
        ("too many strokes", {**edit, "strokes": [stroke] * 33}, 422),
        ("units out of range", {**edit, "strokes": [{**stroke, "concept": None, "units": [SHAPE[-1]]}]}, 422),
        ("extra field", {**edit, "evil": 1}, 422),
    ]


@pytest.mark.parametrize("name, body, status", malformed_requests(), ids=[r[0] for r in malformed_requests()])
def test_malformed_requests_get_4xx_json_errors(client, name, body, status):
    if isinstance(body, bytes):
        response = client.post("/api/edit", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/api/edit", json=body)
    assert response.status_code == status, (name, response.text[:300])
    detail = response.json()["detail"]
    assert detail and "Traceback" not in json.dumps(detail)


@given(st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=20), lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from(["model", "seed", "z", "layer", "strokes", "photo", "mask",
                                                       "concept", "mode", "units", "strength", "top"]),
                                      children, max_size=5), max_leaves=12),
       st.sampled_from(["/api/edit", "/api/generate", "/api/photos"]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
def test_fuzzed_requests_never_get_a_server_error(client, body, path):
    response = client.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text[:300]


def test_generate_for_z_equals_generate_for_seeds(client, model):
    z = model.z_for_seed(4).tolist()
    by_z = client.post("/api/generate", json={"model": "scenes64", "z": [z]}).json()["images"][0]
    by_seed = client.post("/api/generate", json={"model": "scenes64", "seeds": [4]}).json()["images"][0]
    assert by_z["image"] == by_seed["image"] and by_z["segmentation"] == by_seed["segmentation"]
    assert client.post("/api/generate", json={"model": "scenes64", "seeds": list(range(65))}).status_code == 422


# ---------------------------------------------------------------------------------- photos


def test_inversion_of_world_scenes_and_blending(G):
    from gandissect_jax.scenes.world import render_scenes

    photos, _ = render_scenes(123, np.arange(2))  # scenes of the procedural world, not outputs of G
    kwargs = dict(candidates=8, z_steps=40, r_steps=40)
    h, f = G.split(LAYER)
    for photo in photos:  # one at a time, as the server inverts (one compiled program)
        inversion = invert(G, LAYER, photo[None], **kwargs)
        assert inversion.z.shape == (1, G.z_dim) and inversion.delta.shape == (1, *SHAPE)
        r = h(G.params, inversion.z)[0] + inversion.delta
        np.testing.assert_allclose(psnr(f(G.params, r, ()), photo[None]), inversion.psnr_r, atol=1e-3)
        np.testing.assert_allclose(psnr(G.apply(G.params, inversion.z), photo[None]), inversion.psnr_z, atol=1e-3)
        gain = float(inversion.psnr_r[0] - inversion.psnr_z[0])
        assert gain >= 2.0, (inversion.psnr_z, inversion.psnr_r)  # measured: +4 to +7 dB at 150 + 150 steps
    again = invert(G, LAYER, photo[None], **kwargs)
    np.testing.assert_array_equal(again.delta, inversion.delta)  # deterministic
    # blending: the photo wherever the edit changed nothing, the edit where it did
    edited = np.array(inversion.images_r)
    edited[:, 40:, :20] = 1.0
    out = np.asarray(blend(photo[None], inversion.images_r, edited))
    np.testing.assert_array_equal(out[:, :30, 30:], photo[None, :30, 30:])
    np.testing.assert_allclose(out[:, 44:, :16], 1.0)
    np.testing.assert_array_equal(np.asarray(blend(photo[None], inversion.images_r, inversion.images_r)), photo[None])


def test_photo_upload_then_edit_blends_into_the_photo(client, model, S, monkeypatch):
    from gandissect_jax.scenes.world import render_scenes

    monkeypatch.setattr(model, "_invert_settings", dict(candidates=8, z_steps=40, r_steps=40))
    photos, _ = render_scenes(7, np.arange(1))
    photo = gd.to_uint8(photos[0])
    big = np.asarray(Image.fromarray(photo).resize((200, 200), Image.Resampling.NEAREST))
    framed = np.zeros((200, 260, 3), np.uint8)
    framed[:, 30:230] = big  # a wider JPEG is centre-cropped to a square
    buffer = io.BytesIO()
    Image.fromarray(framed).save(buffer, format="JPEG", quality=95)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = client.post("/api/photos", json={"model": "scenes64", "image": url})
    assert response.status_code == 200, response.text
    uploaded = response.json()
    assert uploaded["psnr_r"] > uploaded["psnr_z"] > 10
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(uploaded["image"].split(",")[1]))))
    assert np.abs(seen.astype(int) - photo.astype(int)).mean() < 12  # the photo, through JPEG and resizing
    plain = client.post("/api/edit", json={"model": "scenes64", "photo": uploaded["photo"], "strokes": []}).json()
    assert plain["image"] == uploaded["image"]  # no strokes: the photo itself
    mask = np.zeros((64, 64))
    mask[44:, :24] = 1
    with compilations() as compiled:  # a photo runs the same compiled edit as generated images
        edit = client.post("/api/edit", json={"model": "scenes64", "photo": uploaded["photo"], "strokes": [
            {"concept": "tree", "mask": mask.tolist()}]}).json()
    assert compiled == []
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(edit["image"].split(",")[1]))))
    generated = np.asarray(Image.open(io.BytesIO(base64.b64decode(edit["generated"].split(",")[1]))))
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(plain["generated"].split(",")[1]))))  # G's reconstruction
    assert edit["original"] == uploaded["image"] and edit["original_segmentation"] == plain["original_segmentation"]
    # the segmentation and shares are of what the user sees: the photo with the edit blended in
    seen_labels = segment(S, result[None].astype(np.float32) / 127.5 - 1)[0]
    assert (decode_labels(edit["segmentation"]) == seen_labels).mean() > 0.99
    from scipy.ndimage import binary_erosion

    # pixels the edit left alone (with a margin for the smoothed seam) are the photo's, exactly
    unchanged = binary_erosion(np.abs(generated.astype(int) - original.astype(int)).mean(-1) < 6, np.ones((5, 5)))
    assert unchanged.mean() > 0.3
    np.testing.assert_array_equal(result[unchanged], seen[unchanged])
    changed = np.abs(result.astype(int) - seen.astype(int)).max(-1) > 20
    assert changed[44:, :24].mean() > 0.2 and changed[:30, 34:].mean() < 0.05


# ---------------------------------------------------------------------------------- the command


def test_paint_command_is_registered_and_checks_its_flags(capsys, tmp_path):
    from gandissect_jax.cli import build_parser, main

    assert "paint" in build_parser().format_help()
    with pytest.raises(SystemExit) as stop:  # refused when parsed, before any model is loaded
        main(["paint", "--port", "0", "--outdir", str(tmp_path)])
    assert stop.value.code == 2
    assert "argument --port: must be an integer in [1, 65535], got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # decided by the command line alone: a usage error
        main(["paint", "--outdir", str(tmp_path / "a"), str(tmp_path / "b" / "a")])
    assert stop.value.code == 2
    assert "distinct names" in capsys.readouterr().err
    assert main(["paint", "--outdir", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["paint", "--outdir", str(tmp_path), "--no-warmup"]) == 1
    assert "dissect.json" in capsys.readouterr().err


def test_readme_paint_python_runs_as_written(outdir):
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    section = text.split("## Paint: GANPaint in the browser", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    code = code.replace('"results/scenes64"', repr(outdir))  # the session's tiny dissection
    code = code.replace('invert(G, "layer4", photos)', 'invert(G, "layer4", photos, candidates=8, z_steps=40, r_steps=40)')
    namespace = {}
    exec(compile(code, "README: Paint, Python", "exec"), namespace)
    images, fewer, inversion = namespace["images"], namespace["fewer"], namespace["inversion"]
    assert images.shape == fewer.shape == (4, 64, 64, 3)
    assert not np.array_equal(np.asarray(images), np.asarray(fewer))
    assert inversion.psnr_r[0] > inversion.psnr_z[0]


def test_paint_command_serves_the_demo_dissection_when_there_is_one(outdir, monkeypatch):
    import argparse

    from gandissect_jax.commands import paint as command

    monkeypatch.setattr(command, "DEMO_OUTDIR", outdir)
    args = argparse.Namespace(outdir=None, model=None, segmenter=None, top=7, max_strokes=4, size=10)
    models = command.build_models(args)
    assert [m.name for m in models] == ["scenes64"] and models[0].default_top == 7 and models[0].max_strokes == 4
    assert models[0].info["model"] == "scenes64" and models[0].info["segmenter"] == "scenes64-segmenter"
