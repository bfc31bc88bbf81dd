"""The run lifecycle of a dissection: a rerun never returns results of other inputs, --restart removes
only what the library wrote, a run that failed on bad input does not poison its outdir, bad input
is refused before the passes, and channels-first features are caught."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.dissection import LayerDissection, dissect_features, dissect_generator
from gandissect_jax.dissection.resume import IdentityMismatch, content_digest, pytree_digest
from test_dissect_pipeline import TinyGenerator, TinySegmenter, assert_same

LABELS = {"labels": [["-", "object"], ["sky", "object"], ["tree", "object"], ["road", "object"]],
          "categories": ["object"]}
QUICK = dict(progress=False, make_images=False, batch_size=16)


def toy(n=48, seed=0):
    """28x28 segmentations with three labels and 7x7x16 features, 8 units tied to one label's region."""
    rng = np.random.RandomState(seed)
    seg = np.zeros((n, 28, 28), np.int32)
    feats = rng.rand(n, 7, 7, 16).astype(np.float32) * 0.1
    for i in range(n):
        r0, c0 = rng.randint(0, 14, 2)
        seg[i, :10] = 1
        seg[i, r0:r0 + 12, c0:c0 + 12] = 2
        seg[i, 24:] = 3
        lab7 = seg[i, 2::4, 2::4]
        for u in range(8):
            feats[i, :, :, u] += (lab7 == 1 + u % 3) * (1.0 + 0.1 * u)
    return feats, seg


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class ReadCounter:
    """An array whose slice reads are counted (hash reads and batch reads alike)."""

    def __init__(self, array):
        self.array = array
        self.shape, self.ndim, self.dtype = array.shape, array.ndim, array.dtype
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return self.array[key]

    def transpose(self, *axes):
        return self.array.transpose(*axes)


# ----------------------------------------------------------------------------- identity: content


def test_content_digest_covers_every_byte_and_streams_memmaps(tmp_path):
    feats, _ = toy(40)
    np.save(tmp_path / "f.npy", feats)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    whole = content_digest(feats)
    assert content_digest(mapped) == whole
    assert content_digest(mapped, chunk_bytes=1) == whole  # one sample at a time
    assert content_digest(feats, chunk_bytes=7 * 7 * 16 * 4 * 3 + 5) == whole
    rng = np.random.RandomState(0)
    for _ in range(20):  # one changed value anywhere (not only in the first or last sample) is seen
        changed = feats.copy()
        index = tuple(rng.randint(0, s) for s in feats.shape)
        changed[index] = np.nextafter(changed[index], np.float32(np.inf))
        assert content_digest(changed) != whole, index
    assert content_digest(feats.astype(np.float64)) != whole  # dtype
    assert content_digest(feats.reshape(40, 49, 16)) != whole  # shape
    seen = []
    content_digest(mapped, chunk_bytes=10 * 7 * 7 * 16 * 4, visit=lambda chunk: seen.append(chunk.shape[0]))
    assert seen == [10, 10, 10, 10]  # bounded reads, every sample once


def test_pytree_digest_sees_every_parameter():
    params = TinyGenerator().params
    base = pytree_digest(params)
    assert pytree_digest(jnp.asarray(1.0)) != pytree_digest(jnp.asarray(1))
    assert pytree_digest({k: np.asarray(v) for k, v in params.items()}) == base  # host or device: same
    for name in params:
        changed = dict(params)
        changed[name] = params[name].at[(0,) * params[name].ndim].add(1e-3)
        assert pytree_digest(changed) != base, name
    renamed = {("v" + k if k == "w1" else k): v for k, v in params.items()}
    assert pytree_digest(renamed) != base  # structure


