"""Fitting ACE unit weights alpha with optax through f and the segmenter (prepare_ace, ace_step, optimize_ace) and ranking units by them."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gandissect_jax._structure import Static
from gandissect_jax.generator import check_generator, split_of
from gandissect_jax.segmenter_protocol import check_segmenter
from .corpus import AceCorpus, _location_map, layer_shape
from .scores import OBJECTIVES, _pool_to_grid, label_scores
from .projections import ace_optimizer, project_to_budget


# ============================================================================================
# the fit

# samples of each kind per micro-batch (the unit of work of one device, and what bounds a step's
# memory) when not given: a step's bits depend on it, not on the number of devices (from 2 up;
# the unpartitioned 1-device program agrees to float32 rounding)
DEFAULT_FIT_MICRO_BATCH = 4


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
    micro_batch: int  # samples of each kind per micro-batch: the unit of work of one device
    mesh: Any  # the jax.sharding.Mesh whose devices share a step's micro-batches (axis "devices")


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


def _take(data: AceData, ip, ic) -> AceData:
    """The batch of samples ``ip`` (present) and ``ic`` (candidate), gathered on the device."""
    def rows(tree, idx):
        return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)

    return AceData(rows(data.present_r, ip), rows(data.present_side, ip), rows(data.present_location, ip),
                   rows(data.candidate_r, ic), rows(data.candidate_side, ic),
                   rows(data.candidate_location, ic), rows(data.before, ip))


def _micro_sum(alpha, c: AceConsts, batch: AceData, w: jax.Array, spec: AceSpec):
    """One micro-batch's contribution, its samples weighted by ``w`` (m,) (0 for padding):
    ``"ace"``: the sum of the ablated present samples' scores minus the inserted candidates';
    ``"removal"``: the sum of the present samples' concept scores after ablation; and
    ``"specific_removal"``: the sum of their shares after ablation, (1 + len(others),)."""
    f, grid = spec.f, spec.grid
    if spec.objective == "ace":
        mp = alpha * _location_map(batch.present_location, grid)
        mc = alpha * _location_map(batch.candidate_location, grid)
        # the ablated present and the inserted candidate samples as one batch: one pass of f and
        # of the segmenter (forward and backward), and half the program to compile
        r = jnp.concatenate([batch.present_r * (1 - mp), batch.candidate_r * (1 - mc) + c.value * mc])
        side = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), batch.present_side,
                                      batch.candidate_side)
        locations = jnp.concatenate([batch.present_location, batch.candidate_location])
        scores = _score_at(spec, c.sparams, f(c.gparams, r, side), locations)
        n = len(batch.present_r)
        return jnp.sum(w * scores[:n]) - jnp.sum(w * scores[n:])
    images = f(c.gparams, batch.present_r * (1 - alpha), batch.present_side)
    if spec.objective == "removal":
        score = label_scores(spec.segmenter.obj, c.sparams, images, spec.labels, spec.downsample).sum(-1)
        return jnp.sum(w * _pool_to_grid(score, grid).sum((1, 2)))
    return jnp.sum(w[:, None] * _shares(spec, c.sparams, images), 0)  # specific_removal


def _from_sums(sums, total, before, c: AceConsts):
    """The specific_removal objective from its micro-batch share sums added up (``total``: the
    number of samples; ``before``: the unedited shares' means over the batch)."""
    after = sums / total
    remaining = after[0] / jnp.maximum(before[0], 1e-12)
    side = ((after[1:] - before[1:]) / c.reference) ** 2
    return remaining + c.specificity * side.sum()


def _micro_batches(ip, ic, spec: AceSpec):
    """Rows (k_pad, m) of sample numbers and weights: the batch cut in micro-batches of m, padded
    with rows of sample 0 at weight 0, to whole micro-batches and then to a multiple of the mesh's
    devices (those extra micro-batches' results are dropped). Also k, the number of real ones."""
    m, n, devices = spec.micro_batch, ip.shape[0], spec.mesh.devices.size
    k = -(-n // m)
    rows = -(-k // devices) * devices
    pad = rows * m - n
    weights = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
    ip, ic = (jnp.concatenate([x, jnp.zeros((pad,), x.dtype)]).reshape(rows, m) for x in (ip, ic))
    return ip, ic, weights.reshape(rows, m), k


def _summed(alpha, consts: AceConsts, data: AceData, ip, ic, cotangent, spec: AceSpec, grad: bool):
    """The micro-batch terms of :func:`_per_micro_batch` added up, in an order fixed by the number
    of micro-batches (one XLA reduce of their stacked (k, ...) array on every device)."""
    values, grads = _per_micro_batch(alpha, consts, data, ip, ic, cotangent, spec, grad)
    return values.sum(0), grads.sum(0)


def _per_micro_batch(alpha, consts: AceConsts, data: AceData, ip, ic, cotangent, spec: AceSpec, grad: bool):
    """Every micro-batch's :func:`_micro_sum` (and its gradient in alpha, after a vector-Jacobian
    product with ``cotangent`` for specific_removal), spread over the mesh's devices and
    all-gathered in micro-batch order (k, ...): the same bits on any number of devices from 2 up (one device: to float32
    rounding, XLA compiling the unpartitioned program differently)."""
    from .sharded import AXIS

    rows_p, rows_c, weights, k = _micro_batches(ip, ic, spec)

    def one(alpha, consts, data, cotangent, rp, rc, w):
        batch = _take(data, rp, rc)
        if not grad:
            return _micro_sum(alpha, consts, batch, w, spec), jnp.zeros((0,), jnp.float32)
        if spec.objective == "specific_removal":
            return jax.value_and_grad(lambda a: jnp.vdot(cotangent, _micro_sum(a, consts, batch, w, spec)))(alpha)
        return jax.value_and_grad(lambda a: _micro_sum(a, consts, batch, w, spec))(alpha)

    def device(alpha, consts, data, cotangent, count, rows_p, rows_c, weights):
        # a while loop with a run-time trip count: the per-micro-batch program is the same
        # whatever the number of micro-batches a device gets (no loop unrolled or removed)
        probe = jax.eval_shape(one, alpha, consts, data, cotangent, rows_p[0], rows_c[0], weights[0])
        outs = jax.tree_util.tree_map(lambda s: jnp.zeros((len(rows_p),) + s.shape, s.dtype), probe)

        def body(carry):
            i, outs = carry
            got = one(alpha, consts, data, cotangent, rows_p[i], rows_c[i], weights[i])
            return i + 1, jax.tree_util.tree_map(lambda o, g: o.at[i].set(g), outs, got)

        _, outs = jax.lax.while_loop(lambda carry: carry[0] < count, body, (jnp.int32(0), outs))
        return jax.tree_util.tree_map(lambda o: jax.lax.all_gather(o, AXIS, tiled=True), outs)

    # behind a barrier: XLA sees a run-time trip count, never a constant it could unroll or inline
    count = jax.lax.optimization_barrier(jnp.int32(len(rows_p) // spec.mesh.devices.size))
    mapped = jax.shard_map(device, mesh=spec.mesh, in_specs=(P(), P(), P(), P(), P(), P(AXIS), P(AXIS), P(AXIS)),
                           out_specs=P(), check_vma=False)
    values, grads = mapped(alpha, consts, data, cotangent, count, rows_p, rows_c, weights)
    return values[:k], grads[:k]


def _batch_objective(alpha, consts: AceConsts, data: AceData, ip, ic, spec: AceSpec, grad: bool):
    """(objective, its gradient in alpha or an empty array) of the batch ``ip``/``ic``."""
    total = jnp.float32(ip.shape[0])
    before = None
    if spec.objective == "specific_removal":
        before = jnp.take(data.before, ip, axis=0).mean(0)
        sums, _ = _summed(alpha, consts, data, ip, ic, None, spec, grad=False)
        if not grad:
            return _from_sums(sums, total, before, consts), jnp.zeros((0,), jnp.float32)
        objective, cotangent = jax.value_and_grad(lambda s: _from_sums(s, total, before, consts))(sums)
        _, gradient = _summed(alpha, consts, data, ip, ic, cotangent, spec, grad=True)
        return objective, gradient
    sums, gradient = _summed(alpha, consts, data, ip, ic, None, spec, grad=grad)
    return sums / total, (gradient / total if grad else gradient)


@functools.partial(jax.jit, static_argnames=("spec",))
def ace_step(alpha, opt_state, ramp, consts: AceConsts, data: AceData, ip, ic, *, spec: AceSpec):
    """One optimization step on the batch ``ip``/``ic`` of ``data``: returns (alpha, opt_state, loss).

    alpha: float32 (C,); ramp: float32 (); ip, ic: int32 (batch_size,) sample numbers of the
    present and candidate samples; all, like ``consts`` and ``data`` from :func:`prepare_ace`,
    arrays on ``spec.mesh`` (replicated: :func:`gandissect_jax.ace.sharded.global_array`; plain
    arrays will do with one process). The returned alpha, opt_state and loss are replicated on
    ``spec.mesh``: read one device's copy (``alpha.addressable_data(0)``) with several processes.

    The loss is the objective plus ``l2 |alpha|^2`` and ``ramp * sum(alpha (1 - alpha))``; the
    gradient is taken with respect to ``alpha`` only; the updated alpha is clipped to [0, 1] (the
    optimizer's projection already lands there, up to one float32 rounding). The batch is cut in
    micro-batches of ``spec.micro_batch`` samples of each kind, spread over the devices of
    ``spec.mesh`` (:mod:`gandissect_jax.ace.sharded`); their sums are added in an order fixed by
    the number of micro-batches, so the step's bits depend on the micro-batch size, not on the number of devices from 2 up (a
    1-device mesh agrees to float32 rounding: XLA compiles the unpartitioned program differently)."""
    import optax

    objective, gradient = _batch_objective(alpha, consts, data, ip, ic, spec, grad=True)
    loss = objective + consts.l2 * jnp.sum(alpha**2) + ramp * jnp.sum(alpha * (1 - alpha))
    gradient = gradient + 2 * consts.l2 * alpha + ramp * (1 - 2 * alpha)
    updates, opt_state = spec.optimizer.update(gradient, opt_state, alpha)
    # replicated on every device, pinned: callers read one device's copy (addressable_data(0))
    return _replicated((jnp.clip(optax.apply_updates(alpha, updates), 0.0, 1.0), opt_state, loss), spec)


def _replicated(tree, spec: AceSpec):
    from jax.sharding import NamedSharding

    return jax.lax.with_sharding_constraint(tree, NamedSharding(spec.mesh, P()))


@functools.partial(jax.jit, static_argnames=("spec",))
def _evaluate(alpha, consts: AceConsts, data: AceData, ip, ic, *, spec: AceSpec):
    return _replicated(_batch_objective(alpha, consts, data, ip, ic, spec, grad=False)[0], spec)


def _unedited_shares(consts: AceConsts, r, side, *, spec: AceSpec):
    return _shares(spec, consts.sparams, spec.f(consts.gparams, r, side))


def _representation(gparams, z, *, h):
    return h(gparams, z)


def representations(generator: Any, layer: str, z: np.ndarray, batch_size: int, *, mesh: Any = None
                    ) -> tuple[np.ndarray, Any]:
    """``(r, side) = h(z)`` for every row of ``z``, in zero-padded batches spread over the devices
    of ``mesh`` (default: all; :func:`gandissect_jax.ace.sharded.map_batches`).

    Returns numpy ``r`` (N, H, W, C) and ``side`` (a pytree whose leaves have a leading sample
    axis, or ``()``), the same on every process."""
    from .sharded import map_batches, stacked, unstacked

    h, _ = split_of(generator, layer)
    z = np.asarray(z, np.float32)
    out = map_batches(_representation, [stacked(z, batch_size)], generator.params, mesh=mesh,
                      static=(("h", h),))
    return unstacked(out, len(z))


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
                optimizer: Any = None, micro_batch: int | None = None, mesh: Any = None) -> AceProblem:
    """The :class:`AceProblem` of a fit (arguments as :func:`optimize_ace`): checks the arguments,
    computes ``r = h(z)`` of every corpus sample once (and, for ``specific_removal``, the unedited
    shares), and initialises the optimizer. ``ace_step(problem.alpha, problem.opt_state, ramp,
    problem.consts, problem.train, ip, ic, spec=problem.spec)`` then runs one step. Everything is
    replicated on the devices of ``mesh`` (default: all devices of all processes), which share
    each step's micro-batches.

    Raises:
      ValueError naming the argument (see :func:`optimize_ace`); TypeError for a generator or
      segmenter that is not one (:func:`~gandissect_jax.generator.check_generator`,
      :func:`~gandissect_jax.segmenter.check_segmenter`: ``class_score`` is needed here).
    """
    check_generator(generator)
    check_segmenter(segmenter, "segment", "class_score")
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
    from gandissect_jax.dissection.microbatch import check_micro_batch

    micro_batch = min(batch_size, DEFAULT_FIT_MICRO_BATCH) if micro_batch is None else check_micro_batch(micro_batch)
    if micro_batch > batch_size:
        raise ValueError(f"micro_batch = {micro_batch} needs 1..{batch_size} (the batch size)")
    from .sharded import ace_mesh, replicate

    mesh = ace_mesh() if mesh is None else mesh
    if init is None:
        alpha = jnp.zeros(channels, jnp.float32)
    else:
        alpha = jnp.asarray(init, jnp.float32)
        if alpha.shape != (channels,):
            raise ValueError(f"init has shape {alpha.shape}; expected ({channels},)")
        alpha = project_to_budget(alpha, max_units)
    if optimizer is None:
        optimizer = ace_optimizer(float(learning_rate), None if max_units is None else float(max_units))
    _, f = split_of(generator, corpus.layer)
    others = (tuple(l for l in range(1, len(segmenter.labels)) if l not in labels)
              if objective == "specific_removal" else ())
    spec = AceSpec(f=f, segmenter=Static(segmenter), labels=labels, others=others, grid=(rows, cols),
                   downsample=int(seg_downsample), objective=objective, optimizer=optimizer,
                   micro_batch=micro_batch, mesh=mesh)
    consts = AceConsts(generator.params, segmenter.params, value, jnp.ones((len(others),), jnp.float32),
                       jnp.float32(l2), jnp.float32(specificity))

    # r = h(z) does not depend on alpha: computed once per sample, kept on every device
    def data_of(pz, pl, cz, cl):
        pr, ps = representations(generator, corpus.layer, pz, batch_size, mesh=mesh)
        cr, cs = representations(generator, corpus.layer, cz, batch_size, mesh=mesh)
        return AceData(pr, ps, np.asarray(pl, np.int32), cr, cs, np.asarray(cl, np.int32),
                       np.zeros((len(pz), 0), np.float32))

    train = data_of(corpus.present_z, corpus.present_location, corpus.candidate_z, corpus.candidate_location)
    held = data_of(corpus.eval_present_z, corpus.eval_present_location, corpus.eval_candidate_z,
                   corpus.eval_candidate_location)
    if objective == "specific_removal":
        # the unedited shares do not depend on alpha either: computed once per sample
        from .sharded import map_batches, stacked, unstacked

        def unedited(data: AceData) -> np.ndarray:
            out = map_batches(_unedited_shares, [stacked(data.present_r, batch_size),
                                                 stacked(data.present_side, batch_size)], consts, mesh=mesh,
                              static=(("spec", spec),))
            return unstacked(out, len(data.present_r))

        train = train._replace(before=unedited(train))
        held = held._replace(before=unedited(held))
        consts = consts._replace(reference=np.maximum(train.before[:, 1:].mean(0), np.float32(1e-3)))

    alpha = np.asarray(alpha, np.float32)
    return AceProblem(spec, replicate(consts, mesh), replicate(train, mesh), replicate(held, mesh),
                      replicate(alpha, mesh), replicate(optimizer.init(jnp.asarray(alpha)), mesh))


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
    micro_batch: int | None = None,
    mesh: Any = None,
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
      micro_batch: samples of each kind per micro-batch, in [1, batch_size] (default
        ``min(batch_size, 4)``): each step is cut in micro-batches, the unit of work of one device
        and what bounds a step's memory; their sums are added in micro-batch order. The fit's bits
        depend on it, not on the number of devices or processes (from 2 devices up; on one device
        alpha agrees to float32 rounding).
      mesh: the devices that share each step's micro-batches and the corpus's representations
        (default :func:`gandissect_jax.ace.sharded.ace_mesh`: all devices of all processes; every
        process of a multi-host run calls this function with the same arguments).
      progress: show tqdm bars.

    Returns:
      An :class:`AceFit`.

    Raises:
      ValueError naming the argument for an unknown objective, a non-positive max_units, an
      init of the wrong shape, a batch size larger than the training samples, a micro-batch
      outside [1, batch_size], or a corpus whose insertion value does not fit the layer.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    problem = prepare_ace(generator, segmenter, corpus, init=init, l2=l2, learning_rate=learning_rate,
                          batch_size=batch_size, seg_downsample=seg_downsample, objective=objective,
                          specificity=specificity, max_units=max_units, optimizer=optimizer,
                          micro_batch=micro_batch, mesh=mesh)
    spec, consts, train, held = problem.spec, problem.consts, problem.train, problem.held
    alpha, opt_state = problem.alpha, problem.opt_state
    n_train = min(len(corpus.present_z), len(corpus.candidate_z))

    from .sharded import global_array

    mesh = spec.mesh

    def on_mesh(array):
        return global_array(np.asarray(array), mesh)

    def eval_loss(alpha):
        n = min(len(corpus.eval_present_z), len(corpus.eval_candidate_z))
        total = 0.0
        for start in range(0, n, batch_size):
            idx = on_mesh(np.arange(start, min(start + batch_size, n), dtype=np.int32))
            loss = _evaluate(alpha, consts, held, idx, idx, spec=spec)
            total += float(np.asarray(loss.addressable_data(0))) * idx.shape[0]
        return total / n

    history = [eval_loss(alpha)]
    key = jax.random.key(seed)
    epoch_range = range(epochs)
    progress = progress and jax.process_index() == 0
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc=f"ACE {corpus.layer}", unit="epoch")
    for epoch in epoch_range:
        ramp = on_mesh(np.float32(binarize * epoch / max(epochs - 1, 1)))
        key, key_p, key_c = jax.random.split(key, 3)
        order_p = np.asarray(jax.random.permutation(key_p, len(corpus.present_z)), np.int32)
        order_c = np.asarray(jax.random.permutation(key_c, len(corpus.candidate_z)), np.int32)
        for b in range(n_train // batch_size):
            ip = on_mesh(order_p[b * batch_size : (b + 1) * batch_size])
            ic = on_mesh(order_c[b * batch_size : (b + 1) * batch_size])
            alpha, opt_state, _ = ace_step(alpha, opt_state, ramp, consts, train, ip, ic, spec=spec)
        history.append(eval_loss(alpha))
        if progress:
            epoch_range.set_postfix(eval_loss=f"{history[-1]:.4f}")
    alpha = np.asarray(alpha.addressable_data(0), np.float32)
    return AceFit(alpha=alpha, eval_loss=np.asarray(history, np.float64))


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
