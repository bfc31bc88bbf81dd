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

:func:`optimize_ace` then minimises, with optax Adam and a projection onto ``[0, 1]`` after every
step::

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
relaxation of "ablate k units", so the weights rank the best set of that size; ``binarize``
pushes the weights to 0 or 1 by the last epoch, so that the fit ends on whole units.

Example::

    corpus = build_ace_corpus(G, S, "layer4", "tree", search_size=4000, progress=True)
    fit = optimize_ace(G, S, corpus, init=iou_of_tree_per_unit)
    units = ace_ranking(fit.alpha, tie_break=iou_of_tree_per_unit)[:20]
    shares = label_shares(G, S, z, layer="layer4", edit=ablation_edit(units, 128))
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.sampling import sample_z
from gandissect_jax.segmenter.protocol import label_index

__all__ = [
    "AceCorpus", "AceFit", "build_ace_corpus", "optimize_ace", "ace_ranking", "concept_score",
    "project_to_budget", "label_scores",
]


def _concept_labels(segmenter: Any, concept: str | int | Sequence[str | int]) -> tuple[int, ...]:
    """Label numbers of a concept given as a name, a number, or several of them (a union)."""
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
      budget: the largest allowed sum (e.g. the number of units to ablate); None only clips to
        [0, 1].

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