def test_resume_refuses_changed_features(tmp_path):
    feats, seg = toy()
    outdir = tmp_path / "out"
    dissect_features(feats, seg, LABELS, outdir=str(outdir), **QUICK)
    before = listing(outdir)
    changed = feats.copy()
    changed[23, 3, 3, 5] += 0.5  # a sample in the middle: same shapes, same first and last sample
    counted = ReadCounter(changed)
    with pytest.raises(IdentityMismatch, match=r"source\.content\.features\.features was sha256 .*, now sha256") as err:
        dissect_features(counted, seg, LABELS, outdir=str(outdir), **QUICK)
    assert "--restart" in str(err.value) and "another --outdir" in str(err.value)
    assert counted.reads == 1  # hashed once, then refused: no pass read a batch
    assert listing(outdir) == before  # nothing written


def test_resume_refuses_changed_segmentations(tmp_path):
    feats, seg = toy()
    dissect_features(feats, seg, LABELS, outdir=str(tmp_path), **QUICK)
    changed = seg.copy()
    changed[30, 20, 20] = 3
    with pytest.raises(IdentityMismatch, match=r"source\.content\.segmentations"):
        dissect_features(feats, changed, LABELS, outdir=str(tmp_path), **QUICK)


def test_a_finished_layer_whose_scores_were_replaced_is_measured_again(tmp_path, capsys):
    """A rerun never hands back a scores.npz this run did not write (copied in from another run,
    edited): the layer is measured again and the file rewritten."""
    feats, seg = toy()
    first = dissect_features(feats, seg, LABELS, outdir=str(tmp_path / "a"), **QUICK)["features"]
    other = dissect_features(feats[:40], seg[:40], LABELS, outdir=str(tmp_path / "b"), **QUICK)["features"]
    assert not np.array_equal(first.iou, other.iou)
    scores = tmp_path / "a" / "features" / "scores.npz"
    scores.write_bytes((tmp_path / "b" / "features" / "scores.npz").read_bytes())
    capsys.readouterr()
    again = dissect_features(feats, seg, LABELS, outdir=str(tmp_path / "a"), **QUICK)["features"]
    assert_same(first, again)
    assert "was changed since this run wrote it: measuring layer features again" in capsys.readouterr().err
    reloaded = LayerDissection.load_npz(str(scores))
    np.testing.assert_array_equal(reloaded.iou, first.iou)
    # untouched: taken from the file, no message
    dissect_features(feats, seg, LABELS, outdir=str(tmp_path / "a"), **QUICK)
    assert "was changed" not in capsys.readouterr().err


def test_features_resume_with_another_batch_size_gives_the_same_results(tmp_path):
    """Precomputed data are batch-invariant: batch size is not part of their run's identity."""
    feats, seg = toy()
    first = dissect_features(feats, seg, LABELS, outdir=str(tmp_path), **QUICK)["features"]
    again = dissect_features(feats, seg, LABELS, outdir=str(tmp_path), **{**QUICK, "batch_size": 7})["features"]
    assert_same(first, again)
    settings = json.loads((tmp_path / ".progress" / "settings.json").read_text())
    assert "batch" not in settings


class ShiftedGenerator(TinyGenerator):
    """TinyGenerator with one weight changed (same architecture, same shapes)."""

    def __init__(self):
        super().__init__()
        self.params = dict(self.params, w3=self.params["w3"].at[0, 0].add(0.125))


class OtherSegmenter(TinySegmenter):
    params = {"offset": jnp.float32(0.05)}


def test_resume_refuses_changed_generator_params(tmp_path):
    options = dict(size=24, seed=3, topk=4, outdir=str(tmp_path), **QUICK)
    dissect_generator(TinyGenerator(), TinySegmenter(), ["layer2"], **options)
    with pytest.raises(IdentityMismatch, match=r"source\.params\.generator was sha256"):
        dissect_generator(ShiftedGenerator(), TinySegmenter(), ["layer2"], **options)
    with pytest.raises(IdentityMismatch, match=r"source\.params\.segmenter was sha256"):
        dissect_generator(TinyGenerator(), OtherSegmenter(), ["layer2"], **options)
    # a generator source is batch-invariant at a fixed micro-batch: the micro-batch is part of the
    # identity, the batch size is not (another batch size resumes the finished run)
    with pytest.raises(IdentityMismatch, match=r"source\.micro_batch was 32, now 8"):
        dissect_generator(TinyGenerator(), TinySegmenter(), ["layer2"], **{**options, "micro_batch": 8})
    dissect_generator(TinyGenerator(), TinySegmenter(), ["layer2"], **{**options, "batch_size": 8})
    # the same models and settings resume (here: everything is done)
    dissect_generator(TinyGenerator(), TinySegmenter(), ["layer2"], **options)


