"""Projections of ACE unit weights onto [0, 1]^d and a unit budget, as chainable optax transforms."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp



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
