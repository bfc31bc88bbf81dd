"""Per-label unit rankings (by IoU, and by ACE once fitted) and their place in ``dissect.json``.

A **ranking** orders the units of a layer for one concept, most relevant first. Two metrics:

- ``iou``: the dissection's IoU of unit u with the label -- the paper's IoU_{u,c} at the IQR-optimal
  threshold (``max_iqr_iou``) when the IQR search ran, else the IoU at the unit's own level
  (``iou``); from the layer's ``scores.npz``;
- ``ace``: the fitted ACE weight alpha_u (:func:`gandissect_jax.ace.optimize_ace`), ties broken by
  IoU (:func:`gandissect_jax.ace.ace_ranking`), written by ``gandissect-jax ace``.

In JSON a ranking is ``{"name": "tree-iou", "label": "tree", "labels": [6], "metric": "iou",
"units": [top units, best first], "score": [per-unit score, unit order]}`` (ACE rankings also
carry ``"objective"``, ``"experiment"``, the directory of the fit, and ``"dissection"``, the
:func:`dissection_digest` of the dissection it was fitted on), the reference's
``rankings`` entries (``netdissect.aceoptimize.add_ace_ranking_to_dissection``) with the units
listed and the score's sign as measured (larger is better). ``<outdir>/intervention/
rankings.json`` (``{"layers": {layer: [ranking...]}}``) holds the ACE rankings;
:func:`augment_document` adds both kinds to every layer of a ``dissect.json`` document (and the
link to the intervention pages), and :func:`refresh_report` rewrites ``dissect.json`` and
``dissect.html`` of an output directory with them.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .report_page import render_html
from .results import LayerDissection
from .resume import atomic_file, atomic_write_json, outdir_lock
from .schema import read_dissect_json
from .. import untrusted_json

__all__ = ["iou_scores", "iou_ranking", "ranking_record", "layer_iou_rankings", "read_rankings",
           "add_ranking", "dissection_digest", "augment_document", "refresh_report", "units_by",
           "RANKINGS_FILE", "INDEX_FILE"]

RANKINGS_FILE = os.path.join("intervention", "rankings.json")
INDEX_FILE = os.path.join("intervention", "index.json")
TOP_UNITS = 64  # units listed per ranking ("units"); "score" holds every unit


def iou_scores(result: Any, labels: Sequence[int]) -> np.ndarray:
    """float64 (U,): each unit's IoU with a concept (a union of label numbers: the largest over
    them) from a :class:`~gandissect_jax.dissection.LayerDissection` -- ``max_iqr_iou`` (the
    paper's IoU_{u,c}) when the IQR search ran, else ``iou``."""
    matrix = result.max_iqr_iou if result.max_iqr_iou is not None else result.iou
    rows = np.asarray(matrix, np.float64)[np.asarray(list(labels), np.int64)]
    return np.nan_to_num(rows.max(0), nan=0.0)


def units_by(score: Any) -> np.ndarray:
    """int64 (U,): units by score, largest first, ties to the lower unit number."""
    score = np.asarray(score, np.float64)
    return np.lexsort((np.arange(len(score)), -score)).astype(np.int64)


def iou_ranking(result: Any, labels: Sequence[int]) -> np.ndarray:
    """int64 (U,) units by :func:`iou_scores`, best first."""
    return units_by(iou_scores(result, labels))


def _round(values: Any) -> list:
    return [round(float(v), 6) if np.isfinite(v) else None for v in np.asarray(values, np.float64)]


def ranking_record(name: str, label: str, labels: Sequence[int], metric: str, order: Any, score: Any,
                   **extra: Any) -> dict:
    """One ranking as JSON (see the module docstring); ``order`` is truncated to 64 units."""
    return {"name": name, "label": label, "labels": [int(c) for c in labels], "metric": metric,
            "units": [int(u) for u in np.asarray(order)[:TOP_UNITS]], "score": _round(score), **extra}


def layer_iou_rankings(result: Any, iou_threshold: float = 0.05) -> list[dict]:
    """IoU rankings of a layer for every label some unit reaches ``iou_threshold`` with (label 0
    excluded), by label number."""
    matrix = result.max_iqr_iou if result.max_iqr_iou is not None else result.iou
    matrix = np.nan_to_num(np.asarray(matrix, np.float64))
    records = []
    for c in range(1, matrix.shape[0]):
        if matrix[c].max(initial=0.0) >= iou_threshold:
            name = result.label_names[c]
            records.append(ranking_record(f"{name}-iou", name, [c], "iou", units_by(matrix[c]), matrix[c],
                                          score_name="max_iqr_iou" if result.max_iqr_iou is not None else "iou"))
    return records


def dissection_digest(settings: Mapping[str, Any] | None) -> str | None:
    """sha256 (hex) of a dissection's run identity (the ``settings`` of its ``dissect.json``), or
    None without one. An ACE ranking records the digest of the dissection it was fitted on."""
    if settings is None:
        return None
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _current_settings(outdir: str) -> Mapping[str, Any] | None:
    path = os.path.join(outdir, "dissect.json")
    if not os.path.exists(path):
        return None

    return read_dissect_json(path).get("settings")


def read_rankings(outdir: str, settings: Mapping[str, Any] | None = None, *, all_dissections: bool = False) -> dict:
    """``{"layers": {layer: [ranking...]}}`` from ``<outdir>/intervention/rankings.json`` (empty if
    absent), holding only the rankings fitted on the dissection whose identity is ``settings``
    (default: that of ``<outdir>/dissect.json``): a ranking of an earlier dissection of the
    directory (before a ``--restart``, or one that finished while the dissection was redone) is
    never returned as this one's. ``all_dissections=True`` returns every record. ValueError naming
    the file when it is not such a document."""
    path = os.path.join(outdir, RANKINGS_FILE)
    if not os.path.exists(path):
        return {"layers": {}}
    try:
        with open(path) as handle:
            document = untrusted_json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); remove it to rebuild it from the experiments") from err
    if not isinstance(document, dict) or not isinstance(document.get("layers"), dict):
        raise ValueError(f"{path} is not a rankings file (expected {{\"layers\": {{...}}}})")
    if all_dissections:
        return document
    current = dissection_digest(settings if settings is not None else _current_settings(outdir))
    return {**document, "layers": {layer: [r for r in records if isinstance(r, Mapping)
                                            and r.get("dissection") == current]
                                   if isinstance(records, list) else records
                                   for layer, records in document["layers"].items()}}


