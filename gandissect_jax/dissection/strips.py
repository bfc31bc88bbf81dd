"""Top-k image strips: each unit's best samples side by side, the region above its level outlined in yellow."""

from __future__ import annotations

import os

import numpy as np

from .results import LayerDissection
from .resume import atomic_file
from .upsample import bilinear_matrix

#: default bound on the strip cache's thumbnails (bytes): 512 MiB, about 7,000 thumbnails of 160x160
DEFAULT_CACHE_BYTES = 512 << 20


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


def thumbnail_side(image_height: int, thumbnail: int | None) -> int:
    """The strips' thumbnail side T in pixels: ``thumbnail``, or the image height clamped to [96, 160]."""
    return int(thumbnail or min(max(int(image_height), 96), 160))


def thumbnail_images(background: np.ndarray, thumbnail: int | None) -> np.ndarray:
    """The uint8 (n, T, T, 3) strip thumbnails of uint8 (n, H, W, 3) backgrounds: T = ``thumbnail``, or
    H clamped to [96, 160]; area-resized down (PIL bilinear), nearest-neighbour up."""
    size = thumbnail_side(background.shape[1], thumbnail)
    if background.shape[1] > size:
        return _resize_area(background, size)
    if background.shape[1] < size:
        return _resize_nearest(background, size)
    return background


def unit_groups(tops: np.ndarray, max_samples: int) -> list[range]:
    """Consecutive units grouped so that each group's top-k samples hold at most ``max_samples``
    distinct samples (at least one unit per group). tops: int (U, k) sample numbers."""
    groups, start, seen = [], 0, set()
    for unit in range(tops.shape[0]):
        needed = set(tops[unit].tolist())
        if unit > start and len(seen | needed) > max_samples:
            groups.append(range(start, unit))
            start, seen = unit, set()
        seen |= needed
    if tops.shape[0] > start:
        groups.append(range(start, tops.shape[0]))
    return groups


def _write_unit_strip(path: str, thumbs: list[np.ndarray], maps: np.ndarray, level: float, gap: int) -> None:
    """One unit's strip: ``thumbs`` (uint8 (T, T, 3) each) side by side, each outlined where the
    float64-bilinear upsampling of its map in ``maps`` (k, h, w) exceeds ``level``; JPEG quality 88."""
    from PIL import Image

    size, length = thumbs[0].shape[0], len(thumbs)
    rows = bilinear_matrix(maps.shape[1], size)
    cols = bilinear_matrix(maps.shape[2], size)
    strip = np.full((size, length * (size + gap) - gap, 3), 255, np.uint8)
    for rank, thumb in enumerate(thumbs):
        surface = rows @ maps[rank].astype(np.float64) @ cols.T
        mask = surface > level
        strip[:, rank * (size + gap): rank * (size + gap) + size] = outline_activation(thumb, mask)
    with atomic_file(path) as handle:
        Image.fromarray(strip).save(handle, format="JPEG", quality=88)


def write_strips(layer_dir: str, result: LayerDissection, source=None, *, batch_size: int = 32,
                 thumbnail: int | None = None, gap: int = 4, show_progress: bool = True,
                 max_cache_bytes: int = DEFAULT_CACHE_BYTES, gallery=None) -> None:
    """Write ``<layer_dir>/image/<unit>-top.jpg``: the unit's top-k samples side by side, each with
    the region where the upsampled activation exceeds the unit's level outlined (bilinear upsampling
    in float64, as the reference's ``upsample_bilinear`` then ``> level``; dimmed outside it).

    gallery: the thumbnails and top-k maps the count pass kept (:class:`~.gallery.Gallery`): then
    nothing is rendered and ``source`` is not used. Otherwise source: anything with
    ``visual_batch(indices, layer) -> (uint8 (n, H, W, 3) backgrounds,
    float32 (n, h, w, U) features)`` (the dissection sources: images when there are any, else
    the coloured segmentation). Each distinct top-k sample of the layer is rendered once (in
    batches of ``batch_size``, sorted by sample number); the cache holds its thumbnail and, per
    (unit, rank) that shows it, that unit's (h, w) feature map. When the thumbnails of all the
    layer's distinct top-k samples would exceed ``max_cache_bytes`` (bytes, at the largest
    thumbnail size), the units are taken in consecutive groups that fit, and a sample shown by
    two groups is rendered once per group. Files are written to a temporary name and renamed.
    """
    from tqdm.auto import tqdm

    layer_dir = os.path.join(layer_dir, "image")
    os.makedirs(layer_dir, exist_ok=True)
    tops = np.asarray(result.topk_indices)
    units, length = tops.shape[0], tops.shape[1]
    if length == 0 or units == 0:
        return
    bar = tqdm(total=units, desc=f"strips {result.layer}", disable=not show_progress, leave=False)
    if gallery is not None:
        if tuple(gallery.maps.shape[:2]) != (units, length):
            raise ValueError(f"the gallery holds maps of {gallery.maps.shape[:2]} (units, k); the layer has "
                             f"{(units, length)}")
        for unit in range(units):
            _write_unit_strip(os.path.join(layer_dir, f"{unit}-top.jpg"),
                              [gallery.thumbnail(int(index)) for index in tops[unit]], gallery.maps[unit],
                              float(result.levels[unit]), gap)
            bar.update(1)
        bar.close()
        return
    side = thumbnail or 160
    max_samples = max(int(batch_size), int(max_cache_bytes) // (side * side * 3))
    for group in unit_groups(tops, max_samples):
        group_tops = tops[group.start:group.stop]
        needed = np.unique(group_tops.reshape(-1))
        # (unit, rank) entries of the group, sorted by the sample they show
        order = np.argsort(group_tops.reshape(-1), kind="stable")
        shown = group_tops.reshape(-1)[order]
        thumbs: dict[int, np.ndarray] = {}
        maps: np.ndarray | None = None  # float32 (units in group, k, h, w)
        for b in range(0, needed.size, batch_size):
            indices = needed[b:b + batch_size]
            padded = np.concatenate([indices, np.full(batch_size - indices.size, indices[-1])]).astype(np.int64)
            background, features = source.visual_batch(padded, result.layer)
            background = thumbnail_images(background, thumbnail)
            if maps is None:
                maps = np.empty((len(group), length) + features.shape[1:3], np.float32)
            for i, index in enumerate(indices):
                thumbs[int(index)] = background[i]
                lo, hi = np.searchsorted(shown, index, "left"), np.searchsorted(shown, index, "right")
                for flat in order[lo:hi]:
                    unit, rank = divmod(int(flat), length)
                    maps[unit, rank] = features[i, :, :, group.start + unit]
            del background, features
        for offset, unit in enumerate(group):
            _write_unit_strip(os.path.join(layer_dir, f"{unit}-top.jpg"), [thumbs[int(i)] for i in tops[unit]],
                              maps[offset], float(result.levels[unit]), gap)
            bar.update(1)
        del thumbs, maps
    bar.close()


__all__ = ["write_strips", "outline_activation", "unit_groups", "thumbnail_images"]