# ----------------------------------------------------------------------------- restart


def test_restart_removes_only_our_files(tmp_path):
    feats, seg = toy()
    outdir = tmp_path / "out"
    (outdir / "notes").mkdir(parents=True)
    (outdir / "notes" / "plan.txt").write_text("the user's")
    (outdir / "results.csv").write_text("the user's")
    (outdir / "b").mkdir()
    (outdir / "b" / "mine.txt").write_text("the user's, in a directory a layer will also use")
    users = {p: (outdir / p).read_text() for p in ("notes/plan.txt", "results.csv", "b/mine.txt")}
    dissect_features({"a": feats, "b": feats}, seg, LABELS, outdir=str(outdir),
                     **{**QUICK, "make_images": True})
    assert (outdir / "a" / "image" / "0-top.jpg").exists() and (outdir / "b" / "scores.npz").exists()
    manifest = json.loads((outdir / ".progress" / "outputs.json").read_text())
    assert "a/scores.npz" in manifest["files"] and "dissect.html" in manifest["files"]
    assert "a" in manifest["directories"] and "b" not in manifest["directories"]  # b was the user's
    assert not any(p.startswith(("notes", "results.csv", "b/mine")) for p in manifest["files"])

    # another dataset with one layer only: refused, then restarted
    other_feats, other_seg = toy(seed=1)
    with pytest.raises(IdentityMismatch):
        dissect_features({"c": other_feats}, other_seg, LABELS, outdir=str(outdir), **QUICK)
    dissect_features({"c": other_feats}, other_seg, LABELS, outdir=str(outdir), restart=True, **QUICK)
    for path, text in users.items():
        assert (outdir / path).read_text() == text  # the user's files are all there
    assert not (outdir / "a").exists()  # our old layer directory is gone
    assert sorted(p.name for p in (outdir / "b").iterdir()) == ["mine.txt"]  # only our files went
    assert (outdir / "c" / "scores.npz").exists()
    document = json.loads((outdir / "dissect.json").read_text())
    assert [layer["layer"] for layer in document["layers"]] == ["c"]


def test_restart_ignores_manifest_entries_outside_the_outdir(tmp_path):
    feats, seg = toy()
    outdir = tmp_path / "out"
    dissect_features(feats, seg, LABELS, outdir=str(outdir), **QUICK)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "vdir").mkdir()
    manifest_path = outdir / ".progress" / "outputs.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] += ["../victim.txt", str(victim), "features/../../victim.txt"]
    manifest["directories"] += ["../vdir", str(tmp_path / "vdir")]
    manifest_path.write_text(json.dumps(manifest))
    dissect_features(feats, seg, LABELS, outdir=str(outdir), restart=True, **QUICK)
    assert victim.read_text() == "keep me" and (tmp_path / "vdir").is_dir()


# ----------------------------------------------------------------------------- failures on bad input


