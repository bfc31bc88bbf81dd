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
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .quad import quad_divide
from .resize import adaptive_avg_pool, resize_bilinear
from .upernet import HeadSizes, UnifiedParsingNetwork

__all__ = ["UnifiedParsingSegmenter", "LabelScheme", "build_label_scheme", "Probabilities",
           "check_images", "preprocess", "class_scores_from_probabilities", "selected_class_scores",
           "label_groups"]

BGR_MEAN = (102.9801, 115.9465, 122.7717)
PART_OWNERS = ("sky", "building", "person")  # hard-coded in the reference
CATEGORIES = ("object", "part", "material")
SEGDIVS = ("undivided", "quad")


class LabelScheme(NamedTuple):
    """Shared class numbering and the tables that combine the heads (all hashable, static)."""

    labels: tuple[tuple[str, str], ...]
    divmult: int
    num_object_classes: int          # N, without "-"
    num_object_labels: int           # N + 1
    num_material_labels: int         # including "-"
    material_offset: int             # N * divmult
    owner_objects: tuple[int, ...]   # object number of sky, building, person
    part_index: tuple[tuple[int, ...], ...]  # per owner: local part -> shared number
    part_slices: tuple[tuple[int, int], ...]  # per owner: channel range in the part logits
    part_names: tuple[str, ...]
    heads: HeadSizes

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def build_label_scheme(labeldata: Mapping[str, Any], segdiv: str = "undivided") -> LabelScheme:
    """Derive the reference's label numbering from labels.json for ``segdiv``."""
    if segdiv not in SEGDIVS:
        raise ValueError(f"segdiv must be one of {SEGDIVS}, got {segdiv!r}")
    objects = list(labeldata["object"])
    materials = list(labeldata["material"])
    object_part = labeldata["object_part"]
    mult = 5 if segdiv == "quad" else 1
    num_obj = len(objects) - 1
    first_part = num_obj * mult + 1 + (len(materials) - 1)
    object_numbers = {name: i for i, name in enumerate(objects)}
    for owner in PART_OWNERS:
        if owner not in object_numbers or owner not in object_part:
            raise ValueError(
                f"labels.json must list {owner!r} as an object with parts (object_part); the "
                f"unified-parsing segmenter uses the parts of {list(PART_OWNERS)}")
    # The decoder groups part channels by owner in ascending object number.
    slices, start = {}, 0
    for owner in sorted(object_part, key=lambda name: object_numbers[name]):
        slices[owner] = (start, start + len(object_part[owner]))
        start += len(object_part[owner])
    part_numbers: dict[str, int] = {}
    part_names: list[str] = []
    part_index = []
    for owner in PART_OWNERS:
        numbers = []
        for part in object_part[owner]:
            if part in object_numbers:
                numbers.append(object_numbers[part])
            else:
                if part not in part_numbers:
                    part_numbers[part] = first_part + len(part_names)
                    part_names.append(part)
                numbers.append(part_numbers[part])
        part_index.append(tuple(numbers))
    divided = [(f"{name}-{suffix}", "part") for suffix in ("t", "l", "b", "r")
               for name in objects[1:]] if segdiv == "quad" else []
    labels = ([(name, "object") for name in objects] + divided
              + [(name, "material") for name in materials[1:]]
              + [(name, "part") for name in part_names])
    return LabelScheme(
        labels=tuple(labels), divmult=mult, num_object_classes=num_obj,
        num_object_labels=len(objects), num_material_labels=len(materials),
        material_offset=num_obj * mult,
        owner_objects=tuple(object_numbers[o] for o in PART_OWNERS),
        part_index=tuple(part_index), part_slices=tuple(slices[o] for o in PART_OWNERS),
        part_names=tuple(part_names),
        heads=HeadSizes(object=len(objects), part=start, material=len(materials),
                        scene=len(labeldata["scene"])))


class Probabilities(NamedTuple):
    """Summed per-size softmax maps, NHWC at the output size; ``scene`` is ``(N, K)``."""

    object: jax.Array
    material: jax.Array
    parts: tuple[jax.Array, ...]  # one per owner (sky, building, person)
    scene: jax.Array


# ----------------------------------------------------------------------------------------------
# pure functions (jitted with static label/shape information)


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


