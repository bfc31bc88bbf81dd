"""The Generator protocol: split_module gives exact h and f for any Flax model (a StyleGAN-like
generator whose later layers read w, in linen and nnx; a classifier of images), verify_split
refuses splits that break G, the Progressive GAN implements the protocol, and nothing recompiles
for a second set of weights."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gandissect_jax as gd
from gandissect_jax.flax_split import split_module
from gandissect_jax.generator import Generator, Split, SplitError, verify_split
from toy_models import W_DIM, Z_DIM, Classifier, Mapping, ModConv, StyleGenerator, modulated_conv, pixel_norm, random_like, style_variables  # noqa: F401
from compilations import compilations

FIXTURES = Path(__file__).parent / "fixtures" / "proggan"


@pytest.fixture(scope="module")
def style():
    return split_module(StyleGenerator(), style_variables(0), at=["conv8", "conv16"], z_dim=Z_DIM)


@pytest.fixture(scope="module")
def z():  # as many as verify_split's probe batch, so the tests reuse its compiled programs
    return jnp.asarray(gd.sample_z(4, Z_DIM, seed=2))


def test_stylegan_split_at_two_layers_is_exact(style, z):
    G = style
    assert isinstance(G, Generator) and G.z_dim == Z_DIM and G.input_shape == (Z_DIM,)
    # the submodules in the order their outputs are computed, children before their parent
    assert G.layer_names == ("mapping/Dense_0", "mapping/Dense_1", "mapping", "conv4/affine", "conv4",
                             "conv8/affine", "conv8", "conv16/affine", "conv16", "torgb/affine", "torgb")
    x = np.asarray(G(z))
    assert x.shape == (4, 16, 16, 3) and G.output_shape == (16, 16, 3) and np.abs(x).max() > 0.3
    # the layer outputs as Flax itself records them (capture_intermediates), an independent path
    _, state = jax.jit(lambda v, z: StyleGenerator().apply(v, z, capture_intermediates=True,
                                                            mutable=["intermediates"]))(G.params, z)
    for layer, shape in (("conv8", (8, 8, 32)), ("conv16", (16, 16, 16))):
        h, f = G.split(layer)
        r, side = h(G.params, z)
        assert G.layer_shape(layer) == shape and r.shape == (4, *shape) and r.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(side), np.asarray(z))  # side: the input z
        np.testing.assert_allclose(np.asarray(r), np.asarray(state["intermediates"][layer]["__call__"][0]),
                                   rtol=1e-6, atol=1e-6)
        # f(h(z)) == G(z) bitwise: f runs the same layers on the same values (w recomputed from z
        # by the same ops), and XLA on CPU rounds them alike in both programs
        np.testing.assert_array_equal(np.asarray(f(G.params, r, side)), x)
        assert verify_split(G, layer) == 0.0
    # a second model of the same definition (other weights) runs the same compiled functions
    with compilations() as compiled:
        other = split_module(StyleGenerator(), style_variables(1), at="conv8", z_dim=Z_DIM)
        h, f = other.split("conv8")
        y = f(other.params, *h(other.params, z))
    assert compiled == [] and h is G.split("conv8").h
    np.testing.assert_array_equal(np.asarray(y), np.asarray(other(z)))
    assert np.abs(np.asarray(y) - x).max() > 0.1


def test_f_reads_w_from_the_side_input_after_an_edit(style, z):
    """f of an edited r is the generator's tail computed by hand with w = mapping(z)."""
    G = style
    h, f = G.split("conv8")
    r, side = h(G.params, z)
    edited = r.at[..., :8].set(0.0)  # ablate eight units

    @jax.jit
    def tail_by_hand(p, r, z):
        w = Mapping().apply({"params": p["mapping"]}, z)
        x = ModConv(16, upsample=True).apply({"params": p["conv16"]}, r, w)
        return jnp.tanh(ModConv(3, 1, demodulate=False).apply({"params": p["torgb"]}, x, w))

    expected = tail_by_hand(G.params["params"], edited, z)
    got = np.asarray(f(G.params, edited, side))
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert np.abs(got - np.asarray(G(z))).max() > 1e-2  # the edit changes the images


