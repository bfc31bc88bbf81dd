"""The shipped demo models (weights/scenes64): they load by registry name and reproduce their documented figures."""

import json

import numpy as np
import pytest

from gandissect_jax.scenes import stats, world
from gandissect_jax.weights import shipped_weights_dir

SCENES64 = shipped_weights_dir() / "scenes64"


@pytest.fixture(scope="module")
def segmenter():
    from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter

    return load_demo_segmenter("scenes64-segmenter")


@pytest.fixture(scope="module")
def generator():
    from gandissect_jax.proggan import load_generator

    return load_generator("scenes64")


def _iou_and_accuracy(segmenter, seed, count):
    confusion = np.zeros((world.NUM_LABELS, world.NUM_LABELS), np.int64)
    for images, labels in world.iterate_scenes(seed, 100, 0, count):
        pred = np.asarray(segmenter.segment(segmenter.params, images))[..., 0]
        confusion += np.bincount((labels * world.NUM_LABELS + pred).ravel(),
                                 minlength=world.NUM_LABELS**2).reshape(world.NUM_LABELS, -1)
    tp = np.diag(confusion)
    iou = tp / np.maximum(confusion.sum(0) + confusion.sum(1) - tp, 1)
    return iou, tp.sum() / confusion.sum()


def test_segmenter_accuracy_on_held_out_scenes(segmenter):
    # world seed 1000 is never used for training (training uses seed 0)
    iou, accuracy = _iou_and_accuracy(segmenter, 1000, 300)
    assert accuracy >= 0.95
    per_class = dict(zip(world.LABEL_NAMES[1:], np.round(iou[1:], 3)))
    assert (iou[1:] >= 0.8).all(), per_class
    documented = json.loads((SCENES64 / "segmenter_metrics.json").read_text())
    assert documented["pixel_accuracy"] >= 0.95
    assert abs(documented["pixel_accuracy"] - accuracy) < 0.01


def test_generator_loads_by_name_and_has_the_documented_architecture(generator):
    assert generator.z_dim == 128 and generator.resolution == 64
    assert generator.layer_names[-1] == "output_64x64" and len(generator.layer_names) == 11
    from gandissect_jax.sampling import sample_z

    images = np.asarray(generator(sample_z(4, 128, 0)))
    assert images.shape == (4, 64, 64, 3) and np.isfinite(images).all()


def test_generated_label_frequencies_match_the_documented_ones(generator, segmenter):
    documented = json.loads((SCENES64 / "label_frequencies.json").read_text())
    freq = stats.generated_label_frequencies(generator, segmenter, documented["n_generated"], documented["z_seed"])
    expected = np.array([documented["generated"][name] for name in world.LABEL_NAMES[1:]])
    np.testing.assert_allclose(freq[1:], expected, atol=2e-3)
    # the documented real-world shares are the world's own
    real = stats.world_label_frequencies(200)
    expected_real = np.array([documented["real_exact"][name] for name in world.LABEL_NAMES[1:]])
    np.testing.assert_allclose(real[1:], expected_real, atol=0.02)


