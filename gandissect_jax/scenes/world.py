"""A procedural outdoor-scene world: 64x64 RGB scenes with exact per-pixel labels.

Every scene is drawn by a painter's algorithm from a small set of parameters (sky, sun,
clouds, a wavy horizon, grass, a road in perspective, buildings with roofs, windows and
doors, trees). Rendering is vectorized over a batch with numpy; the label map records, for
every pixel, the class of the last shape painted there, so labels are exact by construction.

Scene ``i`` of a world with seed ``s`` depends only on ``(s, i)``: batches, iterators and
the tfds builder all see the same scenes, in any order.

Label numbers (:data:`LABELS`)::

    0 '-' (none; never produced, every pixel is covered)   1 sky    2 sun    3 cloud
    4 grass   5 road   6 tree   7 building   8 window   9 door   10 roof
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gandissect_jax.images import to_uint8

from .params import (LABEL_NAMES, LABELS, MAX_BUILDINGS, MAX_CLOUDS, MAX_TREES, NUM_LABELS, OBJECT_NAMES,
                     PART_OWNERS, PUFFS_PER_CLOUD, SIZE, SceneParams, sample_params, scene_uniforms)


def render(params: SceneParams) -> tuple[np.ndarray, np.ndarray]:
    """Render scenes from explicit parameters.

    Returns ``(images, labels)``: images float32 (N, 64, 64, 3) in [-1, 1] (NHWC), labels
    int32 (N, 64, 64) with the numbers of :data:`LABEL_NAMES`. The label of a pixel is the
    class of the last shape painted over it, so labels are exact.

    Shapes are painted into a map of shape slots (one slot per shape of a scene); colours and
    textures are looked up once at the end.
    """
    p = params
    n = p.n
    ys = np.arange(SIZE, dtype=np.float32)[None, :, None] + 0.5  # pixel centres
    xs = np.arange(SIZE, dtype=np.float32)[None, None, :] + 0.5
    yi = np.arange(SIZE)[None, :, None]
    xi = np.arange(SIZE)[None, None, :]

    slot_map = np.zeros((n, SIZE, SIZE), np.int8)  # slot 0 is the sky
    slot_label = [LABELS["sky"]]
    slot_color = [np.zeros((n, 3))]
    slot_fine = [np.zeros(n)]
    slot_coarse = [np.full(n, 0.015)]

    def paint(mask, color, label, fine_amp=0.0, coarse_amp=0.0):
        np.putmask(slot_map, mask, len(slot_label))
        slot_label.append(label)
        slot_color.append(np.broadcast_to(color, (n, 3)))
        slot_fine.append(np.broadcast_to(fine_amp, (n,)))
        slot_coarse.append(np.broadcast_to(coarse_amp, (n,)))

    def col(a):
        return np.asarray(a)[:, None, None]

    # sun, then clouds (which may cover it)
    d2 = (xs - col(p.sun_xy[:, 0])) ** 2 + (ys - col(p.sun_xy[:, 1])) ** 2
    paint(col(p.sun_on) & (d2 <= col(p.sun_radius) ** 2), p.sun_color, LABELS["sun"])
    for k in range(MAX_CLOUDS):
        mask = np.zeros((n, SIZE, SIZE), bool)
        for j in range(PUFFS_PER_CLOUD):
            cx, cy, rx, ry = (col(p.cloud_puffs[:, k, j, i]) for i in range(4))
            mask |= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        paint(mask & col(p.cloud_on[:, k]), p.cloud_color[:, k], LABELS["cloud"], 0.0, 0.04)

    # ground below the wavy horizon
    base, amp, freq, phase = (col(p.horizon[:, i]) for i in range(4))
    ground = ys >= base + amp * np.sin(freq * xs + phase)
    paint(ground, p.grass_color, LABELS["grass"], p.grass_texture, 0.08)

    # road: a trapezoid from the vanishing point down to the bottom edge
    vx, bx, bhw = (col(p.road[:, i]) for i in range(3))
    depth = np.clip((ys - base) / (SIZE - base), 0.0, 1.0)
    centre = vx + depth * (bx - vx)
    half = 0.3 + depth * (bhw - 0.3)
    on_road = ground & (ys >= base) & (np.abs(xs - centre) <= half) & col(p.road_on)
    paint(on_road, p.road_color, LABELS["road"], 0.05)
    stripe = on_road & col(p.road_stripe) & (np.abs(xs - centre) <= 0.25 + 0.5 * depth) & (
        np.mod(np.floor(np.sqrt(depth) * 14.0), 2) == 0
    ) & (depth > 0.15)
    paint(stripe, np.full(3, 0.92), LABELS["road"])

    # buildings (they all stand on the horizon line, so their order does not matter)
    for k in range(MAX_BUILDINGS):
        on = col(p.building_on[:, k])
        x0, x1, top, bottom = (col(p.building_box[:, k, i]) for i in range(4))
        wall = on & (xi >= x0) & (xi < x1) & (yi >= top) & (yi < bottom)
        paint(wall, p.building_color[:, k], LABELS["building"], 0.06, 0.05)
        rh = col(p.roof_height[:, k])
        gable = col(p.roof_kind[:, k] == 1)
        # gable: a triangle above the wall, overhanging by one pixel
        rise = (top - ys + 0.5) / np.maximum(rh, 1)  # 0 at wall top .. 1 at apex
        mid = (x0 + x1) / 2.0
        half_w = (x1 - x0) / 2.0 + 1.0
        in_gable = (yi < top) & (yi >= top - rh) & (np.abs(xs - mid) <= half_w * (1.0 - rise))
        # flat: a slab over the top rows, overhanging by one pixel
        in_slab = (yi >= top) & (yi < top + rh) & (xi >= x0 - 1) & (xi < x1 + 1)
        paint(on & np.where(gable, in_gable, in_slab), p.roof_color[:, k], LABELS["roof"], 0.05)
        ww, wh, sx, sy, m = (col(p.window_grid[:, k, i]) for i in range(5))
        dx0, dx1, dtop, dbottom = (col(p.door_box[:, k, i]) for i in range(4))
        wall_top = top + np.where(gable, 0, rh)
        rx = xi - (x0 + m)
        ry = yi - (wall_top + m)
        cell_x, cell_y = np.floor_divide(rx, sx), np.floor_divide(ry, sy)
        full_x = (rx >= 0) & (np.mod(rx, sx) < ww) & (x0 + m + cell_x * sx + ww <= x1 - m)
        full_y = (ry >= 0) & (np.mod(ry, sy) < wh) & (wall_top + m + cell_y * sy + wh <= dtop - 1)
        paint(on & full_x & full_y, p.window_color[:, k], LABELS["window"], 0.04)
        door = on & (xi >= dx0) & (xi < dx1) & (yi >= dtop) & (yi < dbottom)
        paint(door, p.door_color[:, k], LABELS["door"], 0.04)

    # trees, far (small base y) to near
    order = np.argsort(p.tree_trunk[:, :, 3] + np.where(p.tree_on, 0, -1000), axis=1, kind="stable")

    def pick(a, k):
        return np.take_along_axis(a, k.reshape((n,) + (1,) * (a.ndim - 1)), 1)[:, 0]

    for rank in range(MAX_TREES):
        k = order[:, rank]
        on = col(pick(p.tree_on, k))
        x0, x1, top, bottom = (col(pick(p.tree_trunk, k)[:, i]) for i in range(4))
        trunk = on & (xi >= x0) & (xi < x1) & (yi >= top) & (yi < bottom)
        paint(trunk, pick(p.trunk_color, k), LABELS["tree"], 0.05)
        cx, cy, rx, ry = (col(pick(p.tree_crown, k)[:, i]) for i in range(4))
        ellipse = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        apex = cy - ry * 1.4
        cone = (ys >= apex) & (ys <= cy + ry) & (np.abs(xs - cx) <= rx * (ys - apex) / (2.4 * ry))
        crown = on & np.where(col(pick(p.tree_conifer, k)), cone, ellipse)
        paint(crown, pick(p.tree_color, k), LABELS["tree"], 0.18, 0.1)

    # colours: one gather per pixel, then texture, then the sky gradient where the sky shows
    colors = np.stack(slot_color, 1).astype(np.float32)  # (N, S, 3)
    fine_amp = np.stack(slot_fine, 1).astype(np.float32)  # (N, S)
    coarse_amp = np.stack(slot_coarse, 1).astype(np.float32)
    flat = slot_map.reshape(n, -1).astype(np.int64)
    color = np.take_along_axis(colors, flat[..., None], 1).reshape(n, SIZE, SIZE, 3)
    texture = 1.0 + (
        np.take_along_axis(fine_amp, flat, 1).reshape(n, SIZE, SIZE) * p.noise_fine
        + np.take_along_axis(coarse_amp, flat, 1).reshape(n, SIZE, SIZE) * p.noise_coarse
    )
    t = np.clip(ys / np.maximum(col(p.horizon[:, 0]), 1.0), 0.0, 1.0)[..., None]
    sky = (p.sky_top[:, None, None, :] * (1 - t) + p.sky_bottom[:, None, None, :] * t).astype(np.float32)
    color = np.where((slot_map == 0)[..., None], sky, color)
    images = np.clip(color * texture[..., None], 0.0, 1.0) * 2.0 - 1.0
    labels = np.asarray(slot_label, np.int32)[slot_map]
    return images.astype(np.float32), labels


def render_scenes(seed: int, indices) -> tuple[np.ndarray, np.ndarray]:
    """Render scenes ``indices`` of the world ``seed``: float32 (N,64,64,3) in [-1,1], int32 (N,64,64)."""
    return render(sample_params(seed, indices))


def iterate_scenes(seed: int = 0, batch_size: int = 64, start: int = 0, stop: int | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield batches ``(images, labels)`` of consecutive scenes ``start, start+1, ...`` of world ``seed``.

    Images float32 (B, 64, 64, 3) in [-1, 1]; labels int32 (B, 64, 64). Endless when ``stop`` is
    None; otherwise the last batch may be shorter.
    """
    index = start
    while stop is None or index < stop:
        end = index + batch_size if stop is None else min(index + batch_size, stop)
        yield render_scenes(seed, np.arange(index, end))
        index = end