class NaiveStyleSplit:
    """What a user writes without side inputs (shared/cases/turn2/case_own_generator.py): f gets r
    only and runs the later layers with the style of a zero latent."""

    def __init__(self, G):
        self.G, self.params, self.layer_names, self.z_dim = G, G.params, G.layer_names, G.z_dim
        self.apply = G.apply

    def split(self, layer):
        h, f = self.G.split(layer)
        return Split(lambda p, z: (h(p, z)[0], ()),
                     lambda p, r, side: f(p, r, jnp.zeros((r.shape[0], self.z_dim))))


def test_a_split_without_side_inputs_is_refused_with_the_difference(style, z):
    naive = NaiveStyleSplit(style)
    assert isinstance(naive, Generator)
    with pytest.raises(SplitError) as err:
        verify_split(naive, "conv8")
    message = str(err.value)
    assert "'conv8'" in message and "max |f(h(z)) - G(z)| =" in message and "side" in message
    h, f = naive.split("conv8")
    probe = gd.sample_z(4, Z_DIM, seed=0)  # verify_split's default probe batch
    diff = np.abs(np.asarray(f(style.params, *h(style.params, probe)), np.float64)
                  - np.asarray(style(probe), np.float64)).max()
    assert diff > 0.05 and f"{diff:.4g}" in message
    assert isinstance(err.value, ValueError)


def test_the_two_function_contract_of_before_is_refused_with_a_message(style):
    class OldContract(NaiveStyleSplit):  # h returned r alone, f took (params, r)
        def split(self, layer):
            h, f = self.G.split(layer)
            return lambda p, z: h(p, z)[0], lambda p, r: f(p, r, jnp.zeros((len(r), Z_DIM)))

    with pytest.raises(SplitError, match=r"h at layer 'conv16' returned .*not a tuple \(r, side\)"):
        verify_split(OldContract(style), "conv16")


# ---------------------------------------------------------------------------------------------
# The same generator in nnx


class NnxModConv(nnx.Module):
    def __init__(self, cin, features, rngs, kernel_size=3, upsample=False, demodulate=True):
        self.affine = nnx.Linear(W_DIM, cin, bias_init=nnx.initializers.ones, rngs=rngs)
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (kernel_size, kernel_size, cin, features)))
        self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (features,)))
        self.upsample, self.demodulate = upsample, demodulate

    def __call__(self, x, w):
        return modulated_conv(x, self.affine(w), self.kernel[...], self.bias[...], self.upsample,
                              self.demodulate)


class NnxMapping(nnx.Module):
    def __init__(self, rngs):
        self.dense0 = nnx.Linear(Z_DIM, W_DIM, rngs=rngs)
        self.dense1 = nnx.Linear(W_DIM, W_DIM, rngs=rngs)

    def __call__(self, z):
        return nnx.leaky_relu(self.dense1(nnx.leaky_relu(self.dense0(pixel_norm(z)), 0.2)), 0.2)


class NnxStyleGenerator(nnx.Module):
    def __init__(self, rngs):
        self.mapping = NnxMapping(rngs)
        self.const = nnx.Param(jax.random.normal(rngs.params(), (4, 4, 32)))
        blocks = [NnxModConv(32, 32, rngs), NnxModConv(32, 32, rngs, upsample=True),
                  NnxModConv(32, 16, rngs, upsample=True)]
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
        self.torgb = NnxModConv(16, 3, rngs, kernel_size=1, demodulate=False)

    def __call__(self, z):
        w = self.mapping(z)
        x = jnp.broadcast_to(self.const[...], (z.shape[0], 4, 4, 32))
        for block in self.blocks:
            x = block(x, w)
        return jnp.tanh(self.torgb(x, w))


def nnx_style_generator(seed):
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: NnxStyleGenerator(nnx.Rngs(0))))
    return nnx.merge(graphdef, random_like(shapes, seed))


