"""The HTML report page of a dissection: header facts, legend, per-layer unit lists, self-contained (data embedded, no network).

:func:`render_html` turns a ``dissect.json`` document (schema 2) and its SVG graphs into one
page; :mod:`.report` writes it. The page's script renders the unit lists from the embedded JSON.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any, Mapping


def readable(label: str) -> str:
    """A label name for display (underscores to spaces)."""
    return re.sub(r"_", " ", str(label))



_SCRIPT = r"""
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('dissection-data').textContent);
  var state = {layer: 0, sort: 'iou'};
  var showCategory = data.categories.length > 1;
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function fmt(v, d) { return (typeof v === 'number') ? v.toFixed(d) : '-'; }
  function fmtq(q) {
    if (typeof q !== 'number') { return '-'; }
    return q < 0.001 ? '< 0.001' : q.toFixed(3);
  }
  function name(c) {
    if (!c || c.labelnum === 0) { return 'no concept'; }
    var text = c.label.replace(/_/g, ' ');
    return showCategory ? text + ' (' + c.category + ')' : text;
  }
  function sorted(units) {
    var copy = units.slice();
    if (state.sort === 'unit') {
      copy.sort(function (a, b) { return a.unit - b.unit; });
    } else if (state.sort === 'label') {
      copy.sort(function (a, b) {
        if (a.interpretable !== b.interpretable) { return a.interpretable ? -1 : 1; }
        if (a.label !== b.label) { return a.label < b.label ? -1 : 1; }
        return (b.iou || 0) - (a.iou || 0) || a.unit - b.unit;
      });
    } else {
      copy.sort(function (a, b) { return (b.iou || 0) - (a.iou || 0) || a.unit - b.unit; });
    }
    return copy;
  }
  function concept(c, cls) {
    var span = el('span', {'class': cls});
    span.appendChild(el('b', {}, name(c)));
    if (!c || c.labelnum === 0) { return span; }
    var text = ' IoU ' + fmt(c.iou, 3);
    if (typeof c.chance_iou === 'number') {
      text += ' (chance ' + fmt(c.chance_iou, 3) + ', q ' + fmtq(c.q_value) + ')';
    }
    span.appendChild(document.createTextNode(text));
    if (c.significant === true) {
      span.appendChild(el('span', {'class': 'sig', 'title': 'beats chance at FDR ' + data.layers[state.layer].fdr},
                          ' \u2713'));
    }
    return span;
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
    var rule = layer.label_rule === 'significant' ?
      'concept beats chance at FDR ' + layer.fdr + ' and IoU \u2265 ' + data.iou_threshold :
      'IoU \u2265 ' + data.iou_threshold + ', reference label rule';
    document.getElementById('layer-summary').textContent =
      layer.layer + ': ' + layer.interpretable + ' of ' + layer.num_units + ' units interpretable (' + rule + ')';
    var list = document.getElementById('units');
    while (list.firstChild) { list.removeChild(list.firstChild); }
    sorted(layer.units).forEach(function (u) {
      var row = el('div', {'class': 'unit' + (u.interpretable ? ' interp' : '') +
                           (state.target === u.unit ? ' target' : ''), 'id': 'unit-' + u.unit});
      var head = el('div', {'class': 'unit-head'});
      head.appendChild(el('span', {'class': 'unit-num'}, 'unit ' + u.unit));
      head.appendChild(concept(u, 'unit-label'));
      if (u.second) {
        var second = concept(u.second, 'unit-second');
        second.insertBefore(document.createTextNode(u.labelnum === 0 ? 'closest: ' : '2nd: '), second.firstChild);
        head.appendChild(second);
      }
      head.appendChild(el('span', {'class': 'unit-stats'}, 'IQR ' + fmt(u.iqr, 3) + ' \u00b7 level ' +
        fmt(u.level, 3) + ' \u00b7 top ' + fmt(100 * (u.activation_fraction || 0), 2) + '%'));
      row.appendChild(head);
      if (u.image) {
        var img = el('img', {'alt': 'unit ' + u.unit + ': top samples', 'loading': 'lazy'});
        img.addEventListener('error', function () { console.error('image failed to load: ' + u.image); });
        img.setAttribute('src', encodeURI(u.image));  // directory names may hold %XX
        row.appendChild(img);
      }
      list.appendChild(row);
    });
  }
  var tabs = document.getElementById('layer-tabs');
  data.layers.forEach(function (layer, i) {
    var tab = el('button', {'class': 'layer-tab'}, layer.layer + ' (' + layer.interpretable + ' of ' +
                 layer.num_units + ')');
    tab.addEventListener('click', function () { state.layer = i; render(); });
    tabs.appendChild(tab);
  });
  document.querySelectorAll('.sort').forEach(function (button) {
    button.addEventListener('click', function () { state.sort = button.getAttribute('data-sort'); render(); });
  });
  // a link such as dissect.html#layer=layer4&unit=91 opens that layer and marks that unit
  var link = new URLSearchParams(window.location.hash.slice(1));
  data.layers.forEach(function (layer, i) { if (layer.layer === link.get('layer')) { state.layer = i; } });
  if (link.get('unit') !== null && /^[0-9]+$/.test(link.get('unit'))) { state.target = Number(link.get('unit')); }
  render();
  if (state.target !== undefined) {
    var target = document.getElementById('unit-' + state.target);
    if (target) { target.scrollIntoView(); }
  }
  document.body.setAttribute('data-rendered', 'yes');
})();
"""

_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #222; max-width: 1300px; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
h2 { font-size: 16px; margin: 18px 0 6px 0; }
.facts { margin: 0 0 10px 0; color: #444; font-size: 14px; }
.facts span { margin-right: 16px; white-space: nowrap; }
.legend { background: #f7f7f4; border: 1px solid #ddd; padding: 6px 12px; font-size: 13px; max-width: 1050px; }
.legend summary { font-weight: bold; cursor: pointer; }
.legend dl { display: grid; grid-template-columns: 9.5em 1fr; gap: 3px 12px; margin: 6px 0; }
.legend dt { font-weight: bold; }
.legend dd { margin: 0; }
.outline { display: inline-block; width: 18px; height: 10px; border: 2px solid rgb(255, 220, 0); background: #777;
  vertical-align: middle; }
button { margin: 2px; padding: 4px 10px; border: 1px solid #aaa; background: #f4f4f4; cursor: pointer; }
button.active { background: #333; color: #fff; }
.unit { margin: 6px 0; padding: 4px 6px; border-left: 5px solid #ddd; }
.unit.interp { border-left-color: #55B05B; }
.unit.target { background: #fff8d0; }
.unit-head > span { margin-right: 18px; }
.unit-num { font-weight: bold; }
.unit-label b { color: #2f3fa8; }
.unit-second { color: #666; }
.unit-stats { color: #555; }
.sig { color: #2e7d32; font-weight: bold; }
.unit img { display: block; max-width: 100%; margin-top: 3px; }
.bargraph img, #comparison img { max-width: 100%; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
"""

