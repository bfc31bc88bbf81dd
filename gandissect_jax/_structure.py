"""Static arguments of jitted programs, keyed by a model's structure (never by its weights).

The intervention and ACE programs take a segmenter or a discriminator as a ``jax.jit`` static
argument and its parameters as ordinary (traced) arguments. :class:`Static` wraps such an object
so that two objects differing only in ``params`` -- two weight sets of one architecture -- are
equal static arguments and share one compiled program, while objects of different settings
(another segmentation stride, label set or network width) compile their own.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["Static", "structure_key"]


def _freeze(value: Any, depth: int = 0) -> Any:
    """A hashable stand-in for ``value``: containers recursively, arrays by shape, dtype and a
    digest of their bytes, other hashable objects as themselves, anything else by identity."""
    if depth > 8:
        return ("id", id(value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _freeze(v, depth + 1)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v, depth + 1) for v in value))
    if isinstance(value, np.ndarray) or (hasattr(value, "shape") and hasattr(value, "dtype")
                                          and hasattr(value, "__array__")):
        array = np.asarray(value)
        return ("array", array.shape, str(array.dtype),
                hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def structure_key(obj: Any) -> tuple:
    """``(type, every attribute but params, frozen)``: equal for objects that compute the same
    functions of their parameters."""
    attributes = getattr(obj, "__dict__", None)
    if attributes is None:
        return (type(obj), ("id", id(obj)))
    return (type(obj), tuple(sorted((name, _freeze(value)) for name, value in attributes.items()
                                    if name != "params")))


class Static:
    """``obj`` as a ``jax.jit`` static argument, equal and hashed by :func:`structure_key`.

    The key is taken when the wrapper is made: an object changed afterwards is not looked at again.
    The wrapper keeps ``obj`` alive, so an identity in its key cannot be reused by another object.
    """

    __slots__ = ("obj", "_key")

    def __init__(self, obj: Any):
        self.obj = obj
        self._key = structure_key(obj)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Static) and self._key == other._key

    def __repr__(self) -> str:
        return f"Static({type(self.obj).__name__})"
