"""Invert photos into a generator (z, then r at the editing layer) and blend edits back into the photo.

GANPaint edits only images the generator made. To paint on a photo, Bau et al. ("Semantic photo
manipulation with a generative image prior", SIGGRAPH 2019, Sec. 3) first find a generated image
close to it and then make the generator reproduce the photo more exactly before editing; the
edit is finally pasted back into the photo only where it changed something. Here, with the
generator split at the editing layer (``x = f(h(z))``):

1. **z**: start from the best of ``candidates`` latents of the reference's z stream (by pixel
   MSE, forward passes only), then minimise ``mean((G(z) - x)^2)`` with Adam (optax) for
   ``z_steps`` steps.
2. **r**: starting from ``r0 = h(z)``, minimise ``mean((f(r) - x)^2) + r_weight * mean((r - r0)^2)``
   over the layer's representation for ``r_steps`` steps (the paper adapts the generator to the
   image; refining r at the editing layer is the same idea in the space that painting edits,
   and the penalty keeps r close to what the generator produces, so unit edits stay meaningful).
   The result is stored as ``delta = r - h(z)``: the GANPaint server edits ``h(z) + delta``.
3. **blend**: ``out = photo * (1 - m) + edited * m`` with ``m`` the soft mask of pixels the edit
   changed (``|edited - reconstruction|`` ramping from ``low`` to ``high``, dilated and smoothed),
   so pixels the edit did not change are the photo's own, exactly.

Every optimisation step is one jitted function (compiled once per generator architecture and
photo shape, for any number of steps), dispatched asynchronously: nothing returns to the host
until the end. The generator's parameters are arguments. PSNR is reported in dB on [0, 1] images (``10 log10(1 / MSE)``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gandissect_jax.sampling import sample_z
from gandissect_jax.generator import split_of

__all__ = ["Inversion", "invert", "psnr", "blend", "change_mask"]


class Inversion(NamedTuple):
    """A photo batch inverted into a generator at one layer. N images of R x R, layer (H, W, U).

    Attributes:
      z: float32 (N, z_dim) the optimised latents.
      delta: float32 (N, H, W, U) the r refinement: the inverted representation is ``h(z) + delta``.
      images_z: float32 (N, R, R, 3) ``G(z)`` (reconstruction from z alone).
      images_r: float32 (N, R, R, 3) ``f(h(z) + delta)`` (after the r refinement).
      psnr_z, psnr_r: float32 (N,) their PSNR against the photos, dB.
    """

    z: Any
    delta: Any
    images_z: Any
    images_r: Any
    psnr_z: Any
    psnr_r: Any


def psnr(images: Any, targets: Any) -> jax.Array:
    """float32 (N,): PSNR in dB of images against targets, both (N, R, R, 3) in [-1, 1] (clipped),
    measured on [0, 1] pixels: ``10 log10(1 / mean((x - y)^2))`` (inf for identical images)."""
    x = (jnp.clip(jnp.asarray(images, jnp.float32), -1, 1) + 1) / 2
    y = (jnp.clip(jnp.asarray(targets, jnp.float32), -1, 1) + 1) / 2
    return -10.0 * jnp.log10(jnp.mean((x - y) ** 2, axis=(1, 2, 3)))


class _Programs(NamedTuple):
    pick: Callable
    z_step: Callable
    r_start: Callable
    r_step: Callable
    images: Callable


@functools.lru_cache(maxsize=16)
def _programs(h: Callable, f: Callable, apply: Callable) -> _Programs:
    def pick(params, candidates, targets):
        # (K, z_dim) candidates -> per target the candidate of least MSE (forward passes only)
        images = apply(params, candidates)
        errors = jnp.mean((images[None] - targets[:, None]) ** 2, axis=(2, 3, 4))  # (N, K)
        z = candidates[jnp.argmin(errors, axis=1)]
        return z, optax.adam(0.0).init(z)

    def z_loss(z, params, targets):
        return jnp.sum(jnp.mean((apply(params, z) - targets) ** 2, axis=(1, 2, 3)))

    def z_step(params, z, state, targets, lr):
        grads = jax.grad(z_loss)(z, params, targets)
        updates, state = optax.adam(lr).update(grads, state, z)
        return optax.apply_updates(z, updates), state

    def r_start(params, z):
        r0, side = h(params, z)
        return r0, side, optax.adam(0.0).init(r0)

    def r_loss(r, params, r0, side, targets, weight):
        fit = jnp.mean((f(params, r, side) - targets) ** 2, axis=(1, 2, 3))
        stay = jnp.mean((r - r0) ** 2, axis=tuple(range(1, r.ndim)))
        return jnp.sum(fit + weight * stay)

    def r_step(params, r, state, r0, side, targets, lr, weight):
        grads = jax.grad(r_loss)(r, params, r0, side, targets, weight)
        updates, state = optax.adam(lr).update(grads, state, r)
        return optax.apply_updates(r, updates), state

    def images(params, z, r, r0, side, targets):
        images_z, images_r = apply(params, z), f(params, r, side)
        return r - r0, images_z, images_r, psnr(images_z, targets), psnr(images_r, targets)

    return _Programs(*(jax.jit(fn) for fn in (pick, z_step, r_start, r_step, images)))


def invert(generator: Any, layer: str, photos: Any, *, candidates: int = 64, z_steps: int = 150,
           r_steps: int = 150, z_lr: float = 0.05, r_lr: float = 0.02, r_weight: float = 0.01,
           seed: int = 0) -> Inversion:
    """Invert photos into ``generator`` at ``layer``: optimise z, then refine r (see module docstring).

    Args:
      generator: a :class:`gandissect_jax.generator.Generator` producing (N, R, R, 3) images.
      layer: the editing layer (where r is refined and strokes will edit).
      photos: (N, R, R, 3) images in [-1, 1] (float) or uint8 [0, 255], at the generator's size.
      candidates: latents of ``sample_z(candidates, z_dim, seed)`` tried as starting points.
      z_steps, r_steps: Adam steps for z and for r (0 skips that stage).
      z_lr, r_lr: Adam learning rates.
      r_weight: weight of ``mean((r - h(z))^2)`` in the r objective.
      seed: the z stream of the candidates.

    Returns:
      :class:`Inversion` of jax arrays. Deterministic: the same inputs give the same bits.

    Raises:
      ValueError: photos not (N, R, R, 3) at the generator's resolution, or non-finite.
    """
    photos = _as_images(photos)
    h, f = split_of(generator, layer)
    apply = getattr(generator, "apply")
    out_shape = jax.eval_shape(apply, generator.params, jnp.zeros((1, generator.z_dim), jnp.float32)).shape
    if photos.shape[1:] != tuple(out_shape[1:]):
        raise ValueError(f"photos have shape {tuple(photos.shape[1:])}; the generator makes {tuple(out_shape[1:])}")
    if int(candidates) < 1 or int(z_steps) < 0 or int(r_steps) < 0:
        raise ValueError("candidates must be >= 1 and z_steps, r_steps >= 0")
    programs = _programs(h, f, apply)
    params = generator.params
    start = jnp.asarray(sample_z(int(candidates), generator.z_dim, seed))
    z_lr, r_lr, r_weight = jnp.float32(z_lr), jnp.float32(r_lr), jnp.float32(r_weight)
    # One jitted step per iteration, dispatched asynchronously: nothing returns to the host until
    # the end. (XLA:CPU runs a loop *inside* a program, lax.scan / fori_loop, about 8x slower per
    # step for this generator: its convolutions lose their multithreaded kernels there.)
    z, state = programs.pick(params, start, photos)
    for _ in range(int(z_steps)):
        z, state = programs.z_step(params, z, state, photos, z_lr)
    r0, side, state = programs.r_start(params, z)
    r = r0
    for _ in range(int(r_steps)):
        r, state = programs.r_step(params, r, state, r0, side, photos, r_lr, r_weight)
    return Inversion(z, *programs.images(params, z, r, r0, side, photos))


def _as_images(photos: Any) -> jax.Array:
    array = np.asarray(photos)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"photos must be (N, R, R, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 127.5 - 1.0
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError("photos contain NaN or inf")
    return jnp.asarray(array)


def change_mask(reconstruction: Any, edited: Any, *, low: float = 0.03, high: float = 0.1, blur: int = 1) -> jax.Array:
    """float32 (N, R, R, 1) in [0, 1]: where an edit changed the generated image.

    With ``d`` the per-pixel mean absolute difference of the two (N, R, R, 3) images on [0, 1]
    pixels, ``m = clip((d - low) / (high - low), 0, 1)``: 0 where the edit changed a pixel by less
    than ``low`` (the small ripples a unit edit causes far from the stroke leave the photo alone),
    1 from ``high`` on. ``m`` is then dilated by a (2 blur + 1)^2 max filter and smoothed by a box
    filter of the same size, so the seam falls just outside the change.
    """
    if not 0 <= low < high:
        raise ValueError(f"need 0 <= low < high, got low={low}, high={high}")
    a = jnp.asarray(reconstruction, jnp.float32)
    b = jnp.asarray(edited, jnp.float32)
    d = jnp.mean(jnp.abs(jnp.clip(b, -1, 1) - jnp.clip(a, -1, 1)), axis=-1, keepdims=True) / 2
    m = jnp.clip((d - low) / (high - low), 0.0, 1.0)
    if blur > 0:
        size = 2 * int(blur) + 1
        window, strides, pad = (1, size, size, 1), (1, 1, 1, 1), "SAME"
        m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, window, strides, pad)
        m = jax.lax.reduce_window(m, 0.0, jax.lax.add, window, strides, pad)
        # pixels per window (fewer at the border), from the static shape: no constant to fold
        rows = np.convolve(np.ones(m.shape[1]), np.ones(size), "same")
        cols = np.convolve(np.ones(m.shape[2]), np.ones(size), "same")
        m = m / jnp.asarray(np.outer(rows, cols)[None, :, :, None], jnp.float32)
    return m


def blend(photo: Any, reconstruction: Any, edited: Any, *, low: float = 0.03, high: float = 0.1,
          blur: int = 1) -> jax.Array:
    """Paste an edit of an inverted photo back into the photo.

    Args:
      photo: (N, R, R, 3) the photo in [-1, 1].
      reconstruction: (N, R, R, 3) the generator's unedited image of it (``Inversion.images_r``).
      edited: (N, R, R, 3) the edited generator image.
      low, high, blur: see :func:`change_mask`.

    Returns:
      float32 (N, R, R, 3) ``photo * (1 - m) + edited * m``: the photo wherever the edit changed
      nothing (exactly, where ``m`` is 0), the edit where it did.
    """
    m = change_mask(reconstruction, edited, low=low, high=high, blur=blur)
    photo = jnp.asarray(photo, jnp.float32)
    return photo * (1 - m) + jnp.asarray(edited, jnp.float32) * m