THRESHOLD_NAMES = {"iqr": "IQR (the paper's)", "quantile": "top quantile", "levels": "given levels"}


def _facts(document: dict) -> list[tuple[str, str]]:
    """(name, value) pairs naming what was dissected and how, for the report's header."""
    settings = document.get("settings") or {}
    source = settings.get("source") or {}
    layers = document.get("layers") or [{}]
    first = layers[0]
    facts = []
    if source.get("model"):
        facts.append(("model", str(source["model"])))
    elif source.get("kind") == "arrays":
        facts.append(("features", "precomputed arrays"))
    facts.append(("layers", ", ".join(str(l.get("layer")) for l in layers)))
    samples = f"{first.get('num_samples', 0):,}"
    if source.get("kind") == "generator" and "seed" in source:
        samples += f" (z seed {source['seed']})"
    facts.append(("samples", samples))
    labels = [n for n, _ in document.get("labels", [])[1:]]
    segmenter = str(source["segmenter"]) if source.get("segmenter") else "given segmentations"
    facts.append(("segmenter", f"{segmenter}, {len(labels)} concepts"))
    threshold = THRESHOLD_NAMES.get(first.get("threshold"), str(first.get("threshold")))
    if first.get("threshold") == "quantile" and first.get("quantile") is not None:
        threshold += f" {100 * first['quantile']:g}%"
    facts.append(("threshold rule", threshold))
    if first.get("label_rule") == "significant":
        facts.append(("label rule",
                      f"beats chance (FDR {first.get('fdr')}), IoU \u2265 {document.get('iou_threshold')}"))
    else:
        facts.append(("label rule", f"reference (IoU \u2265 {document.get('iou_threshold')})"))
    return facts


