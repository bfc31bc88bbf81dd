"""Causal effects of units: ablation, insertion, context maps and ablation / insertion curves.

The paper (Bau et al., ICLR 2019, Sec. 3.2) measures what a set of units U *causes* by forcing
them off or on at a set of positions P of the representation ``r = h(z)`` and segmenting
``x = f(r')``::

    ablation   r'_{U,P} = 0                  (ablate)
    insertion  r'_{U,P} = k                  (insert; k a per-unit value)

and the average causal effect on a concept c, ``E_z[s_c(x_inserted)] - E_z[s_c(x_ablated)]``, or
the change of the concept's share against the unedited image. Everything here is a pure function
of explicit parameters, arrays in and arrays out, NHWC; ``units`` may be integer unit numbers
``(K,)`` or a float mask ``(C,)`` (an ablation fraction per unit), both traceable, so the
functions compose with ``jax.jit`` and ``jax.vmap`` (e.g. over unit sets or latents)::

    x = ablate(G, G.params, z, "layer4", units)                       # (N, R, R, 3)
    x = insert(G, G.params, z, "layer4", units, value, where=mask)    # mask (H, W) positions
    effect = context_map(G, S, G.params, S.params, z, "layer4", units, value, labels)  # (N, H, W)
    shares = ace_curve(G, S, G.params, S.params, z, "layer4", ranking, counts, labels)  # (K, N)

``G`` is any :class:`gandissect_jax.generator.Generator` and ``S`` any
:class:`gandissect_jax.segmenter.Segmenter`; they are static arguments (their ``split`` functions
and their structure key the compiled programs; their parameters are traced), so one compiled
program serves every weight set of an architecture. Every function taking them refuses, before
any work, an object that is not one, with a TypeError naming what it lacks
(:func:`~gandissect_jax.generator.check_generator`, :func:`~gandissect_jax.segmenter.check_segmenter`).

A concept's **share** of an image is the fraction of its (segmentation) pixels that carry any of
the concept's labels in any channel -- the reference's ``(seg == c).max(channel)`` pixel count
(``netdissect.fullablate.measure_full_ablation``) over the number of pixels.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax._structure import Static
from gandissect_jax.generator import split_of
from gandissect_jax.segmenter_protocol import check_segmenter
from gandissect_jax.ace import layer_shape

__all__ = [
    "unit_mask",
    "ablate",
    "insert",
    "concept_mask",
    "concept_share",
    "label_pixel_shares",
    "paired_label_shares",
    "context_map",
    "block_at",
    "cell_labels",
    "ace_curve",
    "ace_curve_program",
    "curve_batch",
    "unit_counts",
    "bootstrap_mean",
    "BootstrapMean",
]


def unit_mask(units: Any, num_units: int) -> jax.Array:
    """float32 ``(C,)`` ablation fractions from unit numbers or a mask.

    Args:
      units: int ``(K,)`` unit numbers (set to 1), or a bool / float ``(C,)`` mask (used as is, as
        fractions in [0, 1]); may be traced.
      num_units: C, the layer's channels.

    Raises:
      ValueError for a mask of another length, or (concrete input only) unit numbers outside
      ``0..C-1``.
    """
    units = jnp.asarray(units)
    if jnp.issubdtype(units.dtype, jnp.integer):
        units = units.reshape(-1)
        if not isinstance(units, jax.core.Tracer) and units.size:
            low, high = int(units.min()), int(units.max())
            if low < 0 or high >= num_units:
                raise ValueError(f"units must lie in 0..{num_units - 1}; got {low}..{high}")
        return jnp.zeros((num_units,), jnp.float32).at[units].set(1.0)
    if units.shape != (num_units,):
        raise ValueError(f"a unit mask must have shape ({num_units},); got {units.shape}")
    return units.astype(jnp.float32)


def _positions(where: Any, grid: tuple[int, int]) -> jax.Array:
    """float32 position map broadcastable to ``(N, H, W, 1)``: all ones for None, else ``where``
    given as (H, W) or (N, H, W)."""
    if where is None:
        return jnp.ones((*grid, 1), jnp.float32)
    where = jnp.asarray(where, jnp.float32)
    if where.shape[-2:] != tuple(grid) or where.ndim not in (2, 3):
        raise ValueError(f"where must be (H, W) = {tuple(grid)} or (N, H, W); got {where.shape}")
    return where[..., None]


def _edit(r: jax.Array, mask: jax.Array, where: Any, value: Any) -> jax.Array:
    a = mask * _positions(where, r.shape[1:3])
    if value is None:
        return r * (1 - a)
    return r * (1 - a) + jnp.asarray(value, r.dtype) * a


def ablate(generator: Any, params: Any, z: Any, layer: str, units: Any, where: Any = None) -> jax.Array:
    """Images with ``units`` of ``layer`` set to zero: ``f(r * (1 - m), side)`` with ``r, side = h(z)``.

    Args:
      generator: a Generator (``split(layer)``); params: its parameters (may be traced).
      z: float32 (N, z_dim) latents.
      layer: the layer to edit.
      units: int (K,) unit numbers or float (C,) ablation fractions (see :func:`unit_mask`).
      where: None (every position) or float (H, W) / (N, H, W) weights of the positions P.

    Returns:
      float32 (N, R, R, 3) images (about [-1, 1]).
    """
    h, f = split_of(generator, layer)
    r, side = h(params, z)
    return f(params, _edit(r, unit_mask(units, r.shape[-1]), where, None), side)


def insert(generator: Any, params: Any, z: Any, layer: str, units: Any, value: Any,
           where: Any = None) -> jax.Array:
    """Images with ``units`` of ``layer`` forced to ``value`` at the positions ``where``:
    ``r' = r * (1 - a) + value * a`` with ``a = mask(units) * where`` (the reference's
    ``edit_layer`` with an ablation and a replacement).

    Args:
      generator, params, z, layer, units, where: as for :func:`ablate`.
      value: float scalar or (C,) per-unit value k (e.g. each unit's 0.99 quantile, the
        reference GANPaint's choice).

    Returns:
      float32 (N, R, R, 3) images.
    """
    h, f = split_of(generator, layer)
    r, side = h(params, z)
    return f(params, _edit(r, unit_mask(units, r.shape[-1]), where, value), side)


def concept_mask(segmentation: jax.Array, labels: Sequence[int]) -> jax.Array:
    """bool (N, h, w): pixels where any channel of an int (N, h, w, D) segmentation holds any of
    ``labels``."""
    labels = jnp.asarray(tuple(int(c) for c in labels), segmentation.dtype)
    return (segmentation[..., None] == labels).any((-1, -2))


def _segment(segmenter: Any, sparams: Any, images: jax.Array, downsample: int) -> jax.Array:
    return segmenter.segment(sparams, jnp.clip(images, -1.0, 1.0), downsample)


def concept_share(segmenter: Any, sparams: Any, images: jax.Array, labels: Sequence[int],
                  downsample: int = 1) -> jax.Array:
    """float32 (N,): the fraction of each image's segmentation pixels carrying any of ``labels``
    (images clipped to [-1, 1] first, as in dissection)."""
    return concept_mask(_segment(segmenter, sparams, images, downsample), labels).mean((1, 2))


def label_pixel_shares(segmentation: jax.Array, num_labels: int) -> jax.Array:
    """float32 (N, L): per image, the fraction of pixels carrying each label in any channel of an
    int (N, h, w, D) segmentation (a label in two channels of one pixel counts once). Column 0
    counts the pixels with no label in any channel. Values outside ``0..L-1`` are ignored."""
    n, height, width, depth = segmentation.shape
    seg = segmentation.astype(jnp.int32)
    keep = (seg > 0) & (seg < num_labels)
    for d in range(1, depth):  # drop a label already counted in an earlier channel of the pixel
        keep = keep.at[..., d].set(keep[..., d] & ~(seg[..., d:d + 1] == seg[..., :d]).any(-1))
    rows = jnp.broadcast_to(jnp.arange(n)[:, None, None, None], seg.shape)
    counts = jnp.zeros((n, num_labels), jnp.float32).at[rows, jnp.where(keep, seg, 0)].add(
        keep.astype(jnp.float32))
    none = (~(keep.any(-1))).sum((1, 2)).astype(jnp.float32)
    return counts.at[:, 0].set(none) / (height * width)


@functools.partial(jax.jit, static_argnames=("split", "segmenter", "num_labels", "downsample", "insertion"))
def _paired(gparams, sparams, z, mask, value, where, *, split, segmenter, num_labels, downsample, insertion):
    h, f = split
    r, side = h(gparams, z)
    edited = _edit(r, mask, where, value if insertion else None)
    shares = [label_pixel_shares(_segment(segmenter.obj, sparams, f(gparams, x, side), downsample), num_labels)
              for x in (r, edited)]
    return shares[0], shares[1]


def paired_label_shares(generator: Any, segmenter: Any, gparams: Any, sparams: Any, z: Any, layer: str,
                        units: Any, *, value: Any = None, where: Any = None,
                        downsample: int = 1) -> tuple[jax.Array, jax.Array]:
    """Every label's share of each image before and after an edit, in one jitted call.

    The edit is :func:`ablate` (``value=None``) or :func:`insert` (``value`` given) of ``units``
    at ``where``. Returns float32 ``(before, after)``, each (N, L) as :func:`label_pixel_shares`;
    ``after - before`` per sample is the causal effect of the edit on every label, whose mean over
    samples is the average causal effect.
    """
    check_segmenter(segmenter)
    split = tuple(split_of(generator, layer))
    shape = layer_shape(generator, layer)
    mask = unit_mask(units, shape[-1])
    where = jnp.ones(shape[:2], jnp.float32) if where is None else jnp.asarray(where, jnp.float32)
    insertion = value is not None
    value = jnp.zeros((), jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
    return _paired(gparams, sparams, jnp.asarray(z, jnp.float32), mask, value, where, split=split,
                   segmenter=Static(segmenter), num_labels=len(segmenter.labels), downsample=int(downsample),
                   insertion=insertion)


# ============================================================================================
# context maps


def block_at(position: Any, grid: tuple[int, int], block: tuple[int, int] = (1, 1)) -> jax.Array:
    """float32 (H, W) map of the ``block`` = (height, width) cells centred on the flat position
    ``position`` (row * W + col; may be traced): rows ``row - height // 2`` to ``row - height // 2 +
    height - 1`` and likewise the columns, cut off at the edges of the ``grid`` = (H, W). A (1, 1)
    block is the one-hot map of the position."""
    rows, cols = grid
    height, width = block
    row, col = jnp.asarray(position) // cols, jnp.asarray(position) % cols
    ys, xs = jnp.arange(rows), jnp.arange(cols)
    top, left = row - height // 2, col - width // 2
    in_rows = (ys >= top) & (ys < top + height)
    in_cols = (xs >= left) & (xs < left + width)
    return (in_rows[:, None] & in_cols[None, :]).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("split", "segmenter", "labels", "downsample", "chunk", "block"))
def _context_map(gparams, sparams, z, mask, value, *, split, segmenter, labels, downsample, chunk, block):
    h, f = split
    S = segmenter.obj
    r, side = h(gparams, z)
    rows, cols = r.shape[1:3]
    before = concept_share(S, sparams, f(gparams, r, side), labels, downsample)  # (N,)

    def at(position):
        where = block_at(position, (rows, cols), block)
        images = f(gparams, _edit(r, mask, where, value), side)
        return concept_share(S, sparams, images, labels, downsample) - before

    positions = jnp.arange(rows * cols)
    if chunk is None or chunk >= rows * cols:
        effect = jax.vmap(at)(positions)  # (P, N)
    else:
        effect = jax.lax.map(at, positions, batch_size=chunk)
    return effect.T.reshape(len(z), rows, cols)


def context_map(generator: Any, segmenter: Any, gparams: Any, sparams: Any, z: Any, layer: str,
                units: Any, value: Any, labels: Sequence[int], *, downsample: int = 1,
                positions_per_step: int | None = None, block: tuple[int, int] = (1, 1)) -> jax.Array:
    """The causal effect of inserting ``units`` at each position: the paper's context map (Sec.
    4.4, Fig. 11: doors appear where there are buildings, not in the sky).

    For every feature-map position p of every sample, ``units`` are set to ``value`` at p alone
    (:func:`insert` with a one-hot ``where``), or in the ``block`` of cells centred on p
    (:func:`block_at`), and the concept's share of the segmented image is compared with the
    unedited image's: ``effect[n, p] = share(x_n with U=k at p) - share(x_n)``.
    All positions run in one jitted call, ``vmap``-ed over positions (or, with
    ``positions_per_step``, mapped over chunks of that many positions to bound memory).

    Args:
      generator, segmenter: a Generator and a Segmenter; gparams, sparams their parameters.
      z: float32 (N, z_dim).
      layer: the layer edited; (H, W) its feature map.
      units: int (K,) or float (C,) (see :func:`unit_mask`).
      value: float scalar or (C,) inserted value k.
      labels: the concept's label numbers (a union).
      downsample: segmentation stride (a static int).
      block: (height, width) cells edited around each position (static; default one cell), each
        in [1, H] and [1, W].

    Returns:
      float32 (N, H, W): change of the concept's share (fraction of the image's pixels).

    Raises:
      ValueError for a block that is not two whole numbers inside the feature map.
    """
    check_segmenter(segmenter)
    split = tuple(split_of(generator, layer))
    shape = layer_shape(generator, layer)
    block = tuple(int(b) for b in block)
    if len(block) != 2 or not (1 <= block[0] <= shape[0] and 1 <= block[1] <= shape[1]):
        raise ValueError(f"block must be (height, width) within the {shape[0]}x{shape[1]} feature map of {layer}; "
                         f"got {block}")
    mask = unit_mask(units, shape[-1])
    value = jnp.zeros((), jnp.float32) + jnp.asarray(value, jnp.float32)
    return _context_map(gparams, sparams, jnp.asarray(z, jnp.float32), mask, value, split=split,
                        segmenter=Static(segmenter), labels=tuple(int(c) for c in labels),
                        downsample=int(downsample), chunk=positions_per_step, block=block)


def cell_labels(segmentation: jax.Array, grid: tuple[int, int], num_labels: int) -> jax.Array:
    """int32 (N, H, W): the most frequent label of each feature-map cell (the block of an int
    (N, h, w, D) segmentation under it; a pixel's label is its first nonzero channel; ties to the
    lower label), the "context" a context map is read against."""
    seg = segmentation[..., 0].astype(jnp.int32)
    for d in range(1, segmentation.shape[-1]):
        seg = jnp.where(seg == 0, segmentation[..., d].astype(jnp.int32), seg)
    n, height, width = seg.shape
    rows, cols = grid
    if height % rows or width % cols:
        raise ValueError(f"segmentation {height}x{width} is not a whole multiple of the {rows}x{cols} grid")
    blocks = seg.reshape(n, rows, height // rows, cols, width // cols).transpose(0, 1, 3, 2, 4)
    votes = jax.nn.one_hot(blocks.reshape(n, rows, cols, -1), num_labels, dtype=jnp.int32).sum(-2)
    return jnp.argmax(votes, -1).astype(jnp.int32)


# ============================================================================================
# curves


def unit_counts(num_units: int, largest: int = 64) -> tuple[int, ...]:
    """``(0, 1, 2, 4, ..., 2^k)`` up to ``min(largest, num_units)`` (and that number itself if it
    is not a power of two): the unit counts of the paper's ablation curves (Figs. 4, 10)."""
    top = min(int(largest), int(num_units))
    counts = [0]
    n = 1
    while n <= top:
        counts.append(n)
        n *= 2
    if counts[-1] != top:
        counts.append(top)
    return tuple(counts)