def test_failed_run_does_not_poison_outdir(tmp_path):
    feats, seg = toy()
    outdir = tmp_path / "out"
    bad = feats.copy()
    bad[40, 1, 1, 3] = np.nan  # found by the content scan, before the run's identity is written
    with pytest.raises(ValueError, match="NaN"):
        dissect_features(bad, seg, LABELS, outdir=str(outdir), **QUICK)
    assert not (outdir / ".progress").exists()
    result = dissect_features(feats, seg, LABELS, outdir=str(outdir), **QUICK)["features"]  # the fixed data run
    assert_same(result, dissect_features(feats, seg, LABELS, **QUICK)["features"])
    # bad labels are refused before anything is written: not even the outdir is made
    wrong = seg.copy()
    wrong[47, 27, 27] = 9
    with pytest.raises(ValueError, match="label 9"):
        dissect_features(feats, wrong, LABELS, outdir=str(tmp_path / "fresh"), **QUICK)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_nonfinite_features_are_reported_before_the_passes_naming_sample_and_unit(value, dtype, tmp_path):
    """NaN or inf anywhere in precomputed features (any float dtype): one ValueError from the
    content scan, naming the count and the first sample and unit, before any pass reads a batch
    and before anything is written."""
    feats, seg = toy()
    bad = feats.astype(dtype)
    bad[46, 5, 6, 2] = value  # late in the data
    bad[47, 0, 0, 1] = value
    counted = ReadCounter(bad)
    with pytest.raises(ValueError, match=r"features 'features' hold 2 NaN/inf activations, the first at sample 46, "
                                         r"unit 2"):
        dissect_features(counted, seg, LABELS, outdir=str(tmp_path / "out"), **QUICK)
    assert counted.reads == 1  # the features were hashed, never read by a pass
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, message", [
    (lambda im: im.astype(np.int64),
     r"images must be uint8 \(0 to 255\) or floating point in \[-1, 1\], got dtype int64"),
    (lambda im: im > 0, r"images must be uint8 .* got dtype bool"),
    (lambda im: (im + 1) * 127.5, r"images hold values from 0 to 255; float images are read as \[-1, 1\].*uint8"),
    (lambda im: np.where(np.arange(48)[:, None, None, None] == 45, np.nan, im).astype(np.float16),
     r"images hold 48 NaN/inf values, the first in sample 45; float images must be finite"),
    (lambda im: np.where(np.arange(48)[:, None, None, None] == 47, np.inf, im),
     r"images hold 48 NaN/inf values, the first in sample 47"),
])
def test_images_of_another_convention_are_refused_before_the_passes(make, message, tmp_path):
    """--images are drawn as uint8, or as floats in [-1, 1]: integer or bool arrays, NaN/inf, and
    0-255 floats (which would be drawn as white strips) are refused by the content scan, before
    any pass and before anything is written; [-1, 1] floats a little beyond (unclamped
    generators) and uint8 images are taken."""
    feats, seg = toy()
    images = np.linspace(-1, 1, 48 * 4 * 4 * 3, dtype=np.float32).reshape(48, 4, 4, 3)
    counted = ReadCounter(feats)
    with pytest.raises(ValueError, match=message):
        dissect_features(counted, seg, LABELS, outdir=str(tmp_path / "out"), images=make(images), **QUICK)
    assert counted.reads <= 1 and not (tmp_path / "out").exists()
    for good in (images * 1.3, ((images + 1) * 127.5).astype(np.uint8)):
        dissect_features(feats, seg, LABELS, images=good, **QUICK)


@pytest.mark.parametrize("value, hint", [(7, "must list every label number"), (255, "map 'ignore' values"),
                                         (-1, "map 'ignore' values"), (2**31, "must list every label number"),
                                         (2**40, "must list every label number")])
def test_label_out_of_range_is_reported_before_the_passes(value, hint):
    feats, seg = toy()
    wrong = seg.astype(np.int64)
    wrong[46, 5, 7] = value  # one entry, late in the data
    counted = ReadCounter(feats)
    with pytest.raises(ValueError, match=rf"the segmentations hold label {value}, outside \[0, 3\].*{hint}"):
        dissect_features(counted, wrong, LABELS, **QUICK)
    assert counted.reads == 1  # the features were hashed, never read by a pass


class BadSegmenter(TinySegmenter):
    """Labels 9 where the image is bright: outside the 4 labels it declares."""

    def segment(self, params, images, downsample=1):
        labels = super().segment(params, images, downsample)
        return jnp.where(labels == 3, 9, labels)


