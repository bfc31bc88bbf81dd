"""The Flax ProGAN against the PyTorch reference's golden outputs, its split, and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gandissect_jax as gj
from gandissect_jax.proggan import (
    GeneratorConfig,
    ProgressiveGenerator,
    generator_from_state_dict,
    images_to_uint8,
    init_params,
    params_from_state_dict,
    state_dict_from_params,
)
from gandissect_jax.pth import PthError, read_pth, write_legacy_pth

FIXTURES = Path(__file__).parent / "fixtures" / "proggan"
PTH = FIXTURES / "proggan32.pth"
LAYERS = ("layer1", "layer2", "layer3", "layer4", "layer5", "layer6", "layer7", "layer8", "output_32x32")


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 2, 3, 1))


def old_names(state_dict):
    """The reference's older key naming: features.N.* for layerN+1.*, output.* for output_RxR.*."""
    renamed = {}
    for key, value in state_dict.items():
        head, rest = key.split(".", 1)
        if head.startswith("layer"):
            renamed[f"features.{int(head[5:]) - 1}.{rest}"] = value
        else:
            renamed[f"output.{rest}"] = value
    return renamed


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURES / "proggan32_outputs_subset.npz")


@pytest.fixture(scope="module")
def state_dict():
    return read_pth(PTH)


@pytest.fixture(scope="module")
def G():
    return gj.load_generator(PTH)


@pytest.fixture(scope="module")
def old_names_pth(tmp_path_factory, state_dict):
    path = tmp_path_factory.mktemp("old") / "proggan32_oldnames.pth"
    write_legacy_pth(path, old_names(state_dict))
    return path


def assert_close_to_reference(ours, reference, what):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, what
    scale = np.abs(reference).max()
    assert scale > 0.1, what  # a real signal, not an all-zero map
    err = np.abs(ours - reference).max()
    assert err <= 1e-4 * scale, f"{what}: max|diff| {err} > 1e-4 * {scale}"


# ---------------------------------------------------------------------------------------------
# Parity with the reference


def test_architecture_matches_reference(G):
    assert G.layer_names == LAYERS
    assert G.z_dim == 128 and G.resolution == 32
    assert G.config.sizes == (128, 128, 128, 64, 32)
    assert G.layer_shape("layer5") == (16, 16, 64)
    assert G.params["layer1"]["kernel"].shape == (4, 4, 128, 128)
    assert G.params["output_32x32"]["kernel"].shape == (1, 1, 32, 3)


@pytest.mark.parametrize("naming", ["new", "old"])
def test_every_layer_matches_reference(naming, golden, old_names_pth):
    G = gj.load_generator(PTH if naming == "new" else old_names_pth)
    assert G.layer_names == LAYERS
    images, features = G.features(golden["z"], LAYERS)
    for layer in LAYERS:
        assert_close_to_reference(features[layer], nhwc(golden[layer]), f"{naming}:{layer}")
    assert_close_to_reference(images, nhwc(golden["output_32x32"]), f"{naming}:image")
    assert_close_to_reference(G(golden["z"]), nhwc(golden["output_32x32"]), f"{naming}:G(z)")


def test_old_and_new_names_give_identical_params(state_dict, old_names_pth):
    new = gj.load_generator(PTH).params
    old = gj.load_generator(old_names_pth).params
    for layer in LAYERS:
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(new[layer][name]), np.asarray(old[layer][name]))


def test_state_dict_wrapper_and_round_trip(state_dict, golden):
    wrapped = generator_from_state_dict({"state_dict": state_dict})
    np.testing.assert_array_equal(
        np.asarray(wrapped(golden["z"])), np.asarray(gj.load_generator(PTH)(golden["z"]))
    )
    params, config = params_from_state_dict(state_dict)
    back = state_dict_from_params(params, config)
    assert list(back) == list(state_dict)
    for key in state_dict:
        np.testing.assert_array_equal(back[key], state_dict[key])


