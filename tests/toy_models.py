"""Small Flax models shared by the tests: a StyleGAN-like generator (mapping network z -> w, a
learned constant, modulated convolutions reading w at every layer) and a classifier of images."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Z_DIM, W_DIM = 16, 32


def random_like(shapes, seed, scale=0.5):
    """Normal(0, scale) float32 arrays of the shapes of a pytree of ShapeDtypeStructs, drawn with
    numpy (initialising through jax.random would compile a PRNG program per model: slow tests)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape, np.float32)), shapes)



# ---------------------------------------------------------------------------------------------
# A small StyleGAN-like generator: mapping z -> w, a learned constant, modulated convolutions
# that read w (through their own affine style) at every layer, 4 -> 8 -> 16 px.


def pixel_norm(z):
    return z * jax.lax.rsqrt(jnp.mean(z**2, -1, keepdims=True) + 1e-8)


def modulated_conv(x, style, kernel, bias, upsample, demodulate):
    """StyleGAN2's modulated convolution (modulate the input, convolve, demodulate), NHWC."""
    k, _, cin, _ = kernel.shape
    kernel = kernel / np.sqrt(k * k * cin)
    if upsample:
        n, h, w, c = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "nearest")
    y = jax.lax.conv_general_dilated(x * style[:, None, None, :], kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if demodulate:
        demodulation = jax.lax.rsqrt(jnp.einsum("ni,io->no", style**2, jnp.sum(kernel**2, (0, 1))) + 1e-8)
        y = y * demodulation[:, None, None, :]
        return jax.nn.leaky_relu(y + bias, 0.2)
    return y + bias


class Mapping(nn.Module):
    @nn.compact
    def __call__(self, z):
        w = pixel_norm(z)
        for _ in range(2):
            w = nn.leaky_relu(nn.Dense(W_DIM)(w), 0.2)
        return w


class ModConv(nn.Module):
    features: int
    kernel_size: int = 3
    upsample: bool = False
    demodulate: bool = True

    @nn.compact
    def __call__(self, x, w):
        style = nn.Dense(x.shape[-1], bias_init=nn.initializers.ones, name="affine")(w)  # per-layer style
        kernel = self.param("kernel", nn.initializers.normal(1.0),
                            (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return modulated_conv(x, style, kernel, bias, self.upsample, self.demodulate)


class StyleGenerator(nn.Module):
    @nn.compact
    def __call__(self, z):
        w = Mapping(name="mapping")(z)
        const = self.param("const", nn.initializers.normal(1.0), (4, 4, 32))
        x = jnp.broadcast_to(const, (z.shape[0], 4, 4, 32))
        x = ModConv(32, name="conv4")(x, w)
        x = ModConv(32, upsample=True, name="conv8")(x, w)
        x = ModConv(16, upsample=True, name="conv16")(x, w)
        return jnp.tanh(ModConv(3, 1, demodulate=False, name="torgb")(x, w))


def style_variables(seed):
    return random_like(jax.eval_shape(StyleGenerator().init, jax.random.key(0), jnp.zeros((1, Z_DIM))), seed)



# A classifier of images: its input plays the protocol's z


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(10, name="head")(x.mean((1, 2)))
