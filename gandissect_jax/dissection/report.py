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

import html
import json
import math
import os
import re
import string
import xml.etree.ElementTree as ET
from typing import Mapping, Sequence

from .results import LayerDissection
from .resume import atomic_file
from .schema import SCHEMA

CATEGORY_COLORS = ("#4B4CBF", "#55B05B", "#D4A024", "#D92E2B", "#50BDAC", "#AB6BC6", "#F0883B", "#81C679")
CATEGORY_LIGHT = ("#B6B6F2", "#B6F2BA", "#F2E1B6", "#F2B6B6", "#A5E5DB", "#CFAAFF", "#F2CFB6", "#C0FF9B")


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


def readable(label: str) -> str:
    """A label name for display (underscores to spaces)."""
    return re.sub(r"_", " ", str(label))


def _atomic_bytes(path: str, payload: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(payload)


# ----------------------------------------------------------------------------- SVG graphs


def _svg_to_string(svg: ET.Element) -> str:
    return ET.tostring(svg, encoding="unicode")


def concept_bargraph(concepts: Sequence[tuple[str, str, list[int]]], categories: Sequence[str],
                     bar_height: int = 100, bar_width: int = 14) -> str:
    """SVG bar graph of units per concept, bars grouped and colored by category."""
    heights = [len(units) for _, _, units in concepts]
    top = max(heights, default=1)
    unit_height = bar_height / max(top, 1)
    gap = bar_width / 4
    left, label_room = 34, 110
    width = int(left + len(concepts) * (bar_width + gap) + 16)
    height = int(bar_height + label_room + 16)
    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=str(max(width, 120)), height=str(height),
                     version="1.1")
    base = bar_height + 10
    ET.SubElement(svg, "line", x1=str(left - 2), y1=str(base), x2=str(max(width, 120) - 8), y2=str(base),
                  stroke="#888")
    for value in sorted({1, (top + 1) // 2, top}):
        text = ET.SubElement(svg, "text", x=str(left - 6), y=str(base - value * unit_height + 4),
                             style="font: 10px sans-serif; text-anchor: end")
        text.text = str(value)
    x = float(left)
    category_index = {c: i for i, c in enumerate(categories)}
    for label, category, units in concepts:
        color = CATEGORY_COLORS[category_index.get(category, 0) % len(CATEGORY_COLORS)]
        h = len(units) * unit_height
        rect = ET.SubElement(svg, "rect", x=f"{x:.1f}", y=f"{base - h:.1f}", width=str(bar_width), height=f"{h:.1f}",
                             fill=color)
        ET.SubElement(rect, "title").text = f"{label} ({category}): {len(units)} units"
        text = ET.SubElement(svg, "text", x="0", y="0", style="font: 11px sans-serif; text-anchor: end",
                             transform=f"translate({x + bar_width * 0.75:.1f},{base + 8}) rotate(-60)")
        text.text = readable(label)
        x += bar_width + gap
    if not concepts:
        text = ET.SubElement(svg, "text", x=str(left), y=str(base - 20), style="font: 12px sans-serif")
        text.text = "no interpretable units"
    return _svg_to_string(svg)


def layer_comparison(layers: Sequence[tuple[str, dict[str, int], int]], categories: Sequence[str],
                     bar_height: int = 160, bar_width: int = 40) -> str:
    """SVG stacked bars: per layer, the fraction of units that are interpretable, split by category.

    layers: (layer name, {category: interpretable units}, number of units)."""
    gap = 28
    left = 44
    width = int(left + len(layers) * (bar_width + gap) + 150)
    height = bar_height + 70
    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=str(width), height=str(height), version="1.1")
    base = bar_height + 10
    for fraction in (0.0, 0.5, 1.0):
        y = base - fraction * bar_height
        ET.SubElement(svg, "line", x1=str(left - 4), y1=f"{y:.1f}", x2=str(width - 150), y2=f"{y:.1f}",
                      stroke="#ddd")
        ET.SubElement(svg, "text", x=str(left - 8), y=f"{y + 4:.1f}",
                      style="font: 10px sans-serif; text-anchor: end").text = f"{int(fraction * 100)}%"
    x = float(left)
    for name, per_category, units in layers:
        y = float(base)
        for index, category in enumerate(categories):
            count = per_category.get(category, 0)
            if not count:
                continue
            h = bar_height * count / max(units, 1)
            rect = ET.SubElement(svg, "rect", x=f"{x:.1f}", y=f"{y - h:.1f}", width=str(bar_width), height=f"{h:.1f}",
                                 fill=CATEGORY_COLORS[index % len(CATEGORY_COLORS)])
            ET.SubElement(rect, "title").text = f"{name}: {count} {category} units of {units}"
            y -= h
        total = sum(per_category.values())
        ET.SubElement(svg, "text", x=f"{x + bar_width / 2:.1f}", y=f"{y - 4:.1f}",
                      style="font: 10px sans-serif; text-anchor: middle").text = str(total)
        ET.SubElement(svg, "text", x=f"{x + bar_width / 2:.1f}", y=str(base + 16),
                      style="font: 11px sans-serif; text-anchor: middle").text = name
        x += bar_width + gap
    for index, category in enumerate(categories):
        y = 20 + index * 18
        ET.SubElement(svg, "rect", x=str(width - 140), y=str(y - 10), width="12", height="12",
                      fill=CATEGORY_COLORS[index % len(CATEGORY_COLORS)])
        ET.SubElement(svg, "text", x=str(width - 122), y=str(y), style="font: 12px sans-serif").text = category
    return _svg_to_string(svg)


# ----------------------------------------------------------------------------- json + html


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def layer_record(result: LayerDissection, iou_threshold: float, has_images: bool) -> dict:
    """The JSON record of one layer (see the README for the schema)."""
    dirname = safe_dir_name(result.layer)
    interpretable = result.interpretable(iou_threshold)
    concepts = result.units_per_concept(iou_threshold)
    per_category = {c: 0 for c in result.categories}
    for _, category, units in concepts:
        per_category[category] = per_category.get(category, 0) + len(units)
    units = []
    for u in range(result.num_units):
        label = int(result.unit_label[u])
        record = {
            "unit": u,
            "label": result.label_names[label],
            "labelnum": label,
            "category": result.label_categories[label],
            "iou": _finite(result.unit_iou[u]),
            "iqr": _finite(result.unit_iqr[u]),
            "level": _finite(result.levels[u]),
            "activation_fraction": _finite(result.activation_fraction[u]),
            "interpretable": bool(interpretable[u]),
            "top": [{"sample": int(i), "value": _finite(v)}
                    for i, v in zip(result.topk_indices[u], result.topk_values[u])],
        }
        if result.max_iqr is not None:
            record["max_iqr"] = _finite(result.max_iqr[label, u])
            record["max_iqr_quantile"] = _finite(result.max_iqr_quantile[label, u])
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
        "interpretable": int(interpretable.sum()),
        "category_counts": per_category,
        "concepts": [{"label": label, "category": category, "units": units_of}
                     for label, category, units_of in concepts],
        "bargraph": f"{dirname}/bargraph.svg",
        "units": units,
    }


