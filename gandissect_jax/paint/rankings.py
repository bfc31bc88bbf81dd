"""Per-concept unit rankings and insertion values of a dissected layer, read from a dissection output directory.

GANPaint (Bau et al., ICLR 2019, Sec. 4.3 and the reference's ``client/ts/ganpaint.ts``) edits
the top units of a concept: a stroke of concept c turns on (add) or off (remove) the first k
units of c's ranking inside the stroke. Two rankings exist:

- **ACE** (the paper's Sec. 3.2, causal): units ordered by their fitted ACE weight. Written into
  ``dissect.json`` by ``gandissect-jax ace`` in the reference's format (its ``aceoptimize``
  merges the same record): the layer record gains ``"rankings"``, a list of
  ``{"name": "tree-ace", "concept": "tree", "metric": "ace", "score": [U floats]}`` where a
  *lower* score ranks first (the reference stores ``-alpha``). An explicit order
  ``"units": [u0, u1, ...]`` (best first) is read too when present.
- **IoU** (the dissection's own): units ordered by their IoU with c -- the paper's IoU_{u,c} at
  the IQR-optimal threshold (``max_iqr_iou`` of ``<layer>/scores.npz``) when the IQR search ran,
  else the IoU at the unit's own level (``iou``); the reference's ``"<concept>-iou"`` ranking. An
  IoU record in ``dissect.json``'s ``"rankings"`` is used if present.

Ranking records are read in both forms in use: the reference's (``"score"``: lower ranks first,
e.g. ``-alpha``) and gandissect-jax's (``gandissect_jax.dissection.rankings``: ``{"name": "tree-ace",
"label": "tree", "labels": [6], "metric": "ace", "units": [best first, top 64], "score": [per
unit, larger is better, null where not finite]}``). Listed ``"units"`` come first, in their
order; the other units follow by ``"score"`` in the direction the listed units agree with (lower
first without a listing), ACE ties by the concept's IoU (as ``gandissect_jax.ace.ace_ranking``).
The concept is the record's ``"label"`` (or ``"concept"``, or the name before ``-<metric>``);
rankings of a union of labels (``"tree+grass"``) are not offered as paint concepts.

Where records are read: the layer's ``"rankings"`` in ``dissect.json`` (the reference's place, and
where ``gandissect_jax.dissection.rankings.augment_document`` puts them), then
``<outdir>/intervention/rankings.json``, which ``gandissect-jax ace`` writes and which is newer
when ``dissect.json`` could not be refreshed. Without fitted rankings every concept is ranked by
IoU from ``<layer>/scores.npz``, the same ranking that module writes as ``"<label>-iou"``.

ACE is taken when a fitted ranking exists for (layer, concept), IoU otherwise; of several fitted
rankings of one concept (objectives, budgets), the last read (the latest fit) is used. Ties go to
the lower unit number.

The **insertion value** of a unit (what "add" sets it to) is a high quantile of the unit's raw
activations: the reference's GANPaint client asks the server for the levels at q = 0.99
(``GanterAPI.levels(project, layer, 0.99)``). Here it is read from the dissection's exact raw
quantiles (``raw_quantile_q`` / ``raw_quantiles`` in ``scores.npz``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "LayerRankings",
    "INSERTION_QUANTILE",
    "intervention_rankings",
    "layer_rankings",
    "load_rankings",
    "read_dissection",
]

INSERTION_QUANTILE = 0.99  # the reference GANPaint client's levels(..., q = 0.99)


@dataclasses.dataclass(frozen=True)
class LayerRankings:
    """What painting needs from the dissection of one layer. U units, L labels.

    Attributes:
      layer: the layer's name (``"layer4"``).
      shape: ``(H, W, U)`` of one sample's representation at the layer (from ``scores.npz``'s
        feature shape when known, else ``None``; the generator's split gives it otherwise).
      label_names: the segmenter's L label names (label 0 is ``"-"``).
      concepts: the concepts offered for painting, best first: those with an ACE ranking, then
        those with interpretable units (the dissection's ``concepts`` list).
      order: ``{concept: int64 (U,)}`` every unit, best first, for every label but ``"-"``.
      metric: ``{concept: "ace" | "iou"}`` the ranking each order comes from.
      insertion_values: float32 (U,) the value "add" gives each unit (its q=0.99 activation).
      unit_label: int64 (U,) each unit's concept (label number) from the dissection.
      unit_iou: float64 (U,) the IoU of that concept at the unit's level.
      iou: float64 (L, U) the IoU the IoU ranking orders by: ``max_iqr_iou`` (IoU_{u,c} at the
        IQR-optimal threshold for c) when the IQR search ran, else ``iou``.
      interpretable: bool (U,).
      insertion_quantile: the quantile the insertion values were read at.
    """

    layer: str
    label_names: tuple[str, ...]
    concepts: tuple[str, ...]
    order: Mapping[str, np.ndarray]
    metric: Mapping[str, str]
    insertion_values: np.ndarray
    unit_label: np.ndarray
    unit_iou: np.ndarray
    iou: np.ndarray
    interpretable: np.ndarray
    insertion_quantile: float = INSERTION_QUANTILE
    shape: tuple[int, int, int] | None = None

    @property
    def num_units(self) -> int:
        """U."""
        return int(self.insertion_values.shape[0])

    def top_units(self, concept: str, k: int) -> np.ndarray:
        """int64 (k,): the ``k`` best units of ``concept``. ValueError for an unknown concept or k."""
        order = self.order.get(concept)
        if order is None:
            raise ValueError(f"unknown concept {concept!r} in {self.layer}{_hint(concept, self.order)}")
        if not 1 <= int(k) <= self.num_units:
            raise ValueError(f"top={k} outside 1..{self.num_units} (units of {self.layer})")
        return order[: int(k)]

    def unit_label_name(self, unit: int) -> str:
        """The dissection's concept name of ``unit``."""
        return self.label_names[int(self.unit_label[unit])]


def _hint(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), [str(n) for n in names], n=5)
    return f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(names))}"


