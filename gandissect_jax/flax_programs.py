"""The pure programs behind split_module: a Flax model run with one submodule's output captured or replaced.

A :class:`Program` holds the jitted functions of one model definition and input shape (shared by
models of equal definitions, so they share compiled code): ``apply``, ``run`` with capture or
replacement of one submodule's output, discovery of the submodules, and ``split``. For linen it
uses Flax's method interception (``nn.intercept_methods``); for nnx, graph surgery on the
``nnx.merge``-d copy made inside each call. :mod:`gandissect_jax.flax_split` builds the public
``split_module`` / ``FlaxModel`` on it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .generator import Split, SplitError

__all__ = ["Program", "LayerInfo", "path_name", "make_program"]


class _Captured(BaseException):
    """Carries a submodule's output out of the forward pass (stops h early); a BaseException so
    that a model's ``except Exception`` cannot swallow it."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def _struct(tree: Any) -> Any:
    def one(a):
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype) if hasattr(a, "dtype") else a

    return jax.tree_util.tree_map(one, tree)


class LayerInfo(NamedTuple):
    """A submodule found in the forward pass: its path, calls per pass and first output's shapes."""

    path: tuple
    calls: int
    output: Any  # ShapeDtypeStruct tree of the first call's output (for a probe batch of 2)


def path_name(path: tuple) -> str:
    """``("blocks", 1)`` -> ``"blocks/1"``: a submodule's layer name."""
    return "/".join(str(p) for p in path)


class Program:
    """The pure functions of one model definition and input shape (shared by models of equal
    definitions, so they share compiled code): ``apply``, ``run`` with capture or replacement of
    one submodule's output, and discovery of the submodules."""

    def __init__(self, input_shape: tuple[int, ...]):
        self.input_shape = input_shape
        self.z_dim = int(math.prod(input_shape))
        self.apply = jax.jit(self._apply)
        self.apply.__doc__ = (f"Pure forward pass: input (N, {', '.join(map(str, input_shape))}) "
                              f"or (N, {self.z_dim}) -> the model's output.")
        self._splits: dict[tuple, Split] = {}

    def inputs(self, z: Any) -> jax.Array:
        """``z`` as float32 ``(N, *input_shape)`` (flat ``(N, z_dim)`` is reshaped)."""
        z = jnp.asarray(z, jnp.float32)
        if tuple(z.shape[1:]) == self.input_shape:
            return z
        if z.ndim == 2 and z.shape[1] == self.z_dim:
            return z.reshape(z.shape[0], *self.input_shape)
        raise ValueError(f"input has shape {tuple(z.shape)}; expected (N, "
                         f"{', '.join(map(str, self.input_shape))}) or (N, {self.z_dim})")

    def _apply(self, params, z):
        return self.run(params, self.inputs(z))

    def run(self, params, x, *, capture=None, replace=None, record=None):
        raise NotImplementedError

    def discover(self, params) -> tuple[Any, list[LayerInfo]]:
        """The output's shape and the submodules in first-call order with their call counts and
        output shapes, for a batch of 2."""
        order: list[tuple] = []
        calls: dict[tuple, int] = {}
        outputs: dict[tuple, Any] = {}

        def record(path, value):
            if path not in calls:
                order.append(path)
                calls[path] = 0
                outputs[path] = _struct(value)
            calls[path] += 1

        x = jax.ShapeDtypeStruct((2, *self.input_shape), jnp.float32)
        output = jax.eval_shape(lambda p, x: self.run(p, x, record=record), params, x)
        return output, [LayerInfo(path, calls[path], outputs[path]) for path in order]

    def split(self, path: tuple, shape: tuple[int, ...], dtype: Any) -> Split:
        """Jitted ``h`` and ``f`` at the submodule ``path`` whose per-sample output is ``shape``."""
        if path not in self._splits:
            run, inputs, name = self.run, self.inputs, path_name(path)

            def h(params, z):
                z = inputs(z)
                try:
                    run(params, z, capture=path)
                except _Captured as captured:
                    return captured.value, z
                raise SplitError(f"layer {name!r} was not called in the forward pass")

            def f(params, r, side):
                if tuple(np.shape(r)[1:]) != shape:
                    raise ValueError(f"r has shape {tuple(np.shape(r))}; layer {name!r} gives "
                                     f"(N, {', '.join(map(str, shape))})")
                return run(params, inputs(side), replace=(path, jnp.asarray(r, dtype)))

            h.__doc__ = (f"(params, z) -> (r, side): r the output of {name} (N, "
                         f"{', '.join(map(str, shape))}), side = z; pure in params.")
            f.__doc__ = f"(params, r at {name}, side = z) -> the model's output; pure in params."
            self._splits[path] = Split(jax.jit(h), jax.jit(f))
        return self._splits[path]