def test_nnx_stylegan_split_is_exact(z):
    model = nnx_style_generator(0)
    G = split_module(model, at=["blocks/1", "blocks/2"], z_dim=Z_DIM)
    assert isinstance(G, Generator) and G.kind == "nnx"
    assert G.layer_names == ("mapping/dense0", "mapping/dense1", "mapping", "blocks/0/affine", "blocks/0",
                             "blocks/1/affine", "blocks/1", "blocks/2/affine", "blocks/2", "torgb/affine",
                             "torgb")
    x = np.asarray(G(z))
    np.testing.assert_allclose(x, np.asarray(model(z)), rtol=1e-6, atol=1e-6)  # the model itself
    for layer, shape in (("blocks/1", (8, 8, 32)), ("blocks/2", (16, 16, 16))):
        h, f = G.split(layer)
        r, side = h(G.params, z)
        assert r.shape == (4, *shape) == (4, *G.layer_shape(layer))
        np.testing.assert_array_equal(np.asarray(f(G.params, r, side)), x)
    # the live model was not touched by the surgery (done on copies inside each call)
    assert isinstance(model.blocks[1], NnxModConv)
    # the naive split of it is refused too
    with pytest.raises(SplitError, match=r"'blocks/1'.*max \|f\(h\(z\)\) - G\(z\)\| ="):
        verify_split(NaiveStyleSplit(G), "blocks/1")
    # another model of the same definition shares the compiled functions
    other = split_module(nnx_style_generator(1), z_dim=Z_DIM)
    h, f = G.split("blocks/2")
    assert other.split("blocks/2") is G.split("blocks/2")
    with compilations() as compiled:
        x2 = other(z)
        r2, side2 = h(other.params, z)
        y2 = f(other.params, r2, side2)
    assert compiled == []
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(x2))
    assert np.abs(np.asarray(x2) - x).max() > 0.1


# ---------------------------------------------------------------------------------------------
# A classifier of images: its "z" is an image batch