def test_generator_labels_out_of_range_are_reported_before_the_passes(monkeypatch):
    from gandissect_jax.dissection import sources

    fetched = []
    original = sources.GeneratorSource.fetch
    monkeypatch.setattr(sources.GeneratorSource, "fetch",
                        lambda self, indices, sharding, labels=True: fetched.append(labels) or
                        original(self, indices, sharding, labels))
    with pytest.raises(ValueError, match=r"segmentations of the first 32 samples hold label 9, outside \[0, 3\]"):
        dissect_generator(TinyGenerator(), BadSegmenter(), ["layer2"], size=40, topk=4, **QUICK)
    assert fetched == [True]  # one probe batch; no pass started


@pytest.mark.parametrize("labels, message", [
    ({"labels": [["-", "object"], ["sky", "object"], ["sky", "object"], ["road", "object"]], "categories": ["object"]},
     r"label 'sky' \(object\) is listed twice, as label 1 and label 2"),
    ({"labels": [["-", "object"], ["sky", "objet"], ["tree", "object"], ["road", "object"]], "categories": ["object"]},
     r"label 1 'sky' has category 'objet', which is not one of the categories \['object'\]"),
    ({"labels": [["-", "object"], ["sky", "object"], ["tree", "object"], ["road", "object"]],
      "categories": ["object", "object"]}, r"categories \['object'\] are listed more than once"),
    ({"labels": [], "categories": ["object"]}, "no labels"),
])
def test_bad_label_lists_are_refused_before_the_passes(labels, message):
    feats, seg = toy()
    counted = ReadCounter(feats)
    with pytest.raises(ValueError, match=message):
        dissect_features(counted, seg, labels, **QUICK)
    assert counted.reads == 0


def test_the_references_own_label_list_is_accepted():
    """The reference's label lists start with ('-', '-'), "no label", whose category is none of
    the categories: accepted, with the same scores as label 0 listed under a real category (label
    0 is never counted; its category maps to category 0, as in the reference)."""
    feats, seg = toy()
    reference_style = {"labels": [["-", "-"]] + LABELS["labels"][1:], "categories": LABELS["categories"]}
    assert LABELS["labels"][0][1] == LABELS["categories"][0]
    ours = dissect_features(feats, seg, LABELS, **QUICK)["features"]
    theirs = dissect_features(feats, seg, reference_style, **QUICK)["features"]
    np.testing.assert_array_equal(theirs.iou, ours.iou)
    np.testing.assert_array_equal(theirs.unit_label, ours.unit_label)
    with pytest.raises(ValueError, match=r"label 1 'sky' has category '-'"):
        dissect_features(feats, seg, {"labels": [["-", "-"], ["sky", "-"]] + LABELS["labels"][2:],
                                      "categories": LABELS["categories"]}, **QUICK)


def test_bad_shapes_and_counts_are_refused_before_the_passes():
    feats, seg = toy()
    with pytest.raises(ValueError, match="there are no samples"):
        dissect_features(feats[:0], seg[:0], LABELS, **QUICK)
    with pytest.raises(ValueError, match=r"must have 4 axes \(N, h, w, U\).*add a last axis"):
        dissect_features(feats[..., 0], seg, LABELS, **QUICK)
    with pytest.raises(ValueError, match=r"topk \(49\) must be at most the number of samples \(48\)"):
        dissect_features(feats, seg, LABELS, topk=49, **QUICK)
    few = dissect_features(feats[:6], seg[:6], LABELS, **QUICK)["features"]
    assert few.topk_indices.shape == (16, 6)  # the default topk (10) is the sample count when fewer


# ----------------------------------------------------------------------------- layout


