"""Pure edits of a layer's representation r: ablating and inserting units.

The edit is the reference's (``netdissect.nethook.InstrumentedModel.edit_layer``)::

    r' = r * (1 - a) + v * a        (replacement v given)
    r' = r * (1 - a)                (no replacement: ablation towards zero)

with ``a`` the *ablation* (a convex-combination weight, not necessarily binary) and ``v`` the
*replacement*. Everything is NHWC: ``a`` and ``v`` may be a scalar, a per-channel vector ``(C,)``,
a per-position map ``(H, W, C)`` (or ``(H, W, 1)`` for all channels alike) or a batch
``(N, H, W, C)``, i.e. anything that broadcasts to r by numpy rules. This is the reference's
broadcasting (which adds a leading batch axis and trailing spatial axes to NCHW values)
transposed to NHWC. A replacement without an ablation uses ``a = 1``.

An :class:`Edit` bundles ``(ablation, replacement)``; it is a pytree, so it can be passed through
``jit`` and differentiated (e.g. optimising a soft ablation mask as in ACE)::

    h, f = G.split("layer4")
    edit = ablation_edit([0, 5, 7], num_channels=G.layer_shape("layer4")[-1])
    r, side = h(G.params, z)
    x = f(G.params, edit.apply(r), side)
    x = edited_generator(G, "layer4")(G.params, z, edit)      # the same, one jitted function

``G`` is any :class:`gandissect_jax.generator.Generator`; its parameters (and the segmenter's)
are always passed to the jitted functions as arguments, so one compiled program serves every
generator of an architecture.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.dissection.labels import count_labels
from gandissect_jax.generator import split_of

__all__ = [
    "Edit",
    "edit_representation",
    "ablation_edit",
    "insertion_edit",
    "edited_generator",
    "label_shares",
]


def _matching(value: Any, r: jax.Array, what: str) -> jax.Array:
    """``value`` as an array of r's dtype, checked to broadcast to r's shape the NHWC way."""
    value = jnp.asarray(value, dtype=r.dtype)
    if value.ndim == 2 or value.ndim > r.ndim:
        raise ValueError(
            f"{what} has shape {value.shape}; for a representation of shape {r.shape} (NHWC) use "
            "a scalar, (C,), (H, W, C), (H, W, 1) or (N, H, W, C)"
        )
    try:
        broadcast = np.broadcast_shapes(value.shape, r.shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(r.shape):
        raise ValueError(
            f"{what} of shape {value.shape} does not broadcast to the representation's shape "
            f"{tuple(r.shape)} (NHWC)"
        )
    return value


def edit_representation(
    r: jax.Array, ablation: Any = None, replacement: Any = None
) -> jax.Array:
    """Return ``r * (1 - ablation) + replacement * ablation`` (or ``r * (1 - ablation)``).

    Args:
      r: the representation, (N, H, W, C) or one sample (H, W, C), float.
      ablation: weight in [0, 1] broadcastable to r (see module docstring); None means 1 if a
        replacement is given, else no edit.
      replacement: value broadcastable to r, or None (ablate towards zero).

    Returns:
      The edited representation, same shape and dtype as r.
    """
    r = jnp.asarray(r)
    if ablation is None:
        if replacement is None:
            return r
        ablation = 1.0
    a = _matching(ablation, r, "ablation")
    out = r * (1 - a)
    if replacement is not None:
        out = out + _matching(replacement, r, "replacement") * a
    return out


class Edit(NamedTuple):
    """An edit of one layer: ``ablation`` and optional ``replacement`` (NHWC-broadcastable arrays)."""

    ablation: Any
    replacement: Any = None

    def apply(self, r: jax.Array) -> jax.Array:
        """The edited representation (see :func:`edit_representation`)."""
        return edit_representation(r, self.ablation, self.replacement)


def _unit_indices(units: Sequence[int] | np.ndarray, num_channels: int) -> np.ndarray:
    units = np.asarray(units, dtype=np.int64).reshape(-1)
    bad = units[(units < 0) | (units >= num_channels)]
    if bad.size:
        raise ValueError(f"units {bad.tolist()} out of range for a layer with {num_channels} channels")
    return units


def ablation_edit(
    units: Sequence[int] | np.ndarray, num_channels: int, strength: float = 1.0
) -> Edit:
    """Ablate ``units`` everywhere: ablation ``(C,)`` = ``strength`` at the units, 0 elsewhere.

    Returns:
      ``Edit(ablation=(C,) float32, replacement=None)``, so the units become ``(1-strength) * r``.
    """
    units = _unit_indices(units, num_channels)
    ablation = np.zeros(num_channels, np.float32)
    ablation[units] = strength
    return Edit(jnp.asarray(ablation), None)


def insertion_edit(
    units: Sequence[int] | np.ndarray,
    value: float,
    layer_shape: Sequence[int],
    positions: Sequence[Sequence[int]] | np.ndarray | None = None,
) -> Edit:
    """Set ``units`` to ``value`` at ``positions`` (all positions if None).

    Args:
      units: channel indices.
      value: the inserted activation (e.g. a high quantile of the unit).
      layer_shape: ``(H, W, C)`` of the layer (``G.layer_shape(layer)``).
      positions: ``(P, 2)`` (row, col) pairs, or None for everywhere.

    Returns:
      ``Edit(ablation, replacement)``: the ablation is 1 at the units (and positions), of shape
      ``(H, W, C)`` with positions or ``(C,)`` without; the replacement is ``(C,)`` holding
      ``value`` at the units, 0 elsewhere.
    """
    height, width, channels = (int(s) for s in layer_shape)
    units = _unit_indices(units, channels)
    replacement = np.zeros(channels, np.float32)
    replacement[units] = value
    if positions is None:
        ablation = np.zeros(channels, np.float32)
        ablation[units] = 1.0
    else:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
        rows, cols = positions[:, 0], positions[:, 1]
        outside = (rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)
        if outside.any():
            raise ValueError(
                f"positions {positions[outside].tolist()} are outside the {height}x{width} map"
            )
        ablation = np.zeros((height, width, channels), np.float32)
        ablation[rows[:, None], cols[:, None], units[None, :]] = 1.0
    return Edit(jnp.asarray(ablation), jnp.asarray(replacement))


@functools.lru_cache(maxsize=64)
def _edited(h: Callable, f: Callable) -> Callable[[Any, jax.Array, Edit], jax.Array]:
    def run(params, z, edit: Edit):
        r, side = h(params, z)
        return f(params, edit.apply(r), side)

    return jax.jit(run)


def edited_generator(G: Any, layer: str) -> Callable[[Any, jax.Array, Edit], jax.Array]:
    """A jitted pure function ``(params, z, edit) -> images`` that edits ``layer``'s output.

    Equivalent to ``r, side = h(params, z); f(params, edit.apply(r), side)`` with
    ``h, f = G.split(layer)``; differentiable w.r.t. params, z and the edit's arrays. The function
    is made once per split (``h``, ``f``): calling this again, or for another generator sharing
    the split functions (every :class:`~gandissect_jax.proggan.ProgressiveGenerator` of one
    config), returns the same function, which compiles once per input shape.
    """
    h, f = split_of(G, layer)
    return _edited(h, f)


def label_shares(
    generator: Any,
    segmenter: Any,
    z: Any,
    *,
    layer: str | None = None,
    edit: Edit | None = None,
    batch_size: int = 64,
    seg_downsample: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """Pixel share of every segmenter label in the generated images, optionally under an edit.

    This is the measurement behind the paper's causal effects: the average causal effect of an
    edit on concept c is ``label_shares(..., edit=e)[c] - label_shares(...)[c]`` (every image has
    the same number of pixels, so the pooled share is the mean of per-image shares).

    Args:
      generator: a :class:`gandissect_jax.generator.Generator` (``params``, ``apply``, ``split``).
      segmenter: the Segmenter protocol; images are clipped to [-1, 1] before segmenting, as in
        the dissection pipeline.
      z: float32 (N, z_dim) latents.
      layer, edit: edit ``layer``'s representation with ``edit`` (both or neither).
      batch_size: images generated and segmented at once; memory does not grow with N.
      seg_downsample: output stride of the segmentation.
      progress: show a tqdm bar.

    Returns:
      float64 (L,) shares summing to 1 over the L labels (label 0 counts unlabelled pixels);
      with several segmentation channels D, every channel's labels are counted.

    Raises:
      ValueError: only one of layer / edit given, z not (N, z_dim) or empty, or the segmenter
      produced label numbers outside ``0..L-1``.

    The generator and segmenter run with their parameters as arguments of functions compiled
    once per architecture and batch shape (see :func:`edited_generator`); batches are counted on
    the device and nothing returns to the host before the end.
    """
    if (layer is None) != (edit is None):
        raise ValueError("give both layer and edit, or neither")
    z = np.asarray(z, np.float32)
    if z.ndim != 2:
        raise ValueError(f"z must be (N, z_dim); got shape {z.shape}")
    if len(z) == 0:
        raise ValueError("no images: z is empty")
    gparams, sparams = generator.params, segmenter.params
    if edit is None:
        from gandissect_jax.generator import jitted

        apply = jitted(generator.apply)

        def images_of(batch):
            return apply(gparams, batch)
    else:
        run = edited_generator(generator, layer)

        def images_of(batch):
            return run(gparams, batch, edit)
    num_labels = len(segmenter.labels)
    starts = range(0, len(z), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="label shares", unit="batch")
    per_batch = []
    for start in starts:
        images = jnp.clip(images_of(jnp.asarray(z[start : start + batch_size])), -1.0, 1.0)
        per_batch.append(count_labels(segmenter.segment(sparams, images, seg_downsample), num_labels))
    counts = np.zeros(num_labels, np.int64)
    for batch_counts, out_of_range in jax.device_get(per_batch):
        if int(out_of_range):
            raise ValueError(f"segmenter produced label numbers outside 0..{num_labels - 1}")
        counts += np.asarray(batch_counts, np.int64)
    return counts / counts.sum()
