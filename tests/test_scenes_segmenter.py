"""The demo segmenter: Segmenter protocol behaviour (random weights) and its checkpoint round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.scenes import world
from gandissect_jax.scenes.demo_segmenter import (
    DemoSegmenter, init_segmenter_params, is_demo_segmenter_checkpoint, load_demo_segmenter,
    save_demo_segmenter,
)

WIDTHS = (4, 8, 8, 8)


@pytest.fixture(scope="module")
def segmenter():
    return DemoSegmenter(init_segmenter_params(jax.random.PRNGKey(0), WIDTHS), WIDTHS)


@pytest.fixture(scope="module")
def images():
    return world.render_scenes(0, np.arange(3))[0]


def test_labels_and_categories(segmenter):
    assert segmenter.labels[0][0] == "-"
    assert [name for name, _ in segmenter.labels] == list(world.LABEL_NAMES)
    assert all(category in segmenter.categories for _, category in segmenter.labels)


def test_segment_shapes_and_downsample(segmenter, images):
    seg = segmenter.segment(segmenter.params, images)
    assert seg.shape == (3, 64, 64, 1) and seg.dtype == jnp.int32
    assert int(seg.min()) >= 1 and int(seg.max()) < len(segmenter.labels)
    probs = np.asarray(segmenter.probabilities(segmenter.params, images))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(seg)[..., 0], probs.argmax(-1) + 1)
    seg4 = segmenter.segment(segmenter.params, images, downsample=4)
    assert seg4.shape == (3, 16, 16, 1)
    # downsampling averages the probabilities over 4x4 blocks before the argmax
    pooled = probs.reshape(3, 16, 4, 16, 4, -1).mean((2, 4))
    np.testing.assert_array_equal(np.asarray(seg4)[..., 0], pooled.argmax(-1) + 1)


def test_class_score_matches_segment_and_is_differentiable(segmenter, images):
    seg = np.asarray(segmenter.segment(segmenter.params, images))[..., 0]
    probs = np.asarray(segmenter.probabilities(segmenter.params, images))
    for c in (1, 4, 7):
        score, mask = segmenter.class_score(segmenter.params, images, c)
        assert score.shape == mask.shape == (3, 64, 64) and mask.dtype == jnp.bool_
        np.testing.assert_allclose(np.asarray(score), probs[..., c - 1], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(mask), seg == c)
    score0, mask0 = segmenter.class_score(segmenter.params, images, 0)
    assert not np.asarray(mask0).any() and float(jnp.abs(score0).max()) == 0.0
    grad = jax.grad(lambda x: segmenter.class_score(segmenter.params, x, 6)[0].sum())(jnp.asarray(images))
    assert grad.shape == images.shape and bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0


def test_bad_input_is_named(segmenter, images):
    with pytest.raises(ValueError, match="NHWC"):
        segmenter.segment(segmenter.params, np.transpose(images, (0, 3, 1, 2)))
    with pytest.raises(ValueError, match="out of range"):
        segmenter.class_score(segmenter.params, images, 11)
    with pytest.raises(ValueError, match="downsample"):
        segmenter.segment(segmenter.params, images, downsample=3)


def test_checkpoint_round_trip(tmp_path, segmenter, images):
    save_demo_segmenter(tmp_path / "seg", segmenter.params, WIDTHS)
    assert is_demo_segmenter_checkpoint(tmp_path / "seg")
    loaded = load_demo_segmenter(tmp_path / "seg")
    assert loaded.widths == WIDTHS
    np.testing.assert_array_equal(np.asarray(loaded.segment(loaded.params, images)),
                                  np.asarray(segmenter.segment(segmenter.params, images)))
    with pytest.raises(FileNotFoundError):
        load_demo_segmenter(tmp_path / "missing")


def test_implements_the_segmenter_protocol(segmenter):
    from gandissect_jax.segmenter_protocol import Segmenter

    assert isinstance(segmenter, Segmenter)


def test_methods_are_pure_in_params_inside_an_outer_jit(segmenter, images):
    """Parameters passed as arguments of an outer jit give the eager results; a second set of
    weights runs the same compiled program, and the weights are not baked in as constants."""
    from compilations import compilations

    @jax.jit
    def measure(params, x):
        score, mask = segmenter.class_score(params, x, 6, 2)
        return segmenter.segment(params, x, 2), segmenter.class_scores(params, x, 2), score, mask

    seg, scores, score, mask = measure(segmenter.params, images)
    np.testing.assert_array_equal(np.asarray(seg), np.asarray(segmenter.segment(segmenter.params, images, 2)))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(segmenter.class_scores(segmenter.params, images, 2)),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(score), np.asarray(scores[..., 6]))
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(seg[..., 0] == 6))
    other = jax.tree_util.tree_map(lambda a: -a, segmenter.params)
    with compilations() as compiled:
        other_seg = measure(other, images)[0]
    assert compiled == []
    np.testing.assert_array_equal(np.asarray(other_seg), np.asarray(segmenter.segment(other, images, 2)))
    assert (np.asarray(other_seg) != np.asarray(seg)).any()  # the arguments, not captured weights


def test_protocol_docstring_example_runs():
    """The example segmenter of the protocol's documentation works as written."""
    import gandissect_jax.segmenter_protocol as protocol

    code = protocol.__doc__.split("Example -- ")[1].split("::\n", 1)[1]
    code = "\n".join(line[4:] for line in code.splitlines())
    images = jnp.asarray(world.render_scenes(0, np.arange(2))[0])
    namespace = {"Segmenter": protocol.Segmenter, "images": images}
    exec(compile(code, "protocol example", "exec"), namespace)
    labels = np.asarray(namespace["labels"])
    brightness = np.asarray(images, np.float64).mean(-1)  # sky where the mean colour is above 0
    assert labels.shape == (2, 64, 64, 1) and labels.dtype == np.int32
    clear = np.abs(brightness) > 1e-5  # away from the threshold, where rounding cannot flip it
    np.testing.assert_array_equal(labels[..., 0][clear], (brightness > 0)[clear])
    assert 0 < labels.mean() < 1
