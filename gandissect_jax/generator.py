"""The Generator protocol: a model split at a layer into h and f, and the check that the split is exact.

GAN Dissection (Bau et al., ICLR 2019, Sec. 2) writes a generator as ``x = G(z) = f(h(z))``: ``h``
maps the input to the representation ``r`` at a layer, ``f`` maps ``r`` (possibly edited) to
the output. Many generators read the input again after the layer -- a StyleGAN's mapping network
turns ``z`` into ``w``, and every later layer reads ``w`` -- so here ``h`` also returns the *side
inputs* ``f`` needs besides ``r``::

    h(params, z) -> (r, side)        # r: the layer's output (N, H, W, C) NHWC; side: any pytree
    f(params, r, side) -> x          # x: the model's output, e.g. images (N, R, R, 3)

with ``f(params, *h(params, z)) == G(z)``. The Progressive GAN's ``side`` is ``()``; a model
split by :func:`split_module` carries its whole input (``side = z``), so later layers that read
``z`` or ``w`` compute them exactly as in ``G``.

The "z" of this protocol is whatever the model's input is: a latent ``(N, z_dim)`` for a
generator, an image batch ``(N, H, W, 3)`` for a classifier (whose layers can be dissected on a
dataset's images; ``input_shape`` says which). ``z_dim`` is the number of input values per sample.

Any object with ``params``, ``layer_names``, ``z_dim``, ``apply`` and ``split`` is a
:class:`Generator`; :func:`verify_split` checks a split numerically.
:func:`gandissect_jax.flax_split.split_module` gives such an object for any ``flax.linen`` or
``flax.nnx`` module without rewriting it (examples in its module docstring).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Split",
    "Generator",
    "SplitError",
    "verify_split",
    "check_generator",
    "GENERATOR_PARTS",
    "split_of",
    "jitted",
]


class Split(NamedTuple):
    """A model split at one layer into two pure functions (unpacks as ``h, f = split``).

    Attributes:
      h: ``h(params, z) -> (r, side)``: ``r`` the layer's output, float32 ``(N, H, W, C)`` NHWC
        for a convolutional layer (``(N, C)`` for a dense one); ``side`` any pytree ``f`` needs
        besides ``r`` (``()`` for the Progressive GAN; the input ``z`` for :func:`split_module`).
      f: ``f(params, r, side) -> x``: the model's output from (a possibly edited) ``r``, float32
        ``(N, R, R, 3)`` in about [-1, 1] for a generator.
    """

    h: Callable[..., tuple[Any, Any]]
    f: Callable[..., Any]


@runtime_checkable
class Generator(Protocol):
    """What dissection, intervention and ACE need from a generator (or any model of an input).

    Attributes:
      params: the parameter pytree every function below takes explicitly.
      layer_names: the layers ``split`` accepts, in forward order.
      z_dim: input values per sample (the latent size of a generator).
    """

    params: Any
    layer_names: Sequence[str]
    z_dim: int

    def apply(self, params: Any, z: jax.Array) -> jax.Array:
        """The full forward pass ``G(z)``, pure in ``params`` (e.g. (N, z_dim) -> (N, R, R, 3))."""
        ...

    def split(self, layer: str) -> Split:
        """``Split(h, f)`` at ``layer``: pure, jittable, ``f(params, *h(params, z)) == G(z)``."""
        ...


class SplitError(ValueError):
    """A split that does not reproduce the model (``f(h(z)) != G(z)``), or cannot be made."""


GENERATOR_PARTS = ("params", "layer_names", "z_dim", "apply", "split")


def check_generator(generator: Any, needs: Sequence[str] = GENERATOR_PARTS) -> None:
    """Check that ``generator`` has what the :class:`Generator` protocol asks, without running it.

    ``needs``: the parts the caller uses (default all of :data:`GENERATOR_PARTS`; a model only
    split to its layers, as :func:`~gandissect_jax.dissection.dissect_model` runs it, needs
    ``("params", "layer_names", "split")``).

    Raises:
      TypeError naming every missing or malformed part (``params``; ``layer_names``, a
      sequence of str; ``z_dim``, a positive integer; ``apply(params, z)`` and ``split(layer)``,
      callables) and pointing to :func:`~gandissect_jax.flax_split.split_module`, which makes
      any Flax model a Generator. ``apply`` is needed because every split is checked against the
      full forward pass (:func:`verify_split`).
    """
    problems = [f"no {name!r}" for name in needs if not hasattr(generator, name)]
    if not problems:
        if "layer_names" in needs:
            names = generator.layer_names
            if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in _iterable(names)):
                problems.append(f"layer_names must be a sequence of layer names (str), got {names!r:.80}")
        if "z_dim" in needs and not _positive_integer(generator.z_dim):
            problems.append(f"z_dim must be a positive integer, got {generator.z_dim!r:.80}")
        problems += [f"{name!r} is not callable" for name in ("apply", "split")
                     if name in needs and not callable(getattr(generator, name))]
    if problems:
        raise TypeError(
            f"{type(generator).__name__} is not a Generator: {'; '.join(problems)}. A Generator has "
            "params, layer_names, z_dim, apply(params, z) -> G(z) (the full forward pass every split "
            "is checked against) and split(layer) -> Split(h, f) with h(params, z) -> (r, side) and "
            "f(params, r, side) -> x (gandissect_jax.generator). gandissect_jax.split_module(module, "
            "...) makes any flax.linen or flax.nnx model one")


def _positive_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= 1
    except TypeError:
        return False


def _iterable(value: Any) -> list:
    try:
        return list(value)
    except TypeError:
        return [None]


def split_of(generator: Any, layer: str, needs: Sequence[str] = GENERATOR_PARTS) -> Split:
    """``generator.split(layer)`` checked for form (not numerically: see :func:`verify_split`);
    ``needs`` as :func:`check_generator`.

    Returns:
      the :class:`Split` ``(h, f)``.

    Raises:
      TypeError from :func:`check_generator`; ValueError listing ``generator.layer_names`` when
      ``layer`` is not one of them; SplitError (a ValueError) when ``split`` does not return two
      callables ``(h, f)``.
    """
    check_generator(generator, needs)
    names = list(generator.layer_names)
    if names and layer not in names:
        raise ValueError(f"unknown layer {layer!r}; the generator has {names}")
    split = generator.split(layer)
    if not (isinstance(split, tuple) and len(split) == 2 and all(callable(part) for part in split)):
        raise SplitError(
            f"{type(generator).__name__}.split({layer!r}) returned {type(split).__name__!r}, not "
            "Split(h, f) of two functions h(params, z) -> (r, side) and f(params, r, side) -> x")
    return Split(*split)


def _is_jitted(fn: Any) -> bool:
    return callable(getattr(fn, "lower", None))


@functools.lru_cache(maxsize=64)
def _jit_cached(fn: Callable) -> Callable:
    return jax.jit(fn)


def jitted(fn: Callable) -> Callable:
    """``fn`` itself if it is already a ``jax.jit`` function, else one ``jax.jit`` of it per
    function object (so calling this again for the same function does not recompile)."""
    if _is_jitted(fn):
        return fn
    try:
        return _jit_cached(fn)
    except TypeError:  # unhashable callable
        return jax.jit(fn)


def _probe_inputs(generator: Any, probe: int, seed: int) -> jax.Array:
    """Standard-normal float32 ``(probe, *input_shape)`` from ``RandomState(seed)``: for a vector
    input, the reference's z stream (``sample_z(probe, z_dim, seed)``)."""
    shape = getattr(generator, "input_shape", None)
    if shape is None:
        shape = (int(generator.z_dim),)
    draw = np.random.RandomState(seed).standard_normal(int(probe) * math.prod(shape))
    return jnp.asarray(draw.reshape(int(probe), *shape), jnp.float32)