class _LinenProgram(Program):
    def __init__(self, module, method: str | None, kwargs: tuple, input_shape: tuple[int, ...]):
        self.module = module
        self.method = method
        self.kwargs = dict(kwargs)
        super().__init__(input_shape)

    def run(self, params, x, *, capture=None, replace=None, record=None):
        import flax.linen as nn

        variables = params if isinstance(params, Mapping) and "params" in params else {"params": params}
        active: list[tuple] = []

        def interceptor(next_fun, args, kwargs, context):
            path = tuple(context.module.path)
            # the root, setup, and a module's calls of its own methods pass through
            if not path or context.method_name == "setup" or path in active:
                return next_fun(*args, **kwargs)
            if replace is not None and path == replace[0]:
                return replace[1]
            active.append(path)
            try:
                y = next_fun(*args, **kwargs)
            finally:
                active.pop()
            if record is not None:
                record(path, y)
            if capture is not None and path == capture:
                raise _Captured(y)
            return y

        method = self.method or "__call__"
        with nn.intercept_methods(interceptor):
            return self.module.apply(variables, x, method=method, **self.kwargs)


class _Wrapped:
    """Stands in for an nnx submodule during one call: records, captures or replaces its output.
    Attribute reads fall through to the submodule."""

    def __init__(self, inner, path, program_call):
        self._inner = inner
        self._path = path
        self._call = program_call

    def __call__(self, *args, **kwargs):
        return self._call(self._path, self._inner, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _child(obj, key):
    if isinstance(key, int) or isinstance(obj, Mapping):
        return obj[key]
    return getattr(obj, key)


def _set_child(obj, key, value, path):
    if isinstance(obj, tuple):
        raise SplitError(f"cannot split at {path_name(path)!r}: it is held in a tuple; use a "
                         "list (nnx.List) or an attribute")
    if isinstance(key, int) or isinstance(obj, Mapping):
        obj[key] = value
    else:
        setattr(obj, key, value)


class _NnxProgram(Program):
    def __init__(self, graphdef, method: str | None, kwargs: tuple, input_shape: tuple[int, ...]):
        self.graphdef = graphdef
        self.method = method
        self.kwargs = dict(kwargs)
        super().__init__(input_shape)

    def run(self, params, x, *, capture=None, replace=None, record=None):
        from flax import nnx

        model = nnx.merge(self.graphdef, params)
        if capture is not None or replace is not None or record is not None:
            self._operate(model, capture, replace, record)
        fn = getattr(model, self.method) if self.method else model
        return fn(x, **self.kwargs)

    @staticmethod
    def _operate(model, capture, replace, record):
        """Graph surgery on the freshly merged ``model``: wrap the submodules involved."""
        from flax import nnx

        wanted = None if record is not None else {(capture if capture is not None else replace[0])}
        found = []
        for path, node in nnx.iter_graph(model):
            path = tuple(path)
            # callable submodules only: containers (nnx.List, nnx.Dict) are walked, not wrapped
            if (path and isinstance(node, nnx.Module) and callable(node)
                    and (wanted is None or path in wanted)):
                parent = model
                for key in path[:-1]:
                    parent = _child(parent, key)
                found.append((path, parent, node))
        if wanted is not None and not found:
            raise SplitError(f"no submodule at {path_name(next(iter(wanted)))!r}")

        def call(path, inner, args, kwargs):
            if replace is not None and path == replace[0]:
                return replace[1]
            y = inner(*args, **kwargs)
            if record is not None:
                record(path, y)
            if capture is not None and path == capture:
                raise _Captured(y)
            return y

        for path, parent, node in found:
            _set_child(parent, path[-1], _Wrapped(node, path, call), path)


@functools.lru_cache(maxsize=32)
def _cached_program(kind: str, definition, method, kwargs, input_shape) -> Program:
    cls = _LinenProgram if kind == "linen" else _NnxProgram
    return cls(definition, method, kwargs, input_shape)


def make_program(kind: str, definition, method, kwargs: tuple, input_shape: tuple) -> Program:
    """The :class:`Program` of a linen module or nnx graphdef (``kind``), shared by equal definitions."""
    try:
        return _cached_program(kind, definition, method, kwargs, input_shape)
    except TypeError:  # an unhashable module field or keyword: no sharing across instances
        cls = _LinenProgram if kind == "linen" else _NnxProgram
        return cls(definition, method, kwargs, input_shape)