def write_report(outdir: str, results: Mapping[str, LayerDissection], *, iou_threshold: float = 0.05,
                 title: str | None = None, settings: dict | None = None, has_images: bool = True) -> dict:
    """Write dissect.json, per-layer dissect.json and bargraph.svg, comparison.svg and dissect.html."""
    os.makedirs(outdir, exist_ok=True)
    records = []
    first = next(iter(results.values()))
    for layer, result in results.items():
        record = layer_record(result, iou_threshold, has_images)
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
        "title": title or "Dissection",
        "iou_threshold": iou_threshold,
        "categories": first.categories,
        "labels": [[n, c] for n, c in zip(first.label_names, first.label_categories)],
        "settings": settings or {},
        "layers": [r for r, _ in records],
    }
    # hook: per-label unit rankings and links to the intervention pages (gandissect_jax.rankings)
    from gandissect_jax.rankings import augment_document

    document = augment_document(document, outdir, results, iou_threshold)
    _atomic_bytes(os.path.join(outdir, "dissect.json"), json.dumps(document, indent=1).encode())
    page = render_html(document, {r["layer"]: svg for r, svg in records}, comparison)
    _atomic_bytes(os.path.join(outdir, "dissect.html"), page.encode())
    return document


_SCRIPT = r"""
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('dissection-data').textContent);
  var state = {layer: 0, sort: 'iou'};
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function fmt(v, d) { return (typeof v === 'number') ? v.toFixed(d) : '-'; }
  function sorted(units) {
    var copy = units.slice();
    if (state.sort === 'unit') {
      copy.sort(function (a, b) { return a.unit - b.unit; });
    } else if (state.sort === 'label') {
      copy.sort(function (a, b) {
        if (a.interpretable !== b.interpretable) { return a.interpretable ? -1 : 1; }
        if (a.label !== b.label) { return a.label < b.label ? -1 : 1; }
        return (b.iou || 0) - (a.iou || 0);
      });
    } else {
      copy.sort(function (a, b) { return (b.iou || 0) - (a.iou || 0) || a.unit - b.unit; });
    }
    return copy;
  }
  function render() {
    var layer = data.layers[state.layer];
    document.querySelectorAll('.layer-tab').forEach(function (tab, i) {
      tab.classList.toggle('active', i === state.layer);
    });
    document.querySelectorAll('.sort').forEach(function (button) {
      button.classList.toggle('active', button.getAttribute('data-sort') === state.sort);
    });
    document.querySelectorAll('.bargraph').forEach(function (graph, i) {
      graph.style.display = (i === state.layer) ? 'block' : 'none';
    });
    document.getElementById('layer-summary').textContent =
      layer.layer + ': ' + layer.interpretable + ' of ' + layer.num_units +
      ' units interpretable (IoU >= ' + data.iou_threshold + '), ' + layer.num_samples + ' samples, threshold: ' +
      layer.threshold;
    var list = document.getElementById('units');
    while (list.firstChild) { list.removeChild(list.firstChild); }
    sorted(layer.units).forEach(function (u) {
      var row = el('div', {'class': 'unit' + (u.interpretable ? ' interp' : '')});
      var head = el('div', {'class': 'unit-head'});
      head.appendChild(el('span', {'class': 'unit-num'}, 'unit ' + u.unit));
      head.appendChild(el('span', {'class': 'unit-label'}, u.label + ' (' + u.category + ')'));
      head.appendChild(el('span', {}, 'IoU ' + fmt(u.iou, 3) + ', IQR ' + fmt(u.iqr, 3) +
        ', level ' + fmt(u.level, 3) + ', top ' + fmt(100 * (u.activation_fraction || 0), 2) + '%'));
      row.appendChild(head);
      if (u.image) {
        var img = el('img', {'alt': 'unit ' + u.unit, 'loading': 'lazy'});
        img.addEventListener('error', function () { console.error('image failed to load: ' + u.image); });
        img.setAttribute('src', encodeURI(u.image));  // directory names may hold %XX
        row.appendChild(img);
      }
      list.appendChild(row);
    });
  }
  var tabs = document.getElementById('layer-tabs');
  data.layers.forEach(function (layer, i) {
    var tab = el('button', {'class': 'layer-tab'}, layer.layer + ' (' + layer.interpretable + ')');
    tab.addEventListener('click', function () { state.layer = i; render(); });
    tabs.appendChild(tab);
  });
  document.querySelectorAll('.sort').forEach(function (button) {
    button.addEventListener('click', function () { state.sort = button.getAttribute('data-sort'); render(); });
  });
  render();
  document.body.setAttribute('data-rendered', 'yes');
})();
"""

