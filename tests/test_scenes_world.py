"""The procedural scene world: determinism by seed, exact labels of a known scene, iterator."""

import dataclasses

import numpy as np
import pytest

from gandissect_jax.scenes import world
from gandissect_jax.scenes.world import LABELS


def test_deterministic_by_seed_and_independent_of_batch():
    images_a, labels_a = world.render_scenes(7, [3, 11, 12])
    images_b, labels_b = world.render_scenes(7, [3, 11, 12])
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    # scene 11 alone equals scene 11 inside a batch, so any split of the index range agrees
    single_images, single_labels = world.render_scenes(7, [11])
    np.testing.assert_array_equal(single_images[0], images_a[1])
    np.testing.assert_array_equal(single_labels[0], labels_a[1])
    # another seed gives other scenes
    other_images, _ = world.render_scenes(8, [3, 11, 12])
    assert np.abs(other_images - images_a).mean() > 0.05
    assert images_a.dtype == np.float32 and images_a.shape == (3, 64, 64, 3)
    assert labels_a.dtype == np.int32 and labels_a.shape == (3, 64, 64)
    assert images_a.min() >= -1.0 and images_a.max() <= 1.0


def test_uniform_stream_is_uniform_and_decorrelated():
    u = world.scene_uniforms(0, np.arange(2000), 64)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.std() - np.sqrt(1 / 12)) < 0.003
    corr = np.corrcoef(u[:, :8].T)
    assert np.abs(corr - np.eye(8)).max() < 0.08
    np.testing.assert_array_equal(u[5:9], world.scene_uniforms(0, np.arange(5, 9), 64))


def _known_scene():
    """One scene from explicit parameters: flat horizon at y=30, a sun, a building, a tree, no noise."""
    p = world.sample_params(0, [0])
    one = lambda v: np.asarray([v])
    none3 = lambda k: np.zeros((1, k), bool)
    return dataclasses.replace(
        p,
        sky_top=one([0.2, 0.4, 0.9]), sky_bottom=one([0.2, 0.4, 0.9]),
        sun_on=one(True), sun_xy=one([48.0, 8.0]), sun_radius=one(3.0), sun_color=one([1.0, 0.9, 0.2]),
        cloud_on=none3(world.MAX_CLOUDS),
        horizon=one([30.0, 0.0, 0.1, 0.0]), grass_color=one([0.3, 0.7, 0.2]), grass_texture=one(0.0),
        road_on=one(False),
        building_on=one([True, False, False]),
        building_box=np.array([[[10, 22, 20, 40], [0, 0, 0, 0], [0, 0, 0, 0]]]),
        building_color=np.full((1, 3, 3), 0.6),
        roof_kind=np.array([[0, 0, 0]]), roof_height=np.array([[2, 2, 2]]), roof_color=np.full((1, 3, 3), 0.3),
        window_grid=np.array([[[2, 2, 4, 4, 2]] * 3]), window_color=np.full((1, 3, 3), 0.1),
        door_box=np.array([[[14, 17, 34, 40]] * 3]), door_color=np.full((1, 3, 3), 0.25),
        tree_on=one([True, False, False, False, False]),
        tree_trunk=np.array([[[40, 42, 44, 50]] * 5]), tree_crown=np.array([[[41.0, 40.0, 4.0, 5.0]] * 5]),
        tree_conifer=np.zeros((1, 5), bool), tree_color=np.full((1, 5, 3), 0.15),
        trunk_color=np.full((1, 5, 3), 0.35),
        noise_fine=np.zeros((1, 64, 64), np.float32), noise_coarse=np.zeros((1, 64, 64), np.float32),
    )


def _expected_labels():
    """The known scene's labels, built pixel by pixel from the geometry (pixel centres at +0.5)."""
    expected = np.full((64, 64), LABELS["sky"])
    for y in range(64):
        for x in range(64):
            cx, cy = x + 0.5, y + 0.5
            if (cx - 48.0) ** 2 + (cy - 8.0) ** 2 <= 9.0:
                expected[y, x] = LABELS["sun"]
            if cy >= 30.0:
                expected[y, x] = LABELS["grass"]
            if 10 <= x < 22 and 20 <= y < 40:
                expected[y, x] = LABELS["building"]
            if 9 <= x < 23 and 20 <= y < 22:  # flat roof: 2 rows, 1 px overhang
                expected[y, x] = LABELS["roof"]
            # windows: 2x2 every 4 px from (12, 24), whole windows only, above the door top - 1
            if x in (12, 13, 16, 17) and y in (24, 25, 28, 29):
                expected[y, x] = LABELS["window"]
            if 14 <= x < 17 and 34 <= y < 40:
                expected[y, x] = LABELS["door"]
            if 40 <= x < 42 and 44 <= y < 50:
                expected[y, x] = LABELS["tree"]
            if ((cx - 41.0) / 4.0) ** 2 + ((cy - 40.0) / 5.0) ** 2 <= 1.0:
                expected[y, x] = LABELS["tree"]
    return expected


