"""A CPU stand-in for the reference's CUDA-only ``netdissect.upsegmodel.prroi_pool`` (benchmarks only).

Exposes ``PrRoIPool2D(pooled_height, pooled_width, spatial_scale)`` with the reference module's
call signature ``pool(features NCHW, rois (K, 5))``. It computes precise RoI pooling exactly, as
two separable weight matrices per RoI (the integral of the zero-padded bilinear interpolant over
each bin divided by the bin area; see ``gandissect_jax.segmenter.prroi``), in float64 weights
applied with ``einsum``. Our own code, written for the benchmark harness; torch is imported only
when this module is used.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["PrRoIPool2D", "prroi_pool2d"]


def _antiderivative(t: torch.Tensor) -> torch.Tensor:
    t = t.clamp(-1.0, 1.0)
    return torch.where(t <= 0, 0.5 * (t + 1) ** 2, 1 - 0.5 * (1 - t) ** 2)


def _axis_weights(start: float, end: float, pooled: int, size: int) -> torch.Tensor:
    bin_size = max(end - start, 0.0) / pooled
    if bin_size == 0:
        return torch.zeros(pooled, size, dtype=torch.float64)
    starts = start + bin_size * torch.arange(pooled, dtype=torch.float64)
    samples = torch.arange(size, dtype=torch.float64)
    mass = (_antiderivative(starts[:, None] + bin_size - samples[None])
            - _antiderivative(starts[:, None] - samples[None]))
    return mass / bin_size


def prroi_pool2d(features: torch.Tensor, rois: torch.Tensor, pooled_height: int,
                 pooled_width: int, spatial_scale: float) -> torch.Tensor:
    """``(K, C, pooled_height, pooled_width)`` pooled bins of ``features`` (N, C, H, W)."""
    height, width = features.shape[2:]
    out = []
    for roi in rois.detach().double().tolist():
        batch, x0, y0, x1, y1 = roi
        wy = _axis_weights(y0 * spatial_scale, y1 * spatial_scale, pooled_height, height)
        wx = _axis_weights(x0 * spatial_scale, x1 * spatial_scale, pooled_width, width)
        out.append(torch.einsum("ph,chw,qw->cpq", wy.to(features.dtype), features[int(batch)],
                                wx.to(features.dtype)))
    return torch.stack(out)


class PrRoIPool2D(nn.Module):
    """Drop-in CPU replacement of the reference's ``PrRoIPool2D``."""

    def __init__(self, pooled_height: int, pooled_width: int, spatial_scale: float):
        super().__init__()
        self.pooled_height = int(pooled_height)
        self.pooled_width = int(pooled_width)
        self.spatial_scale = float(spatial_scale)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return prroi_pool2d(features, rois, self.pooled_height, self.pooled_width,
                            self.spatial_scale)
