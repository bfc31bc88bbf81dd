"""The scene world as a tensorflow-datasets builder (array_record, no TensorFlow)."""

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from gandissect_jax.images import to_uint8
from gandissect_jax.scenes import world  # noqa: E402
from gandissect_jax.scenes.tfds_builder import build_scenes64  # noqa: E402


def test_builds_a_small_split_and_reads_it_back(tmp_path):
    builder = build_scenes64(tmp_path, train=24, test=6, world_seed=5)
    train = builder.as_data_source("train")
    test = builder.as_data_source("test")
    assert len(train) == 24 and len(test) == 6
    images, labels = world.render_scenes(5, np.arange(24))
    for i in (0, 7, 23):  # random access, in scene order
        example = train[i]
        assert int(example["index"]) == i
        assert example["image"].dtype == np.uint8 and example["image"].shape == (64, 64, 3)
        np.testing.assert_array_equal(example["image"], to_uint8(images[i]))
        np.testing.assert_array_equal(example["label"], labels[i])
    config = builder.builder_config
    test_images, test_labels = world.render_scenes(5, config.test_offset + np.arange(6))
    np.testing.assert_array_equal(test[4]["label"], test_labels[4])
    assert int(test[4]["index"]) == config.test_offset + 4
    assert builder.info.metadata["label_names"] == list(world.LABEL_NAMES)
    # a second builder on the same directory reuses the prepared files
    again = build_scenes64(tmp_path, train=24, test=6, world_seed=5)
    np.testing.assert_array_equal(again.as_data_source("train")[3]["image"], train[3]["image"])


def test_builder_needs_no_tensorflow():
    assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
