"""One DissectConfig: every setting checked at once with a message naming it, earlier keyword names
still accepted; one uint8 rule and one label counter for every writer and reader."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import gandissect_jax as gd
from gandissect_jax.dissection import DissectConfig, count_labels, dissect_features
from gandissect_jax.images import to_uint8

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"


@pytest.mark.parametrize("setting, value, message", [
    ("threshold", "best", "threshold must be 'iqr', 'quantile' or 'levels'"),
    ("quantile", 0.0, "quantile must be a number in"),
    ("quantile", 1.5, "quantile must be a number in"),
    ("topk", 0, r"topk must be None or an integer in \[1, 10000\]"),
    ("topk", 2.5, r"topk must be None or an integer in \[1, 10000\]"),
    ("topk", 10001, r"topk must be None or an integer in \[1, 10000\]"),
    ("batch_size", -4, r"batch_size must be an integer in \[1, 65536\]"),
    ("batch_size", 2**40, r"batch_size must be an integer in \[1, 65536\]"),
    ("checkpoint_every", float("inf"), r"checkpoint_every must be a number of seconds in \[0, 86400\]"),
    ("checkpoint_every", 1e300, r"checkpoint_every must be a number of seconds in \[0, 86400\]"),
    ("quantile", float("nan"), "quantile must be a number in"),
    ("iou_threshold", float("inf"), "iou_threshold must be a number in"),
    ("progress", "no", "progress must be True or False"),
    ("iou_threshold", 1.5, "iou_threshold must be a number in"),
    ("checkpoint_every", float("nan"), "checkpoint_every must be"),
    ("unit_chunk", 0, "unit_chunk must be None or an integer"),
    ("search_iqr", "yes", "search_iqr must be None, True or False"),
])
def test_bad_settings_are_refused_by_name(setting, value, message):
    with pytest.raises(ValueError, match=message):
        DissectConfig(**{setting: value})


def test_config_is_frozen_and_takes_earlier_names():
    config = DissectConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.topk = 3
    assert config.replace(k=5).topk == 5 and config.replace(strip_length=7).topk == 7
    assert config.replace(topk=np.int64(4)).topk == 4
    with pytest.raises(ValueError, match="conflicting values for topk"):
        config.replace(k=5, topk=6)
    with pytest.raises(TypeError, match="unknown dissection setting 'treshold'"):
        config.replace(treshold="iqr")
    assert config.resolved_threshold("iqr", has_levels=False) == ("iqr", True)
    assert config.resolved_threshold("quantile", has_levels=True) == ("levels", False)
    with pytest.raises(ValueError, match="needs the IQR search"):
        config.replace(threshold="iqr", search_iqr=False).resolved_threshold("quantile", False)


def test_config_and_keywords_give_the_same_dissection():
    data = np.load(FIXTURES / "dissect_golden.npz")
    labels = json.loads((FIXTURES / "labels.json").read_text())
    features, segs = data["features"].transpose(0, 2, 3, 1)[:24, :, :, :3], data["segs"].transpose(0, 2, 3, 1)[:24]
    config = gd.DissectConfig(threshold="iqr", topk=4, batch_size=8, progress=False)
    a = dissect_features(features, segs, labels, config)["features"]
    b = dissect_features(features, segs, labels, threshold="iqr", k=4, batch_size=8, progress=False)["features"]
    for name in ("levels", "iou", "iqr", "topk_indices", "max_iqr"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.topk_indices.shape == (3, 4)


def test_to_uint8_rounds_half_up_and_saturates():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, np.nan, 1 / 255 - 1, 2 / 255 - 1], np.float32)
    expected = [0, 0, 64, 128, 191, 255, 255, 0, 1, 1]  # (x + 1) * 127.5 = 63.75 -> 64, 127.5 -> 128, 191.25 -> 191
    np.testing.assert_array_equal(to_uint8(x), expected)
    np.testing.assert_array_equal(to_uint8(jnp.asarray(x)), expected)
    exact = (np.arange(256) / 127.5 - 1).astype(np.float32)  # uint8 -> [-1, 1] -> uint8 is the identity
    np.testing.assert_array_equal(to_uint8(exact), np.arange(256))
    pixels = np.arange(6, dtype=np.uint8)
    assert to_uint8(pixels) is pixels or np.array_equal(to_uint8(pixels), pixels)
    from gandissect_jax.proggan import images_to_uint8

    np.testing.assert_array_equal(images_to_uint8(x), expected)  # the old name is the same rule


def test_count_labels_matches_bincount_and_reports_outsiders():
    rng = np.random.RandomState(0)
    labels = rng.randint(-2, 9, size=(3, 5, 7, 2)).astype(np.int32)
    counts, outside = count_labels(labels, 7)
    inside = labels[(labels >= 0) & (labels < 7)]
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(inside, minlength=7))
    assert int(outside) == int(((labels < 0) | (labels >= 7)).sum())
    with pytest.raises(ValueError, match="integers"):
        count_labels(np.zeros(3, np.float32), 2)
