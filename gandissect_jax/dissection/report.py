"""Dissection outputs: ``dissect.json`` (schema 2), per-layer records, bar graphs and the HTML report.

Layout of an output directory (the image strips are written by :mod:`.strips`)::

    dissect.json                 all layers (schema in gandissect_jax/dissection/README.md)
    dissect.html                 self-contained report (no network, data embedded)
    comparison.svg               interpretable units per category, layer by layer
    <layer>/scores.npz           the full matrices (LayerDissection.save_npz)
    <layer>/dissect.json         the layer's record alone
    <layer>/bargraph.svg         units per concept
    <layer>/image/<unit>-top.jpg top-k samples with the thresholded region outlined

Everything is written to a temporary name and renamed, so readers never see half a file.
"""

from __future__ import annotations

import json
import math
import os
import string
from typing import Mapping, Sequence

from .results import LayerDissection
from .resume import atomic_file
from .rankings import augment_document
from .report_page import readable, render_html
from .schema import SCHEMA
from .threshold_search import best_label_by_max_iou

CATEGORY_COLORS = ("#4B4CBF", "#55B05B", "#D4A024", "#D92E2B", "#50BDAC", "#AB6BC6", "#F0883B", "#81C679")


OUTPUT_FILES = ("dissect.json", "dissect.html", "comparison.svg")
_KEPT = frozenset(string.ascii_letters + string.digits + "_-.")


def safe_dir_name(name: str) -> str:
    """The directory of a layer inside the output directory, whatever the layer's name.

    ASCII letters, digits, '_', '-' and '.' are kept; every other character ('/', '\\', ':',
    spaces, '%', non-ASCII ...) becomes its percent-encoded UTF-8 bytes ('a/b' -> 'a%2Fb'), and so
    does a leading '.'. The result is one path component that cannot be absolute, hidden or climb
    out of the output directory ('..' -> '%2E.'), and distinct names give distinct directories.
    ValueError for an empty name, a name over 200 characters (or 240 once encoded), or a name of
    the output files (dissect.json, dissect.html, comparison.svg).
    """
    name = str(name)
    if not name or len(name) > 200:
        raise ValueError(f"layer name {name!r} cannot name an output directory (it must have 1 to 200 characters)")
    encoded = "".join(c if c in _KEPT else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in name)
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if encoded.lower() in OUTPUT_FILES:
        raise ValueError(f"layer name {name!r} is reserved for an output file; rename the layer")
    if len(encoded) > 240:
        raise ValueError(f"layer name {name!r} is too long for a directory name once encoded ({len(encoded)} > 240)")
    return encoded


def _atomic_bytes(path: str, payload: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(payload)


# ----------------------------------------------------------------------------- graphs (matplotlib, SVG)


def _svg(figure) -> str:
    """A matplotlib figure as SVG text, byte-identical across runs (no date, fixed id salt, text as text)."""
    import io

    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "gandissect-jax", "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight", pad_inches=0.05)
    return buffer.getvalue()


def _category_color(category: str, categories: Sequence[str]) -> str:
    index = list(categories).index(category) if category in categories else 0
    return CATEGORY_COLORS[index % len(CATEGORY_COLORS)]


