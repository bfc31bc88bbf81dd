"""ACE optimization: find the units of a layer that *cause* a concept (the paper's Sec. 3.2).

Dissection says which units *correlate* with a concept; the average causal effect (ACE) of a set
of units says which ones make it appear. Searching all subsets is hopeless, so, as the paper and
the reference (``netdissect.aceoptimize``) do, we fit a continuous per-unit weight
``alpha`` in ``[0, 1]^C`` with gradient descent through f and the segmenter, and then rank the
units by ``alpha``. Two kinds of sample drive the fit, collected by :func:`build_ace_corpus`:

- *present*: images where the concept is visible, each with the feature-map location ``p`` that
  covers the most concept pixels. Ablating ``alpha`` there should erase the concept;
- *candidate*: images where the concept is absent at a location ``q`` but inserting the
  concept's typical features there (``v``, the presence-weighted mean of the layer's features)
  makes it appear. Inserting ``alpha`` there should create the concept.

:func:`optimize_ace` then minimises, with any optax ``GradientTransformation`` (default: Adam
chained with :func:`project_unit_interval`, the projection onto ``[0, 1]``, as a transform)::

    mean_present  s_c(f(r * (1 - alpha m_p)))[p]
  - mean_candidate s_c(f(r * (1 - alpha m_q) + v alpha m_q))[q]  +  l2 * |alpha|^2

where ``m_p`` is the one-hot map of location ``p`` and ``s_c`` the segmenter's differentiable
class score averaged over the pixels under the feature location. The reference measures the
insertion term at the *present* sample's location ``p`` instead of ``q`` (an indexing slip in
``ace_loss``); we measure it where the insertion happened.

Two more objectives ablate ``alpha`` at every position of the present samples: ``"removal"``
(the reference's full-image variant) minimises the concept's score, and ``"specific_removal"``
(ours) minimises the concept's remaining share while penalising any change of the other labels'
shares, to find units whose ablation removes the concept without turning it into something else.
With ``max_units=k`` the fit is kept on ``{alpha in [0, 1]^C : sum(alpha) <= k}``, the convex
relaxation of "ablate k units", so the weights rank the best set of that size (the projection
:func:`project_unit_budget`, also a chainable transform); ``binarize`` pushes the weights to 0 or 1
by the last epoch, so that the fit ends on whole units.

Speed: ``r = h(z)`` does not depend on ``alpha``, so it is computed once per corpus sample and kept
on the device; a step runs only ``f`` and the segmenter (forward and backward, with respect to
``alpha`` alone). Every jitted program here takes the generator's and the segmenter's parameters
as arguments and is keyed by their structure (:mod:`gandissect_jax._structure`), so it compiles
once per architecture and shapes: repeated fits, and fits of another weight set of the same
architecture, compile nothing.

Example::

    corpus = build_ace_corpus(G, S, "layer4", "tree", search_size=4000, progress=True)
    fit = optimize_ace(G, S, corpus, init=iou_of_tree_per_unit)
    units = ace_ranking(fit.alpha, tie_break=iou_of_tree_per_unit)[:20]
    shares = label_shares(G, S, z, layer="layer4", edit=ablation_edit(units, 128))
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax._structure import Static
from gandissect_jax.sampling import sample_z
from gandissect_jax.segmenter.protocol import label_index

__all__ = [
    "AceCorpus", "AceFit", "build_ace_corpus", "optimize_ace", "ace_ranking", "concept_score",
    "project_to_budget", "label_scores", "project_unit_interval", "project_unit_budget",
    "ace_optimizer", "concept_labels", "prepare_ace", "AceProblem", "ace_step", "representations",
    "layer_shape",
]

OBJECTIVES = ("ace", "removal", "specific_removal")


def concept_labels(segmenter: Any, concept: str | int | Sequence[str | int]) -> tuple[int, ...]:
    """Label numbers of a concept given as a name, a number, or several of them (a union).

    ValueError naming the concept (with close names) or the number and the valid range."""
    items = [concept] if isinstance(concept, (str, int, np.integer)) else list(concept)
    if not items:
        raise ValueError("concept is empty: give a label name or a list of label names")
    numbers = []
    for item in items:
        if isinstance(item, str):
            numbers.append(label_index(segmenter, item))
        else:
            number = int(item)
            if not 0 < number < len(segmenter.labels):
                raise ValueError(f"label number {number} out of range 1..{len(segmenter.labels) - 1}")
            numbers.append(number)
    return tuple(sorted(set(numbers)))


_concept_labels = concept_labels  # earlier private name


def concept_score(
    segmenter: Any, params: Any, images: jax.Array, labels: Sequence[int], downsample: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Differentiable score and mask of a union of labels.

    Args:
      segmenter: the Segmenter protocol.
      params: the segmenter's parameters (``segmenter.params``; may be traced).
      images: float32 (N, H, W, 3) in [-1, 1].
      labels: label numbers; the concept is present where any of them is.
      downsample: segmentation stride.

    Returns:
      ``(score, mask)``: float32 (N, h, w), the sum of the labels' class scores (for a softmax
      segmenter, the probability of the union), and bool (N, h, w), where any label wins.
    """
    score, mask = None, None
    for c in labels:
        s, m = segmenter.class_score(params, images, int(c), downsample)
        score = s if score is None else score + s
        mask = m if mask is None else mask | m
    return score, mask


