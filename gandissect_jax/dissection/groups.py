"""Measuring units group by group: the quantile passes, levels and count pass of every unit group, assembled per layer."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping

import numpy as np

from . import gallery
from . import statistics as st
from .passes import LayerLevels, PassSettings, count_levels, count_pass, quantile_passes, quantile_plans


@dataclasses.dataclass
class LayerMeasurement:
    """Everything the passes measure for one layer: its levels, level counts and top-k samples."""

    levels: LayerLevels
    counts: st.LevelCountState
    topk: tuple[np.ndarray, np.ndarray]
    gallery: gallery.Gallery | None = None  # what its strips draw, when the pass kept it


class _Assembly:
    """Per-layer arrays for all units, filled group by group (allocated once, so assembling never
    holds two copies; a group that holds a whole layer hands over its arrays uncopied)."""

    def __init__(self, units: Mapping[str, int]):
        self.units = dict(units)
        self.arrays: dict[str, dict[str, np.ndarray | None]] = {}
        self.handed_over: set[str] = set()  # layers whose arrays are a group's own (maybe read-only, aliased)

    def put(self, layer: str, start: int, stop: int, levels: LayerLevels, counts: st.LevelCountState, topk) -> None:
        parts = {"sorted": levels.sorted, "position": levels.position, "candidates": levels.candidates,
                 "fixed": levels.fixed, "raw_quantiles": levels.raw_quantiles, "label": counts.label,
                 "topk_values": topk[0], "topk_indices": topk[1]}
        if layer not in self.arrays and (start, stop) == (0, self.units[layer]):
            # one group holds the whole layer (the usual case): keep its arrays, copy nothing
            self.arrays[layer] = dict(parts, category=counts.category)
            self.handed_over.add(layer)
            return
        if layer in self.handed_over:  # another group of a layer already held whole: write into copies
            self.arrays[layer] = {name: None if value is None else np.array(value)
                                  for name, value in self.arrays[layer].items()}
            self.handed_over.discard(layer)
        if layer not in self.arrays:
            total = self.units[layer]
            self.arrays[layer] = {name: None if value is None else np.empty((total,) + value.shape[1:], value.dtype)
                                  for name, value in parts.items()}
            category = counts.category
            self.arrays[layer]["category"] = np.empty(category.shape[:1] + (total,) + category.shape[2:], category.dtype)
        arrays = self.arrays[layer]
        for name, value in parts.items():
            if value is not None:
                if arrays[name].shape[1:] != value.shape[1:]:  # e.g. top-k: every group sees the same samples
                    raise RuntimeError(f"layer {layer!r}: unit groups disagree on the shape of {name}")
                arrays[name][start:stop] = value
        arrays["category"][:, start:stop] = counts.category

    def result(self, layer: str) -> LayerMeasurement:
        a = self.arrays.pop(layer)
        return LayerMeasurement(LayerLevels(a["sorted"], a["position"], a["candidates"], a["fixed"], a["raw_quantiles"]),
                                st.LevelCountState(a["category"], a["label"]), (a["topk_values"], a["topk_indices"]))


def _same_labels(a: st.LabelState, b: st.LabelState) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _check_groups(groups, units: Mapping[str, int]) -> dict[str, int]:
    """{layer: U} of the layers the groups cover; ValueError unless every group holds at most one
    slice per layer, every slice lies inside its layer, and together they cover every unit."""
    covered: dict[str, np.ndarray] = {}
    for group in groups:
        names = [layer for layer, _, _ in group]
        if len(set(names)) != len(names):
            raise ValueError(f"a unit group holds two slices of one layer: {group}")
        for layer, start, stop in group:
            if layer not in units or not 0 <= start < stop <= units[layer]:
                raise ValueError(f"unit slice {layer!r} {start}:{stop} lies outside the source's layers "
                                 f"{dict(units)}")
            covered.setdefault(layer, np.zeros(units[layer], bool))[start:stop] = True
    for layer, mask in covered.items():
        if not mask.all():
            raise ValueError(f"the unit groups leave units {np.flatnonzero(~mask)[:10].tolist()} of layer {layer!r} out")
    return {layer: int(units[layer]) for layer in covered}


def measure_units(source, groups, *, threshold: str, quantile: float, search_iqr: bool,
                  fixed_levels: Mapping[str, np.ndarray] | None, topk: int, label_category: np.ndarray,
                  num_categories: int, settings: PassSettings, strips: gallery.StripsRequest | None = None,
                  keep_progress: bool = False) -> tuple[st.LabelState, dict[str, LayerMeasurement]]:
    """Quantile passes, levels and count pass of every unit group in turn, assembled per layer.

    source: a dissection source; groups: unit groups ((layer, start, stop), ...) covering every
    unit of the layers to measure (:class:`~.memory.MemoryPlan`; slices may overlap, e.g. a
    layer's last slice shifted back to the size of the others, so that they share one compiled
    program). Each group reads the data again; every statistic of a unit depends on that unit's
    activations alone, so the assembled results are bit-identical to one group of every unit. With one group the checkpoints live in
    ``settings.directory`` itself, with several in one subdirectory per group (named by its
    slices), so a rerun resumes group by group. RuntimeError when two groups saw different
    segmentations (a source must return the same sample for the same number). strips (its
    ``topk`` ignored): the count passes also keep each layer's :class:`~.gallery.Gallery`. The
    last group's count pass saves no final checkpoint unless ``keep_progress`` (the caller writes
    its results next); a rerun after a stop there continues from its last periodic save.
    """
    totals = _check_groups(groups, {layer: shape[2] for layer, shape in source.feature_shapes.items()})
    assembly = _Assembly(totals)
    label_state = None
    pictures: dict[str, list] = {}
    for number, group in enumerate(groups):
        slices = {layer: (int(start), int(stop)) for layer, start, stop in group}
        group_settings = settings
        if len(groups) > 1 and settings.directory:
            name = "units-" + hashlib.sha256(repr(sorted(slices.items())).encode()).hexdigest()[:12]
            group_settings = dataclasses.replace(settings, directory=settings.checkpoint_dir(name))
        plans = quantile_plans({layer: stop - start for layer, (start, stop) in slices.items()}, threshold, quantile,
                               search_iqr)
        best = quantile_passes(source.features_only(), plans, source.seg_size, topk, group_settings, slices)
        levels = {layer: count_levels(plans[layer], threshold,
                                      None if fixed_levels is None else fixed_levels[layer][start:stop], search_iqr)
                  for layer, (start, stop) in slices.items()}
        del plans  # the planners' lookup tables are no longer needed
        request = None if strips is None else dataclasses.replace(
            strips, topk={layer: best[layer][1] for layer in slices})
        labels, counts, galleries = count_pass(source, levels, label_category, num_categories, source.seg_size,
                                               group_settings, slices, request,
                                               final_checkpoint=keep_progress or number < len(groups) - 1)
        for layer, (start, stop) in slices.items():
            if layer in galleries:
                pictures.setdefault(layer, []).append((start, stop, galleries.pop(layer)))
        if label_state is None:
            label_state = labels
        elif not _same_labels(label_state, labels):
            raise RuntimeError("two passes over the data saw different segmentations; the source must return "
                               "the same sample for the same sample number")
        for layer, (start, stop) in slices.items():
            assembly.put(layer, start, stop, levels[layer], counts.pop(layer), best.pop(layer))
        del levels, counts, best
    measured = {layer: assembly.result(layer) for layer in totals}
    for layer, parts in pictures.items():
        measured[layer].gallery = gallery.assemble(parts, totals[layer])
    return label_state, measured


__all__ = ["LayerMeasurement", "measure_units"]
