"""The Segmenter protocol: what dissection and ACE optimization need from a segmenter s_c(x).

Any object with these attributes and methods plugs into :mod:`gandissect_jax.dissection` and the
intervention / ACE code: the unified-parsing UPerNet of :mod:`gandissect_jax.segmenter`, the demo
segmenter of :mod:`gandissect_jax.scenes`, or your own.

Label numbers index ``labels``; label 0 is "no label" (named ``"-"``). A segmentation has ``D``
channels so that one pixel can carry several labels (e.g. an object, its part and its material);
0 in a channel means "nothing in this channel".

Every method takes the segmenter's parameters explicitly, as its first argument, and is pure in
them: ``S.segment(S.params, images)``. So a segmenter can be called inside an outer ``jax.jit``
(or ``grad``) that passes its parameters as an argument -- nothing is captured as a constant, one
compiled program serves any weights -- and value checks of the inputs run only on concrete arrays.

A segmenter may also have ``class_scores(params, images, downsample=1)``, returning float32
``(N, h, w, L)`` scores of every label at once (column ``c`` equal to
``class_score(params, images, c)[0]``). It is optional: ACE optimization uses it, when present,
to score several labels with one backward pass through the network instead of one per label.
It may take a keyword ``labels`` (a static sequence of K label numbers) and then return only those
columns, ``(N, h, w, K)``, so that it can skip the work the other labels need (ACE passes it).

Example -- a segmenter that calls pixels "sky" where a learned colour direction is bright::

    import jax, jax.numpy as jnp

    class BrightIsSky:
        labels = (("-", "object"), ("sky", "object"))
        categories = ("object",)

        def __init__(self):
            self.params = {"colour": jnp.ones(3) / 3}                    # any pytree

        def segment(self, params, images, downsample=1):
            score, _ = self.class_score(params, images, 1, downsample)
            return (score > 0.5).astype(jnp.int32)[..., None]          # (N, h, w, 1)

        def class_score(self, params, images, c, downsample=1):
            if not isinstance(c, jax.core.Tracer) and c != 1:
                raise ValueError(f"unknown label {c}")
            x = images[:, ::downsample, ::downsample] @ params["colour"]   # (N, h, w)
            score = (x + 1) / 2                                       # differentiable
            return score, score > 0.5

    S = BrightIsSky()
    assert isinstance(S, Segmenter)
    labels = jax.jit(S.segment)(S.params, images)                       # params as an argument
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import jax
import numpy as np

__all__ = ["Segmenter", "check_segmenter", "label_index"]


@runtime_checkable
class Segmenter(Protocol):
    """A semantic segmenter of images in [-1, 1], NHWC, with explicit parameters.

    Attributes:
      params: the parameter pytree every method takes as its first argument.
      labels: ``(name, category)`` for every label number; ``labels[0]`` is ``("-", ...)``.
      categories: the category names used in ``labels`` (e.g. ``("object", "part", "material")``).
    """

    params: Any
    labels: Sequence[tuple[str, str]]
    categories: Sequence[str]

    def segment(self, params: Any, images: jax.Array, downsample: int = 1) -> jax.Array:
        """Label every pixel.

        Args:
          params: the segmenter's parameters (usually its :attr:`params`).
          images: float32 ``(N, H, W, 3)`` RGB in [-1, 1].
          downsample: output stride (a static Python int).

        Returns:
          int32 ``(N, H // downsample, W // downsample, D)`` label numbers, 0 = none.
        """
        ...

    def class_score(
        self, params: Any, images: jax.Array, c: int, downsample: int = 1
    ) -> tuple[jax.Array, jax.Array]:
        """Score of label ``c`` at every pixel, differentiable with respect to ``images`` and
        ``params``.

        Returns:
          ``(score, mask)``: float32 ``(N, h, w)`` and bool ``(N, h, w)`` (where ``c`` wins).
        """
        ...


def check_segmenter(segmenter: Any, *methods: str) -> None:
    """Check that ``segmenter`` has what the :class:`Segmenter` protocol asks, without running it.

    ``methods``: the methods the caller needs (default ``("segment",)``; ACE optimization also
    needs ``"class_score"``).

    Raises:
      TypeError naming every missing or malformed attribute: ``params``; ``labels``, a non-empty
      sequence of ``(name, category)`` pairs of str; ``categories``, a sequence of str; the
      ``methods``, callables.
    """
    methods = methods or ("segment",)
    problems = [f"no {name!r}" for name in ("params", "labels", "categories", *methods)
                if not hasattr(segmenter, name)]
    if not problems:
        labels, categories = segmenter.labels, segmenter.categories
        if not (_sequence(labels) and len(labels) > 0 and all(
                _sequence(pair) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in labels)):
            problems.append(f"labels must be a non-empty sequence of (name, category) pairs of str, got "
                            f"{labels!r:.80}")
        if not (_sequence(categories) and all(isinstance(c, str) for c in categories)):
            problems.append(f"categories must be a sequence of str, got {categories!r:.80}")
        problems += [f"{name!r} is not callable" for name in methods if not callable(getattr(segmenter, name))]
    if problems:
        raise TypeError(
            f"{type(segmenter).__name__} is not a Segmenter: {'; '.join(problems)}. A Segmenter has "
            "params, labels ((name, category) per label number, labels[0] = ('-', ...)), categories, "
            "segment(params, images, downsample) and, for ACE, class_score(params, images, c, "
            "downsample) (gandissect_jax.segmenter_protocol)")


def _sequence(value: Any) -> bool:
    """A list, tuple or other sequence, or a numpy array (e.g. labels as an (L, 2) array of str)."""
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def label_index(segmenter: Segmenter, name: str) -> int:
    """Return the label number of concept ``name``; ValueError listing close names if unknown
    (TypeError from :func:`check_segmenter` for an object that is not a Segmenter)."""
    check_segmenter(segmenter)
    names = [label for label, _ in segmenter.labels]
    if name in names:
        return names.index(name)
    import difflib

    close = difflib.get_close_matches(name, names, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown concept {name!r}: the segmenter has {len(names)} labels{hint}")