def label_frequencies(labels: np.ndarray) -> np.ndarray:
    """Fraction of pixels carrying each label number: float64 (NUM_LABELS,) from int labels (..., H, W).

    ValueError for label numbers outside 0 .. NUM_LABELS - 1."""
    from gandissect_jax.dissection.labels import count_labels

    counts, outside = count_labels(labels, NUM_LABELS)
    if int(outside):
        raise ValueError(f"{int(outside)} label entries lie outside 0..{NUM_LABELS - 1}")
    counts = np.asarray(counts, np.int64)
    return counts / max(counts.sum(), 1)


def object_shares(shares) -> np.ndarray:
    """Merge per-label shares float (NUM_LABELS,) into whole-object shares float64 (len(OBJECT_NAMES),):
    each part's share is added to its owner's (:data:`PART_OWNERS`)."""
    shares = np.asarray(shares, np.float64)
    if shares.shape != (NUM_LABELS,):
        raise ValueError(f"expected ({NUM_LABELS},) label shares, got shape {shares.shape}")
    merged = np.zeros(len(OBJECT_NAMES))
    for number, name in enumerate(LABEL_NAMES[1:], start=1):
        merged[OBJECT_NAMES.index(PART_OWNERS.get(name, name))] += shares[number]
    return merged


def label_palette() -> np.ndarray:
    """A colour per label for visualizing label maps: uint8 (NUM_LABELS, 3)."""
    return np.array(
        [[0, 0, 0], [120, 170, 255], [255, 220, 0], [235, 235, 235], [60, 180, 60], [90, 90, 90],
         [0, 90, 0], [190, 80, 60], [60, 220, 255], [130, 60, 20], [150, 0, 120]],
        dtype=np.uint8,
    )


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """Tile float images (N, H, W, 3) in [-1, 1] (or uint8) into one uint8 (rows*H, columns*W, 3) grid."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = images[i]
    return grid


__all__ = ["SIZE", "LABEL_NAMES", "LABELS", "NUM_LABELS", "OBJECT_NAMES", "PART_OWNERS", "MAX_CLOUDS", "PUFFS_PER_CLOUD",
           "MAX_BUILDINGS", "MAX_TREES", "SceneParams", "scene_uniforms", "sample_params", "render", "render_scenes",
           "iterate_scenes", "label_frequencies", "object_shares", "label_palette", "image_grid"]
