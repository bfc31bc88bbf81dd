"""Pictures and HTML pages of the intervention experiments: image grids, matplotlib plots, tables.

Plots are drawn with matplotlib's object API on the Agg canvas (no global ``pyplot`` state, no
display needed) and returned as PNG bytes; image grids are composed with Pillow. Pages are static,
self-contained HTML (images referenced by relative paths, the experiment's JSON embedded), so they
open from ``file://`` without a server and without scripts that could fail.
"""

from __future__ import annotations

import html
import io
import json
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["page", "table", "image_grid", "colorize", "plot_curves", "plot_alpha", "plot_loss",
           "plot_context", "plot_histogram", "figure_png"]

_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #222; max-width: 1200px; }
h1 { font-size: 20px; margin: 0 0 8px 0; } h2 { font-size: 16px; margin: 18px 0 6px 0; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; image-rendering: pixelated; display: block; margin: 4px 0; }
.note { color: #555; font-size: 13px; }
"""


def page(title: str, body: str, data: Any = None) -> str:
    """A complete HTML page; ``data`` (JSON-able) is embedded as ``<script type=application/json
    id=experiment-data>``."""
    payload = ""
    if data is not None:
        text = json.dumps(data, allow_nan=False).replace("</", "<\\/")
        payload = f'<script type="application/json" id="experiment-data">{text}</script>'
    title = html.escape(title)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f'<link rel="icon" href="data:,">\n<style>{_STYLE}</style>\n</head>\n<body data-rendered="yes">\n'
            f'<h1>{title}</h1>\n{body}\n{payload}\n</body>\n</html>\n')


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table (cells escaped; floats with 4 significant digits)."""
    def cell(value):
        if isinstance(value, (float, np.floating)):
            return f"{float(value):.4g}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(alt, quote=True)}">'


def colorize(segmentation: np.ndarray, labels: Sequence[Any]) -> np.ndarray:
    """uint8 (N, H, W, 3) colours of an int (N, H, W, D) or (N, H, W) segmentation (first nonzero
    channel) over the segmenter's ``labels``: the scene world's colours for its labels, else the
    dissection report's palette."""
    from gandissect_jax.dissection.labels import palette
    from gandissect_jax.scenes import world

    segmentation = np.asarray(segmentation)
    if segmentation.ndim == 3:
        segmentation = segmentation[..., None]
    first = segmentation[..., 0].copy()
    for d in range(1, segmentation.shape[-1]):
        first = np.where(first == 0, segmentation[..., d], first)
    names = [label[0] if isinstance(label, (tuple, list)) else str(label) for label in labels]
    colours = world.label_palette() if names == list(world.LABEL_NAMES) else palette(len(names))
    return colours[np.clip(first, 0, len(names) - 1)]


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.NEAREST)) for im in images])


