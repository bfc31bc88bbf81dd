"""Label maps: pixel counts per label, label/category lists, and colour pictures of segmentations."""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_MAX_ENTRIES = np.iinfo(np.int32).max


@functools.partial(jax.jit, static_argnums=1)
def _count(labels: jax.Array, num_labels: int) -> tuple[jax.Array, jax.Array]:
    labels = labels.reshape(-1)
    outside = (labels < 0) | (labels >= num_labels)
    counts = jnp.zeros((num_labels,), jnp.int32).at[jnp.where(outside, num_labels, labels)].add(1, mode="drop")
    return counts, jnp.sum(outside, dtype=jnp.int32)


def count_labels(labels, num_labels: int) -> tuple[jax.Array, jax.Array]:
    """Pixel count of every label number in a label map, on device.

    labels: int array of any shape (e.g. (N, H, W) or (N, H, W, D) segmentations; every channel's
    entry is counted), numpy or jax, fewer than 2**31 entries. Returns ``(counts, outside)``:
    int32 (num_labels,) entries equal to each label 0 .. num_labels - 1, and int32 () entries
    outside that range (not counted). Only num_labels + 1 numbers need to reach the host, so
    callers sum per-batch counts into int64 there. One compiled program per shape.
    ValueError for non-integer labels or too many entries.
    """
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size > _MAX_ENTRIES:
        raise ValueError(f"count_labels takes fewer than 2**31 entries per call, got {labels.size}; count in batches")
    return _count(labels, int(num_labels))


def labels_and_categories(labels, categories: Sequence[str] | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Normalize a label list: ``[(name, category), ...]`` or labels.json's ``{"labels": [...],
    "categories": [...]}`` -> (labels as string pairs, categories). Without categories, they are
    taken in order of first appearance. ValueError for an empty list or malformed entries."""
    if isinstance(labels, Mapping):
        categories = labels.get("categories", categories)
        labels = labels["labels"]
    pairs = []
    for entry in labels:
        if isinstance(entry, str) or len(entry) != 2:
            raise ValueError(f"each label must be (name, category), got {entry!r}")
        pairs.append((str(entry[0]), str(entry[1])))
    if not pairs:
        raise ValueError("no labels")
    if categories is None:
        categories = list(dict.fromkeys(category for _, category in pairs))
    return pairs, [str(c) for c in categories]


def label_category_indices(labels: Sequence[Sequence[str]], categories: Sequence[str]) -> np.ndarray:
    """(L,) int64 category index per (name, category) label; unknown categories map to 0 (as the reference)."""
    categories = list(categories)
    return np.array([categories.index(cat) if cat in categories else 0 for _, cat in labels], np.int64)


def palette(count: int) -> np.ndarray:
    """uint8 (count, 3) fixed pseudo-random colours, black for label 0."""
    rng = np.random.RandomState(7)
    colors = rng.randint(40, 236, size=(max(count, 1), 3)).astype(np.uint8)
    colors[0] = (0, 0, 0)
    return colors


def colorize_segmentation(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """uint8 (n, H, W, 3) picture of int (n, H, W, D) segmentations: the first non-zero channel."""
    first = labels[..., 0].copy()
    for d in range(1, labels.shape[-1]):
        first = np.where(first == 0, labels[..., d], first)
    return palette(num_labels)[np.clip(first, 0, num_labels - 1)]


__all__ = ["count_labels", "labels_and_categories", "label_category_indices", "palette",
           "colorize_segmentation"]
