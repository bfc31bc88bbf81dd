"""Sources of samples by number: precomputed arrays, a generator with a segmenter, or a tfds dataset.

Every source has ``num_samples``, ``fetch(indices, sharding) -> dict of arrays`` (leading axis =
samples, placed with ``sharding``) and ``identity()``, which is all
:func:`~gandissect_jax.dissection.engine.tally` needs. A sample is produced again from its
number whenever it is needed, so nothing per-sample is kept between passes.

A source's ``batch_invariant`` attribute says whether the arrays it fetches for a sample are the
same bits however samples are grouped into batches and devices; ``micro_batch`` (optional)
asks :func:`~gandissect_jax.dissection.engine.tally` for per-device batches that are multiples
of it. :class:`GeneratorSource` runs the generator and the segmenter at a fixed micro-batch
(:func:`micro_batched`), so it is batch-invariant by design.

The dissection sources (:class:`ArraySource`, :class:`GeneratorSource`) fetch
``{layer: float32 (n, h, w, U), ..., "labels": int32 (n, H, W, D)}`` and also give ``layers``,
``feature_shapes``, ``seg_size``, ``seg_channels``, a features-only view (:meth:`features_only`,
for the quantile passes, where a generator runs only ``h``) and ``visual_batch`` for image strips.
:class:`TfdsSource` reads images and label maps of a tensorflow-datasets split.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gandissect_jax.generator import Split, check_generator, split_of, verify_split
from gandissect_jax.segmenter_protocol import check_segmenter
from gandissect_jax.images import to_uint8

from .labels import colorize_segmentation
# compute dtype and micro-batches (re-exported here, where they were first defined)
from .microbatch import (COMPUTE_DTYPES, DEFAULT_MICRO_BATCH, in_dtype, pad_to_multiple, cast_floats,
                         check_compute_dtype, check_micro_batch, default_micro_batch, micro_batched)
from .resume import content_digest, pytree_digest

# ============================================================================ generator / segmenter contracts
# The only three places that call a generator or a segmenter (the Generator and Segmenter
# protocols: ``split(layer) -> Split(h, f)``, ``segment(params, images, downsample)``).


def split_at(generator, layer: str):
    """(head, tail) of ``generator`` at ``layer``: ``head(params, z) -> (r, side)``, ``tail(params, r, side) -> x``."""
    return split_of(generator, layer)


def segmenter_params(segmenter) -> Any:
    """The segmenter's parameters, passed explicitly into :func:`segment`."""
    return segmenter.params


def segment(segmenter, params, images: jax.Array, downsample: int) -> jax.Array:
    """int32 (n, H / downsample, W / downsample, D) labels of images in [-1, 1]."""
    return segmenter.segment(params, images, downsample)


# ============================================================================ views


class FeaturesOnly:
    """A dissection source that fetches the features only (no images, no segmentation)."""

    def __init__(self, source):
        self.source = source
        self.num_samples = source.num_samples
        self.batch_invariant = bool(getattr(source, "batch_invariant", False))
        self.micro_batch = getattr(source, "micro_batch", None)

    def fetch(self, indices: np.ndarray, sharding) -> dict[str, jax.Array]:
        return self.source.fetch(indices, sharding, labels=False)

    def identity(self) -> dict:
        return self.source.identity()


@functools.lru_cache(maxsize=16)
def _zeros(shape: tuple[int, ...], sharding) -> Callable[[], jax.Array]:
    return jax.jit(lambda: jnp.zeros(shape, jnp.int32), out_shardings=sharding)


