"""``score_layer``: one layer's exact counts at its levels -> its ``LayerDissection`` (pure numpy, no pass over data).

From the count pass's histograms (:class:`~.statistics.LevelCountState`) and the sorted levels
(:class:`~.passes.LayerLevels`), suffix sums give every activation and intersection count at every
level. The IQR search (:mod:`.threshold_search`) picks the paper's per-unit threshold when the rule
is 'iqr'; otherwise the fixed level is used. IoU and IQR at the chosen levels come from
:func:`~.scoring.score_counts`, the chance IoU and the significance of every IoU from
:func:`~.scoring.significance`, and each unit's concept from the label rule (:func:`label_units`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import dataclasses

from .config import LABEL_RULES
from .results import LayerDissection
from .scoring import FDR, score_counts, significance
from .statistics import LabelState, LevelCountState, suffix_counts
from .threshold_search import IQR_FRACTIONS, best_label_by_iqr, search_iqr_thresholds


def label_units(result: LayerDissection, label_rule: str, *, fdr: float | None = None) -> LayerDissection:
    """A copy of ``result`` with every unit's concept chosen by ``label_rule``; nothing else changes.

    'significant' (default): a unit's concept is, among the labels whose IoU with the unit beats
    the chance IoU significantly (Benjamini-Hochberg at false-discovery rate ``fdr`` over the
    layer's units x labels, :func:`~.scoring.significance`), the one with the largest IQR at the
    unit's level (threshold rule 'iqr') or the largest IoU (rules 'quantile', 'levels'); if none is
    significant, the best by that score among the labels with IoU above chance (shown, never
    interpretable), else label 0 (no concept). Interpretable: significant and IoU >= the IoU
    threshold. (:meth:`~.results.LayerDissection.concept_ranking` orders all concepts so.)

    'reference': the reference's rule (netdissect/dissection.py): under 'iqr' the label with the
    largest ``max_iqr``, whose search zeroes every candidate where unit and label agree on <= 0.8
    of the pixels (meant to keep positive correlations; it also hides large concepts: a unit
    active on half of a label covering 45% of the image agrees on at most 0.78 of the pixels);
    under the other rules the label with the largest IoU. Interpretable: IoU >= the IoU
    threshold. It reproduces the reference's and the paper's numbers.

    fdr: the false-discovery rate (default: the one ``result`` was tested at, else
    :data:`~.scoring.FDR`); significance is recomputed when it changes or is missing (that needs
    ``category_images``). ValueError for an unknown rule or missing arrays.
    """
    if label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {label_rule!r}")
    fdr = float(fdr if fdr is not None else (result.fdr if result.fdr is not None else FDR))
    changes: dict = {"label_rule": label_rule, "fdr": fdr}
    if result.significant is None or result.fdr != fdr:
        if result.category_images is None:
            raise ValueError(f"layer {result.layer}: no category_images to test significance with "
                             "(a file written before chance IoUs existed); dissect it again")
        chance, p_value, q_value, significant = significance(
            result.label_category, result.total_counts, result.label_counts, result.category_activation_counts,
            result.intersection_counts, result.category_images, fdr)
        changes.update(chance_iou=chance, p_value=p_value, q_value=q_value, significant=significant)
    relabelled = dataclasses.replace(result, **changes)
    label = relabelled.concept_ranking()[0]
    units = np.arange(result.num_units)
    return dataclasses.replace(relabelled, unit_label=label, unit_iou=result.iou[label, units],
                               unit_iqr=result.iqr[label, units])

def counts_above(histogram: np.ndarray, position: np.ndarray) -> np.ndarray:
    """histogram (U, L, J + 1) bucket counts, position (U,) sorted level index -> (L, U) counts of
    values above that level (buckets position + 1 .. J)."""
    out = np.zeros((histogram.shape[1], histogram.shape[0]), np.int64)
    for unit in range(histogram.shape[0]):
        out[:, unit] = histogram[unit, :, position[unit] + 1:].sum(axis=1)
    return out


def score_layer(layer: str, counts: LevelCountState, levels, labels: LabelState, topk: tuple[np.ndarray, np.ndarray], *,
                label_names: Sequence[tuple[str, str]], categories: Sequence[str], label_category: np.ndarray,
                threshold: str, quantile: float, num_samples: int, seg_size: tuple[int, int],
                raw_quantile_q: Sequence[float], label_rule: str = "significant", fdr: float = FDR) -> LayerDissection:
    """Score one layer from exact counts.

    counts: the layer's level histograms, category (C + 1, U, J + 1) and label (U, L, J + 1) int64;
    levels: its :class:`~.passes.LayerLevels` (sorted (U, J), positions, IQR candidates (U, F)
    and/or fixed levels (U,), raw quantiles); labels: label pixel counts and category presence
    (:class:`~.statistics.LabelState`); topk: (values float32 (U, k), sample numbers int64 (U, k));
    label_names: (name, category) per label; threshold: 'iqr', 'quantile' or 'levels';
    quantile: the rule's top fraction (recorded for 'quantile'); seg_size: (H, W) of the
    segmentations; raw_quantile_q: the q of ``levels.raw_quantiles``' first columns;
    label_rule, fdr: how units get their concept (:func:`label_units`).
    """
    if label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {label_rule!r}")
    num_categories = len(categories)
    pixels = num_samples * seg_size[0] * seg_size[1]
    total_counts = labels.image_counts * (seg_size[0] * seg_size[1])  # (C + 1,)
    units = counts.label.shape[0]
    columns = np.arange(units)
    category_above = suffix_counts(counts.category)  # (C + 1, U, J)
    label_hist = counts.label  # (U, L, J + 1)
    position = levels.position
    search = None
    if levels.candidates is not None:
        F = levels.candidates.shape[1]
        cand_pos = position[:, :F]  # (U, F)
        cat_at = np.take_along_axis(category_above, np.broadcast_to(cand_pos[None], (num_categories + 1,) + cand_pos.shape), 2)

        def label_above(index):
            above = suffix_counts(label_hist[:, index])  # (U, Lc, J)
            return np.take_along_axis(above, np.broadcast_to(cand_pos[:, None, :], above.shape[:2] + cand_pos.shape[1:]), 2)

        search = search_iqr_thresholds(label_above, cat_at, labels.label_counts, labels.label_pixels, total_counts,
                                       label_category, pixels, levels.candidates)
    if threshold == "iqr":  # the paper's level: the best candidate of the label with the largest max_iqr
        unit_label = best_label_by_iqr(search.max_iqr)
        final_levels = search.level[unit_label, columns]
        final_pos = position[columns, search.candidate[unit_label, columns]]
    else:
        unit_label = np.zeros(units, np.int64)  # chosen by label_units below
        final_levels = levels.fixed
        final_pos = position[:, -1]
    cc = category_above[:num_categories, columns, final_pos]  # (C, U)
    activation_fraction = category_above[-1, columns, final_pos] / float(pixels)
    intersections = counts_above(label_hist, final_pos)  # (L, U)
    iou, iqr = score_counts(label_category, total_counts[:num_categories], labels.label_counts, cc, intersections)
    values, indices = topk
    raw = levels.raw_quantiles
    result = LayerDissection(
        layer=layer, label_names=[l[0] for l in label_names], label_categories=[l[1] for l in label_names],
        categories=list(categories), label_category=label_category, threshold=threshold,
        quantile=float(quantile) if threshold == "quantile" else None, num_samples=num_samples,
        levels=np.asarray(final_levels, np.float32), activation_fraction=activation_fraction,
        label_counts=labels.label_counts, label_pixels=labels.label_pixels,
        total_counts=total_counts[:num_categories], category_activation_counts=cc,
        intersection_counts=intersections, iou=iou, iqr=iqr, unit_label=np.asarray(unit_label, np.int64),
        unit_iou=iou[unit_label, columns], unit_iqr=iqr[unit_label, columns],
        topk_values=np.asarray(values, np.float32), topk_indices=np.asarray(indices, np.int64),
        raw_quantile_q=None if raw is None else np.asarray(raw_quantile_q),
        raw_quantiles=None if raw is None else raw[:, :len(raw_quantile_q)],
        category_images=np.asarray(labels.image_counts[:num_categories], np.int64),
    )
    if search is not None:
        result.candidate_fractions = IQR_FRACTIONS.copy()
        result.candidate_levels = levels.candidates
        result.max_iqr = search.max_iqr
        result.max_iqr_level = search.level
        result.max_iqr_quantile = search.quantile
        result.max_iqr_fraction = search.fraction
        result.max_iqr_iou = search.iou
        result.max_iqr_agreement = search.agreement
        result.max_iou = search.max_iou
        result.max_iou_level = search.max_iou_level
        result.max_iou_quantile = search.max_iou_quantile
        result.max_iou_fraction = search.max_iou_fraction
    return label_units(result, label_rule, fdr=fdr)


__all__ = ["score_layer", "counts_above", "label_units", "LABEL_RULES"]