def verify_split(
    generator: Any,
    layer: str,
    *,
    inputs: Any = None,
    probe: int = 4,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    split: Split | None = None,
) -> float:
    """Check ``f(params, *h(params, z)) == G(z)`` at ``layer`` on a probe batch.

    ``h`` and ``f`` run as the dissection runs them (each jitted on its own), against
    ``jax.jit(generator.apply)``. The default tolerance only absorbs float32 rounding of
    compilers fusing differently; the splits of this package are bitwise exact on CPU.

    Args:
      generator: a :class:`Generator`.
      layer: the layer to check.
      inputs: the probe batch; default ``probe`` standard-normal inputs of shape
        ``(probe, *generator.input_shape)`` (or ``(probe, z_dim)``) drawn with numpy's
        ``RandomState(seed)`` (for a latent: ``sample_z(probe, z_dim, seed)``).
      rtol, atol: allowed ``|f(h(z)) - G(z)| <= atol + rtol * |G(z)|`` elementwise.
      split: the split to check (default ``generator.split(layer)``).

    Returns:
      The max ``|f(h(z)) - G(z)|`` (float).

    Raises:
      SplitError (a ValueError) naming the layer and the max difference when the split breaks
      the model, when ``h`` does not return ``(r, side)``, when ``f`` does not take
      ``(params, r, side)``, or when ``G(z)`` is not finite on the probe batch.
    """
    if split is None:
        split = split_of(generator, layer)
    else:
        check_generator(generator)
    if not (isinstance(split, tuple) and len(split) == 2):
        raise SplitError(f"split({layer!r}) returned {type(split).__name__!r}, not Split(h, f)")
    h, f = split
    z = _probe_inputs(generator, probe, seed) if inputs is None else jnp.asarray(inputs)
    params = generator.params
    expected = np.asarray(jitted(generator.apply)(params, z))
    if not np.isfinite(expected).all():
        raise SplitError(f"cannot verify the split at layer {layer!r}: G(z) is not finite on the "
                         "probe batch")
    out = h(params, z)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise SplitError(
            f"h at layer {layer!r} returned {type(out).__name__!r}, not a tuple (r, side): the "
            "Generator protocol's h(params, z) returns the layer's output r and the side inputs f "
            "needs (() if none)")
    r, side = out
    try:
        got = f(params, r, side)
    except TypeError as err:
        raise SplitError(
            f"f at layer {layer!r} failed on (params, r, side): {err}. The Generator protocol's "
            "f takes the side inputs h returns: f(params, r, side)") from err
    got = np.asarray(got)
    if got.shape != expected.shape:
        raise SplitError(f"split at layer {layer!r}: f(h(z)) has shape {got.shape}, G(z) has "
                         f"{expected.shape}")
    error = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    diff = float(np.nanmax(error)) if error.size else 0.0
    if not np.isfinite(got).all() or not (error <= atol + rtol * np.abs(expected)).all():
        diff = float("nan") if not np.isfinite(got).all() else diff
        raise SplitError(
            f"split at layer {layer!r} breaks f(h(z)) == G(z): max |f(h(z)) - G(z)| = {diff:.4g} "
            f"on a probe batch of {len(z)} (allowed: {atol:g} + {rtol:g} * |G(z)|). If layers "
            "after it read the input or a value computed from it (a StyleGAN's w), h must return "
            "it as side and f must use it")
    return diff
