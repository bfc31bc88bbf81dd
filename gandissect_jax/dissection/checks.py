"""Input checks of a dissection, made before any pass: labels, sample count, label values, levels, feature layouts."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import distributed
from .config import DissectConfig
from .engine import AXIS, per_device_batch
from .labels import labels_and_categories

LAYOUTS = ("nhwc", "nchw")
# Label values that public datasets use for "ignore" (ADE20K, Cityscapes, VOC: 255; others: -1).
IGNORE_VALUES = (255, -1, 65535)


def check_labels(labels, categories) -> tuple[list[tuple[str, str]], list[str]]:
    """Labels and categories, normalized; ValueError for a label listed twice, a category listed
    twice, or a label other than label 0 whose category is not among the categories. Label 0 is
    "no label" (never counted): the reference's own list starts with ``('-', '-')``, whose
    category maps to category 0 as in the reference (:func:`~.labels.label_category_indices`)."""
    labels, categories = labels_and_categories(labels, categories)
    if len(set(categories)) != len(categories):
        twice = sorted({c for c in categories if categories.count(c) > 1})
        raise ValueError(f"categories {twice} are listed more than once in {categories}")
    seen: dict[tuple[str, str], int] = {}
    for number, (name, category) in enumerate(labels):
        if category not in categories and number > 0:
            raise ValueError(f"label {number} {name!r} has category {category!r}, which is not one of the "
                             f"categories {categories}")
        if (name, category) in seen:
            raise ValueError(f"label {name!r} ({category}) is listed twice, as label {seen[(name, category)]} "
                             f"and label {number}; every label must be listed once")
        seen[(name, category)] = number
    return labels, categories


def check_source(source, config: DissectConfig) -> None:
    """Sample count, top-k length and sizes, before anything is read."""
    if source.num_samples < 1:
        raise ValueError("there are no samples to dissect (N = 0)")
    config.resolved_topk(source.num_samples)
    if min(source.seg_size) < 1:
        raise ValueError(f"the segmentation size {tuple(source.seg_size)} is empty")
    for layer, shape in source.feature_shapes.items():
        if min(shape) < 1:
            raise ValueError(f"features of layer {layer!r} have an empty shape {tuple(shape)} (h, w, U)")


def check_label_values(source, num_labels: int, mesh, batch_size: int) -> None:
    """Every segmentation entry of precomputed data (an exact scan, done with the content hash), or
    those of the first batch of a generator source, must lie in [0, num_labels); ValueError
    before the passes otherwise. (The count pass checks every entry of every source again.)"""
    if hasattr(source, "label_range"):
        low, high = source.label_range()
        where = "the segmentations"
    else:
        devices = mesh.devices.size
        count = per_device_batch(min(batch_size, source.num_samples), devices,
                                 getattr(source, "micro_batch", None)) * devices
        indices = np.minimum(np.arange(count), source.num_samples - 1)  # whole micro-batches per device
        labels = distributed.to_host(source.fetch(indices, NamedSharding(mesh, P(AXIS)))["labels"])
        low, high = int(labels.min()), int(labels.max())
        where = f"the segmentations of the first {min(count, source.num_samples)} samples"
    if low >= 0 and high < num_labels:
        return
    bad = high if high >= num_labels else low
    hint = ("; map 'ignore' values such as 255 or -1 to 0 (no label) first" if bad in IGNORE_VALUES
            else "; the labels file must list every label number the segmentations use")
    raise ValueError(f"{where} hold label {bad}, outside [0, {num_labels - 1}]: the labels list "
                     f"{num_labels} labels (0 = no label){hint}")


def check_levels(levels: Mapping[str, Any] | None, source) -> dict[str, np.ndarray] | None:
    if levels is None:
        return None
    checked = {}
    for layer in source.layers:
        if layer not in levels:
            raise ValueError(f"no levels given for layer {layer!r}")
        value = np.asarray(levels[layer], np.float32).reshape(-1)
        units = source.feature_shapes[layer][2]
        if value.shape != (units,):
            raise ValueError(f"levels for layer {layer!r} have {value.size} entries; the layer has {units} units")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"levels for layer {layer!r} contain NaN or inf")
        checked[layer] = value
    return checked


def aspect_agrees(spatial: Sequence[int], seg_size: Sequence[int]) -> bool:
    """True when a feature map of size ``spatial`` (h, w) covers ``seg_size`` (H, W) with the same
    aspect ratio, to within one feature pixel (convolutions round odd sizes)."""
    (h, w), (H, W) = spatial, seg_size
    return abs(h * W / H - w) <= 1 or abs(w * H / W - h) <= 1


def arrange_features(features: Mapping[str, Any], segmentations, layout: str) -> dict[str, Any]:
    """NHWC views of the features given in ``layout``; ValueError when a layer's spatial aspect
    ratio disagrees with the segmentations' (suggesting the other layout when that one fits)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    seg_size = tuple(int(s) for s in segmentations.shape[1:3]) if getattr(segmentations, "ndim", 0) >= 3 else None
    arranged = {}
    for name, array in features.items():
        if getattr(array, "ndim", None) != 4:
            axes = "(N, h, w, U)" if layout == "nhwc" else "(N, U, h, w)"
            raise ValueError(f"features {name!r} must have 4 axes {axes} (layout {layout!r}), got shape "
                             f"{tuple(getattr(array, 'shape', ()))}" +
                             ("; for a single unit add a last axis of length 1" if getattr(array, "ndim", 0) == 3
                              else ""))
        view = array if layout == "nhwc" else array.transpose(0, 2, 3, 1)
        if seg_size is not None and not aspect_agrees(view.shape[1:3], seg_size):
            other = "nchw" if layout == "nhwc" else "nhwc"
            swapped = array.shape[2:4] if other == "nchw" else array.shape[1:3]
            hint = (f"; if the array is {'channels-first (N, U, h, w), as PyTorch and Caffe save features' if other == 'nchw' else 'channels-last (N, h, w, U)'}, "
                    f"pass --layout {other} (API: layout='{other}')" if aspect_agrees(swapped, seg_size) else "")
            raise ValueError(f"features {name!r} of shape {tuple(array.shape)} have a {view.shape[1]}x{view.shape[2]} "
                             f"feature map in layout {layout!r}, whose aspect ratio differs from the "
                             f"segmentations' {seg_size[0]}x{seg_size[1]}{hint}")
        arranged[name] = view
    return arranged


__all__ = ["LAYOUTS", "IGNORE_VALUES", "arrange_features", "aspect_agrees", "check_label_values", "check_labels",
           "check_levels", "check_source"]