def test_classifier_of_scene_images_splits_at_an_inner_layer():
    from gandissect_jax.scenes import world

    images, _ = world.render_scenes(0, np.arange(4))  # float32 (4, 64, 64, 3) in [-1, 1]
    shapes = jax.eval_shape(Classifier().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    variables = random_like(shapes, 3)
    C = split_module(Classifier(), variables, at="conv2", input_shape=(64, 64, 3))
    assert C.input_shape == (64, 64, 3) and C.z_dim == 64 * 64 * 3 and C.output_shape == (10,)
    assert C.layer_names == ("conv1", "conv2", "head")
    logits = np.asarray(C(images))
    # the model's own output and Flax's record of the layer (capture_intermediates)
    plain, state = jax.jit(lambda v, x: Classifier().apply(v, x, capture_intermediates=True,
                                                           mutable=["intermediates"]))(variables, images)
    np.testing.assert_allclose(logits, np.asarray(plain), rtol=1e-5, atol=1e-6)
    h, f = C.split("conv2")
    r, side = h(C.params, images)
    assert r.shape == (4, 32, 32, 16) and C.layer_shape("conv2") == (32, 32, 16)
    np.testing.assert_allclose(np.asarray(r), np.asarray(state["intermediates"]["conv2"]["__call__"][0]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(f(C.params, r, side)), logits)
    # flat inputs (N, z_dim) are the same images
    np.testing.assert_array_equal(np.asarray(C(images.reshape(4, -1))), logits)
    with pytest.raises(ValueError, match=r"\(N, 64, 64, 3\) or \(N, 12288\)"):
        C(images[:, :32])


# ---------------------------------------------------------------------------------------------
# The Progressive GAN implements the protocol


def test_progressive_generator_implements_the_protocol_at_golden_parity():
    G = gd.load_generator(FIXTURES / "proggan32.pth")
    golden = np.load(FIXTURES / "proggan32_outputs_subset.npz")
    assert isinstance(G, gd.ProgressiveGenerator) and isinstance(G, gd.Generator)
    z = golden["z"]
    x = np.asarray(G(z))
    for layer in ("layer4", "output_32x32"):  # every layer: tests/test_proggan.py
        h, f = G.split(layer)
        r, side = h(G.params, z)
        assert side == ()
        expected = np.transpose(golden[layer], (0, 2, 3, 1))
        assert np.abs(np.asarray(r) - expected).max() <= 1e-4 * np.abs(expected).max()  # the reference
        np.testing.assert_array_equal(np.asarray(f(G.params, r, side)), x)
        assert verify_split(G, layer, inputs=z) == 0.0
    with pytest.raises(ValueError, match="no side inputs"):
        G.split("layer4").f(G.params, r, (z,))


def test_edited_generator_and_label_shares_compile_once_for_any_weights():
    """Repeated measurements and a second generator (same architecture, other weights) and a
    second segmenter reuse the compiled programs."""
    from gandissect_jax.intervention import ablation_edit, edited_generator, label_shares
    from gandissect_jax.proggan import GeneratorConfig, ProgressiveGenerator
    from gandissect_jax.scenes.demo_segmenter import UNet, DemoSegmenter

    config = GeneratorConfig.from_channels(z_dim=16, channels=(16, 8, 8))  # 16x16 images
    g_shapes = {layer: {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in tensors.items()}
                for layer, tensors in config.param_shapes().items()}
    G1 = ProgressiveGenerator(random_like(g_shapes, 1, 1.0), config)
    G2 = ProgressiveGenerator(random_like(g_shapes, 2, 1.0), config)
    widths = (4, 4, 8, 8)
    s_shapes = jax.eval_shape(UNet(widths=widths).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    s_shapes = s_shapes["params"]
    S1 = DemoSegmenter(random_like(s_shapes, 3), widths)
    S2 = DemoSegmenter(random_like(s_shapes, 4), widths)
    z = gd.sample_z(10, 16, seed=0)
    edit = ablation_edit([0, 3], 8)

    def measure(G, S):
        return (label_shares(G, S, z, batch_size=5),
                label_shares(G, S, z, layer="layer3", edit=edit, batch_size=5))

    first = measure(G1, S1)  # compiles
    with compilations() as compiled:
        again = measure(G1, S1)
        other = measure(G2, S2)
    assert compiled == [], f"{len(compiled)} recompilations"
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[1], first[1])
    assert np.abs(other[0] - first[0]).max() > 0  # other weights, other shares
    assert edited_generator(G1, "layer3") is edited_generator(G2, "layer3")


# ---------------------------------------------------------------------------------------------
# Compiled code and errors


def test_f_compiles_without_the_dead_prefix(style, z):
    """f runs the whole model with one output replaced; XLA drops the convolutions before it."""
    def convolutions(fn, *args):
        return fn.lower(*args).compile().as_text().count("convolution(")

    h, f = style.split("conv16")
    r, side = h(style.params, z)
    whole = convolutions(style.apply, style.params, z)
    assert whole >= 3 and convolutions(f, style.params, r, side) < whole - 2


class Shared(nn.Module):
    @nn.compact
    def __call__(self, z):
        dense = nn.Dense(Z_DIM, name="shared")
        return dense(jnp.tanh(dense(z)))


def test_bad_splits_and_arguments_are_named(style):
    with pytest.raises(ValueError, match="unknown layer 'conv9'.*conv8, conv8/affine|unknown layer 'conv9'"):
        style.split("conv9")
    variables = random_like(jax.eval_shape(Shared().init, jax.random.key(0), jnp.zeros((1, Z_DIM))), 0)
    with pytest.raises(SplitError, match="'shared' is called 2 times"):
        split_module(Shared(), variables, at="shared", z_dim=Z_DIM)
    with pytest.raises(ValueError, match="exactly one of z_dim"):
        split_module(StyleGenerator(), style_variables(0))
    with pytest.raises(ValueError, match="flax.linen or flax.nnx"):
        split_module(lambda z: z, {}, z_dim=3)
    with pytest.raises(ValueError, match=r"r has shape \(4, 4, 4, 32\); layer 'conv8' gives \(N, 8, 8, 32\)"):
        style.split("conv8").f(style.params, jnp.zeros((4, 4, 4, 32)), jnp.zeros((4, Z_DIM)))


class NoApply:
    """The case's generator as users write it: params, layer_names, z_dim and split, no apply."""

    def __init__(self, G):
        self.G, self.params, self.layer_names, self.z_dim = G, G.params, G.layer_names, G.z_dim

    def split(self, layer):
        return self.G.split(layer)


class RedSegmenter:
    labels, categories, params = (("-", "object"), ("red", "object")), ("object",), ()

    def segment(self, params, images, downsample=1):
        return (images[:, ::downsample, ::downsample, :1] > 0).astype(jnp.int32)

    def class_score(self, params, images, c, downsample=1):
        score = images[:, ::downsample, ::downsample, 0]
        return score, score > 0


def entry_points():
    from gandissect_jax import effects, intervention
    from gandissect_jax.ace import build_ace_corpus
    from gandissect_jax.dissection import dissect_generator
    from gandissect_jax.paint import invert

    z = jnp.zeros((2, Z_DIM))
    return {
        "dissect_generator": lambda G, tmp: dissect_generator(G, RedSegmenter(), ["conv8"], size=4, progress=False,
                                                              outdir=str(tmp / "out")),
        "ablate": lambda G, tmp: effects.ablate(G, G.params, z, "conv8", [0]),
        "build_ace_corpus": lambda G, tmp: build_ace_corpus(G, RedSegmenter(), "conv8", "red", search_size=4,
                                                                      train_size=2, eval_size=1),
        "edited_generator": lambda G, tmp: intervention.edited_generator(G, "conv8"),
        "invert": lambda G, tmp: invert(G, "conv8", jnp.zeros((1, 16, 16, 3))),
        "verify_split": lambda G, tmp: verify_split(G, "conv8"),
    }


@pytest.mark.parametrize("entry", sorted(entry_points()))
def test_objects_that_are_not_generators_are_refused_by_name_at_every_entry_point(style, entry, tmp_path):
    run = entry_points()[entry]
    with pytest.raises(TypeError, match=r"NoApply is not a Generator: no 'apply'\..*split_module"):
        run(NoApply(style), tmp_path)
    assert not (tmp_path / "out").exists()

    class TwoFunctions(NaiveStyleSplit):  # split returns a plain pair whose h gives r alone
        def split(self, layer):
            h, f = self.G.split(layer)
            return (lambda p, z: h(p, z)[0], lambda p, r, side: f(p, r, jnp.zeros((len(r), Z_DIM))))

    class NotAPair(NaiveStyleSplit):
        def split(self, layer):
            return {"h": None, "f": None}

    class LayerNamesAsText(NaiveStyleSplit):
        layer_names = "conv8"

        def __init__(self, G):
            super().__init__(G)
            del self.layer_names

    with pytest.raises(SplitError, match=r"NotAPair.split\('conv8'\) returned 'dict', not Split\(h, f\)"):
        run(NotAPair(style), tmp_path)
    with pytest.raises(TypeError, match=r"layer_names must be a sequence of layer names \(str\), got 'conv8'"):
        run(LayerNamesAsText(style), tmp_path)
    if entry in ("dissect_generator", "verify_split"):  # the ones that check numerically, before any pass
        with pytest.raises(SplitError, match=r"h at layer 'conv8' returned .*not a tuple \(r, side\)"):
            run(TwoFunctions(style), tmp_path)
    assert not (tmp_path / "out").exists()


class NoLabels:
    params, categories = (), ("object",)

    def segment(self, params, images, downsample=1):
        return jnp.zeros(images.shape[:3] + (1,), jnp.int32)


@pytest.mark.parametrize("segmenter, message", [
    (None, r"NoneType is not a Segmenter: no 'params'; no 'labels'; no 'categories'; no 'segment'"),
    (NoLabels(), r"NoLabels is not a Segmenter: no 'labels'"),
    (type("Flat", (RedSegmenter,), {"labels": ("-", "red")})(),
     r"labels must be a non-empty sequence of \(name, category\) pairs of str, got \('-', 'red'\)"),
    (type("NoClassScore", (RedSegmenter,), {"class_score": None})(), r"'class_score' is not callable"),
])
def test_objects_that_are_not_segmenters_are_refused_by_name(style, segmenter, message, tmp_path):
    from gandissect_jax.ace import build_ace_corpus, optimize_ace
    from gandissect_jax.dissection import dissect_generator

    from gandissect_jax import effects
    from gandissect_jax.paint.edits import edit_program

    z, units = jnp.zeros((2, Z_DIM)), jnp.arange(2)
    if "class_score" not in message:
        calls = [
            lambda: dissect_generator(style, segmenter, ["conv8"], size=4, progress=False, outdir=str(tmp_path / "out")),
            lambda: build_ace_corpus(style, segmenter, "conv8", "red", search_size=4, train_size=2, eval_size=1),
            lambda: effects.paired_label_shares(style, segmenter, style.params, (), z, "conv8", units),
            lambda: effects.context_map(style, segmenter, style.params, (), z, "conv8", units, 1.0, [1]),
            lambda: effects.ace_curve(style, segmenter, style.params, (), z, "conv8", units, (1, 2), [1]),
            lambda: edit_program(style, segmenter, "conv8"),
        ]
        for call in calls:
            with pytest.raises(TypeError, match=message):
                call()
        assert not (tmp_path / "out").exists()
    else:  # only ACE optimization scores classes
        with pytest.raises(TypeError, match=message):
            optimize_ace(style, segmenter, None)


def test_every_public_name_resolves_to_a_documented_object_of_its_module():
    import importlib

    from gandissect_jax import _EXPORTS

    assert sorted(_EXPORTS) == gd.__all__ and set(gd.__all__) <= set(dir(gd))
    for name, module in _EXPORTS.items():
        value = getattr(gd, name)
        assert value is getattr(importlib.import_module(module), name), name
        assert not isinstance(value, type(gd)), f"{name} resolves to a module, not to the function"
        assert (value.__doc__ or "").strip(), f"{name} has no docstring"
    # photo inversion (GANPaint on photos the GAN did not make) is found by its name
    assert gd.invert.__module__ == "gandissect_jax.paint.invert"


def test_generators_and_segmenters_in_every_accepted_form_pass_the_checks(style):
    from gandissect_jax.generator import check_generator, split_of
    from gandissect_jax.segmenter import check_segmenter

    G, S = gd.load_generator("scenes64"), gd.load_segmenter("scenes64-segmenter")  # the shipped demo pair
    check_generator(G)
    check_segmenter(S, "segment", "class_score")
    check_generator(style)
    # labels as an (L, 2) array of str and categories as an array: what labels_and_categories reads
    as_arrays = type("ArraySegmenter", (RedSegmenter,), {"labels": np.array(RedSegmenter.labels),
                                                         "categories": np.array(RedSegmenter.categories)})()
    check_segmenter(as_arrays, "segment", "class_score")
    # z_dim as any integer (numpy, 0-d jax array), layer_names as a list
    for z_dim in (np.int64(Z_DIM), jnp.asarray(Z_DIM)):
        odd = NaiveStyleSplit(style)
        odd.z_dim, odd.layer_names = z_dim, list(style.layer_names)
        check_generator(odd)
    for z_dim in (0, -3, 2.5, True, "16"):
        odd = NaiveStyleSplit(style)
        odd.z_dim = z_dim
        with pytest.raises(TypeError, match=r"z_dim must be a positive integer"):
            check_generator(odd)
    # a model only split to its layers (dissect_model) needs no z_dim and no apply
    head_only = type("HeadOnly", (), {"params": style.params, "layer_names": style.layer_names,
                                      "split": staticmethod(style.split)})()
    assert split_of(head_only, "conv8", needs=("params", "layer_names", "split")).h is style.split("conv8").h
    with pytest.raises(TypeError, match=r"HeadOnly is not a Generator: no 'z_dim'; no 'apply'"):
        check_generator(head_only)
