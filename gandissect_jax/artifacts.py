"""Artifact units: the units whose ablation makes generated images look more real.

GAN Dissection (Bau et al., ICLR 2019, Sec. 4.3, Fig. 8) found units that cause visible
artifacts by eye and showed that ablating them improves the images. Tousi et al. ("Automatic
correction of internal units in generative neural networks", CVPR 2021) locate them
automatically with the GAN's own discriminator as a realism score: a unit is an artifact unit
when zeroing it raises the discriminator's score of the images in which it is most active.
:func:`artifact_ranking` measures exactly that, for every unit of a layer in one jitted call::

    gain_u = mean over the m samples where unit u is most active (largest max activation) of
             D(f(r with u = 0)) - D(f(r))

A **discriminator** is any object with ``params`` and ``score(params, images) -> float32 (N,)``
(higher = judged more real), pure in its parameters, e.g. the demo's
(:mod:`gandissect_jax.scenes.discriminator`, ``load_discriminator("scenes64-discriminator")``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax._structure import Static
from gandissect_jax.generator import split_of

__all__ = ["ArtifactScores", "artifact_ranking", "realism"]


class ArtifactScores(NamedTuple):
    """Result of :func:`artifact_ranking`.

    Attributes:
      gain: float32 (C,) mean rise of the realism score when the unit alone is zeroed, on its top
        samples; the ranking is ``argsort(-gain)``.
      top_samples: int32 (C, m) indices into ``z`` of each unit's top samples (largest max
        activation first).
      realism: float32 (N,) the unedited images' realism scores.
    """

    gain: jax.Array
    top_samples: jax.Array
    realism: jax.Array


def realism(discriminator: Any, dparams: Any, images: jax.Array) -> jax.Array:
    """float32 (N,) realism scores: ``discriminator.score(dparams, images)``."""
    return discriminator.score(dparams, images)


@functools.partial(jax.jit, static_argnames=("split", "discriminator", "top", "chunk"))
def _artifact_ranking(gparams, dparams, z, *, split, discriminator, top, chunk):
    h, f = split
    D = discriminator.obj
    r, side = h(gparams, z)
    n, channels = r.shape[0], r.shape[-1]

    def rows(idx):
        return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), (r, side))

    def realism_of(idx):
        sample_r, sample_side = rows(idx)
        return D.score(dparams, f(gparams, sample_r, sample_side))

    # the unedited scores, `top` samples per step
    padded = -(-n // top) * top
    order = jnp.minimum(jnp.arange(padded), n - 1).reshape(-1, top)
    base = jax.lax.map(realism_of, order).reshape(-1)[:n]
    _, best = jax.lax.top_k(r.max((1, 2)).T, top)  # (C, top) samples of largest max activation

    def gain(unit_and_samples):
        unit, idx = unit_and_samples
        sample_r, sample_side = rows(idx)
        keep = 1.0 - jax.nn.one_hot(unit, channels, dtype=r.dtype)
        ablated = D.score(dparams, f(gparams, sample_r * keep, sample_side))
        return (ablated - base[idx]).mean()

    units = jnp.arange(channels)
    gains = jax.lax.map(gain, (units, best), batch_size=chunk)
    return gains, best.astype(jnp.int32), base


def artifact_ranking(generator: Any, discriminator: Any, gparams: Any, dparams: Any, z: Any, layer: str,
                     *, top_samples: int = 8, units_per_step: int | None = 8) -> ArtifactScores:
    """Score every unit of ``layer`` as an artifact unit (see the module docstring).

    Args:
      generator: a Generator; gparams its parameters.
      discriminator: ``score(params, images) -> (N,)``; dparams its parameters.
      z: float32 (N, z_dim) latents searched for each unit's top samples (N >= top_samples).
      layer: the layer whose units are scored.
      top_samples: m, the samples per unit (those where its max activation is largest).
      units_per_step: units evaluated together (a ``vmap`` inside a ``lax.map`` over all units,
        one jitted call); None evaluates one unit per step.

    Returns:
      :class:`ArtifactScores`; ``np.argsort(-gain, kind="stable")`` ranks the units, the most
      artifact-causing first.

    Raises:
      ValueError when ``z`` has fewer rows than ``top_samples`` or ``top_samples < 1``.
    """
    z = jnp.asarray(z, jnp.float32)
    if top_samples < 1 or z.shape[0] < top_samples:
        raise ValueError(f"top_samples = {top_samples} needs 1..{z.shape[0]} (the rows of z)")
    gains, best, base = _artifact_ranking(gparams, dparams, z, split=tuple(split_of(generator, layer)),
                                          discriminator=Static(discriminator), top=int(top_samples),
                                          chunk=None if units_per_step is None else int(units_per_step))
    return ArtifactScores(gains, best, base)


def ranking(scores: ArtifactScores) -> np.ndarray:
    """int64 (C,) units by realism gain, largest first (ties to the lower unit number)."""
    gain = np.asarray(scores.gain, np.float64)
    return np.lexsort((np.arange(len(gain)), -gain)).astype(np.int64)
