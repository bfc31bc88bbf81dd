"""UPerNet decoder of the unified-parsing network and the whole encoder-decoder (NHWC, inference).

Decoder (``fpn_dim`` 512 for ``upernet``):

- PPM on conv5: for bins 1, 2, 3, 6, whole-map precise RoI pooling, bilinear resize back to the
  conv5 size (no antialiasing), 1x1 conv-BN-ReLU; concat with conv5, 3x3 conv-BN-ReLU -> P5.
- Scene head on P5: 3x3 conv-BN-ReLU, global average pool, 1x1 conv (bias).
- FPN top-down for stages 3, 2, 1: ``f = lateral(stage) + resize(f)`` (the un-smoothed sum is
  carried down), and ``P_i = 3x3 conv-BN-ReLU(f)``.
- Material head on P2; fusion of [P2, P3, P4, P5] resized to P2 -> 3x3 conv-BN-ReLU (evaluated
  as :class:`ResizedConcatConv`, about 3x fewer multiply-adds, same result); object and part
  heads on the fusion (3x3 conv-BN-ReLU, 1x1 conv with bias).

Logits come out at the P2 resolution (stride 4); resizing to the output size and the softmax
groups live in :mod:`gandissect_jax.segmenter.unified`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import HIGHEST, batch_norm, conv, conv_bn_relu_seq
from .prroi import whole_map_prroi_pool
from .resize import bilinear_matrix, resize_bilinear
from .resnet import RESNET50_BLOCKS, ResNetEncoder

__all__ = ["HeadSizes", "ResizedConcatConv", "UPerNetDecoder", "UnifiedParsingNetwork",
           "UnifiedLogits"]


def _shifted_bilinear_matrices(in_size: int, out_size: int) -> np.ndarray:
    """float64 ``(3, out_size, in_size)``: tap ``t`` resizes bilinearly, then shifts by ``t - 1``
    (``out[i] = resized[i + t - 1]``, zero outside): one axis of a 3x3 tap of a resized map."""
    matrix = bilinear_matrix(in_size, out_size)
    padded = np.pad(matrix, ((1, 1), (0, 0)))
    return np.stack([padded[t:t + out_size] for t in range(3)])


class ResizedConcatConv(nn.Module):
    """``conv3x3(concat([x0, resize(x1), resize(x2), ...]))`` without building the resized maps.

    Bilinear resizing acts on each channel linearly, so it commutes with the per-tap channel
    products of the convolution: ``conv3x3(resize(x))[p] = sum_k shift_k(resize(x @ W_k))[p]``
    (zero padding is preserved because the products of zeros are zero). Each low-resolution
    input is therefore multiplied by the 9 taps at its own resolution, and the 9 products
    (``features`` channels each) are resized, shifted into place and summed by two contractions
    with fixed matrices (one per axis, each stacking the 3 shifted resizes of its taps), so the
    backward pass is two matrix products as well. For the UPerNet fusion (P3, P4, P5 at 1/2,
    1/4, 1/8 of P2's size) this cuts its multiply-adds by about 3x. The result equals the direct
    computation up to float32 rounding. The single ``kernel`` parameter ``(3, 3, sum of input
    channels, features)`` has the layout of ``nn.Conv``.
    """

    features: int

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
        channels = [x.shape[-1] for x in inputs]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, sum(channels), self.features), jnp.float32)
        size = inputs[0].shape[1:3]
        start = 0
        out = None
        for x, count in zip(inputs, channels):
            part = kernel[:, :, start:start + count].astype(x.dtype)
            start += count
            if tuple(x.shape[1:3]) == tuple(size):
                y = jax.lax.conv_general_dilated(
                    x, part, (1, 1), ((1, 1), (1, 1)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
            else:
                rows = jnp.asarray(_shifted_bilinear_matrices(x.shape[1], size[0]), x.dtype)
                cols = jnp.asarray(_shifted_bilinear_matrices(x.shape[2], size[1]), x.dtype)
                taps = jnp.einsum("nhwc,yxco->nhwyxo", x, part, precision=HIGHEST)
                y = jnp.einsum("xqw,nhwyxo->nhyqo", cols, taps, precision=HIGHEST)
                y = jnp.einsum("yph,nhyqo->npqo", rows, y, precision=HIGHEST)
            out = y if out is None else out + y
        return out


class HeadSizes(NamedTuple):
    """Number of output channels of each classifier head (including the ``-`` classes)."""

    object: int
    part: int
    material: int
    scene: int


class UnifiedLogits(NamedTuple):
    """Raw head outputs: ``object``/``part``/``material`` NHWC at stride 4, ``scene`` ``(N, K)``."""

    object: jax.Array
    part: jax.Array
    material: jax.Array
    scene: jax.Array


class UPerNetDecoder(nn.Module):
    """UPerNet over the 4 encoder stages; ``__call__(stages) -> UnifiedLogits``."""

    heads: HeadSizes
    fpn_dim: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)

    @nn.compact
    def __call__(self, stages: Sequence[jax.Array]) -> UnifiedLogits:
        conv5 = stages[-1]
        size5 = conv5.shape[1:3]
        branches = [conv5]
        for index, scale in enumerate(self.pool_scales):
            pooled = whole_map_prroi_pool(conv5, scale)
            self.sow("intermediates", f"ppm_pool_{scale}", pooled)
            branch = conv_bn_relu_seq(resize_bilinear(pooled, size5), 512, 1,
                                      prefix=f"ppm_conv_{index}")
            self.sow("intermediates", f"ppm_branch_{scale}", branch)
            branches.append(branch)
        f = conv_bn_relu_seq(jnp.concatenate(branches, axis=-1), self.fpn_dim, 3,
                             prefix="ppm_last_conv")
        self.sow("intermediates", "ppm_out_P5", f)

        scene = conv_bn_relu_seq(f, self.fpn_dim, 3, prefix="scene_head_0")
        scene = jnp.mean(scene, axis=(1, 2), keepdims=True)
        scene = conv(scene, self.heads.scene, 1, name="scene_head_2", bias=True)[:, 0, 0, :]
        self.sow("intermediates", "scene_logits", scene)

        pyramid = [f]
        for i in reversed(range(len(stages) - 1)):
            lateral = conv_bn_relu_seq(stages[i], self.fpn_dim, 1, prefix=f"fpn_in_{i}")
            self.sow("intermediates", f"fpn_lateral_{i}", lateral)
            f = lateral + resize_bilinear(f, lateral.shape[1:3])
            level = conv_bn_relu_seq(f, self.fpn_dim, 3, prefix=f"fpn_out_{i}_0")
            self.sow("intermediates", f"fpn_P{i + 2}", level)
            pyramid.append(level)
        pyramid.reverse()  # [P2, P3, P4, P5]

        material = conv_bn_relu_seq(pyramid[0], self.fpn_dim, 3, prefix="material_head_0")
        material = conv(material, self.heads.material, 1, name="material_head_1", bias=True)

        # conv_fusion(concat[P2, resize(P3), resize(P4), resize(P5)]), computed without
        # materialising the resized maps (same numbers; see ResizedConcatConv)
        fusion = ResizedConcatConv(self.fpn_dim, name="conv_fusion_0")(pyramid)
        fusion = nn.relu(batch_norm(fusion, name="conv_fusion_1"))
        self.sow("intermediates", "fusion", fusion)
        obj = conv_bn_relu_seq(fusion, self.fpn_dim, 3, prefix="object_head_0")
        obj = conv(obj, self.heads.object, 1, name="object_head_1", bias=True)
        part = conv_bn_relu_seq(fusion, self.fpn_dim, 3, prefix="part_head_0")
        part = conv(part, self.heads.part, 1, name="part_head_1", bias=True)
        for name, value in (("object_logits", obj), ("material_logits", material),
                            ("part_logits", part)):
            self.sow("intermediates", name, value)
        return UnifiedLogits(object=obj, part=part, material=material, scene=scene)


class UnifiedParsingNetwork(nn.Module):
    """ResNet encoder + UPerNet decoder: preprocessed BGR NHWC images -> :class:`UnifiedLogits`.

    Variables: ``{"params": {"encoder": ..., "decoder": ...}, "batch_stats": {...}}``.
    """

    heads: HeadSizes
    fpn_dim: int = 512
    blocks: Sequence[int] = RESNET50_BLOCKS

    @nn.compact
    def __call__(self, x: jax.Array) -> UnifiedLogits:
        stages = ResNetEncoder(blocks=tuple(self.blocks), name="encoder")(x)
        return UPerNetDecoder(heads=self.heads, fpn_dim=self.fpn_dim, name="decoder")(stages)