class Unlabelled:
    """A dissection source whose segmentations are all 0 (no label), made on the devices: the view
    of a dissection without labelling (``DissectConfig(make_labels=False)``, ``--no-labels``). The
    wrapped source is asked for features only, so a generator's segmenter never runs."""

    def __init__(self, source):
        self.source = source
        self.num_samples = source.num_samples
        self.layers = tuple(source.layers)
        self.feature_shapes = dict(source.feature_shapes)
        self.seg_size = tuple(source.seg_size)
        self.seg_channels = 1
        self.batch_invariant = bool(getattr(source, "batch_invariant", False))
        self.micro_batch = getattr(source, "micro_batch", None)

    def fetch(self, indices: np.ndarray, sharding, labels: bool = True) -> dict[str, jax.Array]:
        batch = dict(self.source.fetch(indices, sharding, labels=False))
        if labels:
            batch["labels"] = _zeros((len(indices), *self.seg_size, 1), sharding)()
        return batch

    def features_only(self) -> FeaturesOnly:
        return FeaturesOnly(self)

    def visual_batch(self, indices: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
        return self.source.visual_batch(indices, layer)

    def label_range(self) -> tuple[int, int]:
        return 0, 0

    def identity(self) -> dict:
        return dict(self.source.identity(), labels="none")


def real_dtype(dtype) -> bool:
    """True for a dtype of real numbers: floating (bfloat16 and float8 too), integer or bool."""
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
                or jnp.issubdtype(dtype, jnp.bool_))


class _FiniteCheck:
    """``content_digest`` visitor of a features array: ValueError, once the whole array is read,
    when it holds NaN or inf, naming the layer, the count and the first (sample, unit)."""

    def __init__(self, name: str, array):
        self.name, self.shape = name, tuple(array.shape)
        self.floating = bool(jnp.issubdtype(array.dtype, jnp.floating))
        self.rows = self.count = 0
        self.first = None

    def __call__(self, chunk: np.ndarray) -> None:
        if self.floating:
            bad = ~np.isfinite(chunk)
            if bad.any():
                self.count += int(bad.sum())
                if self.first is None:
                    sample, *_, unit = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), chunk.shape)
                    self.first = (self.rows + int(sample), int(unit))
        self.rows += chunk.shape[0]
        if self.rows == self.shape[0] and self.count:
            raise ValueError(f"features {self.name!r} hold {self.count} NaN/inf activations, the first at sample "
                             f"{self.first[0]}, unit {self.first[1]}; replace them (e.g. np.nan_to_num) first")


class _ImageRangeCheck:
    """``content_digest`` visitor of float images: ValueError, once the whole array is read, when
    they hold NaN/inf or values beyond [-2, 2]: images are read as [-1, 1] (a generator's output;
    values a little beyond saturate, as unclamped generators give), so values like 255 mean images
    of another convention (0-255 floats), which would be drawn as white strips."""

    LIMIT = 2.0

    def __init__(self, array):
        self.floating = bool(jnp.issubdtype(array.dtype, jnp.floating))
        self.rows, self.total = 0, int(array.shape[0])
        self.nonfinite, self.low, self.high, self.first = 0, np.inf, -np.inf, None

    def __call__(self, chunk: np.ndarray) -> None:
        if self.floating and chunk.size:
            values = chunk.astype(np.float32, copy=False)
            finite = np.isfinite(values)
            if not finite.all():
                self.nonfinite += int((~finite).sum())
                if self.first is None:
                    self.first = self.rows + int(np.unravel_index(int(np.flatnonzero(~finite.reshape(-1))[0]),
                                                                  chunk.shape)[0])
            if finite.any():
                self.low = min(self.low, float(values[finite].min()))
                self.high = max(self.high, float(values[finite].max()))
        self.rows += chunk.shape[0]
        if self.rows < self.total or not self.floating:
            return
        if self.nonfinite:
            raise ValueError(f"images hold {self.nonfinite} NaN/inf values, the first in sample {self.first}; "
                             "float images must be finite numbers in [-1, 1]")
        if self.low < -self.LIMIT or self.high > self.LIMIT:
            raise ValueError(f"images hold values from {self.low:g} to {self.high:g}; float images are read as "
                             "[-1, 1] (a generator's output): give 0-255 images as uint8 (images.astype(np.uint8)) "
                             "or map them to [-1, 1] (images / 127.5 - 1)")


