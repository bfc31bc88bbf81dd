"""ResNet-50 encoder with the 3-conv deep stem of the unified-parsing network (NHWC, inference).

Stem: 3x3/2 conv 3->64, 3x3 64->64, 3x3 64->128 (each BN + ReLU), 3x3/2 max pool (pads with
-inf). Then layer1..layer4 of [3, 4, 6, 3] Bottlenecks (1x1, 3x3 carrying the stride, 1x1 with
x4 expansion; a 1x1 strided conv + BN shortcut on each layer's first block). Returns the four
stage outputs at strides 4, 8, 16, 32.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from .layers import conv_bn

__all__ = ["ResNetEncoder", "RESNET50_BLOCKS"]

RESNET50_BLOCKS = (3, 4, 6, 3)
EXPANSION = 4


def _bottleneck(x: jax.Array, planes: int, stride: int, shortcut: bool, prefix: str) -> jax.Array:
    out = conv_bn(x, planes, 1, conv_name=f"{prefix}_conv1", bn_name=f"{prefix}_bn1")
    out = conv_bn(out, planes, 3, stride, conv_name=f"{prefix}_conv2", bn_name=f"{prefix}_bn2")
    out = conv_bn(out, planes * EXPANSION, 1, conv_name=f"{prefix}_conv3",
                  bn_name=f"{prefix}_bn3", relu=False)
    if shortcut:
        x = conv_bn(x, planes * EXPANSION, 1, stride, conv_name=f"{prefix}_downsample_0",
                    bn_name=f"{prefix}_downsample_1", relu=False)
    return nn.relu(out + x)


class ResNetEncoder(nn.Module):
    """Deep-stem ResNet; ``__call__(x)`` maps NHWC ``(N, H, W, 3)`` to the tuple of 4 stage outputs.

    Stage ``i`` (1-based) has ``64 * 2**(i-1) * 4`` channels and stride ``2**(i+1)``; intermediates
    ``encoder_layer{i}`` are sown into the ``"intermediates"`` collection.
    """

    blocks: Sequence[int] = RESNET50_BLOCKS

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = conv_bn(x, 64, 3, 2, conv_name="conv1", bn_name="bn1")
        x = conv_bn(x, 64, 3, conv_name="conv2", bn_name="bn2")
        x = conv_bn(x, 128, 3, conv_name="conv3", bn_name="bn3")
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # -inf padding
        in_channels = 128
        stages = []
        for stage, (count, planes) in enumerate(zip(self.blocks, (64, 128, 256, 512)), start=1):
            for block in range(count):
                stride = 2 if (block == 0 and stage > 1) else 1
                shortcut = block == 0 and (stride != 1 or in_channels != planes * EXPANSION)
                x = _bottleneck(x, planes, stride, shortcut, f"layer{stage}_{block}")
                in_channels = planes * EXPANSION
            self.sow("intermediates", f"encoder_layer{stage}", x)
            stages.append(x)
        return tuple(stages)