def test_sample_z_is_reference_standard_z_sample(golden):
    z = gj.sample_z(6, 128, seed=1)
    assert z.dtype == np.float32 and z.shape == (6, 128)
    np.testing.assert_array_equal(z[golden["sample_index"]], golden["z"])
    expected = np.random.RandomState(7).standard_normal(3 * 5).reshape(3, 5).astype(np.float32)
    np.testing.assert_array_equal(gj.sample_z(3, 5, seed=7), expected)
    np.testing.assert_array_equal(gj.sample_z(2, 5, seed=7), expected[:2])  # prefix-stable


# ---------------------------------------------------------------------------------------------
# The split


def test_split_composes_to_G_at_every_layer(G, golden):
    z = golden["z"]
    x = np.asarray(G(z))
    splits = {layer: G.split(layer) for layer in LAYERS}
    assert G.split("layer4") is splits["layer4"]  # cached: no recompilation

    @jax.jit  # one compilation for all nine splits (the jitted h and f inline into it)
    def every_split(params, z):
        out = {}
        for layer, (h, f) in splits.items():
            r, side = h(params, z)
            assert side == ()  # the Progressive GAN's f needs nothing besides r
            out[layer] = (r, f(params, r, side))
        return out

    for layer, (r, x_split) in every_split(G.params, z).items():
        assert r.shape == (2, *G.layer_shape(layer))
        assert_close_to_reference(r, nhwc(golden[layer]), f"h@{layer}")
        np.testing.assert_allclose(np.asarray(x_split), x, rtol=0, atol=2e-5)
    # the jitted split functions on their own give G(z) exactly
    h, f = splits["layer5"]
    np.testing.assert_array_equal(np.asarray(f(G.params, *h(G.params, z))), x)


def test_split_vmap(G, golden):
    z = golden["z"]
    h, f = G.split("layer3")
    r, side = h(G.params, z)
    per_sample, _ = jax.vmap(h, in_axes=(None, 0))(G.params, z)  # unbatched z inside
    np.testing.assert_allclose(np.asarray(per_sample), np.asarray(r), atol=1e-6)
    x = jax.vmap(f, in_axes=(None, 0, None))(G.params, r, side)
    np.testing.assert_allclose(np.asarray(x), np.asarray(G(z)), atol=1e-6)
    # over parameter sets: the second set is the first with the output bias shifted by 1
    shifted = jax.tree_util.tree_map(lambda a: a, G.params)
    shifted["output_32x32"] = dict(shifted["output_32x32"], bias=shifted["output_32x32"]["bias"] + 1)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), G.params, shifted)
    both = jax.vmap(f, in_axes=(0, None, None))(stacked, r, side)
    np.testing.assert_allclose(np.asarray(both[1] - both[0]), 1.0, atol=1e-5)


