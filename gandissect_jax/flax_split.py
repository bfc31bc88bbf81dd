"""split_module: h and f of any Flax model (linen or nnx), as a Generator, without rewriting it.

Splitting uses Flax's own machinery, no hooks on the live model: for linen, method interception
(``nn.intercept_methods``) captures the submodule's output in ``h`` and returns ``r`` in its
place in ``f``; for nnx, graph surgery on the ``nnx.merge``-d copy made inside each call. Both
are pure functions of ``params``, jitted once per architecture (models of the same definition
share compiled programs); under jit, XLA drops the part of ``f`` before the layer that nothing
after it reads. ``h`` returns the whole input as the side input (``side = z``), so later layers
that read ``z`` or a StyleGAN's ``w`` compute exactly what the model does::

    G = split_module(StyleGenerator(), variables, z_dim=64)   # linen: module + variables
    G.layer_names                          # ('mapping', 'mapping/Dense_0', ..., 'torgb')
    h, f = G.split("conv8")                # verified: f(h(z)) == G(z) on a probe batch
    r, side = h(G.params, z)               # r (N, 8, 8, 32); side = z
    x = f(G.params, edit.apply(r), side)   # the edited images

    C = split_module(classifier, variables, input_shape=(64, 64, 3))   # a model of images
    features, _ = C.split("block2").h(C.params, images)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from .flax_programs import LayerInfo, Program, make_program, path_name
from .generator import Split, SplitError, verify_split

__all__ = ["split_module", "FlaxModel"]


class FlaxModel:
    """A Flax model and its params seen through the :class:`Generator` protocol.

    Made by :func:`split_module`. The model's input is the protocol's "z": ``apply``, ``h`` and
    ``__call__`` take float32 ``(N, *input_shape)`` arrays, or flat ``(N, z_dim)`` ones reshaped
    to ``input_shape``.

    Attributes:
      params: the parameter pytree (linen: the variables dict or bare params; nnx: the State).
      layer_names: every submodule's path (``"block2"``, ``"block2/Dense_0"``, ``"blocks/1"``)
        in the order of first call in the forward pass.
      input_shape: per-sample shape of the model's input; ``z_dim`` its number of values.
      output_shape: per-sample shape of the model's output.
      kind: ``"linen"`` or ``"nnx"``.
    """

    def __init__(self, program: Program, params: Any, kind: str = "linen", verify: bool = True,
                 probe: int = 4, seed: int = 0, _discovered: tuple | None = None):
        self._program = program
        self.params = params
        self.kind = kind
        self.input_shape = program.input_shape
        self.z_dim = program.z_dim
        self._verify = (bool(verify), int(probe), int(seed))
        self._discovered = _discovered or program.discover(params)
        output, layers = self._discovered
        self._output = output
        self._layers = {path_name(info.path): info for info in layers}
        self.layer_names = tuple(self._layers)
        self._checked: dict[str, Split] = {}

    def __repr__(self) -> str:
        count = sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(self.params))
        return (f"FlaxModel({self.kind}, input_shape={self.input_shape}, "
                f"{len(self.layer_names)} layers, params={count:,})")

    @property
    def apply(self) -> Callable[[Any, jax.Array], jax.Array]:
        """Pure forward pass ``apply(params, z)``: input (N, *input_shape) -> output
        (N, *output_shape); one jitted function shared by models of the same definition."""
        return self._program.apply

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the model's output (``()`` unless it is one array)."""
        leaves = jax.tree_util.tree_leaves(self._output)
        return tuple(leaves[0].shape[1:]) if len(leaves) == 1 else ()

    def __call__(self, z: Any) -> jax.Array:
        """The model's output for input ``z`` with :attr:`params`."""
        return self.apply(self.params, z)

    def _info(self, layer: str) -> LayerInfo:
        if layer not in self._layers:
            raise ValueError(f"unknown layer {layer!r}; valid layers are: {', '.join(self.layer_names)}")
        return self._layers[layer]

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """Per-sample shape of ``layer``'s output, e.g. ``(H, W, C)``."""
        output = self._info(layer).output
        if not hasattr(output, "shape"):
            raise SplitError(f"layer {layer!r} returns a {type(output).__name__}, not one array")
        return tuple(output.shape[1:])

    def split(self, layer: str) -> Split:
        """``Split(h, f)`` at submodule ``layer``, checked by :func:`verify_split` on a probe batch
        the first time (unless made with ``verify=False``).

        ``h(params, z) -> (r, z)`` with ``r`` the submodule's output; ``f(params, r, z)`` runs the
        model on ``z`` with the submodule's output replaced by ``r``. Both are jitted and shared by
        every model of the same definition and input shape.

        Raises:
          ValueError listing the valid names for an unknown layer; SplitError when the submodule
          is called more than once per forward pass (which call would r be?), does not return a
          single array with a leading batch axis, or the split does not reproduce the model.
        """
        if layer in self._checked:
            return self._checked[layer]
        info = self._info(layer)
        if info.calls != 1:
            raise SplitError(f"layer {layer!r} is called {info.calls} times per forward pass; "
                             "split_module splits at a submodule called once")
        output = info.output
        if not (hasattr(output, "shape") and len(output.shape) >= 1 and output.shape[0] == 2):
            raise SplitError(f"layer {layer!r} does not return one array with a leading batch "
                             f"axis (got {output}), so it has no representation r to split at")
        result = self._program.split(info.path, tuple(output.shape[1:]), output.dtype)
        verify, probe, seed = self._verify
        if verify:
            verify_split(self, layer, probe=probe, seed=seed, split=result)
        self._checked[layer] = result
        return result

    def with_params(self, params: Any) -> "FlaxModel":
        """The same model with other parameters of the same structure (same compiled programs)."""
        verify, probe, seed = self._verify
        return FlaxModel(self._program, params, self.kind, verify, probe, seed, self._discovered)