def test_known_scene_labels_are_exact():
    images, labels = world.render(_known_scene())
    expected = _expected_labels()
    np.testing.assert_array_equal(labels[0], expected)
    counts = np.bincount(labels[0].ravel(), minlength=world.NUM_LABELS)
    assert counts[LABELS["window"]] == 16
    assert counts[LABELS["door"]] == 18
    assert counts[LABELS["roof"]] == 28
    assert counts[LABELS["sun"]] == 32  # pixel centres (half-integers) within radius 3 of (48, 8)
    assert counts[LABELS["road"]] == counts[LABELS["cloud"]] == 0


def test_known_scene_colours():
    images, labels = world.render(_known_scene())
    rgb = (images[0] + 1) / 2
    np.testing.assert_allclose(rgb[24, 12], [0.1, 0.1, 0.1], atol=1e-6)  # window
    np.testing.assert_allclose(rgb[36, 15], [0.25, 0.25, 0.25], atol=1e-6)  # door
    np.testing.assert_allclose(rgb[21, 9], [0.3, 0.3, 0.3], atol=1e-6)  # roof overhang
    np.testing.assert_allclose(rgb[8, 48], [1.0, 0.9, 0.2], atol=1e-6)  # sun centre
    np.testing.assert_allclose(rgb[60, 2], [0.3, 0.7, 0.2], atol=1e-6)  # grass
    np.testing.assert_allclose(rgb[40, 41], [0.15, 0.15, 0.15], atol=1e-6)  # crown
    np.testing.assert_allclose(rgb[2, 2], [0.2, 0.4, 0.9], atol=1e-6)  # sky


def test_world_statistics_cover_every_class_and_trees_contrast_with_grass():
    images, labels = world.render_scenes(0, np.arange(400))
    freq = world.label_frequencies(labels)
    assert freq[0] == 0.0  # every pixel is labelled
    assert (freq[1:] > 0.003).all(), dict(zip(world.LABEL_NAMES, freq))
    # in every scene with both, tree pixels differ clearly in colour from grass pixels
    gaps = []
    for image, label in zip(images, labels):
        tree, grass = label == LABELS["tree"], label == LABELS["grass"]
        if tree.sum() > 20 and grass.sum() > 20:
            gaps.append(np.abs(image[tree].mean(0) - image[grass].mean(0)).max())
    assert len(gaps) > 200
    assert np.min(gaps) > 0.2


def test_iterate_scenes_matches_render():
    batches = list(world.iterate_scenes(3, batch_size=4, start=10, stop=19))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    ref_images, ref_labels = world.render_scenes(3, np.arange(10, 19))
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    endless = world.iterate_scenes(3, batch_size=2)
    for _ in range(3):
        next(endless)


def test_image_grid_and_palette():
    images, labels = world.render_scenes(0, np.arange(5))
    grid = world.image_grid(images, columns=4)
    assert grid.shape == (128, 256, 3) and grid.dtype == np.uint8
    assert (grid[64:, 64:] == 0).all()  # empty cells stay black
    assert world.label_palette().shape == (world.NUM_LABELS, 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_labels_only_known_numbers(seed):
    _, labels = world.render_scenes(seed, np.arange(64))
    assert labels.min() >= 1 and labels.max() < world.NUM_LABELS


def test_object_shares_merge_parts_into_their_owners():
    shares = np.arange(world.NUM_LABELS, dtype=np.float64)  # label number as its share
    merged = dict(zip(world.OBJECT_NAMES, world.object_shares(shares)))
    L = world.LABELS
    assert merged == {"sky": L["sky"] + L["sun"] + L["cloud"], "grass": L["grass"], "road": L["road"],
                      "tree": L["tree"], "building": L["building"] + L["window"] + L["door"] + L["roof"]}
    with pytest.raises(ValueError, match="label shares"):
        world.object_shares(shares[:5])