_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #222; }
h1 { font-size: 20px; margin: 0 0 8px 0; }
h2 { font-size: 16px; margin: 18px 0 6px 0; }
button { margin: 2px; padding: 4px 10px; border: 1px solid #aaa; background: #f4f4f4; cursor: pointer; }
button.active { background: #333; color: #fff; }
.unit { margin: 6px 0; padding: 4px; border-left: 4px solid #ddd; }
.unit.interp { border-left-color: #55B05B; }
.unit-head span { margin-right: 14px; }
.unit-num { font-weight: bold; }
.unit-label { color: #4B4CBF; }
.unit img { display: block; max-width: 100%; margin-top: 3px; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
"""


def _comparison_table(document: dict) -> str:
    layers = document["layers"]
    counts: dict[tuple[str, str], list[int]] = {}
    for i, layer in enumerate(layers):
        for concept in layer["concepts"]:
            key = (concept["label"], concept["category"])
            counts.setdefault(key, [0] * len(layers))[i] = len(concept["units"])
    rows = sorted(counts.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    head = "".join(f"<th>{html.escape(l['layer'])}</th>" for l in layers)
    body = "".join(
        f"<tr><td>{html.escape(readable(label))} <small>({html.escape(cat)})</small></td>"
        + "".join(f"<td>{v or ''}</td>" for v in values) + "</tr>"
        for (label, cat), values in rows[:60])
    return f"<table><tr><th>concept</th>{head}</tr>{body}</table>"


def render_html(document: dict, bargraphs: Mapping[str, str], comparison_svg: str) -> str:
    """A self-contained report page: layer tabs, sort by IoU / label / unit, bar graphs and the
    cross-layer comparison. The data is embedded, so the page works from file:// without a server."""
    from gandissect_jax.rankings import intervention_html  # hook: links to the intervention pages

    payload = json.dumps(document).replace("</", "<\\/")
    graphs = "".join(f'<div class="bargraph">{svg}</div>' for svg in bargraphs.values())
    title = html.escape(document.get("title") or "Dissection")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head>
<body>
<h1>{title}</h1>
{intervention_html(document)}
<h2>Comparison across layers</h2>
<div id="comparison">{comparison_svg}</div>
{_comparison_table(document)}
<h2>Layer</h2>
<div id="layer-tabs"></div>
<div id="layer-summary"></div>
<h2>Units per concept</h2>
{graphs}
<h2>Units</h2>
<div>sort by:
<button class="sort" data-sort="iou">IoU</button>
<button class="sort" data-sort="label">label</button>
<button class="sort" data-sort="unit">unit</button>
</div>
<div id="units"></div>
<script type="application/json" id="dissection-data">{payload}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""
