"""A dissected generator ready to paint: generator, segmenter, per-layer rankings and compiled edit functions.

:class:`PaintModel` is what the GANPaint server holds per dissection output directory. It turns
requests (seeds or z, strokes with image-space masks, photos) into calls of the jitted programs
of :mod:`gandissect_jax.paint.edits` and :mod:`gandissect_jax.paint.invert` with fixed shapes
(one image per edit, ``max_strokes`` stroke slots), so after the first edit of a layer no edit
compiles again. It keeps nothing on disk; inverted photos are kept in memory (a bounded LRU) so
later strokes on the same photo reuse the inversion.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.images import to_uint8
from gandissect_jax.generator import check_generator, split_of
from gandissect_jax.segmenter_protocol import check_segmenter
from gandissect_jax.sampling import sample_z

from .edits import DEFAULT_TOP, MAX_STROKES, Stroke, StrokeArrays, edit_program, encode_strokes, region_mask
from .invert import Inversion, invert
from .rankings import LayerRankings, load_rankings, read_dissection

__all__ = ["PaintModel", "EditResult", "PhotoInversion", "load_paint_model"]


@dataclasses.dataclass(frozen=True)
class EditResult:
    """One edited image. R x R images, Rs x Rs segmentations, D channels, L labels.

    Attributes:
      original, edited: uint8 (R, R, 3) the unedited and edited generator images (``to_uint8``).
      before, image: uint8 (R, R, 3) what the user sees before and after the edit: ``original``
        and ``edited``, or for a photo the photo and the edit blended into it.
      original_labels, edited_labels: int32 (Rs, Rs, D) segmentations of ``before`` and ``image``.
      counts: int64 (2, 2, L) their label entries [before / after, inside / outside region, label].
      region: bool (Rs, Rs) the painted pixels.
      units: per stroke, the unit numbers it edited.
      photo: whether the edit is of an inverted photo.
    """

    original: np.ndarray
    edited: np.ndarray
    image: np.ndarray
    before: np.ndarray
    original_labels: np.ndarray
    edited_labels: np.ndarray
    counts: np.ndarray
    region: np.ndarray
    units: list[list[int]]
    photo: bool = False


@dataclasses.dataclass(frozen=True)
class PhotoInversion:
    """A photo inverted at a layer, kept in memory by the server (``PaintModel.photo``)."""

    id: str
    layer: str
    photo: np.ndarray  # uint8 (R, R, 3)
    z: np.ndarray  # float32 (1, z_dim)
    delta: np.ndarray  # float32 (1, H, W, U)
    reconstruction_z: np.ndarray  # uint8 (R, R, 3)
    reconstruction: np.ndarray  # uint8 (R, R, 3) after the r refinement
    psnr_z: float
    psnr_r: float


class PaintModel:
    """A generator with its segmenter and dissection, ready to paint.

    Args:
      name: the model's name in the API.
      generator: a :class:`gandissect_jax.generator.Generator` with ``apply`` and ``split``.
      segmenter: a :class:`gandissect_jax.segmenter.Segmenter`.
      rankings: ``{layer: LayerRankings}`` (from :func:`load_rankings`), in dissection order.
      max_strokes: stroke slots per edit (the fixed S of the compiled program).
      default_top: units per concept stroke.
      max_photos: inverted photos kept in memory.
      invert_settings: keyword arguments of :func:`gandissect_jax.paint.invert.invert`.
      info: extra facts shown in the API (outdir, model and segmenter sources).
    """

    def __init__(self, name: str, generator: Any, segmenter: Any, rankings: Mapping[str, LayerRankings], *,
                 max_strokes: int = MAX_STROKES, default_top: int = DEFAULT_TOP, max_photos: int = 16,
                 invert_settings: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None):
        check_generator(generator)
        check_segmenter(segmenter)
        if not rankings:
            raise ValueError(f"model {name!r}: no dissected layers")
        self.name = name
        self.generator = generator
        self.segmenter = segmenter
        self.max_strokes = int(max_strokes)
        self.default_top = int(default_top)
        self.info = dict(info or {})
        self.label_names = tuple(str(label) for label, _ in segmenter.labels)
        self.layers: dict[str, LayerRankings] = {}
        for layer, ranking in rankings.items():
            if layer not in generator.layer_names:
                raise ValueError(f"model {name!r}: dissected layer {layer!r} is not a layer of the generator "
                                 f"({', '.join(generator.layer_names)})")
            if tuple(ranking.label_names) != self.label_names:
                raise ValueError(f"model {name!r}: the dissection of {layer} has other labels than the segmenter")
            self.layers[layer] = ranking
        self.z_dim = int(generator.z_dim)
        z = jax.ShapeDtypeStruct((1, self.z_dim), jnp.float32)
        image = jax.eval_shape(generator.apply, generator.params, z)
        self.image_shape = tuple(int(s) for s in image.shape[1:3])
        labels = jax.eval_shape(segmenter.segment, segmenter.params, image)
        self.seg_shape = tuple(int(s) for s in labels.shape[1:3])
        self.layer_shapes = {}
        for layer in self.layers:
            r, _ = jax.eval_shape(split_of(generator, layer).h, generator.params, z)
            shape = tuple(int(s) for s in r.shape[1:])
            if shape[-1] != self.layers[layer].num_units:
                raise ValueError(f"model {name!r}: {layer} has {shape[-1]} units but the dissection has "
                                 f"{self.layers[layer].num_units}")
            self.layer_shapes[layer] = shape
        self._generate = jax.jit(lambda gp, sp, z: _generate(generator.apply, segmenter.segment, gp, sp, z))
        self._invert_settings = dict(invert_settings or {})
        self._photos: collections.OrderedDict[str, PhotoInversion] = collections.OrderedDict()
        self._max_photos = int(max_photos)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- inputs
    @property
    def default_layer(self) -> str:
        """The first dissected layer."""
        return next(iter(self.layers))

    def ranking(self, layer: str) -> LayerRankings:
        """The rankings of ``layer``; ValueError naming the dissected layers when unknown."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} is not dissected in model {self.name!r} "
                             f"(dissected: {', '.join(self.layers)})")
        return self.layers[layer]

    def z_for_seed(self, seed: int) -> np.ndarray:
        """float32 (z_dim,): ``sample_z(1, z_dim, seed)[0]``, the reference's z for a seed."""
        return sample_z(1, self.z_dim, int(seed))[0]

    # ------------------------------------------------------------------------------- generate
    def generate(self, z: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, R, R, 3) images and int32 (N, Rs, Rs, D) segmentations for z (N, z_dim).

        Batches of ``batch`` (the last padded), so any N runs one compiled program."""
        z = np.asarray(z, np.float32).reshape(-1, self.z_dim)
        images, labels = [], []
        for start in range(0, len(z), batch):
            chunk = z[start:start + batch]
            padded = np.concatenate([chunk, np.zeros((batch - len(chunk), self.z_dim), np.float32)])
            x, seg = jax.device_get(self._generate(self.generator.params, self.segmenter.params, padded))
            images.append(to_uint8(x[: len(chunk)]))
            labels.append(np.asarray(seg[: len(chunk)]))
        return np.concatenate(images), np.concatenate(labels)

    # ------------------------------------------------------------------------------- edit
    def encode(self, layer: str, strokes: Sequence[Stroke]) -> StrokeArrays:
        """Strokes of one edit as :class:`StrokeArrays` (the fixed S = ``max_strokes``)."""
        return encode_strokes(strokes, self.ranking(layer), layer_shape=self.layer_shapes[layer],
                              max_strokes=self.max_strokes, default_top=self.default_top,
                              image_shape=self.image_shape)

    def edit(self, layer: str, strokes: Sequence[Stroke], *, z: np.ndarray | None = None,
             photo: str | None = None) -> EditResult:
        """Apply ``strokes`` at ``layer`` to the image of ``z`` (z_dim,) or of an inverted photo.

        Raises:
          ValueError for a malformed edit; KeyError for an unknown photo id.
        """
        ranking = self.ranking(layer)
        arrays = self.encode(layer, strokes)
        inversion = None
        if photo is not None:
            inversion = self.photo(photo)
            if inversion.layer != layer:
                raise ValueError(f"photo {photo} was inverted at {inversion.layer}, not {layer}")
            z_batch, delta = inversion.z, inversion.delta
            photo_float = inversion.photo[None].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        else:
            if z is None:
                raise ValueError("give z or a photo")
            z_batch = np.asarray(z, np.float32).reshape(1, self.z_dim)
            delta = np.zeros((1, *self.layer_shapes[layer]), np.float32)
            photo_float = np.zeros((1, *self.image_shape, 3), np.float32)
        region = region_mask(strokes, self.seg_shape)
        run = edit_program(self.generator, self.segmenter, layer)
        images, shown, labels, counts = jax.device_get(run(
            self.generator.params, self.segmenter.params, z_batch, delta, arrays,
            ranking.insertion_values, region, photo_float, np.bool_(inversion is not None)))
        units = [np.flatnonzero(arrays.units[i]).tolist() for i in range(len(strokes))]
        return EditResult(original=to_uint8(images[0]), edited=to_uint8(images[1]), image=to_uint8(shown[1]),
                          before=to_uint8(shown[0]), original_labels=np.asarray(labels[0]),
                          edited_labels=np.asarray(labels[1]), counts=np.asarray(counts, np.int64),
                          region=region, units=units, photo=inversion is not None)

    # ------------------------------------------------------------------------------- photos
    def invert_photo(self, layer: str, photo: np.ndarray) -> PhotoInversion:
        """Invert a uint8 (R, R, 3) photo at ``layer`` (cached in memory by content and settings)."""
        self.ranking(layer)
        photo = np.ascontiguousarray(photo, np.uint8)
        if photo.shape != (*self.image_shape, 3):
            raise ValueError(f"photo is {photo.shape}; expected {(*self.image_shape, 3)}")
        digest = hashlib.sha256()
        digest.update(repr((self.name, layer, sorted(self._invert_settings.items()))).encode())
        digest.update(photo.tobytes())
        key = digest.hexdigest()[:24]
        with self._lock:
            if key in self._photos:
                self._photos.move_to_end(key)
                return self._photos[key]
        result: Inversion = invert(self.generator, layer, photo[None], **self._invert_settings)
        result = jax.device_get(result)
        inversion = PhotoInversion(
            id=key, layer=layer, photo=photo, z=np.asarray(result.z, np.float32),
            delta=np.asarray(result.delta, np.float32), reconstruction_z=to_uint8(result.images_z[0]),
            reconstruction=to_uint8(result.images_r[0]), psnr_z=float(result.psnr_z[0]),
            psnr_r=float(result.psnr_r[0]))
        with self._lock:
            self._photos[key] = inversion
            while len(self._photos) > self._max_photos:
                self._photos.popitem(last=False)
        return inversion

    def photo(self, photo_id: str) -> PhotoInversion:
        """An inverted photo by id; KeyError when unknown or evicted."""
        with self._lock:
            if photo_id not in self._photos:
                raise KeyError(f"unknown photo {photo_id!r} (photos are kept in memory; upload it again)")
            self._photos.move_to_end(photo_id)
            return self._photos[photo_id]


def _generate(apply, segment, gparams, sparams, z):
    images = apply(gparams, z)
    return images, segment(sparams, jnp.clip(images, -1.0, 1.0))


def load_paint_model(outdir: str | os.PathLike, *, name: str | None = None, model: str | None = None,
                     segmenter: str | None = None, **settings) -> PaintModel:
    """A :class:`PaintModel` for a dissection output directory.

    Args:
      outdir: written by ``gandissect-jax dissect`` (or ``dissect_generator``).
      name: the model's API name (default: the directory's name).
      model, segmenter: generator / segmenter sources (registry name, file or directory); default
        the ones recorded in ``dissect.json`` (``settings.source.model`` / ``.segmenter``).
      settings: :class:`PaintModel` keywords.

    Raises:
      FileNotFoundError / ValueError naming the directory, file or key when something is missing.
    """
    import gandissect_jax

    outdir = os.fspath(outdir)
    document = read_dissection(outdir)
    source = (document.get("settings") or {}).get("source") or {}
    model = model or source.get("model")
    segmenter = segmenter or source.get("segmenter")
    if not model or not segmenter:
        raise ValueError(f"{outdir}/dissect.json does not record its generator and segmenter "
                         "(settings.source.model / .segmenter); give them (--model, --segmenter)")
    rankings = load_rankings(outdir)
    generator = gandissect_jax.load_generator(model)
    seg = gandissect_jax.load_segmenter(segmenter)
    name = name or os.path.basename(os.path.normpath(os.path.abspath(outdir)))
    info = {"outdir": os.path.abspath(outdir), "model": str(model), "segmenter": str(segmenter),
            "title": document.get("title")}
    return PaintModel(name, generator, seg, rankings, info=info, **settings)
