"""What the image strips draw, gathered during the count pass: each unit's top-k activation maps and the top-k samples' thumbnails.

The top-k samples of every unit are fixed by the first quantile pass; the count pass, which runs
the whole generator anyway (its images go to the segmenter), then keeps for the strips

- per layer, the (h, w) feature map of unit u for each of its k top samples (:func:`unit_maps`):
  float32 (U, k, h, w), ``4 k h w`` bytes per unit on every device and on the host;
- per distinct top-k sample, its uint8 (T, T, 3) strip thumbnail (:func:`thumbnails`): the
  device buffers the float32 images of the wanted samples it meets (``slots`` of them, 12 H W
  bytes each; drained alone when full), and the host turns each into the thumbnail the strips
  show (:func:`~.strips.thumbnail_images`), ``3 T^2`` bytes per distinct top-k sample: at most
  min(N, sum of U k over the layers), whatever N (at T = 160, 76.8 KB each; the dissection keeps
  no gallery when they would exceed :data:`MAX_GALLERY_BYTES` and renders the strips instead).

Both are host states of the count pass, so its checkpoints hold them and a resumed pass has
them; the strips then need no generator run (:func:`~.strips.write_strips` with a
:class:`Gallery`). Every value is selected, never summed, so the result does not depend on the
sharding, the batch size or the resume point. The maps are the very activations the statistics
measured; the thumbnails equal a re-render wherever the count pass's program and the render
program compute the same bits (tested byte for byte on CPU in float32; not checked on GPU/TPU).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from gandissect_jax.images import to_uint8

from .resume import UNREADABLE, atomic_file
from .statistics import INT32_MAX, StreamingStatistic
from .strips import thumbnail_images, thumbnail_side


class MapsState(NamedTuple):
    """maps: float32 (U, k, h, w), unit u's map in its rank-r top sample; seen: bool (U, k)."""

    maps: Any
    seen: Any


def unit_maps(num_units: int, k: int, map_size: tuple[int, int]) -> StreamingStatistic:
    """Each unit's feature map in each of its top-k samples.

    inputs: (features float32 (n, h, w, U), top-k sample numbers int32 (U, k), sample_index int32 (n,)).
    finalize -> float32 (U, k, h, w); RuntimeError when a top-k sample never came by.
    """
    h, w = (int(s) for s in map_size)

    def init():
        return MapsState(jnp.zeros((num_units, k, h, w), jnp.float32), jnp.zeros((num_units, k), bool))

    def update(state, inputs, valid):
        features, topk, index = inputs
        match = (topk[None] == index[:, None, None]) & valid[:, None, None]  # (n, U, k)
        has = jnp.any(match, axis=0)
        position = jnp.argmax(match, axis=0)  # the one batch row holding the sample, if any
        per_unit = jnp.transpose(features, (3, 0, 1, 2))  # (U, n, h, w)
        picked = jnp.take_along_axis(per_unit, position[:, :, None, None], axis=1)  # (U, k, h, w)
        return MapsState(jnp.where(has[:, :, None, None], picked, state.maps), state.seen | has)

    def merge(a, b):
        seen = np.asarray(b.seen)
        maps = np.array(a.maps, np.float32)
        maps[seen] = np.asarray(b.maps)[seen]
        return MapsState(maps, np.asarray(a.seen) | seen)

    def finalize(state):
        if not np.all(state.seen):
            raise RuntimeError(f"{int((~np.asarray(state.seen)).sum())} top-k samples never came by in the count pass")
        return np.asarray(state.maps, np.float32)

    return StreamingStatistic(init, update, merge, finalize)


class ImagesState(NamedTuple):
    """Device: slot: int32 (S,) position in ``wanted`` of each buffered image (INT32_MAX = empty),
    images: float32 (S, H, W, 3), fill: int32 (). Host: thumbs uint8 (D, T, T, 3), have bool (D,)
    (the slots empty)."""

    slot: Any
    images: Any
    fill: Any
    thumbs: Any
    have: Any


