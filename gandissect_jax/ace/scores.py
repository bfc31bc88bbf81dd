"""Concept scores for ACE: the labels of a concept, its differentiable score map, per-label scores pooled to the feature grid."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.segmenter_protocol import check_segmenter, label_index


OBJECTIVES = ("ace", "removal", "specific_removal")


def concept_labels(segmenter: Any, concept: str | int | Sequence[str | int]) -> tuple[int, ...]:
    """Label numbers of a concept given as a name, a number, or several of them (a union).

    ValueError naming the concept (with close names) or the number and the valid range;
    TypeError for a ``segmenter`` that is not a Segmenter (:func:`check_segmenter`)."""
    check_segmenter(segmenter)
    items = [concept] if isinstance(concept, (str, int, np.integer)) else list(concept)
    if not items:
        raise ValueError("concept is empty: give a label name or a list of label names")
    numbers = []
    for item in items:
        if isinstance(item, str):
            numbers.append(label_index(segmenter, item))
        else:
            number = int(item)
            if not 0 < number < len(segmenter.labels):
                raise ValueError(f"label number {number} out of range 1..{len(segmenter.labels) - 1}")
            numbers.append(number)
    return tuple(sorted(set(numbers)))


_concept_labels = concept_labels  # earlier private name


def concept_score(
    segmenter: Any, params: Any, images: jax.Array, labels: Sequence[int], downsample: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Differentiable score and mask of a union of labels.

    Args:
      segmenter: the Segmenter protocol.
      params: the segmenter's parameters (``segmenter.params``; may be traced).
      images: float32 (N, H, W, 3) in [-1, 1].
      labels: label numbers; the concept is present where any of them is.
      downsample: segmentation stride.

    Returns:
      ``(score, mask)``: float32 (N, h, w), the sum of the labels' class scores (for a softmax
      segmenter, the probability of the union), and bool (N, h, w), where any label wins.
    """
    score, mask = None, None
    for c in labels:
        s, m = segmenter.class_score(params, images, int(c), downsample)
        score = s if score is None else score + s
        mask = m if mask is None else mask | m
    return score, mask


def label_scores(
    segmenter: Any, params: Any, images: jax.Array, labels: Sequence[int], downsample: int = 1
) -> jax.Array:
    """Differentiable scores float32 (N, h, w, K) of K labels, in the order given.

    ``params`` are the segmenter's parameters (``segmenter.params``; may be traced). Uses the
    segmenter's optional ``class_scores`` (every label from one pass, so one backward pass when
    differentiated) when it has one -- asking it for ``labels`` only when it takes a ``labels``
    argument, so that it can skip what those labels do not read --, else ``class_score`` once
    per label.
    """
    labels = tuple(int(c) for c in labels)
    if hasattr(segmenter, "class_scores"):
        if _takes_labels(segmenter.class_scores):
            return segmenter.class_scores(params, images, downsample, labels=labels)
        return segmenter.class_scores(params, images, downsample)[..., jnp.asarray(labels, jnp.int32)]
    return jnp.stack([segmenter.class_score(params, images, int(c), downsample)[0] for c in labels], -1)


def _takes_labels(method: Any) -> bool:
    try:
        return "labels" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _pool_to_grid(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Block means of (N, h, w) down to (N, H, W); h, w must be multiples of H, W."""
    n, h, w = x.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(
            f"segmentation of size {h}x{w} is not a whole multiple of the {rows}x{cols} feature map; "
            "change seg_downsample"
        )
    return x.reshape(n, rows, h // rows, cols, w // cols).mean((2, 4))
