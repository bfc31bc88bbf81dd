"""``LayerDissection``: everything measured for one layer, its labelling summary and its ``scores.npz`` form."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .resume import atomic_file
from .schema import SCHEMA


@dataclasses.dataclass
class LayerDissection:
    """Everything measured for one layer. U units, L labels, C categories, F IQR candidates.

    Counts are exact int64. ``levels`` (U,) float32 are the thresholds used: a pixel of unit u is
    active when its upsampled activation is > levels[u]. ``iou``/``iqr`` (L, U) float64 score
    every label against every unit at those levels (row 0, no label, is 0 / meaningless).
    ``unit_label`` is each unit's concept: the IQR-search winner in ``threshold='iqr'`` mode,
    otherwise the label of largest IoU; ``unit_iou``/``unit_iqr`` are its scores at ``levels``.
    The ``max_iqr*`` arrays (L, U) hold the IQR threshold search when it ran (else None).
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

    @property
    def num_units(self) -> int:
        """U."""
        return int(self.levels.shape[0])

    def interpretable(self, iou_threshold: float = 0.05) -> np.ndarray:
        """bool (U,): units whose concept is a real label with IoU >= iou_threshold."""
        return (self.unit_label > 0) & (self.unit_iou >= iou_threshold)

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
        that maximizes IQR for this concept and unit: the paper's IoU_{u,c}) or "max_iqr". Ties go
        to the lower unit number. ValueError for an unknown label or score.
        """
        if label not in self.label_names:
            import difflib

            close = difflib.get_close_matches(label, self.label_names, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown concept {label!r} in the dissection of {self.layer}{hint}")
        scores = ("iou", "iqr", "max_iqr_iou", "max_iqr")
        if score not in scores:
            raise ValueError(f"score must be one of {scores}, not {score!r}")
        if getattr(self, score) is None:
            raise ValueError(f"score {score!r} needs the IQR threshold search (threshold='iqr')")
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
                elif field.name in ("layer", "threshold"):
                    value = str(value)
                elif field.name == "num_samples":
                    value = int(value)
                elif field.name == "quantile":
                    value = None if np.isnan(value) else float(value)
                values[field.name] = value
        return cls(**values)
