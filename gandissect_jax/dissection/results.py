"""``LayerDissection``: everything measured for one layer, how its units are labelled, and its ``scores.npz`` form."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .resume import atomic_file
from .schema import SCHEMA

#: The reference's ``iqr_threshold`` (netdissect/dissection.py ``dissect(..., iqr_threshold=0.01)``):
#: under label rule 'reference' a unit is interpretable only when the IQR of its concept at its
#: level exceeds it.
REFERENCE_IQR_THRESHOLD = 0.01


@dataclasses.dataclass
class LayerDissection:
    """Everything measured for one layer. U units, L labels, C categories, F IQR candidates.

    Counts are exact int64. ``levels`` (U,) float32 are the thresholds used: a pixel of unit u is
    active when its upsampled activation is > levels[u]. ``iou``/``iqr`` (L, U) float64 score
    every label against every unit at those levels (row 0, no label, is 0 / meaningless).
    ``unit_label`` is each unit's concept, chosen by ``label_rule`` (:meth:`concept_ranking`);
    ``unit_iou``/``unit_iqr`` are its scores at ``levels``. The ``max_iqr*`` arrays (L, U) hold the
    IQR threshold search when it ran (else None); ``max_iou`` float64, ``max_iou_level`` float32,
    ``max_iou_quantile`` float32 and ``max_iou_fraction`` float64 (L, U) the reference's maxiou
    fields: the largest IoU over the IQR search's candidate levels (unguarded: the last candidate,
    every pixel active, may win), its level, its target top fraction and the exact fraction of all
    pixels above that level (``collect_maxiou``; computed by the same search, None without it and
    in files written before they existed). They are reported beside the unit's label, never used
    to label it.

    Chance and significance (:func:`~.scoring.significance`; None in files written before they
    existed): ``category_images`` (C,) int64 images where each category is present (the test's
    sample size); ``chance_iou`` (L, U) the IoU expected if the unit's active region were
    independent of the label; ``p_value`` (L, U) the one-sided test of IoU > chance; ``q_value``
    (L, U) its Benjamini-Hochberg adjustment over the layer's units x labels; ``significant``
    (L, U) bool, ``q_value <= fdr``.

    Label rules (:meth:`concept_ranking`): 'significant' (default) ranks a unit's concepts by
    significance first, then by IQR at the unit's level (threshold rule 'iqr') or IoU (other
    rules), and a unit is interpretable when its concept is significant with IoU >= the IoU
    threshold; 'reference' is
    the reference's rule: the largest ``max_iqr`` (threshold rule 'iqr', whose search zeroes
    concepts that agree with the unit on <= 0.8 of the pixels) or the largest IoU, and a unit is
    interpretable when its IoU >= the IoU threshold. Files without a rule were labelled by the
    reference rule. (Files written with the withdrawn rule 'maxiou' load; :meth:`label_scores` and
    :meth:`interpretable` refuse them until relabelled with :func:`~.analysis.label_units`.)
    """

    layer: str
    label_names: list[str]
    label_categories: list[str]
    categories: list[str]
    label_category: np.ndarray
    threshold: str
    quantile: float | None
    num_samples: int
    levels: np.ndarray
    activation_fraction: np.ndarray
    label_counts: np.ndarray
    label_pixels: np.ndarray
    total_counts: np.ndarray
    category_activation_counts: np.ndarray
    intersection_counts: np.ndarray
    iou: np.ndarray
    iqr: np.ndarray
    unit_label: np.ndarray
    unit_iou: np.ndarray
    unit_iqr: np.ndarray
    topk_values: np.ndarray
    topk_indices: np.ndarray
    raw_quantile_q: np.ndarray | None = None
    raw_quantiles: np.ndarray | None = None
    candidate_fractions: np.ndarray | None = None
    candidate_levels: np.ndarray | None = None
    max_iqr: np.ndarray | None = None
    max_iqr_level: np.ndarray | None = None
    max_iqr_quantile: np.ndarray | None = None
    max_iqr_fraction: np.ndarray | None = None
    max_iqr_iou: np.ndarray | None = None
    max_iqr_agreement: np.ndarray | None = None
    max_iou: np.ndarray | None = None
    max_iou_level: np.ndarray | None = None
    max_iou_quantile: np.ndarray | None = None
    max_iou_fraction: np.ndarray | None = None
    category_images: np.ndarray | None = None
    chance_iou: np.ndarray | None = None
    p_value: np.ndarray | None = None
    q_value: np.ndarray | None = None
    significant: np.ndarray | None = None
    label_rule: str = "reference"
    fdr: float | None = None

    @property
    def num_units(self) -> int:
        """U."""
        return int(self.levels.shape[0])

    def _check_label_rule(self) -> None:
        """ValueError unless ``label_rule`` is 'significant' or 'reference' (as analysis.LABEL_RULES)."""
        if self.label_rule not in ("significant", "reference"):
            raise ValueError(
                f"layer {self.layer}: label rule {self.label_rule!r} is not one of 'significant' or 'reference' "
                "(the label rule 'maxiou' was withdrawn: the largest IoU over the IQR candidates is reported beside "
                "a unit's label, never used to label it); relabel with label_units(result, 'significant')")

    def label_scores(self) -> np.ndarray:
        """float64 (L, U): the score by which ``label_rule`` ranks concepts (row 0 set to 0).

        'significant': IQR at ``levels`` under threshold rule 'iqr', else IoU at ``levels``;
        'reference': ``max_iqr`` (the IQR search's guarded maximum) under 'iqr', else IoU.
        ValueError for another rule (such as 'maxiou', withdrawn, in files written with it).
        """
        self._check_label_rule()
        if self.threshold == "iqr":
            scores = self.iqr if self.label_rule == "significant" else self.max_iqr
        else:
            scores = self.iou
        if scores is None:
            raise ValueError(f"label rule {self.label_rule!r} with threshold 'iqr' needs the IQR search's max_iqr")
        scores = np.array(scores, np.float64, copy=True)
        scores[0] = 0.0
        return np.where(np.isfinite(scores), scores, 0.0)

    def concept_ranking(self) -> np.ndarray:
        """int64 (L, U): per unit, label numbers from its best concept to its worst; row 0 is its
        concept (``unit_label``).

        'significant': first the labels whose IoU beats chance significantly, then the others with
        IoU above their chance IoU, each group by :meth:`label_scores`; then label 0 (no concept:
        a unit with no concept above chance gets none); then the labels at or below chance, the
        least avoided first (by IoU - chance IoU; IQR is positive for anti-correlation too, so it
        cannot rank these). Ties go to the lower label number.
        'reference': by :meth:`label_scores`, then by label number (so label 0, no
        concept, comes first when every score is 0, as the reference's argmax).
        """
        scores = self.label_scores()
        number = np.broadcast_to(np.arange(scores.shape[0])[:, None], scores.shape)
        if self.label_rule != "significant":
            return np.lexsort((number, -scores), axis=0).astype(np.int64)
        if self.significant is None or self.chance_iou is None:
            raise ValueError("label rule 'significant' needs the significance arrays (chance_iou, p_value, ...)")
        excess = np.asarray(self.iou, np.float64) - np.asarray(self.chance_iou, np.float64)
        group = np.where(np.asarray(self.significant, bool), 0, np.where(excess > 0, 1, 3))
        group[0] = 2
        within = np.where(group < 2, scores, np.where(group == 3, excess, 0.0))
        return np.lexsort((number, -within, group), axis=0).astype(np.int64)

    def interpretable(self, iou_threshold: float = 0.05) -> np.ndarray:
        """bool (U,): units whose concept is a real label with IoU >= iou_threshold, and, under the
        'significant' label rule, whose IoU with it beats chance at the false-discovery rate.
        Under 'reference', the reference's test (``generate_report`` in netdissect/dissection.py:
        ``interp = iou_iqr > 0.01 and iou > iou_threshold``, both strict): IoU > iou_threshold and
        the IQR at the unit's level > :data:`REFERENCE_IQR_THRESHOLD`.
        ValueError for an unknown label rule (see :meth:`label_scores`)."""
        self._check_label_rule()
        if self.label_rule == "reference":
            return ((self.unit_label > 0) & (np.asarray(self.unit_iou) > iou_threshold)
                    & (np.asarray(self.unit_iqr) > REFERENCE_IQR_THRESHOLD))
        chosen = (self.unit_label > 0) & (self.unit_iou >= iou_threshold)
        if self.label_rule == "significant":
            if self.significant is None:
                raise ValueError("label rule 'significant' needs the significance arrays; use label_units")
            chosen &= np.asarray(self.significant, bool)[self.unit_label, np.arange(self.num_units)]
        return chosen

    def units_per_concept(self, iou_threshold: float = 0.05) -> list[tuple[str, str, list[int]]]:
        """(label, category, units) for every concept with an interpretable unit, ordered by
        category (as listed in ``categories``), then by number of units, then by best IoU."""
        groups: dict[int, list[int]] = {}
        for unit in np.flatnonzero(self.interpretable(iou_threshold)):
            groups.setdefault(int(self.unit_label[unit]), []).append(int(unit))
        order = sorted(groups, key=lambda label: (
            int(self.label_category[label]), -len(groups[label]),
            -max(self.unit_iou[u] for u in groups[label]), label))
        return [(self.label_names[label], self.label_categories[label], groups[label]) for label in order]

    def top_units(self, label: str, k: int = 20, score: str = "iou") -> np.ndarray:
        """int64 (k,): the k units scoring highest for concept ``label`` ("tree"), best first.

        ``score`` names an (L, U) score array of this record: "iou" or "iqr" (at ``levels``, each
        unit's own threshold), or, when the IQR search ran, "max_iqr_iou" (IoU at the threshold
        that maximizes IQR for this concept and unit: the paper's IoU_{u,c}), "max_iqr" or
        "max_iou" (the largest IoU over the candidate thresholds, unguarded, the reference's maxiou
        field; the reference's per-label maxiou rankings zero candidates with a top fraction > 0.5,
        this score does not). Ties go
        to the lower unit number. ValueError for an unknown label or score.
        """
        if label not in self.label_names:
            import difflib

            close = difflib.get_close_matches(label, self.label_names, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown concept {label!r} in the dissection of {self.layer}{hint}")
        scores = ("iou", "iqr", "max_iqr_iou", "max_iqr", "max_iou")
        if score not in scores:
            raise ValueError(f"score must be one of {scores}, not {score!r}")
        if getattr(self, score) is None:
            raise ValueError(f"score {score!r} needs the IQR threshold search (threshold='iqr' or search_iqr=True)")
        if not 1 <= k <= self.num_units:
            raise ValueError(f"k={k} outside 1..{self.num_units} (units of {self.layer})")
        values = getattr(self, score)[self.label_names.index(label)]
        return np.lexsort((np.arange(values.shape[0]), -values))[:k].astype(np.int64)

    def save_npz(self, path: str) -> None:
        """Write every array (and the label names) to ``path`` atomically (numpy .npz, no pickle),
        with a ``schema`` array (the output schema version, :mod:`.schema`)."""
        arrays: dict[str, Any] = {"schema": np.asarray(SCHEMA)}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if field.name in ("label_names", "label_categories", "categories"):
                arrays[field.name] = np.asarray(value, dtype=str)
            elif isinstance(value, (str, int, float)):
                arrays[field.name] = np.asarray(value)
            else:
                arrays[field.name] = np.asarray(value)
        with atomic_file(path) as handle:
            np.savez_compressed(handle, **arrays)

    @classmethod
    def load_npz(cls, path: str) -> "LayerDissection":
        """Read a record written by :meth:`save_npz` (schema 1 or 2). ValueError for a newer schema."""
        with np.load(path, allow_pickle=False) as data:
            schema = int(data["schema"]) if "schema" in data.files else 1
            if schema > SCHEMA:
                raise ValueError(f"{path} has schema {schema}; this gandissect-jax reads schemas 1 to {SCHEMA}")
            values = {}
            for field in dataclasses.fields(cls):
                if field.name not in data.files:
                    values[field.name] = None
                    continue
                value = data[field.name]
                if field.name in ("label_names", "label_categories", "categories"):
                    value = [str(v) for v in value]
                elif field.name in ("layer", "threshold", "label_rule"):
                    value = str(value)
                elif field.name == "num_samples":
                    value = int(value)
                elif field.name in ("quantile", "fdr"):
                    value = None if np.isnan(value) else float(value)
                values[field.name] = value
            if "label_rule" not in data.files:
                values["label_rule"] = "reference"  # written before label rules existed
        return cls(**values)
