"""A tensorflow-datasets split as a tally source: images and label maps by example number, exactly."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from gandissect_jax.images import to_uint8
from gandissect_jax.dissection import StreamingStatistic, TfdsSource, count_labels, running_moments, tally  # noqa: E402
from gandissect_jax.scenes import world  # noqa: E402
from gandissect_jax.scenes.tfds_builder import build_scenes64  # noqa: E402


def label_pixels(num_labels: int) -> StreamingStatistic:
    """Pixels per label over the valid samples (padding samples are relabelled -1 and not counted)."""

    def update(state, labels, valid):
        labels = jnp.where(valid[:, None, None, None], labels, -1)
        counts, _ = count_labels(labels, num_labels)
        return state + counts

    return StreamingStatistic(lambda: jnp.zeros((num_labels,), jnp.int32), update,
                              lambda a, b: np.asarray(a, np.int64) + np.asarray(b, np.int64),
                              lambda s: np.asarray(s, np.int64), lambda labels: (2**31 - 1) // (labels.size // labels.shape[0]))


def test_tfds_split_streams_through_tally(tmp_path):
    builder = build_scenes64(tmp_path, train=21, test=3, world_seed=3)
    source = TfdsSource.from_builder(builder, "train")
    assert source.num_samples == 21 and source.identity()["split"] == "train"

    def compute(params, batch):
        return {"labels": batch["label"], "rgb": (batch["image"], batch["index"])}

    results = tally(compute, source, {"labels": label_pixels(world.NUM_LABELS), "rgb": running_moments(3)},
                    batch_size=8, progress=False)
    images, labels = world.render_scenes(3, np.arange(21))
    np.testing.assert_array_equal(results["labels"], np.bincount(labels.reshape(-1), minlength=world.NUM_LABELS))
    stored = to_uint8(images)  # how the builder quantized them
    pixels = (stored.astype(np.float32) / np.float32(127.5) - np.float32(1)).astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(results["rgb"].mean, pixels.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results["rgb"].variance, pixels.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_array_equal(source.images(np.array([4, 20])), stored[[4, 20]])


def test_missing_keys_are_named(tmp_path):
    builder = build_scenes64(tmp_path, train=4, test=1, world_seed=0)
    with pytest.raises(ValueError, match="no 'segmentation'"):
        TfdsSource.from_builder(builder, "train", label_key="segmentation")
