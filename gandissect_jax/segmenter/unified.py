"""``UnifiedParsingSegmenter``: the reference's unified-parsing segmenter behaviour in JAX.

Pipeline for images ``x`` (NHWC RGB in [-1, 1]):

1. preprocessing: ``(x + 1) / 2 * 255``, RGB -> BGR, minus the BGR mean
   ``(102.9801, 115.9465, 122.7717)`` (no division by a standard deviation);
2. for each ``s`` in ``segsizes``: adaptive average pooling to ``s x s`` (unless the image is
   already ``s x s``), the network, logits bilinearly resized to ``(H // ds, W // ds)`` and
   soft-maxed per group (object, material, and the parts of each owner); the per-size
   probabilities are **summed** (voting);
3. ``segment``: object argmax; material argmax (0 for ``-``, else shifted to the shared
   numbering); parts of ``sky``/``building``/``person`` only where that owner wins the object
   argmax; with ``segdiv="quad"`` two more channels from :func:`quad.quad_divide`;
4. ``class_score``: the probability of a class (object + owner-part probability for classes such
   as ``door`` that are both), and the mask where it wins; ``class_scores``: the same score of
   every class at once, from one pass of the network (one backward pass when differentiated).

Label numbering (``mult`` = 1 undivided, 5 quad; ``N`` objects without ``-``): 0 ``-``, objects
1..N, for quad 4 blocks of N divided objects (``-t``, ``-l``, ``-b``, ``-r``), materials
without ``-``, then parts of sky, building, person in order of first appearance; a part whose name
is also an object (``door``, ``window``) takes that object's number.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .class_scores import (class_score_from_probabilities, class_scores_from_probabilities, label_groups,
                           selected_class_scores, supported_classes)
from .label_scheme import (BGR_MEAN, CATEGORIES, PART_OWNERS, SEGDIVS, LabelScheme, Probabilities,  # noqa: F401
                           build_label_scheme)
from .quad import quad_divide
from .resize import adaptive_avg_pool, resize_bilinear
from .upernet import HeadSizes, UnifiedParsingNetwork

__all__ = ["UnifiedParsingSegmenter", "LabelScheme", "build_label_scheme", "Probabilities",
           "check_images", "preprocess", "class_scores_from_probabilities", "selected_class_scores",
           "label_groups"]

def check_images(images: Any) -> jax.Array:
    """Validate NHWC RGB images in [-1, 1]; returns them as a float32 array.

    Raises ValueError for a wrong rank, a non-RGB last axis (e.g. NCHW input), a non-float dtype,
    or (for concrete arrays) values outside [-1, 1] or NaN.
    """
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        hint = ""
        if len(shape) == 4 and shape[1] == 3:
            hint = " It looks like NCHW: pass images.transpose(0, 2, 3, 1)."
        elif len(shape) == 3 and shape[-1] == 3:
            hint = " Add a batch axis: images[None]."
        raise ValueError(f"images must be NHWC (N, H, W, 3) RGB; got shape {shape}.{hint}")
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"images must be floating point in [-1, 1]; got dtype {dtype}")
    if not isinstance(images, jax.core.Tracer):
        # (XLA's CPU min/max reductions may skip NaN, so finiteness is checked on its own)
        finite, low, high = jax.device_get(
            (jnp.all(jnp.isfinite(images)), jnp.min(images), jnp.max(images)))
        if not finite:
            raise ValueError("images contain NaN or infinite values")
        low, high = float(low), float(high)
        if low < -1.0 or high > 1.0:
            raise ValueError(
                f"images must lie in [-1, 1]; got values in [{low:.4g}, {high:.4g}] "
                "(clip them, e.g. jnp.clip(images, -1, 1), or rescale 0..255 images by x/127.5-1)")
    return jnp.asarray(images, jnp.float32)


def preprocess(images: jax.Array) -> jax.Array:
    """RGB [-1, 1] -> the network's input: BGR 0..255 minus the BGR mean (NHWC float32)."""
    x = (images + 1) / 2 * 255
    x = x[..., ::-1]
    return x - jnp.asarray(BGR_MEAN, x.dtype)


@functools.partial(jax.jit, static_argnames=("heads", "part_slices", "seg_shape", "size", "groups"))
def _size_probabilities(variables: Any, preprocessed: jax.Array, heads: HeadSizes,
                        part_slices: tuple[tuple[int, int], ...], seg_shape: tuple[int, int],
                        size: tuple[int, int], groups: tuple[bool, ...] | None = None) -> Probabilities:
    """Softmax maps of one voting size (the network's part of :func:`raw_probabilities`).

    Static arguments do not depend on ``segdiv``, so undivided and quad segmenters share the
    compiled network. ``groups`` (static; None = all) says which softmax groups to compute, in
    the order object, material, part of each owner; a group left out is ``None`` in the result,
    and the heads no kept group reads (e.g. the part and material heads when only objects are
    scored) are not computed at all, nor differentiated.
    """
    want = (True,) * (2 + len(part_slices)) if groups is None else tuple(groups)
    x = preprocessed
    if tuple(x.shape[1:3]) != tuple(size):
        x = adaptive_avg_pool(x, size)
    logits = UnifiedParsingNetwork(heads=heads).apply(variables, x)
    obj = jax.nn.softmax(resize_bilinear(logits.object, seg_shape), axis=-1) if want[0] else None
    material = jax.nn.softmax(resize_bilinear(logits.material, seg_shape), axis=-1) if want[1] else None
    part = resize_bilinear(logits.part, seg_shape) if any(want[2:]) else None
    parts = tuple(jax.nn.softmax(part[..., a:b], axis=-1) if w else None
                  for (a, b), w in zip(part_slices, want[2:]))
    scene = jax.nn.softmax(logits.scene, axis=-1) if groups is None else None
    return Probabilities(obj, material, parts, scene)