def _kwargs_key(apply_kwargs: Mapping[str, Any] | None) -> tuple:
    return tuple(sorted((apply_kwargs or {}).items()))


def split_module(
    module: Any,
    params: Any = None,
    at: str | Sequence[str] | None = None,
    *,
    z_dim: int | None = None,
    input_shape: Sequence[int] | None = None,
    method: str | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    verify: bool = True,
    probe: int = 4,
    seed: int = 0,
) -> FlaxModel:
    """A :class:`Generator` for any Flax model, split at any of its submodules.

    Args:
      module: a ``flax.linen.Module`` (with ``params``) or a ``flax.nnx.Module`` (its own state
        is used unless ``params`` gives another ``nnx.State`` of it).
      params: linen: the variables ``module.init`` returned (``{"params": ..., ...}``) or the bare
        ``params`` collection; nnx: None or an ``nnx.State``.
      at: layer(s) to split and verify now, so a model that cannot be split at them fails here
        rather than in a long run; any layer can be split later with ``.split``.
      z_dim: the model's input is a vector ``(N, z_dim)`` (a generator's latent); or
      input_shape: the per-sample shape of its input, e.g. ``(64, 64, 3)`` for a model of images.
        Exactly one of the two.
      method: the module method to run (default ``__call__``).
      apply_kwargs: static keyword arguments of every call (e.g. ``{"train": False}``).
      verify: check every split with :func:`verify_split` (on ``probe`` inputs of ``seed``) the
        first time it is made.

    Returns:
      A :class:`FlaxModel`: ``params``, ``layer_names`` (submodule paths in call order),
      ``z_dim``, ``input_shape``, ``apply``, ``split``, ``layer_shape``.

    Raises:
      ValueError for a module that is neither linen nor nnx, missing/both ``z_dim`` and
      ``input_shape``, or an unknown layer in ``at``; SplitError when a layer in ``at`` cannot
      be split exactly.

    Stochastic layers (dropout, noise drawn from an rng) must be off: ``f`` could not reproduce
    ``G`` otherwise. Submodules inside lifted transforms (``nn.scan``, ``nn.remat``...) cannot be
    split at; split at the transformed module instead.
    """
    if (z_dim is None) == (input_shape is None):
        raise ValueError("give exactly one of z_dim (a vector input) and input_shape "
                         "(the per-sample shape of the model's input)")
    shape = (int(z_dim),) if z_dim is not None else tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input shape must be positive, got {shape}")
    import flax.linen as nn

    kwargs = _kwargs_key(apply_kwargs)
    if isinstance(module, nn.Module):
        if params is None:
            raise ValueError("a linen module needs its params (the variables module.init returned)")
        program = make_program("linen", module, method, kwargs, shape)
        kind = "linen"
    else:
        try:
            from flax import nnx
        except ImportError:  # pragma: no cover - flax without nnx
            nnx = None
        if nnx is None or not isinstance(module, nnx.Module):
            raise ValueError(f"split_module needs a flax.linen or flax.nnx Module, got "
                             f"{type(module).__name__}")
        graphdef, state = nnx.split(module)
        params = state if params is None else params
        program = make_program("nnx", graphdef, method, kwargs, shape)
        kind = "nnx"
    model = FlaxModel(program, params, kind=kind, verify=verify, probe=probe, seed=seed)
    for layer in [at] if isinstance(at, str) else list(at or ()):
        model.split(layer)
    return model