def concept_bargraph(concepts: Sequence[tuple[str, str, list[int]]], categories: Sequence[str]) -> str:
    """SVG bar graph of interpretable units per concept (as ``LayerDissection.units_per_concept``),
    bars coloured by category (with a legend when there are several); y axis from 0, integer ticks."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(max(2.6, 0.32 * len(concepts) + 1.0), 2.4))
    axes = figure.subplots()
    axes.spines[["top", "right"]].set_visible(False)
    if not concepts:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "no interpretable units", ha="center", va="center", transform=axes.transAxes)
        return _svg(figure)
    counts = [len(units) for _, _, units in concepts]
    positions = list(range(len(concepts)))
    axes.bar(positions, counts, width=0.75, color=[_category_color(c, categories) for _, c, _ in concepts])
    axes.set_xticks(positions)
    axes.set_xticklabels([readable(label) for label, _, _ in concepts], rotation=60, ha="right",
                         rotation_mode="anchor", fontsize=9)
    axes.set_xlim(-0.6, len(concepts) - 0.4)
    axes.set_ylim(0, max(counts) * 1.08)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("interpretable units", fontsize=9)
    axes.tick_params(labelsize=9)
    if len(categories) > 1:
        from matplotlib.patches import Patch

        used = [c for c in categories if any(category == c for _, category, _ in concepts)]
        axes.legend(handles=[Patch(color=_category_color(c, categories), label=c) for c in used], fontsize=8,
                    frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(figure)


def layer_comparison(layers: Sequence[tuple[str, dict[str, int], int]], categories: Sequence[str]) -> str:
    """SVG stacked bars: per layer, the share of its units that are interpretable, split by category.

    layers: (layer name, {category: interpretable units}, number of units)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    figure = Figure(figsize=(max(2.6, 0.9 * len(layers) + 1.4), 2.6))
    axes = figure.subplots()
    axes.spines[["top", "right"]].set_visible(False)
    positions = list(range(len(layers)))
    bottoms = [0.0] * len(layers)
    drawn = 0
    for category in categories:
        shares = [100.0 * counts.get(category, 0) / max(units, 1) for _, counts, units in layers]
        if not any(shares):
            continue
        axes.bar(positions, shares, width=0.6, bottom=bottoms, color=_category_color(category, categories),
                 label=category)
        bottoms = [b + h for b, h in zip(bottoms, shares)]
        drawn += 1
    for x, (_, counts, units), top in zip(positions, layers, bottoms):
        axes.annotate(f"{sum(counts.values())} of {units}", (x, top), xytext=(0, 2), textcoords="offset points",
                      ha="center", va="bottom", fontsize=8)
    axes.set_xticks(positions)
    axes.set_xticklabels([name for name, _, _ in layers], fontsize=9)
    axes.set_xlim(-0.6, len(layers) - 0.4)
    axes.set_ylim(0, 110)
    axes.set_yticks([0, 25, 50, 75, 100])
    axes.yaxis.set_major_formatter(PercentFormatter())
    axes.set_ylabel("interpretable units", fontsize=9)
    axes.tick_params(labelsize=9)
    if len(categories) > 1 and drawn:
        axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(figure)


# ----------------------------------------------------------------------------- json + html


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _concept(result: LayerDissection, label: int, unit: int) -> dict:
    """A label's scores for one unit: IoU and IQR at the unit's level, chance IoU and significance."""
    def at(array, cast=_finite):
        return None if array is None else cast(array[label, unit])

    return {"label": result.label_names[label], "labelnum": label, "category": result.label_categories[label],
            "iou": _finite(result.iou[label, unit]), "iqr": _finite(result.iqr[label, unit]),
            "chance_iou": at(result.chance_iou), "p_value": at(result.p_value), "q_value": at(result.q_value),
            "significant": at(result.significant, bool)}


def layer_record(result: LayerDissection, iou_threshold: float, has_images: bool) -> dict:
    """The JSON record of one layer (see the README for the schema)."""
    dirname = safe_dir_name(result.layer)
    interpretable = result.interpretable(iou_threshold)
    concepts = result.units_per_concept(iou_threshold)
    ranking = result.concept_ranking()
    per_category = {c: 0 for c in result.categories}
    for _, category, units in concepts:
        per_category[category] = per_category.get(category, 0) + len(units)
    max_iou_label = None if result.max_iou is None else best_label_by_max_iou(result.max_iou)
    units = []
    for u in range(result.num_units):
        label = int(result.unit_label[u])
        best = _concept(result, label, u)
        record = {
            "unit": u,
            "label": result.label_names[label],
            "labelnum": label,
            "category": result.label_categories[label],
            "iou": _finite(result.unit_iou[u]),
            "iqr": _finite(result.unit_iqr[u]),
            "chance_iou": best["chance_iou"],
            "p_value": best["p_value"],
            "q_value": best["q_value"],
            "significant": best["significant"],
            "level": _finite(result.levels[u]),
            "activation_fraction": _finite(result.activation_fraction[u]),
            "interpretable": bool(interpretable[u]),
            "second": None,
            "top": [{"sample": int(i), "value": _finite(v)}
                    for i, v in zip(result.topk_indices[u], result.topk_values[u])],
        }
        others = [int(l) for l in ranking[:, u] if l != label and l != 0]
        if others:
            record["second"] = _concept(result, others[0], u)
        if result.max_iqr is not None:
            record["max_iqr"] = _finite(result.max_iqr[label, u])
            record["max_iqr_quantile"] = _finite(result.max_iqr_quantile[label, u])
        if max_iou_label is not None:
            # the reference's maxiou fields (the label with the largest unguarded IoU over the IQR
            # candidates), reported beside the unit's label, never used to label it
            best_label = int(max_iou_label[u])
            record.update({
                "max_iou": _finite(result.max_iou[best_label, u]),
                "max_iou_label": result.label_names[best_label], "max_iou_labelnum": best_label,
                "max_iou_category": result.label_categories[best_label],
                "max_iou_level": _finite(result.max_iou_level[best_label, u]),
                "max_iou_quantile": _finite(result.max_iou_quantile[best_label, u]),
                "max_iou_fraction": (None if result.max_iou_fraction is None  # scores.npz written before it
                                     else _finite(result.max_iou_fraction[best_label, u]))})
        if has_images:
            record["image"] = f"{dirname}/image/{u}-top.jpg"
        units.append(record)
    return {
        "layer": result.layer,
        "dirname": dirname,
        "num_units": result.num_units,
        "num_samples": result.num_samples,
        "threshold": result.threshold,
        "quantile": result.quantile,
        "label_rule": result.label_rule,
        "fdr": result.fdr,
        "interpretable": int(interpretable.sum()),
        "category_counts": per_category,
        "concepts": [{"label": label, "category": category, "units": units_of}
                     for label, category, units_of in concepts],
        "bargraph": f"{dirname}/bargraph.svg",
        "units": units,
    }


