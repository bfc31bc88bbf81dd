"""IoU and information-quality ratio (IQR) from exact counts: the MI / joint-entropy formulas live here.

Definitions follow the reference's ``score_tally_stats``. For label l of category c = cat(l) and
unit u, with ``pred = category_activation_counts[c, u]`` (active pixels summed over the images
where c is present), ``truth = label_counts[l]`` (entries of l over all segmentation channels),
``ic = intersection_counts[l, u]`` (active pixels carrying l in any channel) and
``total = total_counts[c]`` (H * W times the number of images where c is present):

    union = pred + truth - ic                   (category-restricted union)
    iou   = ic / (union + 1e-20)
    table = [[ic, pred - ic], [truth - ic, total - union]] / total
    iqr   = MI(table) / JE(table), NaN -> 0     (MI, JE clamped at 0; NaN terms dropped)

A category is present in an image when any of its labels is, label 0 included (so label 0's
category, usually ``object``, is present in every image with an unlabelled entry).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mi_and_je(table, xp=np):
    """Mutual information and joint entropy of 2x2 joint tables, the one implementation of both.

    table: ``table[j][k]`` arrays of any one shape (a numpy (2, 2, ...) array or nested lists);
    xp: ``numpy`` (float64 on the host) or ``jax.numpy`` (under jit). NaN terms (0 log 0) count as
    0; both are clamped at 0. Returns (mi, je) of the entries' shape.
    """
    mi = 0.0
    je = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(2):
            for k in range(2):
                joint = table[j][k]
                independent = (table[j][0] + table[j][1]) * (table[0][k] + table[1][k])
                term = joint * xp.log(joint / independent)
                mi = mi + xp.where(xp.isnan(term), 0.0, term)
                term = joint * xp.log(joint)
                je = je + xp.where(xp.isnan(term), 0.0, term)
    return xp.maximum(mi, 0.0), xp.maximum(-je, 0.0)


def mutual_information(table: np.ndarray) -> np.ndarray:
    """MI of 2x2 joint tables (2, 2, ...) float64 -> (...), NaN terms counted as 0, clamped >= 0."""
    return mi_and_je(table)[0]


def joint_entropy(table: np.ndarray) -> np.ndarray:
    """Joint entropy of 2x2 tables (2, 2, ...) float64 -> (...), NaN terms counted as 0, clamped >= 0."""
    return mi_and_je(table)[1]


def information_quality_ratio(table: np.ndarray) -> np.ndarray:
    """MI / JE of 2x2 tables, with 0/0 (NaN) set to 0."""
    mi, je = mi_and_je(table)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = mi / je
    return np.where(np.isnan(ratio), 0.0, ratio)


def score_counts(label_category: Sequence[int], total_counts: np.ndarray, label_counts: np.ndarray,
                 category_activation_counts: np.ndarray, intersection_counts: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """IoU and IQR per label and unit.

    label_category: (L,) category index per label; total_counts: (C,) int; label_counts: (L,) int;
    category_activation_counts: (C, U) int; intersection_counts: (L, U) int.
    Returns (iou, iqr), both float64 (L, U). Row 0 (no label) is meaningless; ignore it.
    """
    label_category = np.asarray(label_category, np.int64)
    pred = np.asarray(category_activation_counts, np.int64)[label_category]  # (L, U)
    total = np.asarray(total_counts, np.int64)[label_category][:, None]
    truth = np.asarray(label_counts, np.int64)[:, None]
    ic = np.asarray(intersection_counts, np.int64)
    union = pred + truth - ic
    iou = ic.astype(np.float64) / (union.astype(np.float64) + 1e-20)
    table = np.stack([np.stack([ic, pred - ic]), np.stack([truth - ic, total - union])]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        table = table / total.astype(np.float64)
    return iou, information_quality_ratio(table)


def best_label_by_iou(iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the label with the largest IoU (first on ties; label 0 wins only if all are 0).

    iou: float64 (L, U). Returns (labels int64 (U,), scores float64 (U,)).
    """
    scores = np.array(iou, np.float64, copy=True)
    scores[0] = 0.0
    labels = np.argmax(scores, axis=0)
    return labels, scores[labels, np.arange(scores.shape[1])]
