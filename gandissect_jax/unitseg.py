"""Unit segmentation: label every pixel with the concept of its most strongly activated unit.

Network Dissection (Bau et al., CVPR 2017, Sec. 4; Zhou et al., TPAMI 2018, "Interpreting Deep
Visual Representations via Network Dissection", Sec. 4.3) segments an image with the units of
one layer alone: each interpretable unit u (its dissection label ``c_u``, its threshold
``level_u``) votes for ``c_u`` where its upsampled activation ``a_u`` exceeds ``level_u``, and each
pixel takes the label of the unit that exceeds its threshold by the most, relative to the
threshold::

    margin_u(x) = (a_u(x) - level_u) / max(|level_u|, eps)      (interpretable u only)
    label(x) = c_{argmax_u margin_u(x)}   if max_u margin_u(x) > 0, else 0

Activations are upsampled exactly as in dissection (:func:`gandissect_jax.dissection.upsample.
upsample_bilinear`). :func:`unit_segmentation` is pure and jit/vmap-able; :func:`agreement`
compares a unit segmentation with a segmenter's.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.dissection.upsample import upsample_bilinear

__all__ = ["unit_segmentation", "agreement", "Agreement"]

EPS = 1e-6


@functools.partial(jax.jit, static_argnames=("size",))
def _unit_segmentation(features, levels, unit_label, interpretable, *, size):
    levels = levels.astype(jnp.float32)
    scale = jnp.maximum(jnp.abs(levels), EPS)

    def one(sample):  # (h, w, U) -> (H, W): one sample at a time bounds memory to H * W * U
        up = upsample_bilinear(sample[None], size)[0]
        margin = jnp.where(interpretable, (up - levels) / scale, -jnp.inf)
        best = jnp.argmax(margin, -1)
        return jnp.where(jnp.max(margin, -1) > 0, unit_label[best], 0).astype(jnp.int32)

    return jax.lax.map(one, features)


def unit_segmentation(features: Any, levels: Any, unit_label: Any, interpretable: Any,
                      size: tuple[int, int]) -> jax.Array:
    """The unit segmentation of a batch (see the module docstring).

    Args:
      features: float32 (N, h, w, U) activations of one layer (NHWC), e.g. ``h(params, z)[0]``.
      levels: float32 (U,) per-unit thresholds (``LayerDissection.levels``).
      unit_label: int (U,) each unit's concept (``LayerDissection.unit_label``).
      interpretable: bool (U,) units allowed to vote (``LayerDissection.interpretable(0.05)``).
      size: (H, W) output size (static), e.g. the segmentation size of the dissection.

    Returns:
      int32 (N, H, W) label numbers of the dissection's label set, 0 where no interpretable unit
      is above its threshold.

    Raises:
      ValueError when the shapes disagree (naming both).
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 4:
        raise ValueError(f"features must be (N, h, w, U); got shape {features.shape}")
    units = features.shape[-1]
    arrays = {"levels": levels, "unit_label": unit_label, "interpretable": interpretable}
    for name, value in arrays.items():
        if np.shape(value) != (units,):
            raise ValueError(f"{name} has shape {np.shape(value)}; the features have {units} units")
    return _unit_segmentation(features, jnp.asarray(levels, jnp.float32), jnp.asarray(unit_label, jnp.int32),
                              jnp.asarray(interpretable, bool), size=(int(size[0]), int(size[1])))


class Agreement(NamedTuple):
    """How a unit segmentation agrees with a segmenter's labels.

    Attributes:
      coverage: fraction of pixels the unit segmentation labels (not 0).
      accuracy: of those, the fraction whose label is also in the segmenter's labels of that pixel
        (any channel).
      per_label: {label number: (IoU, pixels predicted, pixels in the segmentation)} for every
        label the unit segmentation uses; IoU against the segmenter's pixels of that label.
    """

    coverage: float
    accuracy: float
    per_label: dict


def agreement(predicted: Any, segmentation: Any) -> Agreement:
    """Compare int (N, H, W) unit-segmentation labels with an int (N, H, W, D) segmentation of the
    same size (numpy, on the host). ValueError when the sizes differ."""
    predicted = np.asarray(predicted)
    segmentation = np.asarray(segmentation)
    if segmentation.ndim == 3:
        segmentation = segmentation[..., None]
    if predicted.shape != segmentation.shape[:3]:
        raise ValueError(f"unit segmentation {predicted.shape} and segmentation {segmentation.shape} "
                         "differ in size")
    labelled = predicted > 0
    hit = (segmentation == predicted[..., None]).any(-1) & labelled
    coverage = float(labelled.mean())
    accuracy = float(hit.sum() / max(labelled.sum(), 1))
    per_label = {}
    for c in np.unique(predicted[labelled]):
        mine = predicted == c
        truth = (segmentation == c).any(-1)
        inter = int((mine & truth).sum())
        union = int((mine | truth).sum())
        per_label[int(c)] = (inter / union if union else 0.0, int(mine.sum()), int(truth.sum()))
    return Agreement(coverage, accuracy, per_label)
