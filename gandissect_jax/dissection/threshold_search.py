"""The paper's per-unit threshold: argmax of the information-quality ratio over candidate levels.

For every unit u the candidates are the F = 100 levels ``level[u, f] = quantile_u(1 - frac[f])``
of the unit's upsampled activations, ``frac = logspace(-3, 0, 100)`` (float32, as the
reference). For every label l and candidate f, with exact counts over the data set:

    truth   = label_counts[l] / pixels                       (fraction of all pixels)
    preds   = category_above[cat(l), u, f] / total_counts[cat(l)]
    isects  = label_above[l, u, f] / label_pixels[l] * truth
    unions  = truth + preds - isects
    table   = [[isects, preds - isects], [truth - isects, 1 - unions]], clamped to [0, 1]
    iqr     = MI(table) / JE(table)            (NaN -> 0)

``category_above`` counts active pixels in the images where the category is present,
``label_above`` active pixels carrying the label (any channel), ``label_pixels`` the pixels
carrying the label. These are the exact-count versions of the reference's ``collect_iqr``
fractions, which it reads off randomized conditional-quantile sketches. The reference's guards
are kept: MI = 0 at the last candidate (frac = 1) and for labels with ``truth < 1e-3``; IQR = 0
where ``isects + table[1, 1] <= 0.8`` or where the level is <= 0; the first maximal candidate
wins. Row 0 (no label) is not a concept and always scores 0.

The same pass also finds, per label and unit, the candidate with the largest IoU: the reference's
``--maxiou`` fields (``collect_maxiou``, netdissect/dissection.py), ``iou = isects / unions``
over the same candidates and fractions, with none of the IQR guards (NaN -> 0; row 0 scores 0;
the first maximal candidate wins; the last candidate, every pixel active, may win). They are
reported beside a unit's label, never used to label it (nor in the reference). The reference
reads them off its sketches; we count exactly.

The search runs in float32 under jit, vmapped over labels (chunked to bound memory). The
winning candidates' numbers are then recomputed from the exact counts in float64 on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .scoring import mi_and_je

#: The reference's candidate fractions: torch.logspace(-3, 0, 100) in float32.
IQR_FRACTIONS = np.logspace(-3.0, 0.0, 100).astype(np.float32)
MIN_LABEL_FRACTION = 1e-3
MIN_AGREEMENT = 0.8


class IQRSearchResult(NamedTuple):
    """Per label and unit (L, U): the best candidate by IQR and by IoU, and the scores there.

    By IQR (the paper's threshold): max_iqr float64, candidate int64 (index into the fractions),
    level float32, quantile float32 (the candidate's target top fraction, as the reference's
    max_iqr_quantile), fraction float64 (the exact fraction of all pixels above the level), iou
    float64 (isects / unions at the candidate, NaN -> 0), agreement float64 (isects + table[1, 1]).

    By IoU (the reference's ``collect_maxiou``; reported, never used to label units): max_iou
    float64 (isects / unions at the candidate with the largest IoU, unguarded, NaN -> 0, row 0 =
    0), max_iou_candidate int64, max_iou_level float32, max_iou_quantile float32 (the candidate's
    target top fraction; as the reference's max_iou, max_iou_level, max_iou_quantile),
    max_iou_fraction float64 (the exact fraction of all pixels above max_iou_level, as
    ``fraction`` for the IQR winner).
    """

    max_iqr: np.ndarray
    candidate: np.ndarray
    level: np.ndarray
    quantile: np.ndarray
    fraction: np.ndarray
    iou: np.ndarray
    agreement: np.ndarray
    max_iou: np.ndarray
    max_iou_candidate: np.ndarray
    max_iou_level: np.ndarray
    max_iou_quantile: np.ndarray
    max_iou_fraction: np.ndarray


def _table(xp, isects, preds, truth):
    unions = truth + preds - isects
    table = [[isects, preds - isects], [truth - isects, 1 - unions]]
    return [[xp.clip(t, 0, 1) for t in row] for row in table], unions


@jax.jit
def _search_chunk(isects, preds, truth, enabled, is_label, level_ok):
    """float32 isects/preds (Lc, U, F), truth (Lc,), enabled (Lc,) (IQR scored), is_label (Lc,)
    (IoU scored: not row 0, not padding), level_ok (U, F) -> int32 best by IQR, best by IoU (Lc, U)."""

    def one_label(isects, preds, truth, enabled, is_label):
        table, unions = _table(jnp, isects, preds, truth)
        iou = isects / unions
        iou = jnp.where(jnp.isnan(iou) | ~is_label, 0.0, iou)
        mi, je = mi_and_je(table, jnp)
        mi = mi.at[:, -1].set(0.0)
        mi = jnp.where(enabled, mi, 0.0)
        iqr = mi / je
        iqr = jnp.where(jnp.isnan(iqr), 0.0, iqr)
        agreement = isects + table[1][1]
        iqr = jnp.where((agreement > MIN_AGREEMENT) & level_ok, iqr, 0.0)
        return jnp.argmax(iqr, axis=-1).astype(jnp.int32), jnp.argmax(iou, axis=-1).astype(jnp.int32)

    return jax.vmap(one_label)(isects, preds, truth, enabled, is_label)


def iqr_table_float64(isect_count, pred_count, label_count, label_pixel_count, total_count, pixels):
    """The float64 fractions of the search's 2x2 table from integer counts (any broadcastable shapes).

    Returns (isects, preds, truth) as float64 arrays.
    """
    truth = np.asarray(label_count, np.float64) / float(pixels)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.asarray(isect_count, np.float64) / np.asarray(label_pixel_count, np.float64)
        preds = np.asarray(pred_count, np.float64) / np.asarray(total_count, np.float64)
    cond = np.where(np.isfinite(cond), cond, 0.0)
    preds = np.where(np.isfinite(preds), preds, 0.0)
    return cond * truth, preds, truth


def search_iqr_thresholds(label_above, category_above, label_counts, label_pixels, total_counts,
                          label_category, pixels: int, levels: np.ndarray, fractions=IQR_FRACTIONS,
                          label_chunk: int = 64) -> IQRSearchResult:
    """Find, per label and unit, the candidate level with the largest IQR and the one with the largest IoU.

    label_above: int (U, L, F) or a callable ``index -> int (U, len(index), F)`` of an int64
      array of label numbers, the number of pixels above each candidate level carrying each label
      (any channel); only labels with pixels are searched (a label without scores 0 everywhere);
    category_above: int (C + 1, U, F) active pixels per category over the images where it is
      present (last row: all images); label_counts: int (L,) label entries over all channels;
      label_pixels: int (L,) pixels carrying each label; total_counts: int (C + 1,) pixels of the
      images where each category is present; label_category: (L,) category index per label;
      pixels: N * H * W; levels: float32 (U, F) candidate levels, in the order of ``fractions``.
    Returns an :class:`IQRSearchResult` (source: the reference's ``collect_iqr`` and
    ``collect_maxiou``, netdissect/dissection.py).
    """
    label_counts = np.asarray(label_counts, np.int64)
    label_pixels = np.asarray(label_pixels, np.int64)
    total_counts = np.asarray(total_counts, np.int64)
    label_category = np.asarray(label_category, np.int64)
    category_above = np.asarray(category_above, np.int64)
    levels = np.asarray(levels, np.float32)
    fractions = np.asarray(fractions, np.float32)
    num_labels = label_counts.shape[0]
    num_units, num_candidates = levels.shape
    get_above = label_above if callable(label_above) else (lambda index: np.asarray(label_above)[:, index])
    truth_all = label_counts / float(pixels)
    is_label_all = np.arange(num_labels) > 0
    enabled_all = (truth_all >= MIN_LABEL_FRACTION) & is_label_all
    level_ok = jnp.asarray(levels > 0)

    candidate = np.zeros((num_labels, num_units), np.int64)
    isect_at = np.zeros((num_labels, num_units), np.int64)
    iou_candidate = np.zeros((num_labels, num_units), np.int64)
    iou_isect_at = np.zeros((num_labels, num_units), np.int64)
    # A label with no pixel (truth 0) scores IQR 0 and IoU 0 at every candidate, so its best
    # candidates are the first ones (0): only labels present in the data are searched.
    searched = np.flatnonzero(is_label_all & (label_counts > 0))
    for start in range(0, len(searched), label_chunk):
        index = searched[start:start + label_chunk]
        above = np.moveaxis(np.asarray(get_above(index), np.int64), 1, 0)  # (Lc, U, F)
        cats = label_category[index]
        isects, preds, truth = iqr_table_float64(
            above, category_above[cats], label_counts[index, None, None],
            label_pixels[index, None, None], total_counts[cats][:, None, None], pixels)
        pad = label_chunk - len(index)

        def padded(x, fill=0):
            return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)]) if pad else x

        best, best_iou = _search_chunk(jnp.asarray(padded(isects.astype(np.float32))),
                                       jnp.asarray(padded(preds.astype(np.float32))),
                                       jnp.asarray(padded(truth[:, 0, 0].astype(np.float32))),
                                       jnp.asarray(padded(enabled_all[index], False)),
                                       jnp.asarray(padded(is_label_all[index], False)), level_ok)
        best = np.asarray(best, np.int64)[: len(index)]
        best_iou = np.asarray(best_iou, np.int64)[: len(index)]
        candidate[index] = best
        isect_at[index] = np.take_along_axis(above, best[:, :, None], 2)[:, :, 0]
        iou_candidate[index] = best_iou
        iou_isect_at[index] = np.take_along_axis(above, best_iou[:, :, None], 2)[:, :, 0]
    absent = np.setdiff1d(np.arange(num_labels), searched)  # best candidate 0: its counts above it
    for start in range(0, len(absent), label_chunk):  # in chunks, as the search: bounded memory
        index = absent[start:start + label_chunk]
        above = np.asarray(get_above(index), np.int64)[:, :, 0].T  # (Lc, U)
        isect_at[index] = above
        iou_isect_at[index] = above

    units = np.arange(num_units)[None, :]
    pred_at = category_above[label_category[:, None], units, candidate]
    isects, preds, truth = iqr_table_float64(
        isect_at, pred_at, label_counts[:, None], label_pixels[:, None],
        total_counts[label_category][:, None], pixels)
    with np.errstate(divide="ignore", invalid="ignore"):
        table, unions = _table(np, isects, preds, truth)
        mi, je = mi_and_je(table, np)
        mi = np.where(candidate == num_candidates - 1, 0.0, mi)
        mi = np.where(enabled_all[:, None], mi, 0.0)
        iqr = mi / je
        iou = isects / unions
    iqr = np.where(np.isnan(iqr), 0.0, iqr)
    agreement = isects + table[1][1]
    level = levels[units, candidate]
    iqr = np.where((agreement > MIN_AGREEMENT) & (level > 0), iqr, 0.0)
    iou = np.where(np.isnan(iou), 0.0, iou)
    fraction = category_above[-1][units, candidate] / float(pixels)
    max_iou = _iou_at(iou_isect_at, category_above[label_category[:, None], units, iou_candidate], label_counts,
                      label_pixels, total_counts[label_category], pixels)
    max_iou[~is_label_all] = 0.0
    return IQRSearchResult(iqr, candidate, level.astype(np.float32), fractions[candidate], fraction, iou, agreement,
                           max_iou, iou_candidate, levels[units, iou_candidate].astype(np.float32),
                           fractions[iou_candidate], category_above[-1][units, iou_candidate] / float(pixels))


def _iou_at(isect_count, pred_count, label_count, label_pixel_count, total_count, pixels) -> np.ndarray:
    """float64 (L, U) isects / unions of the search's table from integer counts (L, U), (L,), NaN -> 0."""
    isects, preds, truth = iqr_table_float64(isect_count, pred_count, label_count[:, None],
                                             label_pixel_count[:, None], total_count[:, None], pixels)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = isects / (truth + preds - isects)
    return np.where(np.isnan(iou), 0.0, iou)


def best_label_by_iqr(max_iqr: np.ndarray) -> np.ndarray:
    """Per unit, the label whose best candidate has the largest IQR (first on ties, so label 0
    when every IQR is 0): int64 (U,) from float64 (L, U)."""
    return np.argmax(np.asarray(max_iqr), axis=0)


def best_label_by_max_iou(max_iou: np.ndarray) -> np.ndarray:
    """Per unit, the label with the largest ``max_iou`` (row 0 and non-finite values count as 0;
    first on ties, so label 0 when every max_iou is 0): int64 (U,) from float64 (L, U). The
    reference's ``maxiou_label`` (netdissect/dissection.py), a field reported beside the unit's
    label (dissect.json's ``max_iou_label``), never its label."""
    scores = np.array(max_iou, np.float64, copy=True)
    scores[0] = 0.0
    return np.argmax(np.where(np.isfinite(scores), scores, 0.0), axis=0).astype(np.int64)
