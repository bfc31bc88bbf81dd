"""Differentiable per-class score maps of the unified-parsing segmenter, from its probabilities.

``class_score`` semantics of the reference (``UnifiedParsingSegmenter.predict_single_class``):
the probability of a class (object + owner-part probability for classes such as ``door`` that are
both) and the mask where it wins; ``class_scores`` every class at once, gathered with static slices
(no scatter-add in the backward pass); ``selected_class_scores`` only the heads some labels read.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .label_scheme import LabelScheme, Probabilities

__all__ = ["supported_classes", "class_score_from_probabilities", "class_scores_from_probabilities",
           "label_groups", "selected_class_scores"]


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