def thumbnails(num_wanted: int, image_size: tuple[int, int], thumbnail: int | None, slots: int) -> StreamingStatistic:
    """The strip thumbnails of the ``num_wanted`` samples whose numbers are the sorted ``wanted``.

    inputs: (images float (n, H, W, 3) in [-1, 1], wanted int32 (D,) sorted, sample_index int32 (n,)).
    Each device buffers the images of wanted samples in ``slots`` slots (capacity: ``slots``
    samples between drains); the host makes each one's thumbnail (:func:`~.images.to_uint8`,
    then :func:`~.strips.thumbnail_images`) as it merges. finalize -> uint8 (D, T, T, 3) in the
    order of ``wanted``; RuntimeError when a wanted sample never came by.
    """
    H, W = (int(s) for s in image_size)
    side = thumbnail_side(H, thumbnail)
    slots = int(slots)

    def init():
        return ImagesState(jnp.full((slots,), INT32_MAX, jnp.int32), jnp.zeros((slots, H, W, 3), jnp.float32),
                           jnp.zeros((), jnp.int32), jnp.zeros((0, side, side, 3), jnp.uint8), jnp.zeros((0,), bool))

    def update(state, inputs, valid):
        images, wanted, index = inputs
        position = jnp.clip(jnp.searchsorted(wanted, index), 0, wanted.shape[0] - 1).astype(jnp.int32)
        keep = valid & (wanted[position] == index)
        dest = jnp.where(keep, state.fill + jnp.cumsum(keep) - 1, slots)  # out of range: dropped
        return state._replace(slot=state.slot.at[dest].set(position, mode="drop"),
                              images=state.images.at[dest].set(images.astype(jnp.float32), mode="drop"),
                              fill=state.fill + jnp.sum(keep, dtype=jnp.int32))

    def merge(a, b):
        thumbs, have = np.asarray(a.thumbs), np.asarray(a.have)
        if have.shape[0] != num_wanted:
            thumbs, have = np.zeros((num_wanted, side, side, 3), np.uint8), np.zeros(num_wanted, bool)
        elif not (thumbs.flags.writeable and have.flags.writeable):  # else filled in place: no copy per drain
            thumbs, have = thumbs.copy(), have.copy()
        if np.asarray(b.have).shape[0] == num_wanted:  # b is a host state too (merging two hosts)
            mask = np.asarray(b.have)
            thumbs[mask], have[mask] = np.asarray(b.thumbs)[mask], True
        for state in (a, b):  # the buffered images of a device state (a host state's slots are empty)
            slot = np.asarray(state.slot)
            filled = np.flatnonzero(slot != INT32_MAX)
            if filled.size:
                positions = slot[filled]
                thumbs[positions] = thumbnail_images(to_uint8(np.asarray(state.images)[filled]), thumbnail)
                have[positions] = True
        return ImagesState(np.zeros((0,), np.int32), np.zeros((0, H, W, 3), np.float32), np.int32(0), thumbs, have)

    def finalize(state):
        have = np.asarray(state.have)
        if have.shape[0] != num_wanted or not have.all():
            raise RuntimeError("some top-k samples never came by in the count pass")
        return np.asarray(state.thumbs, np.uint8)

    return StreamingStatistic(init, update, merge, finalize, lambda inputs: slots)


@dataclasses.dataclass
class Gallery:
    """What a layer's strips draw. indices: int64 (D,) sorted sample numbers; thumbs: uint8 (D, T, T, 3)
    their thumbnails; maps: float32 (U, k, h, w), unit u's map in its rank-r top sample."""

    indices: np.ndarray
    thumbs: np.ndarray
    maps: np.ndarray

    def thumbnail(self, index: int) -> np.ndarray:
        position = int(np.searchsorted(self.indices, index))
        if position >= self.indices.size or self.indices[position] != index:
            raise KeyError(f"sample {index} has no thumbnail")
        return self.thumbs[position]

    def for_layer(self, topk_indices: np.ndarray) -> "Gallery":
        """The gallery holding only the thumbnails of ``topk_indices`` (U, k)."""
        needed = np.unique(np.asarray(topk_indices, np.int64))
        return Gallery(needed, np.stack([self.thumbnail(int(i)) for i in needed]) if needed.size else
                       self.thumbs[:0], self.maps)

    def fits(self, topk_indices: np.ndarray, side: int) -> bool:
        """Whether this gallery can draw strips of units with top-k samples ``topk_indices`` int (U, k)
        at thumbnail side ``side`` (a kept file from another run or thumbnail size cannot)."""
        topk = np.asarray(topk_indices, np.int64)
        return (self.maps.ndim == 4 and self.maps.shape[:2] == topk.shape and self.thumbs.ndim == 4
                and self.thumbs.shape[1:] == (side, side, 3) and self.thumbs.shape[0] == self.indices.shape[0]
                and bool(np.isin(topk, self.indices).all()))

    def save(self, path: str) -> None:
        """Write the gallery to ``path`` (an atomic .npz) for a rerun that writes the strips."""
        with atomic_file(path) as handle:
            np.savez(handle, indices=self.indices, thumbs=self.thumbs, maps=self.maps)

    @classmethod
    def load(cls, path: str) -> "Gallery | None":
        """The gallery saved at ``path``; None when it is missing or unreadable (the strips are then rendered)."""
        if not path or not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["indices"], data["thumbs"], data["maps"])
        except UNREADABLE:
            return None