def add_ranking(outdir: str, layer: str, record: Mapping[str, Any]) -> dict:
    """Put ``record`` into ``<outdir>/intervention/rankings.json`` under ``layer``, replacing a
    ranking of the same name (written atomically; the caller holds the intervention lock)."""

    document = read_rankings(outdir, all_dissections=True)
    kept = [r for r in document["layers"].get(layer, []) if r.get("name") != record["name"]]
    document["layers"][layer] = kept + [dict(record)]
    os.makedirs(os.path.join(outdir, "intervention"), exist_ok=True)
    atomic_write_json(os.path.join(outdir, RANKINGS_FILE), document)
    return document


def _read_index(outdir: str) -> dict | None:
    path = os.path.join(outdir, INDEX_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            index = untrusted_json.load(handle)
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def augment_document(document: dict, outdir: str | None, results: Mapping[str, Any] | None = None,
                     iou_threshold: float | None = None) -> dict:
    """``document`` (a schema-2 ``dissect.json``) with per-label rankings added to every layer and,
    when ``<outdir>/intervention/index.json`` exists, ``"intervention": {"index": ..., "experiments":
    [...]}``. The report writer calls this before writing (hook; see the module docstring).

    Args:
      document: the document (not modified; a copy is returned).
      outdir: the output directory (ACE rankings and the intervention index are read from it).
      results: {layer: LayerDissection}; default: read from ``<outdir>/<dirname>/scores.npz``.
      iou_threshold: labels listed by IoU (default the document's ``iou_threshold``).
    """
    document = json.loads(json.dumps(document))
    threshold = float(document.get("iou_threshold", 0.05) if iou_threshold is None else iou_threshold)
    ace = read_rankings(outdir, document.get("settings"))["layers"] if outdir else {}
    for record in document.get("layers", []):
        layer = record["layer"]
        result = (results or {}).get(layer)
        if result is None and outdir:
            path = os.path.join(outdir, record.get("dirname", layer), "scores.npz")
            if os.path.exists(path):

                result = LayerDissection.load_npz(path)
        rankings = layer_iou_rankings(result, threshold) if result is not None else []
        rankings += [dict(r) for r in ace.get(layer, [])]
        record["rankings"] = rankings
    index = _read_index(outdir) if outdir else None
    if index is not None:
        document["intervention"] = {"index": "intervention/index.html",
                                    "experiments": index.get("experiments", [])}
    return document


def refresh_report(outdir: str) -> bool:
    """Rewrite ``<outdir>/dissect.json`` and ``dissect.html`` with the rankings and intervention
    links (:func:`augment_document`), keeping everything else. Returns False (and changes nothing)
    when the directory holds no dissection report, or a dissection is writing into it right now
    (its own report will include them)."""

    path = os.path.join(outdir, "dissect.json")
    if not os.path.exists(path):
        return False
    try:
        lock = outdir_lock(outdir)
        lock.__enter__()
    except ValueError:
        return False
    try:
        with open(path) as handle:
            document = untrusted_json.load(handle)
        document = augment_document(document, outdir)
        bargraphs = {}
        for record in document.get("layers", []):
            svg = os.path.join(outdir, record.get("dirname", record["layer"]), "bargraph.svg")
            bargraphs[record["layer"]] = open(svg).read() if os.path.exists(svg) else ""
        comparison_path = os.path.join(outdir, "comparison.svg")
        comparison = open(comparison_path).read() if os.path.exists(comparison_path) else ""
        with atomic_file(path, "w") as handle:
            json.dump(document, handle, indent=1)
        with atomic_file(os.path.join(outdir, "dissect.html"), "w") as handle:
            handle.write(render_html(document, bargraphs, comparison))
    finally:
        lock.__exit__(None, None, None)
    return True