def label_scores(
    segmenter: Any, params: Any, images: jax.Array, labels: Sequence[int], downsample: int = 1
) -> jax.Array:
    """Differentiable scores float32 (N, h, w, K) of K labels, in the order given.

    ``params`` are the segmenter's parameters (``segmenter.params``; may be traced). Uses the
    segmenter's optional ``class_scores`` (every label from one pass, so one backward pass when
    differentiated) when it has one, else ``class_score`` once per label.
    """
    if hasattr(segmenter, "class_scores"):
        return segmenter.class_scores(params, images, downsample)[..., jnp.asarray(labels, jnp.int32)]
    return jnp.stack([segmenter.class_score(params, images, int(c), downsample)[0] for c in labels], -1)


def _pool_to_grid(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Block means of (N, h, w) down to (N, H, W); h, w must be multiples of H, W."""
    n, h, w = x.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(
            f"segmentation of size {h}x{w} is not a whole multiple of the {rows}x{cols} feature map; "
            "change seg_downsample"
        )
    return x.reshape(n, rows, h // rows, cols, w // cols).mean((2, 4))


def project_to_budget(x: Any, budget: float | None) -> jax.Array:
    """Euclidean projection onto ``{a in [0, 1]^C : sum(a) <= budget}``.

    Args:
      x: float (C,).
      budget: the largest allowed sum (e.g. the number of units to ablate; may be traced); None
        only clips to [0, 1].

    Returns:
      float32 (C,): ``clip(x - t, 0, 1)`` with the smallest shift ``t >= 0`` that meets the budget
      (found by bisection, so the sum is at most ``budget``).
    """
    x = jnp.asarray(x, jnp.float32)
    clipped = jnp.clip(x, 0.0, 1.0)
    if budget is None:
        return clipped

    def total(t):
        return jnp.clip(x - t, 0.0, 1.0).sum()

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        over = total(mid) > budget
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    # total(lo) > budget >= total(hi) throughout
    _, hi = jax.lax.fori_loop(0, 60, bisect, (jnp.float32(0.0), jnp.maximum(x.max(), 0.0)))
    return jnp.where(clipped.sum() > budget, jnp.clip(x - hi, 0.0, 1.0), clipped)


# ============================================================================================
# the projections as optax transforms


def _projection(project, name: str):
    import optax

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name} needs the parameters: call update(grads, state, params)")
        projected = jax.tree_util.tree_map(lambda u, p: project(p + u) - p, updates, params)
        return projected, state

    return optax.GradientTransformation(init, update)


@functools.lru_cache(maxsize=None)
def project_unit_interval():
    """An optax transform that makes the update land in ``[0, 1]``: ``u -> clip(p + u, 0, 1) - p``.

    Chain it last (``optax.chain(optax.adam(0.01), project_unit_interval())``) so that the ACE
    weights stay ablation fractions. The same object is returned on every call, so programs
    compiled with it are reused.
    """
    return _projection(lambda a: jnp.clip(a, 0.0, 1.0), "project_unit_interval")


@functools.lru_cache(maxsize=None)
def project_unit_budget(max_units: float):
    """An optax transform that makes the update land in ``{a in [0, 1]^C : sum(a) <= max_units}``
    (:func:`project_to_budget` of ``p + u``), the convex relaxation of "ablate ``max_units``
    units". Chain it last. ValueError unless ``max_units > 0``. Cached per ``max_units``."""
    if not max_units > 0:
        raise ValueError(f"max_units must be positive, got {max_units}")
    budget = float(max_units)
    return _projection(lambda a: project_to_budget(a, budget), "project_unit_budget")


@functools.lru_cache(maxsize=64)
def ace_optimizer(learning_rate: float = 0.01, max_units: float | None = None):
    """The default ACE optimizer: ``optax.chain(optax.adam(learning_rate), projection)`` with
    :func:`project_unit_budget` (``max_units``) or :func:`project_unit_interval` (None). The
    reference uses Adam at 0.01 and clamps to [0, 1] after each step. Cached, so repeated fits with
    the same settings reuse the compiled step."""
    import optax

    projection = project_unit_interval() if max_units is None else project_unit_budget(max_units)
    return optax.chain(optax.adam(float(learning_rate)), projection)


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


# ============================================================================================
# the fit


class AceFit(NamedTuple):
    """Result of :func:`optimize_ace`.

    Attributes:
      alpha: float32 (C,) unit weights in [0, 1]; large means causal for the concept.
      eval_loss: float64 (epochs + 1,) held-out objective (without the L2 term) before training
        and after every epoch.
    """

    alpha: np.ndarray
    eval_loss: np.ndarray


class AceSpec(NamedTuple):
    """Everything static about one ACE program (hashable: a ``jax.jit`` static argument)."""

    f: Any  # the generator's f (jitted; shared by every generator of one architecture)
    segmenter: Static
    labels: tuple[int, ...]
    others: tuple[int, ...]
    grid: tuple[int, int]
    downsample: int
    objective: str
    optimizer: Any  # an optax GradientTransformation


class AceConsts(NamedTuple):
    """What the objectives read besides alpha and the batch (a pytree of arrays passed to jit)."""

    gparams: Any  # generator parameters
    sparams: Any  # segmenter parameters
    value: jax.Array  # float32 (C,) insertion value
    reference: jax.Array  # float32 (len(others),) reference shares of the other labels
    l2: jax.Array  # float32 (): weight of |alpha|^2
    specificity: jax.Array  # float32 (): weight of the side-effect term of specific_removal


class AceData(NamedTuple):
    """Precomputed representations of corpus samples (device arrays, leading axis = sample)."""

    present_r: jax.Array
    present_side: Any
    present_location: jax.Array
    candidate_r: jax.Array
    candidate_side: Any
    candidate_location: jax.Array
    before: jax.Array  # (P, 1 + len(others)) unedited shares of the present samples, or (P, 0)


def _shares(spec: AceSpec, sparams, images):
    """Image-mean scores (N, 1 + len(others)): the concept's, then every other label's."""
    K = len(spec.labels)
    means = label_scores(spec.segmenter.obj, sparams, images, spec.labels + spec.others,
                         spec.downsample).mean((1, 2))
    return jnp.concatenate([means[:, :K].sum(-1, keepdims=True), means[:, K:]], -1)


def _score_at(spec: AceSpec, sparams, images, locations):
    rows, cols = spec.grid
    score = label_scores(spec.segmenter.obj, sparams, images, spec.labels, spec.downsample).sum(-1)
    pooled = _pool_to_grid(score, spec.grid).reshape(len(images), rows * cols)
    return jnp.take_along_axis(pooled, locations[:, None], 1)[:, 0]


def _objective(alpha, c: AceConsts, batch: AceData, spec: AceSpec):
    f, grid = spec.f, spec.grid
    if spec.objective == "ace":
        mp = alpha * _location_map(batch.present_location, grid)
        erased = _score_at(spec, c.sparams, f(c.gparams, batch.present_r * (1 - mp), batch.present_side),
                           batch.present_location)
        mc = alpha * _location_map(batch.candidate_location, grid)
        added = _score_at(spec, c.sparams,
                          f(c.gparams, batch.candidate_r * (1 - mc) + c.value * mc, batch.candidate_side),
                          batch.candidate_location)
        return erased.mean() - added.mean()
    images = f(c.gparams, batch.present_r * (1 - alpha), batch.present_side)
    if spec.objective == "removal":
        score = label_scores(spec.segmenter.obj, c.sparams, images, spec.labels, spec.downsample).sum(-1)
        return _pool_to_grid(score, grid).sum((1, 2)).mean()
    after = _shares(spec, c.sparams, images)  # specific_removal
    before = batch.before
    remaining = after[:, 0].mean() / jnp.maximum(before[:, 0].mean(), 1e-12)
    side = ((after[:, 1:].mean(0) - before[:, 1:].mean(0)) / c.reference) ** 2
    return remaining + c.specificity * side.sum()


def _take(data: AceData, ip, ic) -> AceData:
    """The batch of samples ``ip`` (present) and ``ic`` (candidate), gathered on the device."""
    def rows(tree, idx):
        return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)

    return AceData(rows(data.present_r, ip), rows(data.present_side, ip), rows(data.present_location, ip),
                   rows(data.candidate_r, ic), rows(data.candidate_side, ic),
                   rows(data.candidate_location, ic), rows(data.before, ip))