def test_documented_ablation_reproduces(generator, segmenter):
    """weights/scenes64/ablation.json (scripts/demo_ablation.py): at each concept's documented layer the
    units are its 20 top units by IoU, and ablating them gives the documented label shares."""
    from gandissect_jax.dissection import dissect_generator
    from gandissect_jax.intervention import ablation_edit, label_shares
    from gandissect_jax.sampling import sample_z

    documented = json.loads((SCENES64 / "ablation.json").read_text())
    shipped_step = json.loads((SCENES64 / "label_frequencies.json").read_text())["generator_step"]
    assert documented["generator_step"] == shipped_step, (
        "ablation.json was measured on another generator snapshot; rerun scripts/demo_ablation.py")
    names = world.LABEL_NAMES
    evaluation = documented["evaluation"]
    z = sample_z(evaluation["samples"], generator.z_dim, evaluation["z_seed"])
    before = label_shares(generator, segmenter, z)
    np.testing.assert_allclose(before[1:], [documented["shares_before"][n] for n in names[1:]], atol=2e-4)
    layers = sorted(set(documented["best_layer"].values()))
    dissections = dissect_generator(generator, segmenter, layers, size=documented["dissection"]["samples"],
                                    seed=documented["dissection"]["z_seed"], progress=False,
                                    make_images=False, make_report=False)
    for concept, layer in documented["best_layer"].items():
        record = documented["layers"][layer]["concepts"][concept]
        units = dissections[layer].top_units(concept, documented["units"], score=documented["dissection"]["unit_ranking"])
        assert units.tolist() == record["units"], concept
        after = label_shares(generator, segmenter, z, layer=layer,
                             edit=ablation_edit(units, generator.layer_shape(layer)[-1]))
        c = names.index(concept)
        assert abs(after[c] - record["labels"]["share_after"]) < 2e-4, concept
        # the verdicts, recomputed from these shares: per label, and per whole object (parts merged)
        for level, b, a, classes in (("labels", before[1:], after[1:], names[1:]),
                                     ("objects", world.object_shares(before), world.object_shares(after),
                                      world.OBJECT_NAMES)):
            change = (a - b) / b
            k = list(classes).index(concept)
            removed = -change[k]
            others = np.abs(np.delete(change, k))
            assert abs(removed - record[level]["removed_fraction"]) < 5e-3, (concept, level)
            assert bool(removed >= 0.5 and others.max() < removed / 3) == record[level]["passes"], (concept, level)


def _object_and_other_labels(shares, concept):
    """(concept with its parts, then every other label 1..10 on its own), recomputed here."""
    own = [world.LABELS[concept]] + [world.LABELS[p] for p, o in world.PART_OWNERS.items() if o == concept]
    rest = [i for i in range(1, world.NUM_LABELS) if i not in own]
    return np.concatenate([[shares[own].sum()], shares[rest]])


@pytest.mark.parametrize("name", ["specific_removal_layer6", "specific_removal_layer6_building_binarized"])
def test_documented_causal_unit_ablation_reproduces(generator, segmenter, name):
    """weights/scenes64/ace/<name>.json (demo_ablation.py --rank ace --ace-objective
    specific_removal): zeroing the documented units gives the documented shares and verdicts, in
    all three readings."""
    from gandissect_jax.intervention import ablation_edit, label_shares
    from gandissect_jax.sampling import sample_z

    documented = json.loads((SCENES64 / "ace" / f"{name}.json").read_text())
    assert documented["dissection"]["ace"]["objective"] == "specific_removal"
    assert documented["dissection"]["ace"]["max_units"] == documented["units"] == 20
    evaluation = documented["evaluation"]
    z = sample_z(evaluation["samples"], generator.z_dim, evaluation["z_seed"])
    before = label_shares(generator, segmenter, z)
    for concept, layer in documented["best_layer"].items():
        record = documented["layers"][layer]["concepts"][concept]
        assert len(set(record["units"])) == 20
        after = label_shares(generator, segmenter, z, layer=layer,
                             edit=ablation_edit(record["units"], generator.layer_shape(layer)[-1]))
        for level, b, a in (("labels", before[1:], after[1:]),
                            ("objects", world.object_shares(before), world.object_shares(after)),
                            ("object_vs_labels", _object_and_other_labels(before, concept),
                             _object_and_other_labels(after, concept))):
            names = list(record[level]["relative_change"])
            change = (a - b) / b
            np.testing.assert_allclose(change, [record[level]["relative_change"][n] for n in names], atol=2e-3)
            k = names.index(concept)
            removed, others = -change[k], np.abs(np.delete(change, k))
            assert bool(removed >= 0.5 and others.max() < removed / 3) == record[level]["passes"], (concept, level)
