"""Dissecting models other than the Progressive GAN: a StyleGAN-like Flax generator whose later
layers read w (split with split_module, side inputs exact), and a Flax classifier's layer over
images and label maps of a tfds dataset (the scene world's builder). Each dissection equals the
dissection of the same features and labels computed independently, straight from the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import Z_DIM, Classifier, StyleGenerator, random_like, style_variables

from gandissect_jax.images import to_uint8
from gandissect_jax.dissection import dissect_features, dissect_generator, dissect_model
from gandissect_jax.flax_split import split_module
from gandissect_jax.generator import Split, SplitError

FIELDS = ("levels", "label_counts", "total_counts", "category_activation_counts", "intersection_counts", "iou",
          "iqr", "unit_label", "topk_values", "topk_indices", "max_iqr", "max_iqr_level", "candidate_levels",
          "activation_fraction")


def assert_same(a, b):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        np.testing.assert_array_equal(x, y, err_msg=name)


class ColourSegmenter:
    """Labels pixels of [-1, 1] images by their dominant colour: red, green, blue, or bright."""

    labels = (("-", "object"), ("red", "object"), ("green", "object"), ("blue", "object"), ("bright", "material"))
    categories = ("object", "material")
    params = ()

    def segment(self, params, images, downsample=1):
        x = images[:, ::downsample, ::downsample]
        colour = jnp.argmax(x, axis=-1) + 1
        strong = jnp.max(x, axis=-1) - jnp.min(x, axis=-1) > 0.2
        bright = jnp.where(x.mean(-1) > 0.3, 4, 0)
        return jnp.stack([jnp.where(strong, colour, 0), bright], -1).astype(jnp.int32)

    def class_score(self, params, images, c, downsample=1):
        raise NotImplementedError


def intermediates(module, variables, x, layers):
    """Each layer's output (Flax's own record, capture_intermediates) and the model's output."""
    out, state = jax.jit(lambda v, x: module.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))(
        variables, x)
    return {layer: np.asarray(state["intermediates"][layer]["__call__"][0]) for layer in layers}, out


def test_stylegan_like_generator_dissects_the_images_it_makes(tmp_path):
    G = split_module(StyleGenerator(), style_variables(0), at=["conv8", "conv16"], z_dim=Z_DIM)
    S = ColourSegmenter()
    options = dict(size=40, seed=3, seg_downsample=1, batch_size=8, progress=False, topk=5)
    got = dissect_generator(G, S, ["conv8", "conv16"], outdir=str(tmp_path / "style"), **options)

    # the same numbers from features and images computed with Flax alone, no split anywhere
    z = np.random.RandomState(3).standard_normal(40 * Z_DIM).reshape(40, Z_DIM).astype(np.float32)
    features, images = intermediates(StyleGenerator(), style_variables(0), jnp.asarray(z), ["conv8", "conv16"])
    segmentations = np.asarray(S.segment(S.params, jnp.clip(images, -1, 1)))
    expected = dissect_features(features, segmentations, list(S.labels), categories=S.categories,
                                threshold="iqr", batch_size=8, progress=False, topk=5)
    for layer in ("conv8", "conv16"):
        assert_same(got[layer], expected[layer])
    assert (tmp_path / "style" / "conv16" / "scores.npz").exists()


class WithoutSideInputs:
    """The StyleGAN-like generator split as if f did not read w (the user's case): f gets zeros."""

    def __init__(self, G):
        self.G, self.params, self.layer_names, self.z_dim, self.apply = G, G.params, G.layer_names, G.z_dim, G.apply

    def split(self, layer):
        h, f = self.G.split(layer)
        return Split(lambda p, z: (h(p, z)[0], ()), lambda p, r, side: f(p, r, jnp.zeros((r.shape[0], Z_DIM))))


def test_a_generator_whose_split_drops_side_inputs_is_refused_before_the_passes(tmp_path):
    G = WithoutSideInputs(split_module(StyleGenerator(), style_variables(0), at="conv8", z_dim=Z_DIM))
    with pytest.raises(SplitError, match=r"layer 'conv8' breaks f\(h\(z\)\) == G\(z\)"):
        dissect_generator(G, ColourSegmenter(), ["conv8"], size=16, progress=False, outdir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "conv8").exists()


def test_classifier_layer_dissects_against_a_tfds_datasets_label_maps(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from gandissect_jax.dissection import TfdsSource
    from gandissect_jax.scenes import world
    from gandissect_jax.scenes.tfds_builder import build_scenes64

    builder = build_scenes64(tmp_path / "tfds", train=24, test=2, world_seed=3)
    data = TfdsSource.from_builder(builder, "train")
    variables = random_like(jax.eval_shape(Classifier().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))), 3)
    model = split_module(Classifier(), variables, at=["conv1", "conv2"], input_shape=(64, 64, 3))
    labels = [(name, "object") for name in world.LABEL_NAMES]
    got = dissect_model(model, data, ["conv1", "conv2"], labels, batch_size=8, progress=False, topk=4,
                        outdir=str(tmp_path / "clf"))

    # independently: the builder's stored images and labels, the layers as Flax records them
    images, label_maps = world.render_scenes(3, np.arange(24))
    stored = to_uint8(images)  # how the builder quantized them
    inputs = stored.astype(np.float32) / np.float32(127.5) - np.float32(1)
    features, _ = intermediates(Classifier(), variables, jnp.asarray(inputs), ["conv1", "conv2"])
    expected = dissect_features(features, label_maps.astype(np.int32), labels, batch_size=8, progress=False, topk=4)
    for layer in ("conv1", "conv2"):
        assert got[layer].threshold == "quantile"
        assert_same(got[layer], expected[layer])
    assert got["conv2"].iou.shape == (world.NUM_LABELS, 16)
    assert (tmp_path / "clf" / "dissect.html").exists()
