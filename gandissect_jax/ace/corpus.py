"""The ACE corpus: samples where a concept is present (for ablation) and candidate locations (for insertion), as in the reference's aceoptimize phases 1-2."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax._structure import Static
from gandissect_jax.generator import check_generator, split_of
from gandissect_jax.segmenter_protocol import check_segmenter
from gandissect_jax.sampling import sample_z
from .scores import _pool_to_grid, concept_labels, concept_score
from .sharded import map_batches, progress_bar, stacked


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
    h, _ = split_of(generator, layer)
    z = jax.ShapeDtypeStruct((1, int(generator.z_dim)), jnp.float32)
    r, _ = jax.eval_shape(h, generator.params, z)
    return tuple(int(s) for s in r.shape[1:])


def _presence_pass(consts, z, valid, *, split, segmenter, labels, downsample, grid):
    """One batch of the present search (run by :func:`~gandissect_jax.ace.sharded.map_batches`).

    consts: ``(gparams, sparams)``; z: float32 (B, z_dim); valid: float32 (B,), 1 for real rows,
    0 for padding. Returns float32 (B, H*W) the concept's share of each feature location's
    pixels, and float32 (C,) the features summed with those shares as weights."""
    gparams, sparams = consts
    h, f = split
    r, side = h(gparams, z)
    _, mask = concept_score(segmenter.obj, sparams, f(gparams, r, side), labels, downsample)
    presence = _pool_to_grid(mask.astype(jnp.float32), grid) * valid[:, None, None]  # (N, H, W)
    weighted_sum = jnp.einsum("nhwc,nhw->c", r, presence)
    return presence.reshape(len(z), grid[0] * grid[1]), weighted_sum


def _candidate_pass(consts, z, probe_locations, *, split, segmenter, labels, downsample, grid):
    """One batch of the candidate search (run by :func:`~gandissect_jax.ace.sharded.map_batches`).

    consts: ``(gparams, sparams, value)`` with value float32 (C,) the insertion value; z: float32
    (B, z_dim); probe_locations: int (probes,) flat feature locations. Returns float32
    (B, probes): the concept pixels gained by writing ``value`` at each probe location, 0 where
    the concept was already present there."""
    gparams, sparams, value = consts
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
    mesh: Any = None,
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
      batch_size: images per forward pass (the last batch is zero-padded, so one program serves
        all). The batches are spread over the devices of ``mesh``, one whole batch per device
        (:func:`gandissect_jax.ace.sharded.map_batches`): the corpus is bit-identical for any
        number of devices and processes.
      seg_downsample: segmentation stride.
      progress: show tqdm bars (on process 0).
      mesh: a 1-D device mesh (default :func:`gandissect_jax.ace.sharded.ace_mesh`: every device
        of every process). In a multi-process run every process calls this with the same
        arguments and gets the whole corpus.

    Returns:
      An :class:`AceCorpus`. ValueError if fewer than ``train_size + eval_size`` images show the
      concept, or the sizes are inconsistent; TypeError for a generator or segmenter that is
      not one (:func:`~gandissect_jax.generator.check_generator`,
      :func:`~gandissect_jax.segmenter.check_segmenter`).
    """
    check_generator(generator)
    check_segmenter(segmenter)
    if min(train_size, eval_size, probes, batch_size) < 1:
        raise ValueError("train_size, eval_size, probes and batch_size must be positive")
    if train_size + eval_size > search_size:
        raise ValueError(
            f"train_size + eval_size = {train_size + eval_size} exceeds search_size = {search_size}"
        )
    labels = concept_labels(segmenter, concept)
    split = split_of(generator, layer)
    rows, cols, _ = layer_shape(generator, layer)
    grid = (rows, cols)
    locations = rows * cols
    if probes > locations:
        raise ValueError(f"probes = {probes} exceeds the {locations} locations of {layer}")
    gparams, sparams = generator.params, segmenter.params
    static = (("split", tuple(split)), ("segmenter", Static(segmenter)), ("labels", labels),
              ("downsample", int(seg_downsample)), ("grid", grid))

    z_present = sample_z(search_size, generator.z_dim, seed)
    z_batches = stacked(z_present, batch_size)
    num_batches = len(z_batches)
    valid = stacked(np.ones(search_size, np.float32), batch_size)
    bar = progress_bar(num_batches, progress, f"ACE {layer}: present")
    presence, sums = map_batches(_presence_pass, (z_batches, valid), (gparams, sparams), mesh=mesh,
                                 static=static, progress=bar)
    if bar is not None:
        bar.close()
    presence = np.asarray(presence).reshape(num_batches * batch_size, locations)[:search_size]
    # float64 sums on the host in batch order (cumsum adds sequentially, as a loop over batches)
    feature_sum = np.cumsum(np.asarray(sums, np.float64), axis=0)[-1]
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

    z_candidate = sample_z(search_size, generator.z_dim, seed + 1)
    z_batches = stacked(z_candidate, batch_size)
    rng = np.random.RandomState(seed)  # the probes of every batch, in batch order
    probe_locations = np.stack([rng.choice(locations, size=probes, replace=False, p=weights)
                                for _ in range(num_batches)]).astype(np.int32)
    bar = progress_bar(num_batches, progress, f"ACE {layer}: candidates")
    gains = map_batches(_candidate_pass, (z_batches, probe_locations), (gparams, sparams, insertion_value),
                        mesh=mesh, static=static, progress=bar)
    if bar is not None:
        bar.close()
    candidate_scores = np.zeros((num_batches, batch_size, locations), np.float32)
    candidate_scores[np.arange(num_batches)[:, None, None], np.arange(batch_size)[None, :, None],
                     probe_locations[:, None, :]] = np.asarray(gains)
    candidate_scores = candidate_scores.reshape(num_batches * batch_size, locations)[:search_size]
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
