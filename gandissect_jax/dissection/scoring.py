"""IoU and information-quality ratio (IQR) from exact counts, and whether an IoU beats chance (FDR-controlled).

The MI / joint-entropy formulas live here, and the chance IoU, the per-image binomial test and the
Benjamini-Hochberg step of the label rules (:func:`significance`).

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


# ----------------------------------------------------------------------------- chance and significance

#: The false-discovery rate at which a unit's IoU with a concept counts as beating chance.
FDR = 0.05


def _fractions(label_category, total_counts, label_counts, category_activation_counts):
    """(q, p, total) float64: the unit's active fraction q (C -> (L, U)) and the label's pixel
    fraction p ((L, 1)) of the pixels of the images where the label's category is present."""
    label_category = np.asarray(label_category, np.int64)
    total = np.asarray(total_counts, np.float64)[label_category][:, None]  # (L, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.asarray(category_activation_counts, np.float64)[label_category] / total  # (L, U)
        p = np.asarray(label_counts, np.float64)[:, None] / total
    return np.where(np.isfinite(q), q, 0.0), np.where(np.isfinite(p), p, 0.0), total


def chance_iou(label_category: Sequence[int], total_counts: np.ndarray, label_counts: np.ndarray,
               category_activation_counts: np.ndarray) -> np.ndarray:
    """The IoU a unit would get with each label by chance: ``q p / (q + p - q p)``. float64 (L, U).

    The fractions are those of the IoU itself (:func:`score_counts`), over the pixels of the images
    where the label's category c is present: ``q = category_activation_counts[c, u] /
    total_counts[c]`` (the unit's active fraction) and ``p = label_counts[l] / total_counts[c]``
    (the label's fraction). If the active region were independent of the label, the intersection
    would be ``q p`` of those pixels and the union ``q + p - q p``. 0 where q or p is 0; row 0
    (no label) is 0.
    """
    q, p, _ = _fractions(label_category, total_counts, label_counts, category_activation_counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        chance = q * p / (q + p - q * p)
    chance = np.where(np.isfinite(chance), chance, 0.0)
    chance[0] = 0.0
    return chance


def overlap_p_values(label_category: Sequence[int], total_counts: np.ndarray, label_counts: np.ndarray,
                     category_activation_counts: np.ndarray, intersection_counts: np.ndarray,
                     category_images: np.ndarray) -> np.ndarray:
    """One-sided p-values of "the unit's IoU with the label beats chance", per label and unit.

    Under the null hypothesis the unit's active region is independent of the label (pooled over
    pixels of the images where the label's category c is present), so the intersection's share
    of those pixels has mean ``mu = q p`` (fractions as :func:`chance_iou`). The IoU exceeds the
    chance IoU exactly when the intersection exceeds ``q p``, so the test is on the intersection.

    Effective sample size: one observation per image. With ``n = category_images[c]`` images and
    ``k = n * intersection_counts[l, u] / total_counts[c]`` (the intersection measured in whole
    images), the p-value is the binomial tail ``P(Binomial(n, mu) >= k)``, evaluated for real k as
    the regularized incomplete beta function ``I_mu(k, n - k + 1)`` (exact for integer k). Why
    binomial with n = images: images are independent samples, and pixels within an image may be
    correlated in any way. Each image's overlap fraction lies in [0, 1] with mean mu, so its
    variance is at most mu (1 - mu) (Bhatia-Davis), reached when, within every image, the overlap
    is all or nothing; then the sum over images is exactly Binomial(n, mu). Any pixel-level
    independence within images only shrinks the variance, so the test is conservative: it never
    treats correlated pixels as independent evidence (a pixel-level hypergeometric test would, and
    flags noise units). The price is power on few images. q and p are estimated from the same
    data (plug-in).

    category_images: (C,) int, images where each category is present. Returns float64 (L, U) in
    [0, 1]; 1 for row 0 (no label), for labels that never occur and where k = 0.
    """
    from scipy.special import betainc

    q, p, total = _fractions(label_category, total_counts, label_counts, category_activation_counts)
    n = np.asarray(category_images, np.float64)[np.asarray(label_category, np.int64)][:, None]  # (L, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = n * np.asarray(intersection_counts, np.float64) / total
    k = np.where(np.isfinite(k), np.clip(k, 0.0, n), 0.0)
    mu = np.clip(q * p, 0.0, 1.0)
    testable = (k > 0) & (n > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        tail = betainc(np.where(testable, k, 1.0), np.where(testable, n - k + 1.0, 1.0), mu)
    values = np.where(testable & np.isfinite(tail), np.clip(tail, 0.0, 1.0), 1.0)
    values[0] = 1.0
    return values


def benjamini_hochberg(p_values: np.ndarray, family: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) over the entries where ``family`` is True.

    p_values: float (L, U); family: bool (L, U), the hypotheses tested together (the others get
    1). Uses ``scipy.stats.false_discovery_control(method='bh')``. A hypothesis is rejected at
    false-discovery rate alpha when its q-value is <= alpha. BH controls the FDR at alpha for
    independent or positively dependent tests.
    """
    from scipy.stats import false_discovery_control

    p_values = np.asarray(p_values, np.float64)
    family = np.asarray(family, bool)
    adjusted = np.ones_like(p_values)
    if family.any():
        adjusted[family] = false_discovery_control(p_values[family], method="bh")
    return adjusted


def significance(label_category: Sequence[int], total_counts: np.ndarray, label_counts: np.ndarray,
                 category_activation_counts: np.ndarray, intersection_counts: np.ndarray,
                 category_images: np.ndarray, fdr: float = FDR):
    """Chance IoU, p-values, BH q-values and significance for every label and unit of one layer.

    The family is every unit x every label > 0 that occurs in the segmentations (one family per
    layer). Returns (chance_iou, p_value, q_value float64 (L, U), significant bool (L, U)),
    significant = q_value <= fdr.
    """
    chance = chance_iou(label_category, total_counts, label_counts, category_activation_counts)
    p_value = overlap_p_values(label_category, total_counts, label_counts, category_activation_counts,
                               intersection_counts, category_images)
    family = np.zeros(p_value.shape, bool)
    family[1:] = (np.asarray(label_counts)[1:] > 0)[:, None]
    q_value = benjamini_hochberg(p_value, family)
    return chance, p_value, q_value, family & (q_value <= fdr)
