"""The Progressive GAN generator of GAN Dissection, in Flax, split cleanly at any layer.

The network is the one of the PyTorch reference (``netdissect.proggan.ProgressiveGenerator``),
computed in NHWC: a latent ``z`` of shape ``(N, z_dim)`` is viewed as a ``1x1`` feature map and
passed through named layers ``layer1 ... layerK`` and a final ``output_RxR`` layer that gives an
``(N, R, R, 3)`` float32 image, unclamped (about [-1, 1] for trained models).

Each conv block is PixelNorm (eps 1e-8) -> [nearest 2x upsample] -> conv (no bias) ->
equalized-learning-rate scale ``sqrt(2 / (C_in * k * k))`` -> + bias -> LeakyReLU(0.2).
``layer1`` is a 4x4 conv with padding 3 applied to the 1x1 latent (giving 4x4); every odd layer
after it doubles the resolution. The output block is PixelNorm -> 1x1 conv -> scale
``1 / sqrt(C_in)`` -> + bias (-> clip to [-1, 1] only if ``output_tanh``, the reference's Hardtanh).

Building and using a generator::

    config = GeneratorConfig(sizes=(128, 256, 256, 128, 64, 32))   # reference `sizes`: z_dim first
    config = GeneratorConfig.from_channels(z_dim=128, channels=(256, 256, 128, 64, 32))  # same
    params = init_params(jax.random.key(0), config)   # equalized-lr init: weights N(0,1), biases 0
    G = ProgressiveGenerator(params, config)          # implements the Generator protocol
    x = G(z)                                          # (N, 64, 64, 3)
    x = G.apply(params, z)                            # the same as a pure function of params
    h, f = G.split("layer4")                          # h(params, z) -> (r, ()); f(params, r, ()) -> x
    x, feats = G.features(z, ["layer4", "layer7"])    # images + NHWC layer outputs, one pass
    G.layer_shape("layer4")                           # (H, W, C) of one sample's r
    save_generator(G, "runs/g")                       # orbax checkpoint dir (atomic)
    G = load_generator("runs/g")                      # or a .pth file, or a registry name

Parameters are a plain pytree ``{layer_name: {"kernel": (k, k, C_in, C_out), "bias": (C_out,)}}``
(HWIO kernels; the reference's OIHW ``layerK.conv.weight`` / ``layerK.wscale.b`` map onto them),
so training code can differentiate and update them with optax directly.

Upsample-then-3x3-conv layers are computed without materialising the upsampled map
(:func:`upsample_conv3x3`), about 2x faster than the reference on CPU at equal results up to
float32 rounding.
"""

from ._config import PIXEL_NORM_EPS, GeneratorConfig, LayerSpec
from ._files import convert_reference, images_to_uint8, load_generator, save_generator
from ._generator import ProgressiveGenerator
from ._network import ProgressiveGAN, init_params, pixel_norm, upsample_conv3x3, upsample_nearest_2x
from ._state_dict import generator_from_state_dict, params_from_state_dict, state_dict_from_params, unwrap_state_dict

__all__ = [
    "GeneratorConfig",
    "LayerSpec",
    "ProgressiveGAN",
    "ProgressiveGenerator",
    "init_params",
    "load_generator",
    "save_generator",
    "generator_from_state_dict",
    "params_from_state_dict",
    "state_dict_from_params",
    "convert_reference",
    "images_to_uint8",
    "PIXEL_NORM_EPS",
    "pixel_norm",
    "upsample_nearest_2x",
    "upsample_conv3x3",
    "unwrap_state_dict",
]