def image_grid(rows: Sequence[tuple[str, np.ndarray]], size: int | None = None, margin: int = 180) -> bytes:
    """PNG bytes of a grid: one row per ``(caption, uint8 (N, H, W, 3))``, captions on the left;
    images resized (nearest) to ``size`` px (default: the largest given, at least 96)."""
    from PIL import Image, ImageDraw, ImageFont

    size = size or max(96, max(int(images.shape[1]) for _, images in rows))
    columns = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (margin + columns * (size + 2), len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    for i, (caption, images) in enumerate(rows):
        images = _resize(np.asarray(images, np.uint8), size)
        y = i * (size + 2)
        for j, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (margin + j * (size + 2), y))
        for k, line in enumerate(str(caption).split("\n")):
            draw.text((4, y + size // 2 - 10 + 16 * k), line, fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def figure_png(fig) -> bytes:
    """PNG bytes of a matplotlib ``Figure`` (drawn on the Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _figure(width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="tight")


def plot_curves(counts: Sequence[int], curves: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
                errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                ylim: tuple[float, float] | None = (0.0, 1.0)) -> bytes:
    """Curves against the number of units (log2 axis), one per ranking, as in the paper's Fig. 4
    (the reference's ``aceplotablate``); ``errors`` give (low, high) bands."""
    fig = _figure()
    ax = fig.add_subplot(111)
    x = np.asarray(counts, np.float64)
    plotted = np.maximum(x, 0.5)  # 0 units drawn at 0.5 on the log axis
    for name, values in curves.items():
        ax.plot(plotted, values, marker="o", label=name)
        if errors and name in errors:
            low, high = errors[name]
            ax.fill_between(plotted, low, high, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(plotted, [str(int(c)) for c in x])
    ax.set_xlabel("number of units")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.4)
    ax.legend()
    return figure_png(fig)


def plot_alpha(alpha: Sequence[float], iou: Sequence[float], *, title: str, show: int = 64) -> bytes:
    """The fitted ACE weights of the top ``show`` units (bars) with each unit's IoU (dots)."""
    alpha = np.asarray(alpha, np.float64)
    iou = np.asarray(iou, np.float64)
    order = np.lexsort((np.arange(len(alpha)), -iou, -alpha))[:show]
    fig = _figure(max(5.0, 0.12 * len(order) + 1.5), 3.2)
    ax = fig.add_subplot(111)
    ax.bar(np.arange(len(order)), alpha[order], color="#4B4CBF", label="ACE weight alpha")
    ax.plot(np.arange(len(order)), iou[order], "o", color="#D4A024", markersize=3, label="IoU")
    ax.set_xticks(np.arange(len(order)), [str(u) for u in order], rotation=90, fontsize=6)
    ax.set_xlabel("unit")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return figure_png(fig)


def plot_loss(losses: Sequence[float], *, title: str) -> bytes:
    """Held-out ACE objective per epoch (the reference's ``acesummarize`` loss plot)."""
    fig = _figure(4.5, 3.0)
    ax = fig.add_subplot(111)
    ax.plot(np.arange(len(losses)), losses, marker="o")
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("held-out objective")
    ax.set_title(title)
    ax.grid(True, alpha=0.4)
    return figure_png(fig)


def plot_context(images: np.ndarray, effects: np.ndarray, *, title: str, limit: float | None = None) -> bytes:
    """Context maps over their images (the paper's Fig. 11): per sample, the image, then the
    effect (N, H, W) as a heat map (red: the concept appears, blue: it disappears) laid over it."""
    images = np.asarray(images, np.uint8)
    effects = np.asarray(effects, np.float64)
    limit = float(limit if limit is not None else max(np.abs(effects).max(), 1e-6))
    n = len(images)
    fig = _figure(1.6 * n + 0.6, 3.5)
    for i in range(n):
        ax = fig.add_subplot(2, n, i + 1)
        ax.imshow(images[i])
        ax.set_axis_off()
        ax = fig.add_subplot(2, n, n + i + 1)
        ax.imshow(images[i], alpha=0.5)
        shown = ax.imshow(effects[i], cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.75,
                          extent=(-0.5, images.shape[2] - 0.5, images.shape[1] - 0.5, -0.5),
                          interpolation="nearest")
        ax.set_axis_off()
    fig.colorbar(shown, ax=fig.axes, shrink=0.6, label="change of concept share")
    fig.suptitle(title, fontsize=10)
    fig.set_layout_engine(None)
    return figure_png(fig)


def plot_histogram(groups: Mapping[str, Sequence[float]], *, title: str, xlabel: str) -> bytes:
    """Overlaid histograms (e.g. realism scores before / after an ablation), with their means."""
    fig = _figure()
    ax = fig.add_subplot(111)
    values = [np.asarray(v, np.float64) for v in groups.values()]
    low = min(v.min() for v in values)
    high = max(v.max() for v in values)
    bins = np.linspace(low, high if high > low else low + 1, 30)
    for (name, v) in zip(groups, values):
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (mean {v.mean():.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return figure_png(fig)


def plot_bars(names: Sequence[str], values: Sequence[float], *, title: str, ylabel: str) -> bytes:
    """A bar per name (e.g. the mean context-map effect per context label)."""
    fig = _figure(max(4.0, 0.45 * len(names) + 1.5), 3.2)
    ax = fig.add_subplot(111)
    values = np.asarray(values, np.float64)
    ax.bar(np.arange(len(values)), values, color=["#D92E2B" if v > 0 else "#4B4CBF" for v in values])
    ax.set_xticks(np.arange(len(values)), list(names), rotation=45, ha="right")
    ax.axhline(0, color="#888", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return figure_png(fig)