def _legend(document: dict) -> str:
    first = (document.get("layers") or [{}])[0]
    fdr = first.get("fdr") or 0.05
    iou_threshold = document.get("iou_threshold")
    threshold = first.get("threshold")
    if threshold == "iqr":
        level = ("chosen per unit, as in the paper, among 100 candidates (the unit's top 0.1% ... 100% of "
                 "pixels) to maximise the IQR of its best concept")
    elif threshold == "quantile":
        level = "the unit's top quantile of activations"
    else:
        level = "given"
    if first.get("label_rule") == "significant":
        measure = "IQR" if threshold == "iqr" else "IoU"
        naming = (f"among the concepts whose IoU beats chance significantly (\u2713), the one with the "
                  f"largest {measure} at the unit's level (with none significant, the best by {measure} among "
                  f"those above chance, without \u2713; with none above chance, no concept). "
                  f"<b>Interpretable</b> (green bar at the left): the concept is significant and its IoU "
                  f"\u2265 {iou_threshold}. Large concepts (sky, grass) are never hidden. <b>2nd</b>: the next "
                  f"concept by the same rule (significant ones first, then those above chance, then the one "
                  f"least below chance; <b>closest</b> when the unit has no concept).")
    else:
        naming = ("by the reference's rule: " + (
            "the concept with the largest IQR at its own best level, counting only levels where unit and "
            "concept agree on more than 0.8 of the pixels (this hides large concepts such as sky or grass)"
            if threshold == "iqr" else "the concept with the largest IoU")
            + f". <b>Interpretable</b> (green bar at the left): IoU \u2265 {iou_threshold}. <b>2nd</b>: the "
            f"next concept by the same rule.")
    items = [
        ("unit", "one channel of the layer's output (a feature map)."),
        ("level", "the unit's threshold: a pixel is <i>active</i> when the unit's activation, upsampled "
                  f"bilinearly to the segmentation's size, exceeds its level; the level is {level}."),
        ("top %", "the share of all pixels where the unit is active."),
        ("IoU", "intersection over union of the unit's active pixels and the concept's pixels, over the "
                "images where the concept's category occurs (1 = the same region, 0 = disjoint)."),
        ("chance", "the IoU expected if the active region were independent of the concept: "
                   "q&thinsp;p&thinsp;/&thinsp;(q + p &minus; q&thinsp;p), q the unit's and p the concept's share "
                   "of those pixels. A unit active on half of every image gets IoU p&thinsp;/&thinsp;(1 + p) by "
                   "chance alone: 0.29 with a concept covering 40% of the image."),
        ("q, \u2713", f"significance of IoU &gt; chance: one-sided binomial test with one observation per "
                      f"image (pixels of an image may be correlated), Benjamini-Hochberg adjusted (q) over all "
                      f"units &times; concepts of the layer; \u2713 = q \u2264 {fdr} (false-discovery rate)."),
        ("IQR", "information quality ratio: mutual information / joint entropy of the unit's and the "
                "concept's pixel masks (0 = independent, 1 = identical); the paper's measure."),
        ("concept", "the unit's best concept, " + naming),
        ("image strip", "the unit's top samples by maximum activation; the <span class=\"outline\"></span> "
                        "yellow outline surrounds the active region, the rest is dimmed."),
    ]
    body = "".join(f"<dt>{html.escape(name)}</dt><dd>{text}</dd>" for name, text in items)
    return (f'<details class="legend" id="legend" open><summary>How to read this report</summary>'
            f"<dl>{body}</dl></details>")