@functools.partial(jax.jit, static_argnames=("spec",))
def ace_step(alpha, opt_state, ramp, consts: AceConsts, data: AceData, ip, ic, *, spec: AceSpec):
    """One optimization step on the batch ``ip``/``ic`` of ``data``: returns (alpha, opt_state, loss).

    The loss is the objective plus ``l2 |alpha|^2`` and ``ramp * sum(alpha (1 - alpha))``; the
    gradient is taken with respect to ``alpha`` only; the updated alpha is clipped to [0, 1] (the
    optimizer's projection already lands there, up to one float32 rounding)."""
    import optax

    batch = _take(data, ip, ic)

    def loss_fn(a):
        return (_objective(a, consts, batch, spec) + consts.l2 * jnp.sum(a**2)
                + ramp * jnp.sum(a * (1 - a)))

    loss, grad = jax.value_and_grad(loss_fn)(alpha)
    updates, opt_state = spec.optimizer.update(grad, opt_state, alpha)
    return jnp.clip(optax.apply_updates(alpha, updates), 0.0, 1.0), opt_state, loss


@functools.partial(jax.jit, static_argnames=("spec",))
def _evaluate(alpha, consts: AceConsts, data: AceData, ip, ic, *, spec: AceSpec):
    return _objective(alpha, consts, _take(data, ip, ic), spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _unedited_shares(consts: AceConsts, r, side, *, spec: AceSpec):
    return _shares(spec, consts.sparams, spec.f(consts.gparams, r, side))


@functools.partial(jax.jit, static_argnames=("h",))
def _representation(gparams, z, *, h):
    return h(gparams, z)


def representations(generator: Any, layer: str, z: np.ndarray, batch_size: int) -> tuple[jax.Array, Any]:
    """``(r, side) = h(z)`` for every row of ``z``, in padded batches, concatenated on the device.

    Returns ``r`` (N, H, W, C) and ``side`` (a pytree whose leaves have a leading sample axis, or
    ``()``)."""
    h, _ = generator.split(layer)
    z = np.asarray(z, np.float32)
    parts = []
    for start in range(0, len(z), batch_size):
        batch, count = _padded(z, start, batch_size)
        r, side = _representation(generator.params, jnp.asarray(batch), h=h)
        parts.append(jax.tree_util.tree_map(lambda a, n=count: a[:n], (r, side)))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, 0), *parts)


