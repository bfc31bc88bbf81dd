"""Building blocks shared by the encoder and decoder: NHWC conv, inference batch norm, ReLU.

Submodules are created inside the caller's ``@nn.compact`` method with flat names equal to the
PyTorch module path with ``.`` replaced by ``_`` (``layer1.0.conv1`` -> ``layer1_0_conv1``), so
a reference state dict maps onto the Flax variables by a purely mechanical rule
(see :mod:`gandissect_jax.segmenter.convert`).
"""

from __future__ import annotations

import flax.linen as nn
import jax

HIGHEST = jax.lax.Precision.HIGHEST

BN_EPSILON = 1e-5


def conv(x: jax.Array, features: int, kernel: int, stride: int = 1, *, name: str,
         bias: bool = False) -> jax.Array:
    """``nn.Conv2d(kernel, stride, padding=kernel // 2)`` on NHWC ``x`` at full float32 precision."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=bias, precision=HIGHEST,
                   name=name)(x)


def batch_norm(x: jax.Array, *, name: str) -> jax.Array:
    """Inference batch norm from running statistics: ``(x - mean) / sqrt(var + 1e-5) * scale + bias``."""
    return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=BN_EPSILON, name=name)(x)


def conv_bn(x: jax.Array, features: int, kernel: int, stride: int = 1, *, conv_name: str,
            bn_name: str, relu: bool = True) -> jax.Array:
    """Bias-free conv, batch norm, optional ReLU."""
    x = batch_norm(conv(x, features, kernel, stride, name=conv_name), name=bn_name)
    return nn.relu(x) if relu else x


def conv_bn_relu_seq(x: jax.Array, features: int, kernel: int, *, prefix: str) -> jax.Array:
    """A PyTorch ``Sequential(conv, BN, ReLU)`` registered under ``prefix``: ``prefix_0``, ``prefix_1``."""
    return conv_bn(x, features, kernel, conv_name=f"{prefix}_0", bn_name=f"{prefix}_1")
