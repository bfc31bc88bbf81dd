"""Paint strokes as edits of a layer: masks pooled to the layer, unit sets, and one jitted edit-and-measure function.

A GANPaint stroke (Bau et al., ICLR 2019, Sec. 4.3; the reference's ``serverstate.decode_intervention``)
turns a set of units on or off inside a painted region of the image. With the layer's
representation ``r`` (N, H, W, U) NHWC, stroke s has

- a mask ``m_s`` (H, W) in [0, 1]: the painted image-space mask, max-pooled to the layer's grid
  (adaptive max pooling, the reference's default ``maskpooling='max'``),
- a unit set ``u_s`` (U,) in {0, 1}: the top-k units of a concept's ranking, or units given
  directly,
- a strength ``w_s`` in [0, 1] and a mode: add (insert: value ``v`` = each unit's insertion value,
  a high quantile of its activations) or remove (ablate: value 0),

and is the edit of :mod:`gandissect_jax.intervention` with ablation ``a_s = w_s m_s u_s``::

    r <- r * (1 - a_s) + v_s * a_s          for s = 1 .. S, in order

(the reference composes several strokes the same way, ``decode_intervention_array``). Strokes
are encoded on the host into fixed-shape arrays (:class:`StrokeArrays`: S strokes at most,
unused ones with an empty mask, which edits nothing exactly), so one compiled program serves
every stroke list: the first call compiles and every later stroke reuses it.

:func:`paint` is the Python API (images only). :func:`edit_program` is what the GANPaint server
runs per request: one jitted function of ``(generator params, segmenter params, z, r offset,
strokes, insertion values, region, photo)`` returning the original and edited images (for a
photo, also the edit blended into it), their segmentations and label counts inside and outside
the painted region.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.generator import split_of
from gandissect_jax.segmenter_protocol import check_segmenter

__all__ = [
    "Stroke",
    "StrokeArrays",
    "MODES",
    "pool_mask",
    "resize_mask",
    "encode_strokes",
    "apply_strokes",
    "region_mask",
    "paint",
    "edit_program",
    "DEFAULT_TOP",
    "MAX_STROKES",
]

MODES = ("add", "remove")
DEFAULT_TOP = 20  # units per concept stroke (the reference's "high" intensity is 15 of 512)
MAX_STROKES = 32


class Stroke(NamedTuple):
    """One paint stroke.

    Attributes:
      mask: float (h, w) in [0, 1] (or bool), image space, any resolution with the image's
        aspect ratio; > 0 where painted (values are the coverage).
      concept: the concept whose top units the stroke edits (``"tree"``), or None with ``units``.
      mode: ``"add"`` (insert the units) or ``"remove"`` (ablate them).
      strength: the edit's weight in [0, 1] (1: the units take their new value fully).
      units: explicit unit numbers (a unit-level edit); with a concept too, these replace its
        top units.
      top: how many of the concept's top units (default :data:`DEFAULT_TOP`).
    """

    mask: Any
    concept: str | None = None
    mode: str = "add"
    strength: float = 1.0
    units: Sequence[int] | None = None
    top: int | None = None


class StrokeArrays(NamedTuple):
    """Strokes as fixed-shape arrays (a pytree; S strokes, layer grid H x W, U units).

    Attributes:
      masks: float32 (S, H, W) pooled masks (0 for unused strokes).
      units: float32 (S, U) 1 where the stroke edits the unit.
      insert: float32 (S,) 1 for add, 0 for remove.
      strength: float32 (S,) the strokes' weights.
    """

    masks: Any
    units: Any
    insert: Any
    strength: Any


def _as_mask(mask: Any, what: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype == bool:
        array = array.astype(np.float32)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"{what} must be a non-empty 2-D (h, w) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{what} values must be finite and in [0, 1]")
    return array


def _bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """Adaptive pooling bins: output i covers [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))."""
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def pool_mask(mask: Any, size: tuple[int, int], how: str = "max") -> np.ndarray:
    """Adaptive max (or mean) pooling of an image-space mask to a layer's grid.

    As PyTorch's ``adaptive_max_pool2d`` / ``adaptive_avg_pool2d`` (which the reference applies to
    stroke masks): cell (i, j) covers rows ``[floor(i h / H), ceil((i + 1) h / H))`` and likewise
    columns, so a mask smaller than the grid is replicated and a larger one pooled.

    Args:
      mask: (h, w) float in [0, 1].
      size: (H, W) of the layer.
      how: "max" (a cell the stroke touches is edited fully) or "mean" (by coverage).

    Returns:
      float32 (H, W).
    """
    mask = _as_mask(mask, "mask")
    rows, cols = int(size[0]), int(size[1])
    reduce = {"max": np.max, "mean": np.mean}.get(how)
    if reduce is None:
        raise ValueError(f"how must be 'max' or 'mean', not {how!r}")
    by_row = np.stack([reduce(mask[a:b], axis=0) for a, b in _bins(mask.shape[0], rows)])
    return np.stack([reduce(by_row[:, a:b], axis=1) for a, b in _bins(mask.shape[1], cols)], axis=1).astype(np.float32)


def resize_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """bool (H, W): the pixels of an image-space mask of any resolution at (H, W) -- its mean
    coverage over each target pixel's footprint (adaptive mean pooling, or replication when the
    mask is smaller) is at least one half."""
    return pool_mask(mask, size, "mean") >= 0.5


def encode_strokes(strokes: Sequence[Stroke], rankings, *, layer_shape: Sequence[int],
                   max_strokes: int = MAX_STROKES, default_top: int = DEFAULT_TOP,
                   image_shape: Sequence[int] | None = None, pooling: str = "max") -> StrokeArrays:
    """Encode strokes as fixed-shape :class:`StrokeArrays` on the host (numpy).

    Args:
      strokes: up to ``max_strokes`` :class:`Stroke`.
      rankings: the layer's :class:`~gandissect_jax.paint.rankings.LayerRankings` (for concept
        strokes; may be None when every stroke gives ``units``).
      layer_shape: ``(H, W, U)`` of the layer.
      max_strokes: S, the padded number of strokes.
      default_top: units per concept stroke when a stroke gives no ``top``.
      image_shape: ``(R_h, R_w)`` of the images; when given, each mask must have its aspect ratio.
      pooling: "max" (the reference's default) or "mean".

    Returns:
      :class:`StrokeArrays` of numpy float32 arrays (S, H, W), (S, U), (S,), (S,).

    Raises:
      ValueError naming the stroke (``strokes[i]``) and field: unknown concept or mode, units out
      of range, strength outside [0, 1], a mask of another aspect ratio or with values outside
      [0, 1], too many strokes.
    """
    height, width, num_units = (int(s) for s in layer_shape)
    if len(strokes) > max_strokes:
        raise ValueError(f"{len(strokes)} strokes; at most {max_strokes} per edit")
    masks = np.zeros((max_strokes, height, width), np.float32)
    units = np.zeros((max_strokes, num_units), np.float32)
    insert = np.zeros((max_strokes,), np.float32)
    strength = np.zeros((max_strokes,), np.float32)
    for index, stroke in enumerate(strokes):
        where = f"strokes[{index}]"
        if not isinstance(stroke, Stroke):
            stroke = Stroke(**stroke) if isinstance(stroke, dict) else stroke
        if stroke.mode not in MODES:
            raise ValueError(f"{where}.mode must be one of {MODES}, not {stroke.mode!r}")
        weight = float(stroke.strength)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"{where}.strength must be in [0, 1], got {stroke.strength!r}")
        if stroke.units is not None:
            chosen = np.asarray(list(stroke.units), dtype=np.int64).reshape(-1)
            if chosen.size == 0:
                raise ValueError(f"{where}.units is empty")
            bad = chosen[(chosen < 0) | (chosen >= num_units)]
            if bad.size:
                raise ValueError(f"{where}.units {bad.tolist()} out of range 0..{num_units - 1}")
        elif stroke.concept is not None:
            if rankings is None:
                raise ValueError(f"{where}: a concept stroke needs rankings")
            top = default_top if stroke.top is None else int(stroke.top)
            try:
                chosen = rankings.top_units(stroke.concept, min(top, num_units) if stroke.top is None else top)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        else:
            raise ValueError(f"{where} needs a concept or units")
        mask = _as_mask(stroke.mask, f"{where}.mask")
        if image_shape is not None:
            image_h, image_w = int(image_shape[0]), int(image_shape[1])
            if mask.shape[0] * image_w != mask.shape[1] * image_h:
                raise ValueError(f"{where}.mask is {mask.shape[0]}x{mask.shape[1]}; it must have the image's "
                                 f"aspect ratio ({image_h}x{image_w}, any resolution)")
        masks[index] = pool_mask(mask, (height, width), pooling)
        units[index, chosen] = 1.0
        insert[index] = 1.0 if stroke.mode == "add" else 0.0
        strength[index] = weight
    return StrokeArrays(masks, units, insert, strength)


def apply_strokes(r: jax.Array, strokes: StrokeArrays, values: jax.Array) -> jax.Array:
    """Apply encoded strokes to a representation, in order (pure, jittable, differentiable).

    Args:
      r: float32 (N, H, W, U) NHWC representation.
      strokes: :class:`StrokeArrays` with masks (S, H, W) (or (S, N, H, W) per image), units
        (S, U), insert (S,), strength (S,).
      values: float32 (U,) the insertion value of every unit.

    Returns:
      float32 (N, H, W, U): ``r <- r * (1 - a_s) + insert_s * values * a_s`` for each stroke s,
      with ``a_s = strength_s * mask_s[..., None] * units_s``. A stroke with an empty mask, no
      units or strength 0 leaves r bit-for-bit unchanged.
    """
    values = jnp.asarray(values, r.dtype)

    def one(r, stroke):
        mask, units, insert, strength = stroke
        a = (strength * mask)[..., None] * units  # (H, W, U) or (N, H, W, U)
        return r * (1 - a) + (insert * values) * a, None

    edited, _ = jax.lax.scan(one, r, (jnp.asarray(strokes.masks, r.dtype), jnp.asarray(strokes.units, r.dtype),
                                      jnp.asarray(strokes.insert, r.dtype), jnp.asarray(strokes.strength, r.dtype)))
    return edited


def region_mask(strokes: Sequence[Stroke], size: tuple[int, int]) -> np.ndarray:
    """bool (H, W): the union of the strokes' masks at an image size, each pixel in when the mask
    covers at least half of it (see :func:`resize_mask`); all False for no strokes."""
    region = np.zeros(tuple(int(s) for s in size), bool)
    for index, stroke in enumerate(strokes):
        region |= resize_mask(_as_mask(stroke.mask, f"strokes[{index}].mask"), size)
    return region


# ------------------------------------------------------------------------------------ programs


@functools.lru_cache(maxsize=64)
def _paint_program(h: Callable, f: Callable) -> Callable:
    def run(params, z, strokes: StrokeArrays, values):
        r, side = h(params, z)
        return f(params, apply_strokes(r, strokes, values), side)

    return jax.jit(run)


def _padded(count: int, minimum: int = 8) -> int:
    """The stroke capacity for ``count`` strokes: a power of two >= 8 (few compiled shapes)."""
    size = minimum
    while size < count:
        size *= 2
    return size


def paint(generator: Any, z: Any, strokes: Sequence[Stroke], rankings, *, layer: str | None = None,
          max_strokes: int | None = None, default_top: int = DEFAULT_TOP) -> jax.Array:
    """Paint strokes into generated images: the GANPaint edit as a function.

    Args:
      generator: a :class:`gandissect_jax.generator.Generator` (``params``, ``split``).
      z: float32 (N, z_dim) latents.
      strokes: :class:`Stroke` list (masks image-space, any resolution, shared by the N images).
      rankings: the layer's :class:`~gandissect_jax.paint.rankings.LayerRankings` (from
        :func:`~gandissect_jax.paint.rankings.load_rankings`): concept orders and insertion values.
      layer: the layer to edit (default ``rankings.layer``).
      max_strokes: the padded stroke capacity (default: a power of two >= 8 holding the strokes;
        one compiled program per capacity, generator architecture and layer).
      default_top: units per concept stroke without ``top``.

    Returns:
      float32 (N, R, R, 3) edited images in about [-1, 1]; with no strokes, ``G(z)`` through the
      split (``f(h(z))``).

    Raises:
      ValueError for malformed strokes (see :func:`encode_strokes`) or a layer mismatch.
    """
    layer = layer or rankings.layer
    if rankings is not None and rankings.layer != layer:
        raise ValueError(f"rankings are for {rankings.layer!r}, not {layer!r}")
    h, f = split_of(generator, layer)
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2:
        raise ValueError(f"z must be (N, z_dim), got shape {tuple(z.shape)}")
    r_shape = jax.eval_shape(h, generator.params, z)[0].shape
    arrays = encode_strokes(strokes, rankings, layer_shape=r_shape[1:],
                            max_strokes=max_strokes or _padded(len(strokes)), default_top=default_top)
    values = rankings.insertion_values if rankings is not None else np.zeros(r_shape[-1], np.float32)
    return _paint_program(h, f)(generator.params, z, arrays, jnp.asarray(values, jnp.float32))


@functools.lru_cache(maxsize=64)
def _edit_program(h: Callable, f: Callable, segment: Callable, num_labels: int) -> Callable:
    from .invert import blend

    def run(gparams, sparams, z, delta, strokes: StrokeArrays, values, region, photo, use_photo):
        r, side = h(gparams, z)
        r = r + delta
        edited = apply_strokes(r, strokes, values)
        original, changed = f(gparams, r, side), f(gparams, edited, side)
        # what the user sees: the generated images, or the photo with the edit blended in
        shown = jax.lax.cond(use_photo, lambda: jnp.concatenate([photo, blend(photo, original, changed)]),
                             lambda: jnp.concatenate([original, changed]))  # (2N, R, R, 3)
        labels = segment(sparams, jnp.clip(shown, -1.0, 1.0))  # (2N, Rs, Rs, D)
        n = z.shape[0]
        inside = jnp.broadcast_to(region[None, :, :, None], labels.shape).astype(jnp.int32)
        which = jnp.broadcast_to((jnp.arange(2 * n) // n)[:, None, None, None], labels.shape)
        index = (which * 2 + (1 - inside)) * num_labels + jnp.clip(labels, 0, num_labels - 1)
        counts = jax.ops.segment_sum(jnp.ones(labels.size, jnp.int32), index.reshape(-1),
                                     num_segments=4 * num_labels)
        return jnp.concatenate([original, changed]), shown, labels, counts.reshape(2, 2, num_labels)

    return jax.jit(run)


def edit_program(generator: Any, segmenter: Any, layer: str) -> Callable:
    """The GANPaint server's per-request function, jitted once per (split, segmenter, label count).

    ``run(gparams, sparams, z, delta, strokes, values, region, photo, use_photo)
    -> (images, shown, labels, counts)``:

    - z float32 (N, z_dim); delta float32 (N, H, W, U) added to ``h(z)`` (zeros for generated
      images; the r refinement of an inverted photo, :mod:`gandissect_jax.paint.invert`);
    - strokes :class:`StrokeArrays`; values float32 (U,) insertion values;
    - region bool (Rs, Rs): the painted pixels at the segmentation's size;
    - photo float32 (N, R, R, 3) in [-1, 1] and use_photo bool (): edit a photo (zeros / False
      for generated images);
    - images float32 (2N, R, R, 3): the generator's images, rows 0..N-1 unedited
      (``f(h(z) + delta)``), N..2N-1 edited;
    - shown float32 (2N, R, R, 3): what the user sees: ``images``, or for a photo the photo and
      the edit blended into it (:func:`gandissect_jax.paint.invert.blend`);
    - labels int32 (2N, Rs, Rs, D): segmentations of ``shown`` (clipped to [-1, 1]);
    - counts int32 (2, 2, L): label entries of ``labels`` [before / after, inside / outside the
      region, label].

    All parameters are arguments: one compiled program serves any weights of an architecture, and
    every stroke list of the same capacity, generated image or photo.
    """
    check_segmenter(segmenter)
    h, f = split_of(generator, layer)
    return _edit_program(h, f, segmenter.segment, len(segmenter.labels))