def test_split_grad_wrt_params_and_r(G, golden):
    z = golden["z"]
    h, f = G.split("layer6")
    r, side = h(G.params, z)

    # d sum(x) / d output bias = number of pixels per channel, exactly (no clamp on the output)
    grads = jax.grad(lambda p: f(p, r, side).sum())(G.params)
    np.testing.assert_allclose(np.asarray(grads["output_32x32"]["bias"]), 2 * 32 * 32, rtol=1e-6)
    assert float(jnp.abs(grads["layer7"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["layer6"]["kernel"]).max()) == 0  # before the split: unused by f

    # grad w.r.t. r against a central finite difference along a random direction
    def loss(rr):
        return (f(G.params, rr, side) ** 2).mean()

    g = jax.jit(jax.grad(loss))(r)
    direction = jax.random.normal(jax.random.key(0), r.shape)
    eps = 1e-3
    fd = (loss(r + eps * direction) - loss(r - eps * direction)) / (2 * eps)
    analytic = jnp.vdot(g, direction)
    np.testing.assert_allclose(float(analytic), float(fd), rtol=2e-2)

    # grad through h w.r.t. params reaches layer1
    gh = jax.grad(lambda p: h(p, z)[0].sum())(G.params)
    assert float(jnp.abs(gh["layer1"]["kernel"]).max()) > 0


def test_apply_is_pure_in_params(G, golden):
    z = golden["z"]
    apply = jax.jit(G.apply)
    zeroed = jax.tree_util.tree_map(jnp.zeros_like, G.params)
    np.testing.assert_array_equal(np.asarray(apply(zeroed, z)), 0.0)  # conv 0, bias 0
    np.testing.assert_array_equal(np.asarray(apply(G.params, z)), np.asarray(G(z)))
    # one unbatched sample; batch size may change the last float32 bits of XLA's convolutions
    single = apply(G.params, z[0])
    assert single.shape == (32, 32, 3)
    np.testing.assert_allclose(np.asarray(single), np.asarray(G(z))[0], atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Architectures, init, conversion to uint8


@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 128, 256, 1024])
def test_reference_resolution_table(resolution):
    config = GeneratorConfig.for_resolution(resolution)
    names = config.layer_names
    n_conv = 2 * (len(config.sizes) - 1)
    assert names == tuple(f"layer{i}" for i in range(1, n_conv + 1)) + (f"output_{resolution}x{resolution}",)
    assert config.resolution == resolution
    # sizes inferred back from a state dict of that architecture
    state = {}
    for spec in config.layers:
        k = spec.kernel_size
        state[f"{spec.name}.conv.weight"] = np.zeros((spec.out_channels, spec.in_channels, k, k), np.float32)
        state[f"{spec.name}.wscale.b"] = np.zeros((spec.out_channels,), np.float32)
    assert params_from_state_dict(state)[1] == config


def test_lsun_architecture():
    config = GeneratorConfig(sizes=(512, 512, 512, 512, 512, 256, 128, 64))
    assert config.resolution == 256
    assert config.layer_names[-3:] == ("layer13", "layer14", "output_256x256")
    count = sum(int(np.prod(s)) for layer in config.param_shapes().values() for s in layer.values())
    assert 22e6 < count < 24e6


def test_init_params_equalized_lr():
    config = GeneratorConfig.from_channels(z_dim=64, channels=(128, 64, 32))
    assert config.sizes == (64, 128, 64, 32) and config.resolution == 16
    params = init_params(jax.random.key(3), config)
    kernels = np.concatenate([np.ravel(params[l]["kernel"]) for l in config.layer_names])
    assert abs(kernels.mean()) < 0.01 and abs(kernels.std() - 1.0) < 0.01
    for layer in config.layer_names:
        np.testing.assert_array_equal(np.asarray(params[layer]["bias"]), 0.0)
        assert params[layer]["kernel"].dtype == jnp.float32
    again = init_params(jax.random.key(3), config)
    np.testing.assert_array_equal(np.asarray(again["layer2"]["kernel"]), np.asarray(params["layer2"]["kernel"]))
    G = ProgressiveGenerator(params, config)
    x = G(gj.sample_z(3, 64, seed=0))
    assert x.shape == (3, 16, 16, 3) and np.isfinite(np.asarray(x)).all()
    assert float(jnp.std(x)) > 0.1


def test_output_tanh_clips(state_dict, golden):
    params, config = params_from_state_dict(state_dict)
    clipped = ProgressiveGenerator(params, GeneratorConfig(config.sizes, output_tanh=True))(golden["z"])
    reference = nhwc(golden["output_32x32"])
    assert np.abs(reference).max() > 1  # the clamp matters for these weights
    np.testing.assert_allclose(np.asarray(clipped), np.clip(reference, -1, 1), atol=1e-4)


def test_images_to_uint8_rounds_half_up_like_every_writer():
    x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(images_to_uint8(x), [0, 0, 128, 255, 255, 255])


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_layer_lists_valid_names(G):
    with pytest.raises(ValueError) as err:
        G.split("layer42")
    assert "layer42" in str(err.value)
    for name in LAYERS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="output_32x32"):
        G.features(np.zeros((1, 128), np.float32), ["conv3"])


def test_wrong_z_shape(G):
    with pytest.raises(ValueError, match=r"\(N, 128\)"):
        G(np.zeros((2, 100), np.float32))