@functools.partial(jax.jit, static_argnames=("split", "segmenter", "labels", "downsample", "insertion"))
def _curve(gparams, sparams, z, masks, value, where, *, split, segmenter, labels, downsample, insertion):
    h, f = split
    r, side = h(gparams, z)

    def one(mask):
        edited = _edit(r, mask, where, value if insertion else None)
        return concept_share(segmenter.obj, sparams, f(gparams, edited, side), labels, downsample)

    return jax.vmap(one)(masks)  # (K, N)


def ace_curve(generator: Any, segmenter: Any, gparams: Any, sparams: Any, z: Any, layer: str,
              ranking: Any, counts: Sequence[int], labels: Sequence[int], *, mode: str = "ablate",
              value: Any = None, where: Any = None, downsample: int = 1) -> jax.Array:
    """The concept's share as the top ``counts[k]`` units of ``ranking`` are ablated (or inserted):
    the paper's Figs. 4 and 10 (the reference's ``netdissect.fullablate``), for every count in one
    jitted call ``vmap``-ed over the unit sets.

    Args:
      generator, segmenter, gparams, sparams, z, layer, labels, downsample: as for
        :func:`context_map`.
      ranking: int (C,) units, most important first (e.g. :func:`gandissect_jax.ace.ace_ranking`
        or the IoU order); the set for count n is ``ranking[:n]``.
      counts: the set sizes, e.g. :func:`unit_counts` ``(0, 1, 2, 4, ..., 64)`` (static).
      mode: ``"ablate"`` (units set to 0) or ``"insert"`` (units set to ``value``).
      value: float scalar or (C,) inserted value (``mode="insert"`` only).
      where: None (every position) or float (H, W) positions edited.

    Returns:
      float32 (K, N): the concept's share of each sample's image for each count.
    """
    consts, static = ace_curve_program(generator, segmenter, gparams, sparams, layer, ranking, counts, labels,
                                       mode=mode, value=value, where=where, downsample=downsample)
    return curve_batch(consts, jnp.asarray(z, jnp.float32), **dict(static))


