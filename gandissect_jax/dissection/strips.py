"""Top-k image strips: each unit's best samples side by side, the region above its level outlined in yellow."""

from __future__ import annotations

import os

import numpy as np

from .results import LayerDissection
from .resume import atomic_file
from .upsample import bilinear_matrix


def _resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
    rows = (np.arange(size) * images.shape[1] // size).astype(np.int64)
    cols = (np.arange(size) * images.shape[2] // size).astype(np.int64)
    return images[:, rows][:, :, cols]


def _resize_area(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def outline_activation(image: np.ndarray, mask: np.ndarray, dim: float = 0.5) -> np.ndarray:
    """uint8 (T, T, 3) image with the inactive area dimmed and a yellow outline around the mask."""
    interior = mask.copy()
    padded = np.pad(mask, 1, mode="edge")
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        interior &= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    edge = mask & ~interior
    out = image.astype(np.float32) * np.where(mask, 1.0, dim)[:, :, None]
    out[edge] = (255, 220, 0)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_strips(layer_dir: str, result: LayerDissection, source, *, batch_size: int = 32,
                 thumbnail: int | None = None, unit_chunk: int = 64, gap: int = 4, show_progress: bool = True) -> None:
    """Write ``<layer_dir>/image/<unit>-top.jpg``: the unit's top-k samples side by side, each with
    the region where the upsampled activation exceeds the unit's level outlined.

    source: anything with ``visual_batch(indices, layer) -> (uint8 (n, H, W, 3) backgrounds,
    float32 (n, h, w, U) features)`` (the dissection sources: images when there are any, else
    the coloured segmentation). Files are written to a temporary name and renamed.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    layer_dir = os.path.join(layer_dir, "image")
    os.makedirs(layer_dir, exist_ok=True)
    tops = result.topk_indices
    units = result.num_units
    length = tops.shape[1]
    if length == 0:
        return
    for start in tqdm(range(0, units, unit_chunk), desc=f"strips {result.layer}", disable=not show_progress,
                      leave=False):
        chunk = range(start, min(start + unit_chunk, units))
        needed = np.unique(tops[list(chunk)].reshape(-1))
        thumbs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for b in range(0, needed.size, batch_size):
            indices = needed[b:b + batch_size]
            padded = np.concatenate([indices, np.full(batch_size - indices.size, indices[-1])]).astype(np.int64)
            background, features = source.visual_batch(padded, result.layer)
            size = thumbnail or int(min(max(background.shape[1], 96), 160))
            if background.shape[1] > size:
                background = _resize_area(background, size)
            elif background.shape[1] < size:
                background = _resize_nearest(background, size)
            for i, index in enumerate(indices):
                thumbs[int(index)] = (background[i], features[i])
        size = next(iter(thumbs.values()))[0].shape[0]
        any_features = next(iter(thumbs.values()))[1]
        rows = bilinear_matrix(any_features.shape[0], size)
        cols = bilinear_matrix(any_features.shape[1], size)
        for unit in chunk:
            strip = np.full((size, length * (size + gap) - gap, 3), 255, np.uint8)
            for rank, index in enumerate(tops[unit]):
                image, features = thumbs[int(index)]
                surface = rows @ features[:, :, unit].astype(np.float64) @ cols.T
                mask = surface > float(result.levels[unit])
                strip[:, rank * (size + gap): rank * (size + gap) + size] = outline_activation(image, mask)
            with atomic_file(os.path.join(layer_dir, f"{unit}-top.jpg")) as handle:
                Image.fromarray(strip).save(handle, format="JPEG", quality=88)


__all__ = ["write_strips", "outline_activation"]
