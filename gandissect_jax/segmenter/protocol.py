"""The Segmenter protocol: what dissection and ACE optimization need from a segmenter s_c(x).

Any object with these attributes and methods plugs into :mod:`gandissect_jax.dissection` and the
intervention / ACE code: the unified-parsing UPerNet of :mod:`gandissect_jax.segmenter`, the demo
segmenter of :mod:`gandissect_jax.scenes`, or your own.

Label numbers index ``labels``; label 0 is "no label" (named ``"-"``). A segmentation has ``D``
channels so that one pixel can carry several labels (e.g. an object, its part and its material);
0 in a channel means "nothing in this channel".

A segmenter may also have ``class_scores(images, downsample=1)``, returning float32
``(N, h, w, L)`` scores of every label at once (column ``c`` equal to ``class_score(images, c)[0]``).
It is optional: ACE optimization uses it, when present, to score several labels with one
backward pass through the network instead of one per label.

Example -- a segmenter that calls bright pixels "sky"::

    import jax.numpy as jnp

    class BrightIsSky:
        labels = (("-", "object"), ("sky", "object"))
        categories = ("object",)

        def segment(self, images, downsample=1):
            score, _ = self.class_score(images, 1, downsample)
            return (score > 0.5).astype(jnp.int32)[..., None]          # (N, h, w, 1)

        def class_score(self, images, c, downsample=1):
            if c != 1:
                raise ValueError(f"unknown label {c}")
            x = images[:, ::downsample, ::downsample].mean(-1)       # (N, h, w)
            score = (x + 1) / 2                                       # differentiable
            return score, score > 0.5

    assert isinstance(BrightIsSky(), Segmenter)
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import jax

__all__ = ["Segmenter", "label_index"]


@runtime_checkable
class Segmenter(Protocol):
    """A semantic segmenter of images in [-1, 1], NHWC.

    Attributes:
      labels: ``(name, category)`` for every label number; ``labels[0]`` is ``("-", ...)``.
      categories: the category names used in ``labels`` (e.g. ``("object", "part", "material")``).
    """

    labels: Sequence[tuple[str, str]]
    categories: Sequence[str]

    def segment(self, images: jax.Array, downsample: int = 1) -> jax.Array:
        """Label every pixel.

        Args:
          images: float32 ``(N, H, W, 3)`` RGB in [-1, 1].
          downsample: output stride.

        Returns:
          int32 ``(N, H // downsample, W // downsample, D)`` label numbers, 0 = none.
        """
        ...

    def class_score(
        self, images: jax.Array, c: int, downsample: int = 1
    ) -> tuple[jax.Array, jax.Array]:
        """Score of label ``c`` at every pixel, differentiable with respect to ``images``.

        Returns:
          ``(score, mask)``: float32 ``(N, h, w)`` and bool ``(N, h, w)`` (where ``c`` wins).
        """
        ...


def label_index(segmenter: Segmenter, name: str) -> int:
    """Return the label number of concept ``name``; ValueError listing close names if unknown."""
    names = [label for label, _ in segmenter.labels]
    if name in names:
        return names.index(name)
    import difflib

    close = difflib.get_close_matches(name, names, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown concept {name!r}: the segmenter has {len(names)} labels{hint}")
