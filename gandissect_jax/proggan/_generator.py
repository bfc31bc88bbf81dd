"""ProgressiveGenerator: params + config with pure apply and split (the Generator protocol), one compiled program per config."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.generator import Split
from ._config import GeneratorConfig
from ._network import ProgressiveGAN


# --------------------------------------------------------------------------------------------
# The ProgressiveGenerator object and its split


def check_params(params: Mapping, config: GeneratorConfig, source: str = "params") -> dict:
    """Return ``params`` as plain nested dicts after checking names and shapes against ``config``."""
    expected = config.param_shapes()
    if not isinstance(params, Mapping):
        raise ValueError(f"{source}: expected a mapping of layer name -> params, got {type(params)}")
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source}: unexpected layers {unexpected}; the architecture {list(config.sizes)} "
            f"has {', '.join(expected)}"
        )
    checked = {}
    for layer, shapes in expected.items():
        if layer not in params:
            raise ValueError(f"{source}: missing params of layer {layer!r}")
        checked[layer] = {}
        for name, shape in shapes.items():
            key = f"{layer}/{name}"
            if name not in params[layer]:
                raise ValueError(f"{source}: missing tensor {key!r} (expected shape {shape})")
            value = params[layer][name]
            if tuple(np.shape(value)) != shape:
                raise ValueError(
                    f"{source}: tensor {key!r} has shape {tuple(np.shape(value))}, "
                    f"expected {shape}"
                )
            checked[layer][name] = value
        extra = sorted(set(params[layer]) - set(shapes))
        if extra:
            raise ValueError(f"{source}: unexpected tensors {[f'{layer}/{e}' for e in extra]}")
    return checked


def _as_batch(x: jax.Array, unbatched_ndim: int) -> tuple[jax.Array, bool]:
    x = jnp.asarray(x)
    if x.ndim == unbatched_ndim:
        return x[None], True
    if x.ndim != unbatched_ndim + 1:
        raise ValueError(
            f"expected an array with {unbatched_ndim + 1} dims (batched) or {unbatched_ndim}, "
            f"got shape {x.shape}"
        )
    return x, False


class _Program:
    """The pure functions of one architecture, jitted once and shared by every generator with an
    equal config (so a second set of weights runs the same compiled programs)."""

    def __init__(self, config: GeneratorConfig):
        self.config = config
        self.module = ProgressiveGAN(config)
        self.apply = jax.jit(self._apply)
        self.apply.__doc__ = (
            f"Pure forward pass ``apply(params, z)``: z (N, {config.z_dim}) or ({config.z_dim},) "
            f"-> images (N, {config.resolution}, {config.resolution}, 3) or unbatched."
        )
        self.features = jax.jit(self._features, static_argnums=2)
        self._splits: dict[str, Split] = {}

    def _run(self, params, x, start: int, stop: int | None):
        return self.module.apply({"params": params}, x, start=start, stop=stop)

    def _latent_map(self, z: jax.Array) -> jax.Array:
        z_dim = self.config.z_dim
        if z.shape[-1] != z_dim:
            raise ValueError(f"z has shape {z.shape}; expected (N, {z_dim})")
        return z.reshape(z.shape[0], 1, 1, z_dim).astype(jnp.float32)

    def _apply(self, params, z):
        z, single = _as_batch(z, 1)
        x = self._run(params, self._latent_map(z), 0, None)
        return x[0] if single else x

    def _features(self, params, z, layers: tuple[str, ...]):
        x = self._latent_map(jnp.asarray(z))
        wanted = set(layers)
        features = {}
        for index, spec in enumerate(self.config.layers):
            x = self._run(params, x, index, index + 1)
            if spec.name in wanted:
                features[spec.name] = x
        return x, features

    def split(self, layer: str) -> Split:
        if layer in self._splits:
            return self._splits[layer]
        index = self.config.layer_index(layer)
        last = len(self.config.layers)
        run, latent_map = self._run, self._latent_map

        def h(params, z):
            z, single = _as_batch(z, 1)
            r = run(params, latent_map(z), 0, index + 1)
            return (r[0] if single else r), ()

        def f(params, r, side):
            if jax.tree_util.tree_leaves(side):
                raise ValueError(f"the Progressive GAN's f takes no side inputs (side = ()), got {side!r}")
            r, single = _as_batch(r, 3)
            x = run(params, r, index + 1, last) if index + 1 < last else r
            return x[0] if single else x

        h.__doc__ = f"(params, z (N, {self.config.z_dim})) -> (output of {layer} (N, H, W, C), ()); pure."
        f.__doc__ = f"(params, output of {layer} (N, H, W, C), ()) -> images (N, R, R, 3); pure."
        self._splits[layer] = Split(jax.jit(h), jax.jit(f))
        return self._splits[layer]


@functools.lru_cache(maxsize=16)
def _program(config: GeneratorConfig) -> _Program:
    return _Program(config)


class ProgressiveGenerator:
    """A Progressive GAN generator: params pytree + architecture; implements
    :class:`gandissect_jax.generator.Generator` (its split's side inputs are ``()``).

    Attributes:
      params: ``{layer: {"kernel", "bias"}}`` pytree of float32 arrays.
      config: the :class:`GeneratorConfig`.
      module: the :class:`ProgressiveGAN` Flax module.
      layer_names: layer names in forward order, ending with ``output_RxR``.
      z_dim: latent dimension; resolution: output side.

    The pure functions (``apply``, ``split``'s h and f) depend only on the config: generators of
    equal configs share them, and their compiled code.
    """

    def __init__(self, params: Mapping, config: GeneratorConfig):
        self.config = config
        checked = check_params(params, config)
        self.params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), checked)
        self._program = _program(config)
        self.module = self._program.module

    # -- description --------------------------------------------------------------------------
    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.config.layer_names

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def layer_shape(self, layer: str) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image's representation at ``layer``."""
        spec = self.config.layers[self.config.layer_index(layer)]
        return (spec.resolution, spec.resolution, spec.out_channels)

    def __repr__(self) -> str:
        count = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(self.params))
        return (
            f"ProgressiveGenerator(sizes={list(self.config.sizes)}, resolution={self.resolution}, "
            f"params={count:,})"
        )

    # -- pure functions -----------------------------------------------------------------------
    @property
    def apply(self) -> Callable[[Any, jax.Array], jax.Array]:
        """Pure forward pass ``apply(params, z)``: ``z`` (N, z_dim) or (z_dim,) -> images
        (N, R, R, 3) or (R, R, 3); jitted, shared by generators of the same config."""
        return self._program.apply

    def __call__(self, z: jax.Array) -> jax.Array:
        """Images for latents ``z`` (N, z_dim) -> (N, R, R, 3) float32, with :attr:`params` (jitted)."""
        return self._program.apply(self.params, z)

    def split(self, layer: str) -> Split:
        """Split the generator after ``layer`` into ``Split(h, f)``, both jitted pure functions.

        ``h(params, z) -> (r, ())``: z (N, z_dim) -> r (N, H, W, C), the output of ``layer``, and
        no side inputs; ``f(params, r, side) -> x``: r -> images (N, R, R, 3), so
        ``f(params, *h(params, z)) == G(z)`` (bitwise on CPU: the same layers run on the same
        values). Unbatched inputs ((z_dim,) and (H, W, C)) are accepted too, so both ``vmap`` over
        a sample axis. The split is cached and shared by generators of the same config.

        Raises:
          ValueError listing the valid names if ``layer`` is unknown; ``f`` raises ValueError
          when given side inputs other than ``()``.
        """
        return self._program.split(layer)

    def features(self, z: jax.Array, layers: Iterable[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One forward pass returning the images and the (N, H, W, C) outputs of ``layers``."""
        layers = tuple(layers)
        for layer in layers:
            self.config.layer_index(layer)
        return self._program.features(self.params, z, layers)

    def with_params(self, params: Mapping) -> "ProgressiveGenerator":
        """A generator of the same architecture with other parameters (same compiled code)."""
        return ProgressiveGenerator(params, self.config)