def test_nchw_features_are_refused_with_layout_hint(tmp_path):
    feats, seg = toy()
    nchw = np.ascontiguousarray(feats.transpose(0, 3, 1, 2))  # (48, 16, 7, 7), as PyTorch saves them
    with pytest.raises(ValueError, match=r"16x7 feature map in layout 'nhwc'.*segmentations' 28x28.*"
                                         r"pass --layout nchw \(API: layout='nchw'\)"):
        dissect_features(nchw, seg, LABELS, outdir=str(tmp_path / "refused"), **QUICK)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match=r"pass --layout nhwc"):
        dissect_features(feats, seg, LABELS, layout="nchw", **QUICK)
    with pytest.raises(ValueError, match="layout must be 'nhwc' or 'nchw'"):
        dissect_features(feats, seg, LABELS, layout="chw", **QUICK)
    assert_same(dissect_features(nchw, seg, LABELS, layout="nchw", **QUICK)["features"],
                dissect_features(feats, seg, LABELS, **QUICK)["features"])


def test_layout_check_accepts_rounded_feature_maps():
    from gandissect_jax.dissection.dissect import aspect_agrees

    assert aspect_agrees((47, 63), (375, 500)) and aspect_agrees((7, 7), (28, 28))
    assert aspect_agrees((1, 1), (224, 224)) and aspect_agrees((12, 16), (375, 500))
    assert not aspect_agrees((16, 7), (28, 28)) and not aspect_agrees((512, 7), (224, 224))
    assert not aspect_agrees((3, 7), (28, 28))


# ----------------------------------------------------------------------------- progress state


def test_completed_run_removes_pass_checkpoints_unless_kept(tmp_path):
    feats, seg = toy()
    dissect_features(feats, seg, LABELS, outdir=str(tmp_path / "a"), **QUICK)
    assert sorted(p.name for p in (tmp_path / "a" / ".progress").iterdir()) == [
        "layer-features.done", "outputs.json", "settings.json"]
    dissect_features(feats, seg, LABELS, outdir=str(tmp_path / "b"), keep_progress=True, **QUICK)
    [kept] = (tmp_path / "b" / ".progress").glob("passes-*")
    assert (kept / "plan.npz").exists() and (kept / "counts" / "tally.npz").exists()


def test_progress_bars_name_each_pass(capsys):
    feats, seg = toy()
    dissect_features(feats, seg, LABELS, **{**QUICK, "progress": True})
    err = capsys.readouterr().err
    for name in ("pass 1/4: unit quantiles and top samples", "pass 2/4: quantile refinement",
                 "pass 3/4: exact quantiles", "pass 4/4: concept counts", "dissection:"):
        assert name in err, name


def test_overall_progress_weights_each_pass_by_its_measured_cost(monkeypatch):
    """The overall bar counts each pass's samples times its cost per sample relative to the first
    pass: a prior at first, the measured ratio once a twentieth of the pass ran; it ends full."""
    from gandissect_jax.dissection import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    run = progress.RunProgress(1000, ["quantiles-0", "quantiles-1", "counts"], costs={"counts": 6.0})
    seconds_per_sample = {"quantiles-0": 0.001, "quantiles-1": 0.0005, "counts": 0.003}
    assert run.outer.total == 1000 * (1 + 1 + 6)
    seen = {}
    for name, cost in seconds_per_sample.items():
        bar = run.bar(name, 1000, 0)
        for _ in range(100):
            clock[0] += 10 * cost
            bar.update(10)
        seen[name] = list(run.costs)
        bar.close()
    assert seen["quantiles-0"] == [1.0, 1.0, 6.0]  # priors while the first pass runs
    assert seen["quantiles-1"][1] == pytest.approx(0.5)  # measured: half the first pass's time per sample
    assert seen["counts"][2] == pytest.approx(3.0)  # the prior 6 replaced by the measured 3
    assert run.outer.n == pytest.approx(run.outer.total) == pytest.approx(1000 * (1 + 0.5 + 3))
    run.close()


def test_a_resumed_run_starts_the_overall_bar_where_it_stopped():
    from gandissect_jax.dissection import progress

    run = progress.RunProgress(1000, ["quantiles-0", "quantiles-1", "counts"], costs={"counts": 2.0})
    bar = run.bar("quantiles-1", 1000, 400)  # passes 0 done, 400 samples of pass 1 saved
    assert run.outer.n == pytest.approx(1000 + 400) and run.outer.total == pytest.approx(4000)
    bar.close()
    run.close()
