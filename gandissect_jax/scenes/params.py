"""The scene world's parameters: label vocabulary, the SceneParams of a batch of scenes, and their sampling from (seed, scene index).

Scene ``i`` of a world with seed ``s`` depends only on ``(s, i)`` (:func:`scene_uniforms`).
Rendering: :mod:`gandissect_jax.scenes.world`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64
LABEL_NAMES = ("-", "sky", "sun", "cloud", "grass", "road", "tree", "building", "window", "door", "roof")
LABELS = {name: number for number, name in enumerate(LABEL_NAMES)}
NUM_LABELS = len(LABEL_NAMES)

# Whole objects and the parts they own, as in the unified-parsing vocabulary (its segmenter labels
# the parts of sky and building in a separate channel, inside the owner's object pixels).
OBJECT_NAMES = ("sky", "grass", "road", "tree", "building")
PART_OWNERS = {"sun": "sky", "cloud": "sky", "window": "building", "door": "building", "roof": "building"}

MAX_CLOUDS = 3
PUFFS_PER_CLOUD = 3
MAX_BUILDINGS = 3
MAX_TREES = 5


@dataclass(frozen=True)
class SceneParams:
    """Parameters of a batch of N scenes (struct of arrays; all float64 unless noted).

    Colours are RGB in [0, 1]. Shapes absent from a scene have ``*_on == False``.
    Textures are per-scene noise fields in [-1, 1] of shape (N, 64, 64).
    """

    sky_top: np.ndarray  # (N, 3)
    sky_bottom: np.ndarray  # (N, 3)
    sun_on: np.ndarray  # (N,) bool
    sun_xy: np.ndarray  # (N, 2) centre (x, y) in pixels
    sun_radius: np.ndarray  # (N,)
    sun_color: np.ndarray  # (N, 3)
    cloud_on: np.ndarray  # (N, MAX_CLOUDS) bool
    cloud_puffs: np.ndarray  # (N, MAX_CLOUDS, PUFFS_PER_CLOUD, 4): cx, cy, rx, ry
    cloud_color: np.ndarray  # (N, MAX_CLOUDS, 3)
    horizon: np.ndarray  # (N, 4): base y, amplitude, frequency (rad/px), phase
    grass_color: np.ndarray  # (N, 3)
    grass_texture: np.ndarray  # (N,) amplitude of the grass texture
    road_on: np.ndarray  # (N,) bool
    road: np.ndarray  # (N, 3): vanishing x, bottom centre x, bottom half-width
    road_color: np.ndarray  # (N, 3)
    road_stripe: np.ndarray  # (N,) bool: dashed centre line (still labelled road)
    building_on: np.ndarray  # (N, MAX_BUILDINGS) bool
    building_box: np.ndarray  # (N, MAX_BUILDINGS, 4) int: x0, x1, top, bottom (half-open)
    building_color: np.ndarray  # (N, MAX_BUILDINGS, 3)
    roof_kind: np.ndarray  # (N, MAX_BUILDINGS) int: 0 flat slab, 1 gable
    roof_height: np.ndarray  # (N, MAX_BUILDINGS) int
    roof_color: np.ndarray  # (N, MAX_BUILDINGS, 3)
    window_grid: np.ndarray  # (N, MAX_BUILDINGS, 5) int: width, height, step x, step y, margin
    window_color: np.ndarray  # (N, MAX_BUILDINGS, 3)
    door_box: np.ndarray  # (N, MAX_BUILDINGS, 4) int: x0, x1, top, bottom
    door_color: np.ndarray  # (N, MAX_BUILDINGS, 3)
    tree_on: np.ndarray  # (N, MAX_TREES) bool
    tree_trunk: np.ndarray  # (N, MAX_TREES, 4) int: x0, x1, top, bottom
    tree_crown: np.ndarray  # (N, MAX_TREES, 4): cx, cy, rx, ry
    tree_conifer: np.ndarray  # (N, MAX_TREES) bool: triangular crown instead of an ellipse
    tree_color: np.ndarray  # (N, MAX_TREES, 3)
    trunk_color: np.ndarray  # (N, MAX_TREES, 3)
    noise_fine: np.ndarray  # (N, 64, 64) in [-1, 1]
    noise_coarse: np.ndarray  # (N, 64, 64) in [-1, 1], smooth

    @property
    def n(self) -> int:
        """Number of scenes."""
        return self.sky_top.shape[0]


# how many uniforms one scene's parameters consume (fixed, so the stream layout is stable)
_NUM_UNIFORMS = 320
_COARSE = 9  # coarse noise grid (upsampled bilinearly to 64x64)


def _hsv_to_rgb(h, s, v):
    """Vectorized HSV -> RGB; h, s, v arrays in [0, 1] of equal shape; returns shape + (3,)."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
    )
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def _upsample_coarse(grid: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of (N, 9, 9) noise grids to (N, 64, 64)."""
    pos = np.linspace(0, _COARSE - 1, SIZE)
    i0 = np.minimum(np.floor(pos).astype(np.int64), _COARSE - 2)
    w = pos - i0
    rows = grid[:, i0, :] * (1 - w)[None, :, None] + grid[:, i0 + 1, :] * w[None, :, None]
    return rows[:, :, i0] * (1 - w)[None, None, :] + rows[:, :, i0 + 1] * w[None, None, :]


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 arrays (a bijective avalanche hash)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def scene_uniforms(seed: int, indices, count: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1): float64 (N, count); row r depends only on (seed, indices[r]).

    Value j of scene i is ``mix64(mix64(key(seed) + i * golden) + j * golden2)`` mapped to 53 bits,
    so any scene can be drawn without drawing the ones before it, in any batch.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(int(seed) & (2**64 - 1)) ^ np.uint64(0x5DEECE66D2545F49))
        scene_key = _mix64(key + indices * np.uint64(0x9E3779B97F4A7C15))
        counter = np.arange(count, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        bits = _mix64(scene_key[:, None] + counter[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0**53)


def sample_params(seed: int, indices) -> SceneParams:
    """Draw the parameters of scenes ``indices`` (1-D ints) of the world with ``seed``.

    Scene i depends only on (seed, i): a counter-based hash (:func:`scene_uniforms`) supplies a
    fixed block of uniforms per scene for the layout and two noise fields; all vectorized.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = indices.shape[0]
    stream = scene_uniforms(seed, indices, _NUM_UNIFORMS + SIZE * SIZE + _COARSE * _COARSE)
    u = stream[:, :_NUM_UNIFORMS]
    fine = stream[:, _NUM_UNIFORMS : _NUM_UNIFORMS + SIZE * SIZE].reshape(n, SIZE, SIZE)
    coarse = stream[:, _NUM_UNIFORMS + SIZE * SIZE :].reshape(n, _COARSE, _COARSE)
    cursor = [0]

    def take(*shape):
        size = int(np.prod(shape)) if shape else 1
        start = cursor[0]
        cursor[0] += size
        assert cursor[0] <= _NUM_UNIFORMS
        return u[:, start : start + size].reshape((n,) + shape)

    def lerp(lo, hi, *shape):
        return lo + (hi - lo) * take(*shape)

    # --- sky: day (blue), dusk (orange/pink horizon), overcast (grey)
    mood = take()
    day, dusk = mood < 0.6, (mood >= 0.6) & (mood < 0.8)
    top_day = _hsv_to_rgb(lerp(0.55, 0.64), lerp(0.45, 0.85), lerp(0.65, 0.95))
    bot_day = _hsv_to_rgb(lerp(0.52, 0.6), lerp(0.15, 0.4), lerp(0.85, 1.0))
    top_dusk = _hsv_to_rgb(lerp(0.66, 0.8), lerp(0.35, 0.6), lerp(0.35, 0.6))
    bot_dusk = _hsv_to_rgb(lerp(0.02, 0.1), lerp(0.45, 0.75), lerp(0.85, 1.0))
    grey = lerp(0.55, 0.8)
    top_grey = _hsv_to_rgb(lerp(0.55, 0.65), lerp(0.05, 0.15), grey)
    bot_grey = _hsv_to_rgb(lerp(0.55, 0.65), lerp(0.02, 0.1), np.minimum(grey + 0.12, 1.0))
    sky_top = np.where(day[:, None], top_day, np.where(dusk[:, None], top_dusk, top_grey))
    sky_bottom = np.where(day[:, None], bot_day, np.where(dusk[:, None], bot_dusk, bot_grey))

    # --- horizon: base height, gentle wave
    horizon = np.stack(
        [lerp(26.0, 40.0), lerp(0.0, 3.5), lerp(0.04, 0.18), lerp(0.0, 2 * np.pi)], -1
    )
    sky_floor = horizon[:, 0] - horizon[:, 1]  # highest ground point

    # --- sun (not under overcast skies); sits in the sky, may touch the horizon
    sun_on = (take() < 0.65) & (mood < 0.8)
    sun_radius = lerp(3.0, 6.5)
    sun_xy = np.stack([lerp(6.0, 58.0), 4.0 + take() * np.maximum(sky_floor - 10.0, 1.0)], -1)
    sun_day = _hsv_to_rgb(lerp(0.12, 0.17), lerp(0.2, 0.6), np.ones(n))
    sun_dusk = _hsv_to_rgb(lerp(0.0, 0.07), lerp(0.6, 0.9), lerp(0.9, 1.0))
    sun_color = np.where(dusk[:, None], sun_dusk, sun_day)

    # --- clouds: each a row of overlapping elliptical puffs
    num_clouds = np.floor(take() * (MAX_CLOUDS + 1.0)).astype(np.int64)
    num_clouds = np.where(mood >= 0.8, np.maximum(num_clouds, 2), num_clouds)
    cloud_on = np.arange(MAX_CLOUDS)[None, :] < num_clouds[:, None]
    cx = lerp(0.0, 64.0, MAX_CLOUDS)
    cy = 3.0 + take(MAX_CLOUDS) * np.maximum(sky_floor[:, None] - 12.0, 1.0)
    width = lerp(6.0, 12.0, MAX_CLOUDS)
    offsets = (take(MAX_CLOUDS, PUFFS_PER_CLOUD) * 2 - 1) * width[..., None]
    puff_rx = lerp(3.0, 7.0, MAX_CLOUDS, PUFFS_PER_CLOUD)
    puff_ry = puff_rx * lerp(0.45, 0.75, MAX_CLOUDS, PUFFS_PER_CLOUD)
    puff_dy = lerp(-1.5, 1.5, MAX_CLOUDS, PUFFS_PER_CLOUD)
    cloud_puffs = np.stack(
        [cx[..., None] + offsets, cy[..., None] + puff_dy, puff_rx, puff_ry], -1
    )
    shade = lerp(0.85, 1.0, MAX_CLOUDS)
    cloud_grey = np.where((mood >= 0.8)[:, None], shade - 0.25, shade)
    cloud_tint = _hsv_to_rgb(
        np.full((n, MAX_CLOUDS), 0.95), np.where(dusk[:, None], lerp(0.15, 0.35, MAX_CLOUDS), 0.0), cloud_grey
    )
    cloud_color = cloud_tint

    # --- grass: yellow-green to deep green, lighter than the trees
    grass_color = _hsv_to_rgb(lerp(0.2, 0.33), lerp(0.45, 0.8), lerp(0.55, 0.85))
    grass_texture = lerp(0.04, 0.1)

    # --- road in perspective from a vanishing point on the horizon
    road_on = take() < 0.6
    vanish_x = lerp(12.0, 52.0)
    road = np.stack([vanish_x, vanish_x + lerp(-30.0, 30.0), lerp(7.0, 18.0)], -1)
    road_value = lerp(0.25, 0.55)
    road_color = _hsv_to_rgb(lerp(0.05, 0.12), lerp(0.0, 0.25), road_value)
    road_stripe = take() < 0.5

    # --- buildings standing on the horizon
    num_buildings = np.floor(take() * 3.6).astype(np.int64)
    building_on = np.arange(MAX_BUILDINGS)[None, :] < num_buildings[:, None]
    bw = np.round(lerp(11.0, 22.0, MAX_BUILDINGS)).astype(np.int64)
    # spread buildings: slot k prefers the k-th third of the image
    bx0 = np.round(
        (np.arange(MAX_BUILDINGS)[None, :] + take(MAX_BUILDINGS)) * (SIZE / MAX_BUILDINGS) - bw / 2
    ).astype(np.int64)
    bx1 = bx0 + bw
    bottom = np.round(horizon[:, None, 0] + lerp(1.0, 5.0, MAX_BUILDINGS)).astype(np.int64)
    bh = np.round(lerp(12.0, 26.0, MAX_BUILDINGS)).astype(np.int64)
    top = bottom - bh
    building_box = np.stack([bx0, bx1, top, bottom], -1)
    building_color = _hsv_to_rgb(
        take(MAX_BUILDINGS) * 0.16 + np.where(take(MAX_BUILDINGS) < 0.3, 0.5, 0.0),
        lerp(0.1, 0.55, MAX_BUILDINGS),
        lerp(0.45, 0.9, MAX_BUILDINGS),
    )
    roof_kind = (take(MAX_BUILDINGS) < 0.55).astype(np.int64)
    roof_height = np.where(
        roof_kind == 1, np.round(lerp(4.0, 9.0, MAX_BUILDINGS)), np.round(lerp(2.0, 3.0, MAX_BUILDINGS))
    ).astype(np.int64)
    roof_color = _hsv_to_rgb(
        np.where(take(MAX_BUILDINGS) < 0.6, lerp(0.0, 0.05, MAX_BUILDINGS), lerp(0.55, 0.65, MAX_BUILDINGS)),
        lerp(0.3, 0.7, MAX_BUILDINGS),
        lerp(0.2, 0.45, MAX_BUILDINGS),
    )
    win_w = np.round(lerp(2.0, 3.0, MAX_BUILDINGS)).astype(np.int64)
    win_h = np.round(lerp(2.0, 3.0, MAX_BUILDINGS)).astype(np.int64)
    step_x = win_w + np.round(lerp(2.0, 3.0, MAX_BUILDINGS)).astype(np.int64)
    step_y = win_h + np.round(lerp(2.0, 3.0, MAX_BUILDINGS)).astype(np.int64)
    margin = np.round(lerp(2.0, 3.0, MAX_BUILDINGS)).astype(np.int64)
    window_grid = np.stack([win_w, win_h, step_x, step_y, margin], -1)
    lit = take(MAX_BUILDINGS) < np.where(dusk, 0.7, 0.2)[:, None]
    window_color = np.where(
        lit[..., None],
        _hsv_to_rgb(lerp(0.12, 0.16, MAX_BUILDINGS), lerp(0.5, 0.8, MAX_BUILDINGS), lerp(0.85, 1.0, MAX_BUILDINGS)),
        _hsv_to_rgb(lerp(0.55, 0.65, MAX_BUILDINGS), lerp(0.3, 0.6, MAX_BUILDINGS), lerp(0.1, 0.3, MAX_BUILDINGS)),
    )
    door_w = np.round(lerp(3.0, 4.0, MAX_BUILDINGS)).astype(np.int64)
    door_h = np.round(lerp(5.0, 7.0, MAX_BUILDINGS)).astype(np.int64)
    door_x0 = bx0 + margin + np.floor(take(MAX_BUILDINGS) * np.maximum(bw - 2 * margin - door_w + 1, 1)).astype(np.int64)
    door_box = np.stack([door_x0, door_x0 + door_w, bottom - door_h, bottom], -1)
    door_color = _hsv_to_rgb(lerp(0.02, 0.1, MAX_BUILDINGS), lerp(0.4, 0.8, MAX_BUILDINGS), lerp(0.15, 0.35, MAX_BUILDINGS))

    # --- trees in front of the buildings, on the ground
    num_trees = np.floor(take() * (MAX_TREES + 1.0)).astype(np.int64)
    tree_on = np.arange(MAX_TREES)[None, :] < num_trees[:, None]
    base = np.round(horizon[:, None, 0] + lerp(3.0, 20.0, MAX_TREES)).astype(np.int64)
    scale = 0.6 + 0.6 * (base - horizon[:, None, 0]) / 20.0  # nearer trees are bigger
    tx = lerp(2.0, 62.0, MAX_TREES)
    trunk_half = np.where(scale > 0.95, 1, 0.5)
    trunk_h = np.round(lerp(3.0, 6.0, MAX_TREES) * scale).astype(np.int64)
    trunk_x0 = np.round(tx - trunk_half).astype(np.int64)
    trunk_x1 = trunk_x0 + np.where(trunk_half > 0.5, 2, 1)
    tree_trunk = np.stack([trunk_x0, trunk_x1, base - trunk_h, base], -1)
    crown_rx = lerp(4.0, 7.5, MAX_TREES) * scale
    crown_ry = lerp(5.0, 9.0, MAX_TREES) * scale
    tree_crown = np.stack([tx, base - trunk_h - crown_ry + 1.0, crown_rx, crown_ry], -1)
    tree_conifer = take(MAX_TREES) < 0.3
    autumn = take(MAX_TREES) < 0.2
    green = _hsv_to_rgb(lerp(0.25, 0.4, MAX_TREES), lerp(0.55, 0.9, MAX_TREES), lerp(0.18, 0.38, MAX_TREES))
    fall = _hsv_to_rgb(lerp(0.0, 0.11, MAX_TREES), lerp(0.7, 0.95, MAX_TREES), lerp(0.55, 0.85, MAX_TREES))
    tree_color = np.where((autumn & ~tree_conifer)[..., None], fall, green)
    trunk_color = _hsv_to_rgb(lerp(0.05, 0.1, MAX_TREES), lerp(0.5, 0.8, MAX_TREES), lerp(0.2, 0.35, MAX_TREES))

    return SceneParams(
        sky_top=sky_top, sky_bottom=sky_bottom, sun_on=sun_on, sun_xy=sun_xy, sun_radius=sun_radius,
        sun_color=sun_color, cloud_on=cloud_on, cloud_puffs=cloud_puffs, cloud_color=cloud_color,
        horizon=horizon, grass_color=grass_color, grass_texture=grass_texture, road_on=road_on, road=road,
        road_color=road_color, road_stripe=road_stripe, building_on=building_on, building_box=building_box,
        building_color=building_color, roof_kind=roof_kind, roof_height=roof_height, roof_color=roof_color,
        window_grid=window_grid, window_color=window_color, door_box=door_box, door_color=door_color,
        tree_on=tree_on, tree_trunk=tree_trunk, tree_crown=tree_crown, tree_conifer=tree_conifer,
        tree_color=tree_color, trunk_color=trunk_color, noise_fine=(fine * 2 - 1).astype(np.float32),
        noise_coarse=(_upsample_coarse(coarse) * 2 - 1).astype(np.float32),
    )