def default_title(settings: dict | None) -> str:
    """'Dissection of <model>' from the run's settings (its source), else 'Dissection'."""
    source = (settings or {}).get("source") or {}
    if source.get("model"):
        return f"Dissection of {source['model']}"
    if source.get("kind") == "arrays":
        return "Dissection of precomputed features"
    return "Dissection"


def write_report(outdir: str, results: Mapping[str, LayerDissection], *, iou_threshold: float = 0.05,
                 title: str | None = None, settings: dict | None = None,
                 has_images: bool | Mapping[str, bool] = True) -> dict:
    """Write dissect.json, per-layer dissect.json and bargraph.svg, comparison.svg and dissect.html.

    title: the report's title (default: :func:`default_title`); settings: the run's identity
    (recorded, and shown in the report's header); has_images: whether the layers have image
    strips (``<layer>/image/<unit>-top.jpg``), for all or per layer {layer: bool} (a layer not
    in it has none). Returns the dissect.json document."""
    os.makedirs(outdir, exist_ok=True)
    records = []
    first = next(iter(results.values()))
    title = title or default_title(settings)
    for layer, result in results.items():
        images = bool(has_images.get(layer, False)) if isinstance(has_images, Mapping) else bool(has_images)
        record = layer_record(result, iou_threshold, images)
        layer_dir = os.path.join(outdir, record["dirname"])
        os.makedirs(layer_dir, exist_ok=True)
        bargraph = concept_bargraph([(c["label"], c["category"], c["units"]) for c in record["concepts"]],
                                    result.categories)
        _atomic_bytes(os.path.join(layer_dir, "bargraph.svg"), bargraph.encode())
        prefix = record["dirname"] + "/"
        local_units = [dict(u, image=u["image"][len(prefix):]) if "image" in u else u for u in record["units"]]
        local = dict(record, dirname=".", bargraph="bargraph.svg", units=local_units)
        single = {"schema": SCHEMA, "title": title, "iou_threshold": iou_threshold, "layers": [local]}
        _atomic_bytes(os.path.join(layer_dir, "dissect.json"), json.dumps(single, indent=1).encode())
        records.append((record, bargraph))
    comparison = layer_comparison([(r["layer"], r["category_counts"], r["num_units"]) for r, _ in records],
                                  first.categories)
    _atomic_bytes(os.path.join(outdir, "comparison.svg"), comparison.encode())
    document = {
        "schema": SCHEMA,
        "title": title,
        "iou_threshold": iou_threshold,
        "categories": first.categories,
        "labels": [[n, c] for n, c in zip(first.label_names, first.label_categories)],
        "settings": settings or {},
        "layers": [r for r, _ in records],
    }
    # per-label unit rankings (IoU; ACE once fitted) and links to the intervention pages
    document = augment_document(document, outdir, results, iou_threshold)
    _atomic_bytes(os.path.join(outdir, "dissect.json"), json.dumps(document, indent=1).encode())
    page = render_html(document, {r["layer"]: svg for r, svg in records}, comparison)
    _atomic_bytes(os.path.join(outdir, "dissect.html"), page.encode())
    return document