def test_missing_tensor_is_named(tmp_path, state_dict):
    for key, expected in (("layer5.wscale.b", "(64,)"), ("layer5.conv.weight", "layer5.conv.weight")):
        broken = {k: v for k, v in state_dict.items() if k != key}
        path = tmp_path / f"missing-{key}.pth"
        write_legacy_pth(path, broken)
        with pytest.raises(ValueError) as err:
            gj.load_generator(path)
        assert key in str(err.value) and expected in str(err.value) and "missing" in str(err.value)


def test_misshaped_tensor_names_key_and_both_shapes(tmp_path, state_dict):
    broken = dict(state_dict)
    broken["layer2.conv.weight"] = np.zeros((128, 128, 1, 1), np.float32)
    path = tmp_path / "misshaped.pth"
    write_legacy_pth(path, broken)
    with pytest.raises(ValueError) as err:
        gj.load_generator(path)
    message = str(err.value)
    assert "layer2.conv.weight" in message
    assert "(128, 128, 1, 1)" in message and "(128, 128, 3, 3)" in message

    broken = dict(state_dict)
    broken["output_32x32.wscale.b"] = np.zeros((4,), np.float32)
    with pytest.raises(ValueError, match=r"output_32x32\.wscale\.b.*\(4,\).*\(3,\)"):
        generator_from_state_dict(broken)


@pytest.mark.parametrize("key, shape", [("layer1.conv.weight", (128, 0, 4, 4)), ("layer1.conv.weight", (0, 128, 4, 4)),
                                        ("layer3.conv.weight", (0, 128, 3, 3))])
def test_a_conv_weight_without_channels_is_refused_naming_the_file_and_tensor(tmp_path, state_dict, key, shape):
    broken = {**state_dict, key: np.zeros(shape, np.float32)}
    path = tmp_path / "empty-channels.pth"
    write_legacy_pth(path, broken)
    with pytest.raises(ValueError, match=rf"{path}: tensor '{re.escape(key)}' has shape {re.escape(str(shape))}: "
                                         "a conv weight with no channels"):
        gj.load_generator(path)


def test_unexpected_tensor_is_named(state_dict):
    extra = dict(state_dict, **{"layer3.conv.bias": np.zeros(128, np.float32)})
    with pytest.raises(ValueError, match="layer3.conv.bias"):
        generator_from_state_dict(extra)


def test_misshaped_params_name_key_and_both_shapes(G):
    params = jax.tree_util.tree_map(lambda a: a, G.params)
    params["layer3"] = dict(params["layer3"], kernel=jnp.zeros((3, 3, 128, 64)))
    with pytest.raises(ValueError) as err:
        ProgressiveGenerator(params, G.config)
    assert "layer3/kernel" in str(err.value)
    assert "(3, 3, 128, 64)" in str(err.value) and "(3, 3, 128, 128)" in str(err.value)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(PthError):
        gj.load_generator(text)
    array_pickle = tmp_path / "array.pth"
    write_legacy_pth(array_pickle, {"weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="not a Progressive GAN"):
        gj.load_generator(array_pickle)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a gandissect-jax checkpoint"):
        gj.load_generator(empty)
    with pytest.raises(FileNotFoundError, match="registered generator name"):
        gj.load_generator("no_such_model_anywhere")


def test_upsample_conv_equals_upsampling_then_conv():
    from gandissect_jax.proggan import upsample_conv3x3, upsample_nearest_2x

    x = jax.random.normal(jax.random.key(4), (2, 3, 5, 6))
    kernel = jax.random.normal(jax.random.key(5), (3, 3, 6, 4))
    up = np.repeat(np.repeat(np.asarray(x, np.float64), 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(np.asarray(upsample_nearest_2x(x)), up.astype(np.float32))
    padded = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k = np.asarray(kernel, np.float64)
    direct = sum(
        np.einsum("nhwc,co->nhwo", padded[:, dy : dy + 6, dx : dx + 10], k[dy, dx])
        for dy in range(3) for dx in range(3)
    )
    np.testing.assert_allclose(np.asarray(upsample_conv3x3(x, kernel)), direct, rtol=1e-5, atol=1e-5)
