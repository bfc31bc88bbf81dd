"""Orbax checkpoints: round trip, atomic replacement, clear errors (safety: test_checkpoint_safety.py)."""

import os

import numpy as np
import pytest

from gandissect_jax.checkpoints import CheckpointError, is_checkpoint, load_checkpoint, save_checkpoint


def _params():
    rng = np.random.default_rng(1)
    return {
        "layer1": {"kernel": rng.standard_normal((3, 3, 4, 5)).astype(np.float32),
                   "bias": rng.standard_normal(5).astype(np.float32)},
        "steps": np.array(12, np.int64),
    }


def test_round_trip_and_replace(tmp_path):
    target = tmp_path / "ckpt"
    params = _params()
    save_checkpoint(target, params, {"sizes": [4, 5], "kind": "test"})
    loaded, config = load_checkpoint(target)
    assert config == {"sizes": [4, 5], "kind": "test"}
    np.testing.assert_array_equal(loaded["layer1"]["kernel"], params["layer1"]["kernel"])
    assert loaded["steps"] == 12 and loaded["layer1"]["bias"].dtype == np.float32
    # replacing an existing checkpoint (force=True) leaves exactly one complete directory behind
    params["steps"] = np.array(13, np.int64)
    save_checkpoint(target, params, {"kind": "second"}, force=True)
    loaded, config = load_checkpoint(target)
    assert config == {"kind": "second"} and loaded["steps"] == 13
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(target, _params(), {"kind": "good"})
    with pytest.raises(TypeError):
        save_checkpoint(target, _params(), {"kind": object()}, force=True)  # not JSON-serialisable
    assert load_checkpoint(target)[1] == {"kind": "good"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    assert not is_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a gandissect-jax checkpoint"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "ck", _params(), {"a": 1})
    (tmp_path / "ck" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