@functools.lru_cache(maxsize=32)
def _class_tables(scheme: LabelScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class number: object channel, material channel, local part index per owner (-1 = none)."""
    n = scheme.num_classes
    object_channel = np.full(n, -1, np.int32)
    object_channel[: scheme.num_object_labels] = np.arange(scheme.num_object_labels)
    material_channel = np.full(n, -1, np.int32)
    for k in range(1, scheme.num_material_labels):
        material_channel[scheme.material_offset + k] = k
    part_local = np.full((len(scheme.part_index), n), -1, np.int32)
    for g, table in enumerate(scheme.part_index):
        for j, number in enumerate(table):
            part_local[g, number] = j
    # materials are handled exclusively, like the reference's early return
    is_material = material_channel >= 0
    object_channel[is_material] = -1
    part_local[:, is_material] = -1
    return object_channel, material_channel, part_local


def supported_classes(scheme: LabelScheme) -> np.ndarray:
    """bool ``(num_classes,)``: which class numbers :func:`class_score_from_probabilities` handles."""
    obj, mat, part = _class_tables(scheme)
    return (obj >= 0) | (mat >= 0) | (part >= 0).any(axis=0)


def _pick(maps: jax.Array, channel: jax.Array) -> jax.Array:
    safe = jnp.maximum(channel, 0)
    picked = jnp.take(maps, safe, axis=-1)
    return jnp.where(channel >= 0, picked, jnp.zeros((), maps.dtype))


@functools.partial(jax.jit, static_argnames=("scheme",))
def class_score_from_probabilities(probs: Probabilities, c: jax.Array,
                                   scheme: LabelScheme) -> tuple[jax.Array, jax.Array]:
    """(float32 score ``(N, h, w)``, bool mask) of class ``c`` (may be traced, e.g. vmapped)."""
    obj_table, mat_table, part_table = (jnp.asarray(t) for t in _class_tables(scheme))
    c = jnp.asarray(c, jnp.int32)
    object_argmax = jnp.argmax(probs.object, axis=-1)
    oc, mc = obj_table[c], mat_table[c]
    score = _pick(probs.object, oc)
    mask = (oc >= 0) & (object_argmax == oc)
    score = score + _pick(probs.material, mc)
    mask = mask | ((mc >= 0) & (jnp.argmax(probs.material, axis=-1) == mc))
    for g, (owner, owner_probs) in enumerate(zip(scheme.owner_objects, probs.parts)):
        j = part_table[g, c]
        score = score + _pick(owner_probs, j)
        mask = mask | ((j >= 0) & (object_argmax == owner)
                       & (jnp.argmax(owner_probs, axis=-1) == j))
    return score, mask


def _column_runs(table: np.ndarray) -> list[tuple[int, int]]:
    """``table`` (L,) of source channels (-1 = none) as runs ``(first source or -1, length)``."""
    runs: list[tuple[int, int]] = []
    for source in (int(t) for t in table):
        if runs:
            first, length = runs[-1]
            if (source < 0 and first < 0) or (source >= 0 and first >= 0 and source == first + length):
                runs[-1] = (first, length + 1)
                continue
        runs.append((source if source >= 0 else -1, 1))
    return runs


def _gather_columns(maps: jax.Array, table: np.ndarray) -> jax.Array:
    """``out[..., l] = maps[..., table[l]]`` (0 where ``table[l] < 0``) for a static ``table``,
    built from contiguous slices and zero blocks: the same values as ``jnp.take``, but its
    gradient is a sum of padded slices, not a scatter-add (slow on XLA:CPU)."""
    pieces = []
    for first, length in _column_runs(table):
        if first < 0:
            pieces.append(jnp.zeros(maps.shape[:-1] + (length,), maps.dtype))
        else:
            pieces.append(maps[..., first:first + length])
    return jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]


@functools.partial(jax.jit, static_argnames=("scheme",))
def class_scores_from_probabilities(probs: Probabilities, scheme: LabelScheme) -> jax.Array:
    """float32 ``(N, h, w, L)``: column ``c`` is :func:`class_score_from_probabilities`'s score of
    class ``c`` (object + material + owner-part probabilities, in that order of addition), for
    every class at once by three gathers over the channel axis. Columns of classes without a score
    (the divided quad classes ``-t``, ``-l``, ``-b``, ``-r``) are 0."""
    obj_table, mat_table, part_table = _class_tables(scheme)
    gather = _gather_columns
    score = gather(probs.object, obj_table) + gather(probs.material, mat_table)
    for g, owner_probs in enumerate(probs.parts):
        score = score + gather(owner_probs, part_table[g])
    return score


def label_groups(scheme: LabelScheme, labels: Sequence[int]) -> tuple[bool, ...]:
    """The softmax groups (object, material, part of each owner) the scores of ``labels`` read."""
    obj, mat, part = _class_tables(scheme)
    labels = np.asarray(labels, np.int64)
    return (bool((obj[labels] >= 0).any()), bool((mat[labels] >= 0).any()),
            *(bool((row[labels] >= 0).any()) for row in part))


def selected_class_scores(probs: Probabilities, scheme: LabelScheme,
                          labels: Sequence[int]) -> jax.Array:
    """float32 ``(N, h, w, K)``: the columns ``labels`` (static ints) of
    :func:`class_scores_from_probabilities`, equal to them bit for bit (the same additions in the
    same order, without the exact zeros), read with static slices from the groups they need only
    (``probs`` may hold ``None`` for the others; see :func:`label_groups`)."""
    obj_table, mat_table, part_table = _class_tables(scheme)
    columns = []
    for c in labels:
        terms = []
        if obj_table[c] >= 0:
            terms.append(probs.object[..., int(obj_table[c])])
        if mat_table[c] >= 0:
            terms.append(probs.material[..., int(mat_table[c])])
        for g, owner_probs in enumerate(probs.parts):
            if part_table[g, c] >= 0:
                terms.append(owner_probs[..., int(part_table[g, c])])
        if not terms:
            some = next(p for p in (probs.object, probs.material, *probs.parts) if p is not None)
            terms.append(jnp.zeros(some.shape[:-1], some.dtype))
        score = terms[0]
        for term in terms[1:]:
            score = score + term
        columns.append(score)
    return jnp.stack(columns, axis=-1)


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