def _split_best(scores: np.ndarray, train_size: int, eval_size: int):
    """The train_size + eval_size images of highest score, in index order: the first train_size
    for training, the last eval_size for evaluation (the reference's split)."""
    order = np.argsort(-scores, kind="stable")[: train_size + eval_size]
    chosen = np.sort(order)
    return chosen[:train_size], chosen[len(chosen) - eval_size :]


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
    """Collect present and candidate samples for :func:`optimize_ace` (the reference's phases 1-2).

    Present samples come from ``search_size`` z of ``seed``; candidate samples from as many z of
    ``seed + 1``. For each batch of candidates, ``probes`` feature locations are drawn (weighted
    by where the concept is usually found, without replacement) and ``insertion_value`` is
    written there across all channels; an image's candidate score is the largest number of
    concept pixels gained at a location where the concept was absent.

    Args:
      generator: a :class:`gandissect_jax.generator.Generator` with ``layer_shape``.
      segmenter: the Segmenter protocol.
      layer: the layer to edit.
      concept: a label name or number, or several (their union, e.g. an object and its parts).
      search_size: z searched for each kind of sample.
      train_size, eval_size: samples kept of each kind.
      seed: z seed of the present search (candidates use seed + 1; probes use seed).
      probes: locations tried per candidate batch.
      batch_size: images per forward pass.
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
    labels = _concept_labels(segmenter, concept)
    h, f = generator.split(layer)
    rows, cols, channels = generator.layer_shape(layer)
    grid = (rows, cols)
    locations = rows * cols
    if probes > locations:
        raise ValueError(f"probes = {probes} exceeds the {locations} locations of {layer}")
    gparams, sparams = generator.params, segmenter.params

    # parameters are arguments of the jitted passes, never constants baked into them
    @jax.jit
    def presence_pass(gparams, sparams, z):
        r, side = h(gparams, z)
        _, mask = concept_score(segmenter, sparams, f(gparams, r, side), labels, seg_downsample)
        presence = _pool_to_grid(mask.astype(jnp.float32), grid)  # (N, H, W)
        weighted_sum = jnp.einsum("nhwc,nhw->c", r, presence)
        return presence.reshape(len(z), locations), weighted_sum

    z_present = sample_z(search_size, generator.z_dim, seed)
    presence = np.zeros((search_size, locations), np.float32)
    feature_sum = np.zeros(channels, np.float64)
    for start in _batches(search_size, batch_size, progress, f"ACE {layer}: present"):
        p, s = presence_pass(gparams, sparams, jnp.asarray(z_present[start : start + batch_size]))
        presence[start : start + len(p)] = np.asarray(p)
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

    @jax.jit
    def candidate_pass(gparams, sparams, value, z, probe_locations):
        r, side = h(gparams, z)
        _, mask = concept_score(segmenter, sparams, f(gparams, r, side), labels, seg_downsample)
        baseline = mask.sum((1, 2)).astype(jnp.float32)
        absent = _pool_to_grid(mask.astype(jnp.float32), grid).reshape(len(z), locations) == 0

        def gain(location):
            m = _location_map(jnp.full((len(z),), location), grid)
            _, inserted = concept_score(segmenter, sparams, f(gparams, r * (1 - m) + value * m, side),
                                        labels, seg_downsample)
            return inserted.sum((1, 2)).astype(jnp.float32) - baseline

        gains = jax.vmap(gain)(probe_locations).T  # (N, probes)
        return gains * absent[:, probe_locations]

    z_candidate = sample_z(search_size, generator.z_dim, seed + 1)
    candidate_scores = np.zeros((search_size, locations), np.float32)
    rng = np.random.RandomState(seed)
    for start in _batches(search_size, batch_size, progress, f"ACE {layer}: candidates"):
        probe_locations = rng.choice(locations, size=probes, replace=False, p=weights)
        g = np.asarray(candidate_pass(gparams, sparams, value,
                                      jnp.asarray(z_candidate[start : start + batch_size]),
                                      jnp.asarray(probe_locations)))
        candidate_scores[start : start + len(g), probe_locations] = g
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


class _AceConsts(NamedTuple):
    """What the ACE objectives read besides alpha and the batch (a pytree passed to jit)."""

    gparams: Any  # generator parameters
    sparams: Any  # segmenter parameters
    value: jax.Array  # float32 (C,) insertion value
    reference: jax.Array  # float32 (L - 1 - K,) reference shares of the other labels


class AceFit(NamedTuple):
    """Result of :func:`optimize_ace`.

    Attributes:
      alpha: float32 (C,) unit weights in [0, 1]; large means causal for the concept.
      eval_loss: float64 (epochs + 1,) held-out objective (without the L2 term) before training
        and after every epoch.
    """

    alpha: np.ndarray
    eval_loss: np.ndarray


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
    progress: bool = False,
) -> AceFit:
    """Fit the per-unit ablation weights alpha (see the module docstring for the objective).

    Args:
      generator, segmenter: as for :func:`build_ace_corpus`; their parameters are arguments of
        the jitted step, not constants in it.
      corpus: from :func:`build_ace_corpus`.
      init: float (C,) starting alpha, e.g. the units' IoU with the concept divided by its
        maximum (the reference's start); None starts at zero. Clipped to [0, 1].
      l2: weight of ``|alpha|^2`` (the reference's default 0.005).
      learning_rate: Adam step size (the reference's 0.01).
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
        number of units that will be ablated; None for no budget.
      binarize: weight of ``sum(alpha * (1 - alpha))``, ramped up linearly from 0 in the first
        epoch to ``binarize`` in the last, to push alpha to 0 or 1 so that the fitted weights
        are the set of units that will be ablated whole (with ``max_units=k``: k units at 1).
      progress: show tqdm bars.

    Returns:
      An :class:`AceFit`.
    """
    if objective not in ("ace", "removal", "specific_removal"):
        raise ValueError(f"objective must be 'ace', 'removal' or 'specific_removal', got {objective!r}")
    if max_units is not None and not max_units > 0:
        raise ValueError(f"max_units must be positive or None, got {max_units}")
    import optax

    h, f = generator.split(corpus.layer)
    rows, cols, channels = generator.layer_shape(corpus.layer)
    grid = (rows, cols)
    labels = corpus.labels
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

    # Everything the objectives read besides alpha and the batch -- generator and segmenter
    # parameters, the insertion value, the reference shares -- is an argument of the jitted
    # functions (``consts``), never a constant compiled into them.
    Consts = _AceConsts

    def generate(c: Consts, z, edit_r):
        r, side = h(c.gparams, z)
        return f(c.gparams, edit_r(r), side)

    def score_at(c: Consts, images, locations):
        score = label_scores(segmenter, c.sparams, images, labels, seg_downsample).sum(-1)
        pooled = _pool_to_grid(score, grid).reshape(len(images), rows * cols)
        return jnp.take_along_axis(pooled, locations[:, None], 1)[:, 0]

    def removal(alpha, c: Consts, zp, lp, zc, lc, before):
        images = generate(c, zp, lambda r: r * (1 - alpha))
        score = label_scores(segmenter, c.sparams, images, labels, seg_downsample).sum(-1)
        return _pool_to_grid(score, grid).sum((1, 2)).mean()

    def local_ace(alpha, c: Consts, zp, lp, zc, lc, before):
        mp = alpha * _location_map(lp, grid)
        erased = score_at(c, generate(c, zp, lambda r: r * (1 - mp)), lp)
        mc = alpha * _location_map(lc, grid)
        added = score_at(c, generate(c, zc, lambda r: r * (1 - mc) + c.value * mc), lc)
        return erased.mean() - added.mean()

    others = tuple(l for l in range(1, len(segmenter.labels)) if l not in labels)

    def shares(sparams, images):
        """Image-mean scores (N, 1 + len(others)): the concept's, then every other label's."""
        means = label_scores(segmenter, sparams, images, labels + others, seg_downsample).mean((1, 2))
        return jnp.concatenate([means[:, : len(labels)].sum(-1, keepdims=True), means[:, len(labels) :]], -1)

    consts = Consts(generator.params, segmenter.params, value, jnp.ones((len(others),), jnp.float32))
    # per present sample, what the objective compares against: the unedited shares (specific
    # removal only; they do not depend on alpha, so they are computed once)
    present_before = np.zeros((len(corpus.present_z), 0), np.float32)
    eval_before = np.zeros((len(corpus.eval_present_z), 0), np.float32)
    if objective == "specific_removal":
        unedited = jax.jit(lambda c, z: shares(c.sparams, generate(c, z, lambda r: r)))

        def unedited_shares(zs):
            return np.concatenate([np.asarray(unedited(consts, jnp.asarray(zs[i : i + batch_size])))
                                   for i in range(0, len(zs), batch_size)])

        present_before = unedited_shares(corpus.present_z)
        eval_before = unedited_shares(corpus.eval_present_z)
        consts = consts._replace(reference=jnp.maximum(jnp.asarray(present_before[:, 1:].mean(0)), 1e-3))

    def specific_removal(alpha, c: Consts, zp, lp, zc, lc, before):
        after = shares(c.sparams, generate(c, zp, lambda r: r * (1 - alpha)))
        remaining = after[:, 0].mean() / jnp.maximum(before[:, 0].mean(), 1e-12)
        side = ((after[:, 1:].mean(0) - before[:, 1:].mean(0)) / c.reference) ** 2
        return remaining + specificity * side.sum()

    objective_fn = {"ace": local_ace, "removal": removal, "specific_removal": specific_removal}[objective]
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(alpha, state, ramp, c, *batch):
        def loss_fn(a):
            return objective_fn(a, c, *batch) + l2 * jnp.sum(a**2) + ramp * jnp.sum(a * (1 - a))

        loss, grad = jax.value_and_grad(loss_fn)(alpha)
        updates, state = optimizer.update(grad, state, alpha)
        return project_to_budget(optax.apply_updates(alpha, updates), max_units), state, loss

    evaluate = jax.jit(objective_fn)

    def eval_loss(alpha):
        n = min(len(corpus.eval_present_z), len(corpus.eval_candidate_z))
        total = 0.0
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            total += float(evaluate(alpha, consts, *(jnp.asarray(a[start:stop]) for a in (
                corpus.eval_present_z, corpus.eval_present_location,
                corpus.eval_candidate_z, corpus.eval_candidate_location, eval_before)))) * (stop - start)
        return total / n

    state = optimizer.init(alpha)
    history = [eval_loss(alpha)]
    key = jax.random.key(seed)
    epoch_range = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc=f"ACE {corpus.layer}", unit="epoch")
    for epoch in epoch_range:
        ramp = jnp.float32(binarize * epoch / max(epochs - 1, 1))
        key, key_p, key_c = jax.random.split(key, 3)
        order_p = np.asarray(jax.random.permutation(key_p, len(corpus.present_z)))
        order_c = np.asarray(jax.random.permutation(key_c, len(corpus.candidate_z)))
        for b in range(n_train // batch_size):
            ip = order_p[b * batch_size : (b + 1) * batch_size]
            ic = order_c[b * batch_size : (b + 1) * batch_size]
            alpha, state, _ = step(alpha, state, ramp, consts, jnp.asarray(corpus.present_z[ip]),
                                   jnp.asarray(corpus.present_location[ip]),
                                   jnp.asarray(corpus.candidate_z[ic]),
                                   jnp.asarray(corpus.candidate_location[ic]),
                                   jnp.asarray(present_before[ip]))
        history.append(eval_loss(alpha))
        if progress:
            epoch_range.set_postfix(eval_loss=f"{history[-1]:.4f}")
    return AceFit(alpha=np.asarray(alpha, np.float32), eval_loss=np.asarray(history, np.float64))


def ace_ranking(alpha: Any, tie_break: Any = None) -> np.ndarray:
    """Units ordered by alpha, largest first; equal alphas (e.g. several at 1) by ``tie_break``
    (e.g. IoU), largest first, then by unit number.

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