def _order_by_score(score: np.ndarray) -> np.ndarray:
    """int64 (U,): units by ascending score (lower first), ties to the lower unit."""
    return np.lexsort((np.arange(score.shape[0]), score)).astype(np.int64)


def _ranking_order(record: Mapping[str, Any], num_units: int, where: str,
                   tiebreak: np.ndarray | None = None) -> np.ndarray:
    """The unit order of one ``rankings`` record: listed ``units`` first, then by ``score``, equal
    scores by ``tiebreak`` (larger first; float (U,)) when given, then by unit number."""
    score = record.get("score")
    values = None
    if score is not None:
        if not isinstance(score, list) or len(score) != num_units:
            raise ValueError(f"{where}: 'score' must list one number per unit ({num_units})")
        try:
            values = np.asarray([np.nan if v is None else v for v in score], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'score' must hold numbers") from None
    units = record.get("units")
    if units is None:
        if values is None:
            raise ValueError(f"{where}: a ranking needs 'units' (best first) or 'score' (one per unit)")
        key = np.where(np.isfinite(values), values, np.inf)  # lower first, NaN last
        if tiebreak is None:
            return _order_by_score(key)
        return np.lexsort((np.arange(num_units), -tiebreak, key)).astype(np.int64)
    if not isinstance(units, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in units):
        raise ValueError(f"{where}: 'units' must be a list of unit numbers")
    listed = np.asarray(units, dtype=np.int64).reshape(-1)
    if listed.size and (listed.min() < 0 or listed.max() >= num_units or len(set(units)) != listed.size):
        raise ValueError(f"{where}: 'units' must be distinct unit numbers in 0..{num_units - 1}")
    rest = np.setdiff1d(np.arange(num_units), listed)
    if values is not None and rest.size:
        larger_first = listed.size < 2 or not values[listed[0]] < values[listed[-1]]
        key = -values if larger_first else values
        key = np.where(np.isfinite(key), key, np.inf)[rest]
        rest = rest[np.lexsort((rest, key) if tiebreak is None else (rest, -tiebreak[rest], key))]
    return np.concatenate([listed, rest]).astype(np.int64)


def _ranking_concept(record: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(concept, metric) of a ``rankings`` record: its ``label`` (or ``concept``) and ``metric``,
    or parsed from a ``"<concept>-<metric>"`` name as the reference writes it."""
    metric = record.get("metric")
    concept = record.get("label", record.get("concept"))
    name = record.get("name")
    if isinstance(name, str) and "-" in name:
        head, _, tail = name.rpartition("-")
        concept = concept if isinstance(concept, str) else head
        metric = metric if isinstance(metric, str) else tail
    return (concept if isinstance(concept, str) else None, metric if isinstance(metric, str) else None)


def layer_rankings(scores, layer_record: Mapping[str, Any] | None = None, *, where: str = "dissection",
                   insertion_quantile: float = INSERTION_QUANTILE,
                   shape: Sequence[int] | None = None,
                   more_rankings: Sequence[tuple[Sequence[Any], str]] = ()) -> LayerRankings:
    """Rankings of one layer from its :class:`~gandissect_jax.dissection.LayerDissection` (``scores``)
    and, optionally, its ``dissect.json`` layer record (for ACE rankings and the concept list).

    more_rankings: further ``(records, where)`` read after the layer record's ``"rankings"``
    (``<outdir>/intervention/rankings.json``'s records of this layer; later records win).

    Raises:
      ValueError naming ``where`` (or the further records' ``where``) when the raw quantiles
      needed for insertion values are missing, a ranking record is malformed, or the quantile was
      not measured.
    """
    label_names = tuple(str(n) for n in scores.label_names)
    num_units = int(scores.levels.shape[0])
    matrix = scores.max_iqr_iou if scores.max_iqr_iou is not None else scores.iou
    iou = np.nan_to_num(np.asarray(matrix, np.float64), nan=0.0)
    order: dict[str, np.ndarray] = {}
    metric: dict[str, str] = {}
    for number, name in enumerate(label_names):
        if number == 0:
            continue
        order[name] = _order_by_score(-iou[number])
        metric[name] = "iou"
    ace_concepts: list[str] = []
    sources = [((layer_record or {}).get("rankings") or [], where), *more_rankings]
    preference = {"iou": 1, "ace": 2}
    for records, source in sources:
        if not isinstance(records, list):
            raise ValueError(f"{source}: 'rankings' must be a list")
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise ValueError(f"{source}: rankings[{index}] is not an object")
            concept, kind = _ranking_concept(record)
            if concept not in order or kind not in preference:
                continue  # other rankings (per-unit, "max iou", unions, other metrics) are not paint rankings
            if preference[kind] < preference[metric[concept]]:
                continue
            tiebreak = iou[label_names.index(concept)] if kind == "ace" else None
            order[concept] = _ranking_order(record, num_units, f"{source}: rankings[{index}] ({concept}-{kind})",
                                            tiebreak)
            metric[concept] = kind
            if kind == "ace" and concept not in ace_concepts:
                ace_concepts.append(concept)
    listed = [c.get("label") for c in (layer_record or {}).get("concepts") or [] if isinstance(c, Mapping)]
    if not listed:  # no dissect.json record: concepts with interpretable units, by their count
        interpretable_labels = scores.unit_label[scores.interpretable()]
        counts = np.bincount(interpretable_labels, minlength=len(label_names))
        listed = [label_names[i] for i in np.argsort(-counts, kind="stable") if counts[i] > 0 and i > 0]
    concepts = tuple(dict.fromkeys([*ace_concepts, *[c for c in listed if c in order]]))
    if scores.raw_quantiles is None or scores.raw_quantile_q is None:
        raise ValueError(f"{where}: scores.npz has no raw_quantiles; it is needed for the insertion values "
                         "(dissect again with this version of gandissect-jax)")
    qs = np.asarray(scores.raw_quantile_q, np.float64)
    match = np.flatnonzero(np.isclose(qs, insertion_quantile, rtol=0, atol=1e-9))
    if match.size == 0:
        raise ValueError(f"{where}: no raw quantile at q={insertion_quantile} (measured: {qs.tolist()})")
    values = np.asarray(scores.raw_quantiles, np.float32)[:, int(match[0])]
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where}: non-finite insertion values (raw quantiles)")
    return LayerRankings(
        layer=str(scores.layer), label_names=label_names, concepts=concepts, order=order, metric=metric,
        insertion_values=values, unit_label=np.asarray(scores.unit_label, np.int64),
        unit_iou=np.asarray(scores.unit_iou, np.float64), iou=iou,
        interpretable=np.asarray(scores.interpretable(), bool), insertion_quantile=float(insertion_quantile),
        shape=None if shape is None else tuple(int(s) for s in shape))


def intervention_rankings(outdir: str | os.PathLike) -> tuple[dict[str, list], str]:
    """``({layer: [ranking record...]}, path)`` of ``<outdir>/intervention/rankings.json`` as
    :func:`gandissect_jax.dissection.rankings.read_rankings` reads it (the ACE fits of
    ``gandissect-jax ace``); ``({}, path)`` when there is no such file (then paint ranks by IoU,
    from the dissection alone).

    Raises:
      ValueError naming the file when it is not a rankings document.
    """
    from gandissect_jax.dissection import rankings as written

    path = os.path.join(os.fspath(outdir), written.RANKINGS_FILE)
    layers = written.read_rankings(os.fspath(outdir))["layers"]
    for layer, records in layers.items():
        if not isinstance(records, list):
            raise ValueError(f"{path}: layer {layer!r} must hold a list of rankings")
    return layers, path


def read_dissection(outdir: str | os.PathLike) -> dict:
    """The ``dissect.json`` of a dissection output directory, as schema 2.

    Raises:
      FileNotFoundError naming the file; ValueError when it is not a dissect.json.
    """
    from gandissect_jax.dissection.schema import read_dissect_json

    path = os.path.join(os.fspath(outdir), "dissect.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no dissection in {outdir}: {path} does not exist "
                                "(run `gandissect-jax dissect --outdir ...` first)")
    return read_dissect_json(path)


def load_rankings(outdir: str | os.PathLike, layer: str | None = None,
                  *, insertion_quantile: float = INSERTION_QUANTILE) -> dict[str, LayerRankings] | LayerRankings:
    """Read the paint rankings of a dissection output directory.

    Args:
      outdir: a directory written by ``gandissect-jax dissect`` (``dissect.json`` and
        ``<layer>/scores.npz``; the layer directory is the record's ``dirname``), and its
        ``intervention/rankings.json`` (ACE fits) when there is one.
      layer: one layer's name, or None for every dissected layer.
      insertion_quantile: the raw-activation quantile inserted by "add" (0.99, the reference's).

    Returns:
      One :class:`LayerRankings` for ``layer``, or ``{layer: LayerRankings}`` in dissection order.

    Raises:
      FileNotFoundError / ValueError naming the file, layer or key that is missing or malformed.
    """
    from gandissect_jax.dissection.report import safe_dir_name
    from gandissect_jax.dissection.results import LayerDissection

    document = read_dissection(outdir)
    records = {}
    for record in document["layers"]:
        if not isinstance(record, Mapping) or not isinstance(record.get("layer"), str):
            raise ValueError(f"{outdir}/dissect.json: a layer record has no 'layer' name")
        records[record["layer"]] = record
    if layer is not None and layer not in records:
        raise ValueError(f"layer {layer!r} is not in the dissection {outdir}{_hint(layer, records)}")
    written, written_path = intervention_rankings(outdir)
    result = {}
    for name, record in records.items():
        if layer is not None and name != layer:
            continue
        dirname = safe_dir_name(name)  # never a path from the file: stays inside outdir
        path = os.path.join(os.fspath(outdir), dirname, "scores.npz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist (layer {name!r} of {outdir})")
        scores = LayerDissection.load_npz(path)
        more = [(written[name], written_path)] if name in written else []
        result[name] = layer_rankings(scores, record, where=path, insertion_quantile=insertion_quantile,
                                      more_rankings=more)
    return result[layer] if layer is not None else result