def _clip(indices: np.ndarray, count: int) -> np.ndarray:
    return np.clip(np.asarray(indices), 0, count - 1)


def _take(array, indices: np.ndarray, count: int) -> np.ndarray:
    """array[indices] (indices clipped to the samples), as one slice when they are consecutive."""
    indices = _clip(indices, count)
    lo, hi = int(indices.min()), int(indices.max()) + 1
    if hi - lo == len(indices) and np.all(np.diff(indices) == 1):
        return np.asarray(array[lo:hi])
    return np.asarray(array[indices])


# ============================================================================ arrays


class ArraySource:
    """Precomputed activations (N, h, w, U) per layer and segmentations (N, H, W, D), e.g. memory-mapped.

    ``identity()`` holds a sha256 of every byte of every array (streamed, computed once), and
    ``label_range()`` the smallest and largest segmentation entry, taken in the same read.
    Batch-invariant: a sample's arrays are read as stored, whatever batch it is read in.
    """

    batch_invariant = True

    def __init__(self, features: Mapping[str, Any], segmentations, images=None, identity: dict | None = None):
        if not features:
            raise ValueError("no features given")
        for name, value in features.items():
            if value.ndim != 4:
                raise ValueError(f"features {name!r} must have shape (N, h, w, U), got {tuple(value.shape)}")
            if not real_dtype(value.dtype):
                raise ValueError(f"features {name!r} must hold real numbers (a float, integer or bool dtype), "
                                 f"got dtype {value.dtype}")
        self.arrays = dict(features)
        self.layers = tuple(self.arrays)
        segmentations = segmentations if segmentations.ndim == 4 else segmentations[..., None]
        if segmentations.ndim != 4:
            raise ValueError(f"segmentations must have shape (N, H, W, D), got {tuple(segmentations.shape)}")
        if not np.issubdtype(segmentations.dtype, np.integer):
            raise ValueError(f"segmentations must hold integer labels, got dtype {segmentations.dtype}")
        self.segmentations = segmentations
        self.seg_channels = int(segmentations.shape[3])
        counts = {name: a.shape[0] for name, a in self.arrays.items()}
        counts["segmentations"] = segmentations.shape[0]
        if images is not None:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"images must have shape (N, H, W, 3), got {tuple(images.shape)}")
            if not (images.dtype == np.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
                raise ValueError(f"images must be uint8 (0 to 255) or floating point in [-1, 1], got dtype "
                                 f"{images.dtype}; convert them (e.g. images.astype(np.uint8) for 0-255 values)")
            counts["images"] = images.shape[0]
        if len(set(counts.values())) != 1:
            raise ValueError(f"features, segmentations and images disagree on the number of samples: {counts}")
        self.images_array = images
        self.num_samples = int(segmentations.shape[0])
        self.seg_size = (int(segmentations.shape[1]), int(segmentations.shape[2]))
        self.feature_shapes = {name: tuple(int(s) for s in a.shape[1:]) for name, a in self.arrays.items()}
        self._identity = identity or {}

    def fetch(self, indices: np.ndarray, sharding, labels: bool = True) -> dict[str, jax.Array]:
        batch = {name: jax.device_put(_take(a, indices, self.num_samples).astype(np.float32), sharding)
                 for name, a in self.arrays.items()}
        if labels:
            seg = _take(self.segmentations, indices, self.num_samples).astype(np.int32)
            batch["labels"] = jax.device_put(seg, sharding)
        return batch

    def features_only(self) -> FeaturesOnly:
        return FeaturesOnly(self)

    def visual_batch(self, indices: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, H, W, 3) backgrounds (the images, else the coloured segmentation) and float32 (n, h, w, U) features."""
        if self.images_array is not None:
            background = to_uint8(_take(self.images_array, indices, self.num_samples))
        else:
            seg = _take(self.segmentations, indices, self.num_samples).astype(np.int64)
            background = colorize_segmentation(seg, int(seg.max()) + 1)
        return background, _take(self.arrays[layer], indices, self.num_samples).astype(np.float32)

    def _scan(self) -> dict:
        """sha256 of every array's content, and the segmentations' (min, max), in one read of each array."""
        if getattr(self, "_content", None) is None:
            low, high = [], []

            def extremes(chunk):
                if chunk.size:
                    low.append(int(chunk.min()))
                    high.append(int(chunk.max()))

            content = {"features": {name: content_digest(a, visit=_FiniteCheck(name, a)) for name, a in self.arrays.items()},
                       "segmentations": content_digest(self.segmentations, visit=extremes)}
            if self.images_array is not None:
                content["images"] = content_digest(self.images_array, visit=_ImageRangeCheck(self.images_array))
            self._content = content
            self._label_range = (min(low), max(high)) if low else (0, 0)
        return self._content

    def label_range(self) -> tuple[int, int]:
        """(smallest, largest) entry of the segmentations, exact (any integer dtype)."""
        self._scan()
        return self._label_range

    def identity(self) -> dict:
        shapes = {name: list(a.shape) for name, a in self.arrays.items()}
        return {"kind": "arrays", "features": shapes, "segmentations": list(self.segmentations.shape),
                "content": self._scan(), **self._identity}


# ============================================================================ generator


class GeneratorSource:
    """Samples z_i of ``sample_z``-style normal noise (numpy RandomState(seed)) through a generator split
    at each layer, and segments the generated images (clipped to [-1, 1]) at 1/seg_downsample of their size.

    The generator and the segmenter run at a fixed micro-batch of ``micro_batch`` samples per
    call on each device (None: :func:`default_micro_batch` of the segmenter) (:func:`micro_batched`); the engine's per-device batches are multiples of
    it and start at multiples of it, so every sample is computed in the same chunk of samples by
    the same compiled kernels, whatever the batch size or the device count: the fetched arrays
    are bit-identical (``batch_invariant``). ``micro_batch`` is part of :meth:`identity` (another
    micro-batch can round differently), with a sha256 of the generator's and
    the segmenter's parameters. ``compute_dtype='bfloat16'`` runs the generator and the
    segmenter in bfloat16 (parameters, z and images cast inside the jitted programs; the features
    handed to the statistics are float32), recorded in :meth:`identity`; the default 'float32'
    is unchanged. ValueError for an unknown layer, a bad micro_batch or compute_dtype; TypeError
    for a generator or segmenter that is not one (:func:`~gandissect_jax.generator.check_generator`,
    :func:`~gandissect_jax.segmenter.check_segmenter`).
    """

    batch_invariant = True

    def __init__(self, generator, segmenter, layers: Sequence[str], num_samples: int, seed: int = 1,
                 seg_downsample: int = 2, identity: dict | None = None, micro_batch: int | None = None,
                 compute_dtype: str = "float32"):
        check_generator(generator)
        check_segmenter(segmenter)
        names = tuple(generator.layer_names)
        unknown = [layer for layer in layers if names and layer not in names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; the generator has {list(names)}")
        if not layers:
            raise ValueError("no layers to dissect")
        self.generator, self.segmenter = generator, segmenter
        self.layers = tuple(layers)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.seg_downsample = int(seg_downsample)
        self.micro_batch = check_micro_batch(default_micro_batch(segmenter) if micro_batch is None else micro_batch)
        self.z_dim = int(generator.z_dim)
        self.compute_dtype = check_compute_dtype(compute_dtype)
        self._identity = identity or {}
        parts = {layer: split_at(generator, layer) for layer in self.layers}
        for layer, part in parts.items():  # refuse before the passes a split that breaks G (side inputs)
            verify_split(generator, layer, probe=2, split=Split(*part))
        if self.compute_dtype != "float32":
            parts = {layer: in_dtype(head, tail, jnp.dtype(self.compute_dtype)) for layer, (head, tail) in parts.items()}
        # The last of the layers in forward order produces the image through its tail.
        last = sorted(self.layers, key=lambda l: names.index(l) if l in names else 0)[-1]

        def features(gparams, z):
            return {layer: head(gparams, z)[0] for layer, (head, _) in parts.items()}

        def features_and_images(gparams, z):
            heads = {layer: head(gparams, z) for layer, (head, _) in parts.items()}
            r, side = heads[last]
            return {layer: value[0] for layer, value in heads.items()}, parts[last][1](gparams, r, side)

        def features_labels_images(gparams, sparams, z):
            feats, images = features_and_images(gparams, z)
            clipped = jnp.clip(images, -1.0, 1.0)
            if self.compute_dtype != "float32":
                sparams, clipped = cast_floats(sparams, self.compute_dtype), clipped.astype(self.compute_dtype)
            return feats, segment(segmenter, sparams, clipped, self.seg_downsample), images

        def features_and_labels(gparams, sparams, z):
            return features_labels_images(gparams, sparams, z)[:2]

        # per-device programs (micro-batched), mapped over a mesh in _program; the labels program
        # also returns the images (one compiled program whether or not a pass keeps them)
        self._per_device = {"features": micro_batched(features, self.micro_batch),
                            "labels": micro_batched(features_labels_images, self.micro_batch)}
        self._programs: dict[Any, Callable] = {}
        self._features_and_images = jax.jit(micro_batched(features_and_images, self.micro_batch))
        self._placed: tuple[Any, Any] | None = None
        self._stream = None
        probe = jax.eval_shape(features_and_images, generator.params, jax.ShapeDtypeStruct((1, self.z_dim), jnp.float32))
        self.image_size = (int(probe[1].shape[1]), int(probe[1].shape[2]))
        self.seg_size = (self.image_size[0] // self.seg_downsample, self.image_size[1] // self.seg_downsample)
        if min(self.seg_size) < 1:
            raise ValueError(f"seg_downsample {self.seg_downsample} is larger than the generated images "
                             f"({self.image_size[0]}x{self.image_size[1]}): --seg-downsample in "
                             f"[1, {min(self.image_size)}]")
        self.feature_shapes = {layer: tuple(int(s) for s in probe[0][layer].shape[1:]) for layer in self.layers}
        try:
            labels = jax.eval_shape(features_and_labels, generator.params, segmenter_params(segmenter),
                                    jax.ShapeDtypeStruct((1, self.z_dim), jnp.float32))[1]
        except ValueError as err:  # the segmenter refuses these images or this stride: say which setting
            raise ValueError(f"the segmenter cannot segment the generated {self.image_size[0]}x{self.image_size[1]} "
                             f"images at 1/{self.seg_downsample} of their size (seg_downsample, --seg-downsample): "
                             f"{err}") from err
        self.seg_channels = int(labels.shape[3]) if labels.ndim == 4 else 1

    def _z(self, indices: np.ndarray) -> np.ndarray:
        """float32 z rows of the given sample numbers: rows of RandomState(seed).standard_normal(N * z_dim)
        (the reference's and ``sample_z``'s stream), drawn in bounded chunks."""
        indices = _clip(indices, self.num_samples)
        lo, hi = int(indices.min()), int(indices.max()) + 1
        rng, row = self._stream if self._stream is not None else (None, 0)
        if rng is None or row > lo:
            rng, row = np.random.RandomState(self.seed), 0
        # Legacy Gaussians are drawn one by one (the pair cache lives in the state), so drawing
        # the stream in pieces gives the same numbers as one big draw.
        while row < lo:
            take = min(lo - row, max(1, (1 << 20) // self.z_dim))
            rng.standard_normal(take * self.z_dim)
            row += take
        block = rng.standard_normal((hi - lo) * self.z_dim).reshape(hi - lo, self.z_dim)
        self._stream = (rng, hi)
        return block[indices - lo].astype(np.float32)

    def _params(self, sharding) -> tuple[Any, Any]:
        """Generator and segmenter parameters, replicated on the mesh (placed once per mesh)."""
        if self._placed is None or self._placed[0] is not sharding.mesh:
            replicated = NamedSharding(sharding.mesh, P())
            placed = jax.device_put((self.generator.params, segmenter_params(self.segmenter)), replicated)
            self._placed = (sharding.mesh, placed)
        return self._placed[1]

    def _program(self, kind: str, sharding) -> Callable:
        """jit(shard_map(micro-batched program)) over the sharding's 1-D mesh: each device runs its own
        samples, micro-batch by micro-batch (compiled once per mesh)."""
        key = (kind, sharding.mesh, sharding.spec)
        if key not in self._programs:
            axis = sharding.spec[0] if len(sharding.spec) else None
            if axis is None or len(sharding.mesh.axis_names) != 1:
                raise ValueError(f"GeneratorSource.fetch needs a sharding over a 1-D mesh along the samples, got {sharding}")
            params = (P(),) if kind == "features" else (P(), P())
            mapped = jax.shard_map(self._per_device[kind], mesh=sharding.mesh, in_specs=params + (P(axis),),
                                   out_specs=P(axis), check_vma=False)
            self._programs[key] = jax.jit(mapped)
        return self._programs[key]

    #: fetch(..., images=True) also returns the generated images (the count pass keeps the strips' thumbnails)
    fetches_images = True

    def fetch(self, indices: np.ndarray, sharding, labels: bool = True, images: bool = False) -> dict[str, jax.Array]:
        """``{layer: float32 (n, h, w, U), "labels": int32 (n, H, W, D)}`` of samples ``indices``, sharded
        along n with ``sharding`` (a NamedSharding over a 1-D mesh, as the engine's); with ``images``
        (and ``labels``) also ``"images"``: float32 (n, H_img, W_img, 3), the generated images,
        unclipped, from the same program as the labels. Every device's share must be a whole
        number of micro-batches (the engine arranges it); ValueError otherwise."""
        devices = sharding.mesh.devices.size
        if len(indices) % (devices * self.micro_batch):
            raise ValueError(f"{len(indices)} samples over {devices} device(s) are not whole micro-batches of "
                             f"{self.micro_batch} per device")
        z = jax.device_put(self._z(indices), sharding)
        gparams, sparams = self._params(sharding)
        if not labels:
            return dict(self._program("features", sharding)(gparams, z))
        feats, seg, pictures = self._program("labels", sharding)(gparams, sparams, z)
        batch = dict(feats)
        batch["labels"] = seg.astype(jnp.int32)
        if images:
            batch["images"] = pictures
        return batch

    def features_only(self) -> FeaturesOnly:
        return FeaturesOnly(self)

    def visual_batch(self, indices: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, H, W, 3) generated images and float32 (n, h, w, U) features of ``layer`` (micro-batched)."""
        n = len(indices)
        padded = pad_to_multiple(indices, self.micro_batch)
        feats, images = self._features_and_images(self.generator.params, jnp.asarray(self._z(padded)))
        return to_uint8(images[:n]), np.asarray(feats[layer][:n], np.float32)

    def identity(self) -> dict:
        if getattr(self, "_params_digest", None) is None:
            self._params_digest = {"generator": pytree_digest(self.generator.params),
                                   "segmenter": pytree_digest(segmenter_params(self.segmenter))}
        dtype = {} if self.compute_dtype == "float32" else {"compute_dtype": self.compute_dtype}
        return {"kind": "generator", "num_samples": self.num_samples, "seed": self.seed,
                "seg_downsample": self.seg_downsample, "z_dim": self.z_dim, "micro_batch": self.micro_batch,
                "params": self._params_digest, **dtype, **self._identity}


__all__ = ["ArraySource", "GeneratorSource", "FeaturesOnly", "Unlabelled", "split_at",
           "segment", "segmenter_params", "micro_batched", "DEFAULT_MICRO_BATCH", "default_micro_batch"]