class AceProblem(NamedTuple):
    """Everything one ACE fit runs on, ready for :func:`ace_step` (made by :func:`prepare_ace`).

    Attributes:
      spec: the static :class:`AceSpec` (keys the compiled programs).
      consts: :class:`AceConsts`, the parameters and constants (arrays).
      train, held: :class:`AceData` of the training and held-out samples (``r = h(z)`` computed
        once, on the device).
      alpha: float32 (C,) the starting weights (projected).
      opt_state: the optimizer's state for ``alpha``.
    """

    spec: AceSpec
    consts: AceConsts
    train: AceData
    held: AceData
    alpha: jax.Array
    opt_state: Any


def prepare_ace(generator: Any, segmenter: Any, corpus: AceCorpus, *, init: Any = None, l2: float = 0.005,
                learning_rate: float = 0.01, batch_size: int = 20, seg_downsample: int = 1,
                objective: str = "ace", specificity: float = 1.0, max_units: float | None = None,
                optimizer: Any = None) -> AceProblem:
    """The :class:`AceProblem` of a fit (arguments as :func:`optimize_ace`): checks the arguments,
    computes ``r = h(z)`` of every corpus sample once (and, for ``specific_removal``, the unedited
    shares), and initialises the optimizer. ``ace_step(problem.alpha, problem.opt_state, ramp,
    problem.consts, problem.train, ip, ic, spec=problem.spec)`` then runs one step.

    Raises:
      ValueError naming the argument (see :func:`optimize_ace`).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be 'ace', 'removal' or 'specific_removal', got {objective!r}")
    if max_units is not None and not max_units > 0:
        raise ValueError(f"max_units must be positive or None, got {max_units}")
    rows, cols, channels = layer_shape(generator, corpus.layer)
    labels = tuple(int(c) for c in corpus.labels)
    value = jnp.asarray(corpus.insertion_value)
    if value.shape != (channels,):
        raise ValueError(
            f"corpus insertion value has shape {value.shape}; {corpus.layer} has {channels} channels"
        )
    n_train = min(len(corpus.present_z), len(corpus.candidate_z))
    if batch_size < 1 or n_train < batch_size:
        raise ValueError(f"batch_size = {batch_size} needs 1..{n_train} (the training samples)")
    if init is None:
        alpha = jnp.zeros(channels, jnp.float32)
    else:
        alpha = jnp.asarray(init, jnp.float32)
        if alpha.shape != (channels,):
            raise ValueError(f"init has shape {alpha.shape}; expected ({channels},)")
        alpha = project_to_budget(alpha, max_units)
    if optimizer is None:
        optimizer = ace_optimizer(float(learning_rate), None if max_units is None else float(max_units))
    _, f = generator.split(corpus.layer)
    others = (tuple(l for l in range(1, len(segmenter.labels)) if l not in labels)
              if objective == "specific_removal" else ())
    spec = AceSpec(f=f, segmenter=Static(segmenter), labels=labels, others=others, grid=(rows, cols),
                   downsample=int(seg_downsample), objective=objective, optimizer=optimizer)
    consts = AceConsts(generator.params, segmenter.params, value, jnp.ones((len(others),), jnp.float32),
                       jnp.float32(l2), jnp.float32(specificity))

    # r = h(z) does not depend on alpha: computed once per sample, kept on the device
    def data_of(pz, pl, cz, cl):
        pr, ps = representations(generator, corpus.layer, pz, batch_size)
        cr, cs = representations(generator, corpus.layer, cz, batch_size)
        return AceData(pr, ps, jnp.asarray(pl, jnp.int32), cr, cs, jnp.asarray(cl, jnp.int32),
                       jnp.zeros((len(pz), 0), jnp.float32))

    train = data_of(corpus.present_z, corpus.present_location, corpus.candidate_z, corpus.candidate_location)
    held = data_of(corpus.eval_present_z, corpus.eval_present_location, corpus.eval_candidate_z,
                   corpus.eval_candidate_location)
    if objective == "specific_removal":
        # the unedited shares do not depend on alpha either: computed once
        def unedited(data: AceData) -> jax.Array:
            n = len(data.present_r)
            out = []
            for start in range(0, n, batch_size):
                idx = jnp.asarray(np.minimum(np.arange(start, start + batch_size), n - 1))
                rows_ = jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0),
                                               (data.present_r, data.present_side))
                out.append(_unedited_shares(consts, *rows_, spec=spec)[: min(batch_size, n - start)])
            return jnp.concatenate(out, 0)

        train = train._replace(before=unedited(train))
        held = held._replace(before=unedited(held))
        consts = consts._replace(reference=jnp.maximum(train.before[:, 1:].mean(0), 1e-3))

    return AceProblem(spec, consts, train, held, alpha, optimizer.init(alpha))


def optimize_ace(
    generator: Any,
    segmenter: Any,
    corpus: AceCorpus,
    *,
    init: Any = None,
    l2: float = 0.005,
    learning_rate: float = 0.01,
    epochs: int = 10,
    batch_size: int = 20,
    seed: int = 0,
    seg_downsample: int = 1,
    objective: str = "ace",
    specificity: float = 1.0,
    max_units: float | None = None,
    binarize: float = 0.0,
    optimizer: Any = None,
    progress: bool = False,
) -> AceFit:
    """Fit the per-unit ablation weights alpha (see the module docstring for the objective; the
    reference's ``train_ablation`` of ``netdissect.aceoptimize``).

    Args:
      generator, segmenter: as for :func:`build_ace_corpus`; their parameters are arguments of
        the jitted step, not constants in it.
      corpus: from :func:`build_ace_corpus`.
      init: float (C,) starting alpha, e.g. the units' IoU with the concept divided by its
        maximum (the reference's start); None starts at zero. Projected onto the feasible set.
      l2: weight of ``|alpha|^2`` (the reference's default 0.005).
      learning_rate: Adam step size of the default optimizer (the reference's 0.01).
      epochs: passes over the training samples; each step uses ``batch_size`` present and as
        many candidate samples (the last ``len % batch_size`` of each shuffled pass are skipped).
      seed: shuffling seed.
      seg_downsample: segmentation stride.
      objective: ``"ace"``, the objective of the module docstring; or ``"removal"``, the
        reference's ``_fia`` variant: ablate alpha at every position of the present samples and
        minimise the concept's score summed over the whole image (per location, as the ace
        objective), with no insertion term; or ``"specific_removal"``: ablate alpha at every
        position of the present samples and minimise, per batch, the concept's share after
        ablation over its share before (so 1 means nothing removed), plus ``specificity`` times
        the sum over every other label l >= 1 of ``((share_l after - share_l before) / ref_l)^2``,
        where ``ref_l`` is label l's mean share in the unedited present training samples (at
        least 1e-3). Shares are the segmenter's class scores averaged over the image.
      specificity: weight of the side-effect term of ``"specific_removal"``.
      max_units: keep ``sum(alpha) <= max_units`` (see :func:`project_to_budget`), e.g. the
        number of units that will be ablated; None for no budget. Used by the default optimizer
        and to project ``init``.
      binarize: weight of ``sum(alpha * (1 - alpha))``, ramped up linearly from 0 in the first
        epoch to ``binarize`` in the last, to push alpha to 0 or 1 so that the fitted weights
        are the set of units that will be ablated whole (with ``max_units=k``: k units at 1).
      optimizer: any optax ``GradientTransformation`` (default :func:`ace_optimizer`
        ``(learning_rate, max_units)``: Adam chained with the projection). End a chain of your own
        with :func:`project_unit_budget` or :func:`project_unit_interval` to keep alpha feasible;
        alpha is clipped to [0, 1] after every update in any case. Pass the same object again to
        reuse the compiled step.
      progress: show tqdm bars.

    Returns:
      An :class:`AceFit`.

    Raises:
      ValueError naming the argument for an unknown objective, a non-positive max_units, an
      init of the wrong shape, a batch size larger than the training samples, or a corpus whose
      insertion value does not fit the layer.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    problem = prepare_ace(generator, segmenter, corpus, init=init, l2=l2, learning_rate=learning_rate,
                          batch_size=batch_size, seg_downsample=seg_downsample, objective=objective,
                          specificity=specificity, max_units=max_units, optimizer=optimizer)
    spec, consts, train, held = problem.spec, problem.consts, problem.train, problem.held
    alpha, opt_state = problem.alpha, problem.opt_state
    n_train = min(len(corpus.present_z), len(corpus.candidate_z))

    def eval_loss(alpha):
        n = min(len(corpus.eval_present_z), len(corpus.eval_candidate_z))
        total = 0.0
        for start in range(0, n, batch_size):
            idx = jnp.arange(start, min(start + batch_size, n))
            total += float(_evaluate(alpha, consts, held, idx, idx, spec=spec)) * len(idx)
        return total / n

    history = [eval_loss(alpha)]
    key = jax.random.key(seed)
    epoch_range = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc=f"ACE {corpus.layer}", unit="epoch")
    for epoch in epoch_range:
        ramp = jnp.float32(binarize * epoch / max(epochs - 1, 1))
        key, key_p, key_c = jax.random.split(key, 3)
        order_p = jax.random.permutation(key_p, len(corpus.present_z))
        order_c = jax.random.permutation(key_c, len(corpus.candidate_z))
        for b in range(n_train // batch_size):
            ip = order_p[b * batch_size : (b + 1) * batch_size]
            ic = order_c[b * batch_size : (b + 1) * batch_size]
            alpha, opt_state, _ = ace_step(alpha, opt_state, ramp, consts, train, ip, ic, spec=spec)
        history.append(eval_loss(alpha))
        if progress:
            epoch_range.set_postfix(eval_loss=f"{history[-1]:.4f}")
    return AceFit(alpha=np.asarray(alpha, np.float32), eval_loss=np.asarray(history, np.float64))


def ace_ranking(alpha: Any, tie_break: Any = None) -> np.ndarray:
    """Units ordered by alpha, largest first; equal alphas (e.g. several at 1) by ``tie_break``
    (e.g. IoU), largest first, then by unit number (the reference's ``fullablate`` ordering).

    Args:
      alpha: float (C,).
      tie_break: float (C,) or None.

    Returns:
      int64 (C,) unit numbers.
    """
    alpha = np.asarray(alpha, np.float64).reshape(-1)
    tie = np.zeros_like(alpha) if tie_break is None else np.asarray(tie_break, np.float64).reshape(-1)
    if tie.shape != alpha.shape:
        raise ValueError(f"tie_break has shape {tie.shape}; alpha has {alpha.shape}")
    return np.lexsort((np.arange(len(alpha)), -tie, -alpha)).astype(np.int64)