class WithImages:
    """A dissection source's view whose batches also hold ``"images"`` (float (n, H, W, 3) in [-1, 1]),
    for a source with ``fetches_images`` (:class:`~.sources.GeneratorSource`)."""

    def __init__(self, source):
        self.source = source
        self.num_samples = source.num_samples
        self.batch_invariant = bool(getattr(source, "batch_invariant", False))
        self.micro_batch = getattr(source, "micro_batch", None)

    def fetch(self, indices: np.ndarray, sharding) -> dict:
        return self.source.fetch(indices, sharding, labels=True, images=True)

    def identity(self) -> dict:
        return self.source.identity()


@dataclasses.dataclass(frozen=True)
class StripsRequest:
    """What the count pass keeps for the strips of some units. thumbnail: the strips' thumbnail side
    (None: the default rule of :func:`~.strips.thumbnail_images`); topk: {layer: int (U, k) top-k
    sample numbers of the units the pass counts}."""

    thumbnail: int | None
    topk: dict

    def wanted(self) -> np.ndarray:
        """int64 (D,): the distinct top-k samples of every layer, sorted."""
        return np.unique(np.concatenate([np.asarray(t, np.int64).reshape(-1) for t in self.topk.values()]))

    def spec(self, per_device: int, image_size, feature_shapes) -> tuple[tuple, dict]:
        """(hashable spec for :func:`statistics`, params of the pass: ``wanted``, ``<layer>/topk``)."""
        wanted = self.wanted()
        layers = tuple((layer, int(np.shape(t)[1])) + tuple(int(s) for s in feature_shapes[layer][:2])
                       for layer, t in self.topk.items())
        spec = (int(wanted.size), tuple(int(s) for s in image_size), self.thumbnail,
                gallery_slots(per_device, image_size), layers)
        params = {"wanted": wanted.astype(np.int32)}
        params.update({f"{layer}/topk": np.asarray(t, np.int32) for layer, t in self.topk.items()})
        return spec, params

    def galleries(self, results: dict) -> dict[str, Gallery]:
        """{layer: Gallery} from the pass's results (the thumbnails shared by the layers, not copied)."""
        wanted, thumbs = self.wanted(), results["thumbnails"]
        return {layer: Gallery(wanted, thumbs, results[f"{layer}/maps"]) for layer in self.topk}


def statistics(spec: tuple, units: dict) -> dict[str, StreamingStatistic]:
    """The count pass's statistics for ``spec`` (:meth:`StripsRequest.spec`); units: {layer: U}."""
    num_wanted, image_size, thumbnail, slots, layers = spec
    stats = {"thumbnails": thumbnails(num_wanted, image_size, thumbnail, slots)}
    for layer, k, h, w in layers:
        stats[f"{layer}/maps"] = unit_maps(units[layer], k, (h, w))
    return stats


def assemble(parts: list[tuple[int, int, Gallery]], num_units: int) -> Gallery:
    """One layer's Gallery from those of unit slices [start, stop) (slices may overlap)."""
    indices = np.unique(np.concatenate([g.indices for _, _, g in parts]))
    if len(parts) == 1 and parts[0][:2] == (0, num_units) and np.array_equal(indices, parts[0][2].indices):
        return parts[0][2]
    first = parts[0][2]
    thumbs = np.empty((indices.size,) + first.thumbs.shape[1:], np.uint8)
    maps = np.empty((num_units,) + first.maps.shape[1:], np.float32)
    for start, stop, part in parts:
        thumbs[np.searchsorted(indices, part.indices)] = part.thumbs
        maps[start:stop] = part.maps
    return Gallery(indices, thumbs, maps)


MAX_GALLERY_BYTES = 512 << 20  # host bytes of thumbnails and unit maps a dissection keeps for its strips


def gallery_bytes(num_samples: int, units_topk: dict[str, tuple[int, int, int, int]], side: int) -> int:
    """Host bytes of a count pass's gallery, at most: the thumbnails (3 T^2 each) of min(N, sum U k)
    samples and every unit's maps (4 k h w each). units_topk: {layer: (U, k, h, w)}."""
    samples = min(int(num_samples), sum(u * k for u, k, _, _ in units_topk.values()))
    return 3 * side * side * samples + sum(4 * u * k * h * w for u, k, h, w in units_topk.values())


def gallery_slots(per_device: int, image_size: tuple[int, int], max_bytes: int = 64 << 20) -> int:
    """Image slots per device: four steps' worth, within ``max_bytes`` of float32 images (at least one step's)."""
    per_image = 12 * int(image_size[0]) * int(image_size[1])
    return max(int(per_device), min(4 * int(per_device), int(max_bytes) // per_image))


__all__ = ["unit_maps", "thumbnails", "Gallery", "gallery_slots", "gallery_bytes", "MAX_GALLERY_BYTES", "MapsState", "ImagesState", "WithImages",
           "StripsRequest", "statistics", "assemble"]
