"""Quad division of object segments by connected components, on device (jit/vmap-able).

The reference (``UnifiedParsingSegmenter.expand_segment_quad``) labels the connected components
of the object channel with ``skimage.morphology.label`` (8-connectivity, equal values, 0 is
background), numbered in order of their first pixel in a row-major scan, and splits each
component's bounding box at ``vmid = (top + bottom + 1) // 2`` and ``hmid = (left + right + 1)
// 2``: rows above ``vmid`` get ``-t`` (object + N), the rest ``-b`` (object + 3N); columns left
of ``hmid`` get ``-l`` (object + 2N), the rest ``-r`` (object + 4N). Its loop runs over
``range(1, num)``, so the **last component is never divided** and its pixels stay 0 in both
channels; :func:`quad_divide` replicates this by default (``skip_last_component=True``) and
offers the corrected behaviour only when asked (``skip_last_component=False``).

Components are found here without a host round trip: every foreground pixel starts with its own
row-major index, then a ``lax.while_loop`` repeatedly takes the minimum over the 8 neighbours of
equal value and jumps pointers (``comp = comp[comp]``) until nothing changes, leaving each pixel
with the index of its component's first pixel. That index orders components as skimage does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["connected_components", "quad_divide"]

_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _components_single(labels: jax.Array) -> jax.Array:
    height, width = labels.shape
    count = height * width
    index = jnp.arange(count, dtype=jnp.int32).reshape(height, width)
    foreground = labels > 0
    background = jnp.int32(count)
    padded_labels = jnp.pad(labels, 1, constant_values=-1)
    same = [
        foreground & (padded_labels[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] == labels)
        for dy, dx in _NEIGHBOURS
    ]

    def neighbour_min(comp):
        padded = jnp.pad(comp, 1, constant_values=count)
        for (dy, dx), ok in zip(_NEIGHBOURS, same):
            shifted = padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
            comp = jnp.minimum(comp, jnp.where(ok, shifted, background))
        return comp

    def jump(comp):
        flat = comp.reshape(-1)
        target = jnp.take(flat, jnp.minimum(flat, count - 1)).reshape(height, width)
        return jnp.where(comp < count, target, background)

    def body(state):
        comp, _ = state
        new = jump(jump(neighbour_min(comp)))
        return new, jnp.any(new != comp)

    start = jnp.where(foreground, index, background)
    comp, _ = jax.lax.while_loop(lambda state: state[1], body, (start, jnp.bool_(True)))
    return comp


def connected_components(labels: jax.Array) -> jax.Array:
    """8-connected components of equal nonzero values.

    Args:
      labels: int ``(N, H, W)``; 0 is background.

    Returns:
      int32 ``(N, H, W)``: for each foreground pixel the row-major index of the first pixel of
      its component (so components are ordered as ``skimage.morphology.label`` numbers them);
      ``H * W`` on background.
    """
    return jax.vmap(_components_single)(jnp.asarray(labels, jnp.int32))


def _quad_single(objects: jax.Array, num_objects: int, skip_last: bool) -> tuple[jax.Array, ...]:
    height, width = objects.shape
    count = height * width
    comp = _components_single(objects)
    index = jnp.arange(count, dtype=jnp.int32).reshape(height, width)
    rows, cols = index // width, index % width
    foreground = objects > 0
    segments = comp.reshape(-1)
    box = {}
    for name, values, op in (("top", rows, jax.ops.segment_min), ("bottom", rows, jax.ops.segment_max),
                             ("left", cols, jax.ops.segment_min), ("right", cols, jax.ops.segment_max)):
        per_component = op(values.reshape(-1), segments, num_segments=count + 1)
        box[name] = per_component[comp]
    vmid = (box["top"] + box["bottom"] + 1) // 2
    hmid = (box["left"] + box["right"] + 1) // 2
    divided = foreground
    if skip_last:
        last_first_pixel = jnp.max(jnp.where(foreground & (comp == index), index, -1))
        divided = divided & (comp != last_first_pixel)
    vertical = objects + jnp.where(rows < vmid, num_objects, 3 * num_objects)
    horizontal = objects + jnp.where(cols < hmid, 2 * num_objects, 4 * num_objects)
    return jnp.where(divided, vertical, 0), jnp.where(divided, horizontal, 0)


def quad_divide(objects: jax.Array, num_objects: int, skip_last_component: bool = True) -> jax.Array:
    """The two quad channels of a batch of object segmentations.

    Args:
      objects: int ``(N, H, W)`` object labels (0 = none, 1..num_objects).
      num_objects: ``N_obj``, the number of object classes without ``-``.
      skip_last_component: replicate the reference quirk (the last component of each image in
        row-major order of first pixels is not divided and becomes 0). ``False`` divides all.

    Returns:
      int32 ``(N, H, W, 2)``: channel 0 holds ``-t``/``-b`` labels (object + N / + 3N), channel 1
      ``-l``/``-r`` (object + 2N / + 4N); 0 where not divided.
    """
    objects = jnp.asarray(objects, jnp.int32)
    vertical, horizontal = jax.vmap(
        lambda o: _quad_single(o, int(num_objects), bool(skip_last_component)))(objects)
    return jnp.stack([vertical, horizontal], axis=-1)