def raw_probabilities(variables: Any, images: jax.Array, scheme: LabelScheme,
                      segsizes: Sequence[int], downsample: int = 1,
                      groups: tuple[bool, ...] | None = None) -> Probabilities:
    """Voting over ``segsizes`` (sum of softmax maps), like the reference's raw_seg_prediction.

    Args:
      variables: network variables.
      images: float32 ``(N, H, W, 3)`` RGB in [-1, 1] (not validated here).
      scheme: label scheme (static).
      segsizes: square input sizes to vote over.
      downsample: output stride; maps are ``(N, H // downsample, W // downsample, K)``.
      groups: which softmax groups to compute (see :func:`_size_probabilities`); None = all.
    """
    seg_shape = (images.shape[1] // downsample, images.shape[2] // downsample)
    x = preprocess(images)
    total = None
    for s in segsizes:
        probs = _size_probabilities(variables, x, scheme.heads, scheme.part_slices, seg_shape,
                                    (int(s), int(s)), groups)
        total = probs if total is None else jax.tree_util.tree_map(jnp.add, total, probs)
    return total


def _segment_channels(probs: Probabilities, scheme: LabelScheme) -> jax.Array:
    objects = jnp.argmax(probs.object, axis=-1).astype(jnp.int32)
    material = jnp.argmax(probs.material, axis=-1).astype(jnp.int32)
    material = jnp.where(material == 0, 0, material + scheme.material_offset)
    parts = jnp.zeros_like(objects)
    for owner, table, owner_probs in zip(scheme.owner_objects, scheme.part_index, probs.parts):
        local = jnp.argmax(owner_probs, axis=-1)
        shared = jnp.asarray(table, jnp.int32)[local]
        parts = jnp.where(objects == owner, shared, parts)
    return jnp.stack([objects, material, parts], axis=-1)


@functools.partial(jax.jit, static_argnames=("scheme", "quad", "skip_last_component"))
def segment_from_probabilities(probs: Probabilities, scheme: LabelScheme, quad: bool = False,
                               skip_last_component: bool = True) -> jax.Array:
    """int32 ``(N, h, w, 3)`` (``5`` with ``quad``) label channels from voting probabilities."""
    segs = _segment_channels(probs, scheme)
    if quad:
        pieces = quad_divide(segs[..., 0], scheme.num_object_classes, skip_last_component)
        segs = jnp.concatenate([segs, pieces], axis=-1)
    return segs


# ----------------------------------------------------------------------------------------------
# the segmenter object


class UnifiedParsingSegmenter:
    """The unified-parsing (UPerNet-50) segmenter; implements :class:`Segmenter`.

    Every method takes the network's variables explicitly (``S.segment(S.params, images)``) and
    is pure in them: it can run inside an outer ``jax.jit`` that passes them as an argument, and
    segmenters of equal settings share compiled code.

    Attributes:
      params: the network's Flax variables (on device), the pytree every method takes.
      labels: tuple of ``(name, category)`` per class number (0 = ``("-", "object")``).
      categories: ``("object", "part", "material")``.
      segdiv: ``"undivided"`` (3 channels) or ``"quad"`` (5 channels).
      segsizes: square input sizes voted over.
      scheme: :class:`LabelScheme` with the numbering tables.
    """

    categories = CATEGORIES
    #: Samples per segmenter call when dissecting (the default micro-batch of a dissection that
    #: uses this segmenter; :class:`~gandissect_jax.dissection.sources.GeneratorSource`). Measured
    #: on a 2-core CPU at 256x256, quad (benchmarks/README.md, "Segmenter batch"): batches 4, 8
    #: and 16 segment at the same images/s, while memory grows by about 0.26 GB per image
    #: (batch 4: 2.0 GB, 8: 3.0 GB, 16: 5.1 GB; the old default of 32 reached 10.9 GB end to end).
    dissection_micro_batch = 4

    def __init__(self, variables: Any, labeldata: Mapping[str, Any], segdiv: str = "undivided",
                 segsizes: Sequence[int] = (256,), skip_last_component: bool = True):
        segsizes = tuple(int(s) for s in segsizes)
        if not segsizes or min(segsizes) < 32:
            raise ValueError(f"segsizes must be a non-empty list of sizes >= 32, got {segsizes}")
        self.scheme = build_label_scheme(labeldata, segdiv)
        self.labeldata = dict(labeldata)
        self.segdiv = segdiv
        self.segsizes = segsizes
        self.skip_last_component = bool(skip_last_component)
        self.params = jax.device_put(variables)
        self.labels = self.scheme.labels

    def __repr__(self) -> str:
        return (f"UnifiedParsingSegmenter(segdiv={self.segdiv!r}, segsizes={self.segsizes}, "
                f"{len(self.labels)} labels)")

    @property
    def num_channels(self) -> int:
        """D, the number of label channels ``segment`` returns."""
        return 5 if self.segdiv == "quad" else 3

    def probabilities(self, params: Any, images: jax.Array, downsample: int = 1) -> Probabilities:
        """Voting softmax maps (NHWC, at ``(H // downsample, W // downsample)``)."""
        images = check_images(images)
        downsample = _check_downsample(downsample, images.shape)
        return raw_probabilities(params, images, self.scheme, self.segsizes, downsample)

    def segment(self, params: Any, images: jax.Array, downsample: int = 1) -> jax.Array:
        """Label every pixel: float32 ``(N, H, W, 3)`` in [-1, 1] -> int32 ``(N, H//ds, W//ds, D)``.

        Channels: object, material, part (parts of sky/building/person where the owner wins);
        with ``segdiv="quad"`` also the ``-t``/``-b`` and ``-l``/``-r`` channels.
        ``params``: :attr:`params` (or other variables of the same network).
        """
        probs = self.probabilities(params, images, downsample)
        return segment_from_probabilities(probs, self.scheme, self.segdiv == "quad",
                                          self.skip_last_component)

    def class_score(self, params: Any, images: jax.Array, c: int,
                    downsample: int = 1) -> tuple[jax.Array, jax.Array]:
        """Differentiable score of class ``c`` and the mask where it is the predicted label.

        Returns:
          ``(score, mask)``: float32 ``(N, h, w)`` (probability, or summed object + part
          probability for classes that are both) and bool ``(N, h, w)``. Divided quad classes
          (``-t`` ...) are not supported, as in the reference. ``c`` may be traced (e.g. vmapped);
          a concrete ``c`` out of range or unsupported raises ValueError.
        """
        if not isinstance(c, jax.core.Tracer):
            c = int(c)
            if not 0 <= c < len(self.labels):
                raise ValueError(f"class number {c} is out of range 0..{len(self.labels) - 1}")
            if not supported_classes(self.scheme)[c]:
                raise ValueError(
                    f"class {c} ({self.labels[c][0]!r}) has no score: divided quad classes are "
                    "not supported by class_score")
        probs = self.probabilities(params, images, downsample)
        return class_score_from_probabilities(probs, c, self.scheme)


    def class_scores(self, params: Any, images: jax.Array, downsample: int = 1,
                     labels: Sequence[int] | None = None) -> jax.Array:
        """Differentiable scores of every class (or of ``labels``) from one pass of the network.

        Args:
          params: :attr:`params` (or other variables of the same network; may be traced).
          images: float32 ``(N, H, W, 3)`` RGB in [-1, 1].
          downsample: output stride (a static Python int).
          labels: None for every class, or a static sequence of K class numbers: then only those
            columns are returned, and only the heads and softmax groups they read are computed
            (scoring ``tree`` skips the part, material and scene heads, forward and backward).

        Returns:
          float32 ``(N, H // downsample, W // downsample, L)`` (``K`` with ``labels``): column
          ``c`` equals ``class_score(params, images, c, downsample)[0]`` (the same part
          semantics: ``door`` scores its object probability plus its building-part probability);
          the columns of the divided quad classes, which ``class_score`` refuses, are 0. Used by
          ACE optimization to score several labels with one backward pass
          (``gandissect_jax.ace.label_scores``).

        Raises:
          ValueError for a class number in ``labels`` outside 0..L-1.
        """
        if labels is None:
            probs = self.probabilities(params, images, downsample)
            return class_scores_from_probabilities(probs, self.scheme)
        labels = tuple(int(c) for c in labels)
        bad = [c for c in labels if not 0 <= c < len(self.labels)]
        if bad or not labels:
            raise ValueError(f"labels must be class numbers in 0..{len(self.labels) - 1}, got {labels}")
        images = check_images(images)
        downsample = _check_downsample(downsample, images.shape)
        groups = label_groups(self.scheme, labels)
        if not any(groups):  # only scoreless classes: still the shape of the answer
            groups = (True,) + groups[1:]
        probs = raw_probabilities(params, images, self.scheme, self.segsizes, downsample, groups)
        return selected_class_scores(probs, self.scheme, labels)


def _check_downsample(downsample: Any, shape: tuple[int, ...]) -> int:
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}")
    downsample = int(downsample)
    if shape[1] // downsample < 1 or shape[2] // downsample < 1:
        raise ValueError(f"downsample {downsample} is larger than the image size {shape[1:3]}")
    return downsample