def curve_batch(consts, z, *, split, segmenter, labels, downsample, insertion):
    """:func:`ace_curve` of one batch z float32 (N, z_dim), float32 (K, N), from the ``consts``
    and ``static`` of :func:`ace_curve_program` (a function of the form
    :func:`gandissect_jax.ace.sharded.map_batches` runs)."""
    gparams, sparams, masks, value, where = consts
    return _curve(gparams, sparams, z, masks, value, where, split=split, segmenter=segmenter, labels=labels,
                  downsample=downsample, insertion=insertion)


def ace_curve_program(generator: Any, segmenter: Any, gparams: Any, sparams: Any, layer: str, ranking: Any,
                      counts: Sequence[int], labels: Sequence[int], *, mode: str = "ablate",
                      value: Any = None, where: Any = None, downsample: int = 1) -> tuple[tuple, tuple]:
    """``(consts, static)`` of :func:`curve_batch` for the curve :func:`ace_curve` describes (its
    arguments but z): ``consts`` = (gparams, sparams, float32 (K, C) unit
    masks, float32 inserted value, float32 (H, W) edited positions), ``static`` = hashable
    ``(name, value)`` pairs. ValueError for a bad ``mode`` / ``value`` pair."""
    if mode not in ("ablate", "insert"):
        raise ValueError(f"mode must be 'ablate' or 'insert', got {mode!r}")
    if (mode == "insert") != (value is not None):
        raise ValueError("mode='insert' needs a value; mode='ablate' takes none")
    ranking = jnp.asarray(ranking, jnp.int32).reshape(-1)
    num_units = ranking.shape[0]
    counts = jnp.asarray(tuple(int(c) for c in counts), jnp.int32)
    position = jnp.zeros((num_units,), jnp.int32).at[ranking].set(jnp.arange(num_units, dtype=jnp.int32))
    masks = (position[None, :] < counts[:, None]).astype(jnp.float32)  # (K, C)
    check_segmenter(segmenter)
    split = tuple(split_of(generator, layer))
    value = jnp.zeros((), jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
    grid = layer_shape(generator, layer)[:2]
    where = jnp.ones(grid, jnp.float32) if where is None else jnp.asarray(where, jnp.float32)
    static = (("split", split), ("segmenter", Static(segmenter)), ("labels", tuple(int(c) for c in labels)),
              ("downsample", int(downsample)), ("insertion", mode == "insert"))
    return (gparams, sparams, masks, value, where), static


# ============================================================================================
# statistics


class BootstrapMean(NamedTuple):
    """A mean over samples with a percentile bootstrap confidence interval (float64 arrays)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float
    resamples: int


def bootstrap_mean(values: Any, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> BootstrapMean:
    """Mean over axis 0 of ``values`` (N, ...) and its percentile bootstrap interval: ``resamples``
    resamplings of the N samples with replacement (``numpy.random.RandomState(seed)``), the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their means. Deterministic by seed.

    ValueError for fewer than 2 samples, a level outside (0, 1) or fewer than 10 resamples."""
    values = np.asarray(values, np.float64)
    if values.ndim == 0 or len(values) < 2:
        raise ValueError("bootstrap_mean needs at least 2 samples")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 10:
        raise ValueError(f"resamples must be >= 10, got {resamples}")
    n = len(values)
    rng = np.random.RandomState(seed)
    means = np.stack([values[rng.randint(0, n, n)].mean(0) for _ in range(int(resamples))])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return BootstrapMean(values.mean(0), low, high, float(level), int(resamples))