def _label_text(label: str, category: str, show_category: bool) -> str:
    text = html.escape(readable(label))
    return f"{text} <small>({html.escape(category)})</small>" if show_category else text


def _comparison_table(document: dict) -> str:
    layers = document["layers"]
    show_category = len(document.get("categories", [])) > 1
    counts: dict[tuple[str, str], list[int]] = {}
    for i, layer in enumerate(layers):
        for concept in layer["concepts"]:
            key = (concept["label"], concept["category"])
            counts.setdefault(key, [0] * len(layers))[i] = len(concept["units"])
    rows = sorted(counts.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    head = "".join(f"<th>{html.escape(l['layer'])}</th>" for l in layers)
    body = "".join(
        f"<tr><td>{_label_text(label, cat, show_category)}</td>"
        + "".join(f"<td>{v or ''}</td>" for v in values) + "</tr>"
        for (label, cat), values in rows[:60])
    return f"<table><tr><th>concept (interpretable units)</th>{head}</tr>{body}</table>"


def _svg_image(svg: str, alt: str) -> str:
    """An SVG as a self-contained <img> (data URI): ids inside one graph cannot clash with another's."""
    import base64

    encoded = base64.b64encode(svg.encode()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{encoded}">'


def render_html(document: dict, bargraphs: Mapping[str, str], comparison_svg: str) -> str:
    """A self-contained report page: a header naming the model, layers, samples, segmenter and rules;
    a legend; layer tabs; units sorted by IoU / label / unit with their best and second-best
    concepts; bar graphs and the cross-layer comparison. The data is embedded, so the page works
    from file:// without a server."""
    payload = json.dumps(document).replace("</", "<\\/")
    graphs = "".join(f'<div class="bargraph">{_svg_image(svg, f"interpretable units per concept in {layer}")}</div>'
                     for layer, svg in bargraphs.items())
    title = html.escape(document.get("title") or "Dissection")
    facts = " ".join(f"<span>{html.escape(name)}: <b>{html.escape(value)}</b></span>"
                    for name, value in _facts(document))
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
<p class="facts" id="facts">{facts}</p>
{_legend(document)}
{intervention_html(document)}
<h2>Interpretable units across layers</h2>
<div id="comparison">{_svg_image(comparison_svg, "interpretable units per layer")}</div>
{_comparison_table(document)}
<h2>Layer</h2>
<div id="layer-tabs"></div>
<div id="layer-summary"></div>
<h2>Interpretable units per concept</h2>
{graphs}
<h2>Units</h2>
<div>sort by:
<button class="sort" data-sort="iou">IoU</button>
<button class="sort" data-sort="label">concept</button>
<button class="sort" data-sort="unit">unit</button>
</div>
<div id="units"></div>
<script type="application/json" id="dissection-data">{payload}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def intervention_html(document: Mapping[str, Any]) -> str:
    """The report's link block to the intervention pages ('' when there are none)."""
    intervention = document.get("intervention")
    if not intervention:
        return ""
    items = "".join(
        f'<li><a href="{html.escape(e["page"], quote=True)}">{html.escape(e.get("title", e["page"]))}</a></li>'
        for e in intervention.get("experiments", []) if isinstance(e, dict) and e.get("page"))
    return (f'<h2>Interventions</h2><p><a id="intervention-index" href="{intervention["index"]}">'
            f'all intervention experiments</a></p><ul class="interventions">{items}</ul>')
