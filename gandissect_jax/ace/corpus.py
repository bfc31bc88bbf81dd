"""The ACE corpus: samples where a concept is present (for ablation) and candidate locations (for insertion), as in the reference's aceoptimize phases 1-2."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax._structure import Static
from gandissect_jax.sampling import sample_z
from .scores import _pool_to_grid, concept_labels, concept_score


# ============================================================================================
# corpus


def _location_map(locations: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """One-hot float32 (N, H, W, 1) maps of flat locations (N,) int."""
    rows, cols = grid
    return jax.nn.one_hot(locations, rows * cols, dtype=jnp.float32).reshape(-1, rows, cols, 1)


class AceCorpus(NamedTuple):
    """Samples for ACE optimization (all numpy; locations are flat indices row * W + col).

    Attributes:
      layer: the layer name.
      labels: the concept's label numbers.
      present_z, present_location: float32 (P, z_dim), int32 (P,) training images where the
        concept is present, and the feature location covering most of it.
      candidate_z, candidate_location: float32 (Q, z_dim), int32 (Q,) training images where
        inserting ``insertion_value`` at that location adds the concept.
      eval_present_z, eval_present_location, eval_candidate_z, eval_candidate_location: the same,
        held out for the evaluation loss.
      insertion_value: float32 (C,), the presence-weighted mean of the layer's features.
    """

    layer: str
    labels: tuple[int, ...]
    present_z: np.ndarray
    present_location: np.ndarray
    candidate_z: np.ndarray
    candidate_location: np.ndarray
    eval_present_z: np.ndarray
    eval_present_location: np.ndarray
    eval_candidate_z: np.ndarray
    eval_candidate_location: np.ndarray
    insertion_value: np.ndarray


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    return starts


def _padded(array: np.ndarray, start: int, size: int) -> tuple[np.ndarray, int]:
    """Rows ``start:start+size`` of ``array``, zero-padded to ``size`` rows (so every batch has
    one shape and one compiled program); also the number of real rows."""
    part = array[start:start + size]
    count = len(part)
    if count < size:
        part = np.concatenate([part, np.zeros((size - count, *array.shape[1:]), array.dtype)])
    return part, count


def _split_best(scores: np.ndarray, train_size: int, eval_size: int):
    """The train_size + eval_size images of highest score, in index order: the first train_size
    for training, the last eval_size for evaluation (the reference's split)."""
    order = np.argsort(-scores, kind="stable")[: train_size + eval_size]
    chosen = np.sort(order)
    return chosen[:train_size], chosen[len(chosen) - eval_size :]


def layer_shape(generator: Any, layer: str) -> tuple[int, ...]:
    """Per-sample shape of ``layer``'s representation: ``generator.layer_shape(layer)`` when the
    generator has it, else found by ``jax.eval_shape`` of its ``h``."""
    if hasattr(generator, "layer_shape"):
        return tuple(int(s) for s in generator.layer_shape(layer))
    h, _ = generator.split(layer)
    z = jax.ShapeDtypeStruct((1, int(generator.z_dim)), jnp.float32)
    r, _ = jax.eval_shape(h, generator.params, z)
    return tuple(int(s) for s in r.shape[1:])


@functools.partial(jax.jit, static_argnames=("split", "segmenter", "labels", "downsample", "grid"))
def _presence_pass(gparams, sparams, z, valid, *, split, segmenter, labels, downsample, grid):
    h, f = split
    r, side = h(gparams, z)
    _, mask = concept_score(segmenter.obj, sparams, f(gparams, r, side), labels, downsample)
    presence = _pool_to_grid(mask.astype(jnp.float32), grid) * valid[:, None, None]  # (N, H, W)
    weighted_sum = jnp.einsum("nhwc,nhw->c", r, presence)
    return presence.reshape(len(z), grid[0] * grid[1]), weighted_sum


@functools.partial(jax.jit, static_argnames=("split", "segmenter", "labels", "downsample", "grid"))
def _candidate_pass(gparams, sparams, value, z, probe_locations, *, split, segmenter, labels,
                    downsample, grid):
    h, f = split
    S = segmenter.obj
    r, side = h(gparams, z)
    _, mask = concept_score(S, sparams, f(gparams, r, side), labels, downsample)
    baseline = mask.sum((1, 2)).astype(jnp.float32)
    locations = grid[0] * grid[1]
    absent = _pool_to_grid(mask.astype(jnp.float32), grid).reshape(len(z), locations) == 0

    def gain(location):
        m = _location_map(jnp.full((len(z),), location), grid)
        _, inserted = concept_score(S, sparams, f(gparams, r * (1 - m) + value * m, side), labels,
                                    downsample)
        return inserted.sum((1, 2)).astype(jnp.float32) - baseline

    gains = jax.vmap(gain)(probe_locations).T  # (N, probes)
    return gains * absent[:, probe_locations]


def build_ace_corpus(
    generator: Any,
    segmenter: Any,
    layer: str,
    concept: str | int | Sequence[str | int],
    *,
    search_size: int = 10000,
    train_size: int = 1000,
    eval_size: int = 200,
    seed: int = 10,
    probes: int = 5,
    batch_size: int = 50,
    seg_downsample: int = 1,
    progress: bool = False,
) -> AceCorpus:
    """Collect present and candidate samples for :func:`optimize_ace` (the reference's phases 1-2,
    ``compute_present_locations`` and ``compute_candidate_locations`` of ``netdissect.aceoptimize``).

    Present samples come from ``search_size`` z of ``seed``; candidate samples from as many z of
    ``seed + 1``. For each batch of candidates, ``probes`` feature locations are drawn (weighted
    by where the concept is usually found, without replacement) and ``insertion_value`` is
    written there across all channels; an image's candidate score is the largest number of
    concept pixels gained at a location where the concept was absent.

    Args:
      generator: a :class:`gandissect_jax.generator.Generator`.
      segmenter: the Segmenter protocol.
      layer: the layer to edit.
      concept: a label name or number, or several (their union, e.g. an object and its parts).
      search_size: z searched for each kind of sample.
      train_size, eval_size: samples kept of each kind.
      seed: z seed of the present search (candidates use seed + 1; probes use seed).
      probes: locations tried per candidate batch.
      batch_size: images per forward pass (the last batch is padded, so one program serves all).
      seg_downsample: segmentation stride.
      progress: show tqdm bars.

    Returns:
      An :class:`AceCorpus`. ValueError if fewer than ``train_size + eval_size`` images show the
      concept, or the sizes are inconsistent.
    """
    if min(train_size, eval_size, probes, batch_size) < 1:
        raise ValueError("train_size, eval_size, probes and batch_size must be positive")
    if train_size + eval_size > search_size:
        raise ValueError(
            f"train_size + eval_size = {train_size + eval_size} exceeds search_size = {search_size}"
        )
    labels = concept_labels(segmenter, concept)
    split = generator.split(layer)
    rows, cols, channels = layer_shape(generator, layer)
    grid = (rows, cols)
    locations = rows * cols
    if probes > locations:
        raise ValueError(f"probes = {probes} exceeds the {locations} locations of {layer}")
    gparams, sparams = generator.params, segmenter.params
    static = dict(split=tuple(split), segmenter=Static(segmenter), labels=labels,
                  downsample=int(seg_downsample), grid=grid)

    z_present = sample_z(search_size, generator.z_dim, seed)
    presence = np.zeros((search_size, locations), np.float32)
    feature_sum = np.zeros(channels, np.float64)
    for start in _batches(search_size, batch_size, progress, f"ACE {layer}: present"):
        z, count = _padded(z_present, start, batch_size)
        valid = jnp.asarray(np.arange(batch_size) < count, jnp.float32)
        p, s = _presence_pass(gparams, sparams, jnp.asarray(z), valid, **static)
        presence[start : start + count] = np.asarray(p)[:count]
        feature_sum += np.asarray(s, np.float64)
    best_presence = presence.max(1)
    shown = int((best_presence > 0).sum())
    if shown < train_size + eval_size:
        names = [segmenter.labels[c][0] for c in labels]
        raise ValueError(
            f"only {shown} of {search_size} images show {names}; need train_size + eval_size = "
            f"{train_size + eval_size}: raise search_size or lower the sizes"
        )
    train, held_out = _split_best(best_presence, train_size, eval_size)
    present_location = presence.argmax(1).astype(np.int32)
    insertion_value = (feature_sum / (1e-20 + presence.sum(dtype=np.float64))).astype(np.float32)

    popularity = np.bincount(present_location[train], minlength=locations).astype(np.float64)
    weights = popularity + popularity.mean() / 10.0
    weights /= weights.sum()
    value = jnp.asarray(insertion_value)

    z_candidate = sample_z(search_size, generator.z_dim, seed + 1)
    candidate_scores = np.zeros((search_size, locations), np.float32)
    rng = np.random.RandomState(seed)
    for start in _batches(search_size, batch_size, progress, f"ACE {layer}: candidates"):
        probe_locations = rng.choice(locations, size=probes, replace=False, p=weights)
        z, count = _padded(z_candidate, start, batch_size)
        g = np.asarray(_candidate_pass(gparams, sparams, value, jnp.asarray(z),
                                       jnp.asarray(probe_locations), **static))
        candidate_scores[start : start + count, probe_locations] = g[:count]
    candidate_location = candidate_scores.argmax(1).astype(np.int32)
    c_train, c_held_out = _split_best(candidate_scores.max(1), train_size, eval_size)
    return AceCorpus(
        layer=layer,
        labels=labels,
        present_z=z_present[train],
        present_location=present_location[train],
        candidate_z=z_candidate[c_train],
        candidate_location=candidate_location[c_train],
        eval_present_z=z_present[held_out],
        eval_present_location=present_location[held_out],
        eval_candidate_z=z_candidate[c_held_out],
        eval_candidate_location=candidate_location[c_held_out],
        insertion_value=insertion_value,
    )
