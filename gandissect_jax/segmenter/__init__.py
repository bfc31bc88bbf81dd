"""Segmenters: the :class:`Segmenter` protocol and the unified-parsing UPerNet (ResNet-50).

``load_segmenter(src)`` returns a :class:`UnifiedParsingSegmenter` from the reference's weight
directory (``encoder_epoch_40.pth``, ``decoder_epoch_40.pth``, ``labels.json``; read without
PyTorch), an orbax checkpoint written by :func:`convert_reference`, or a registry name such as
``"upp-resnet50-upernet"`` (resolved by :mod:`gandissect_jax.weights`). Everything, including
precise RoI pooling and the quad division's connected components, runs in JAX on any backend.

Example::

    import jax, jax.numpy as jnp
    from gandissect_jax import load_segmenter

    S = load_segmenter("weights/upp-resnet50-upernet", segdiv="undivided", segsizes=(256,))
    images = jnp.zeros((2, 256, 256, 3))               # NHWC RGB in [-1, 1]
    seg = S.segment(S.params, images, downsample=2)    # int32 (2, 128, 128, 3)
    tree = S.labels.index(("tree", "object"))
    score, mask = S.class_score(S.params, images, tree) # (2, 256, 256) float32 / bool
    grad = jax.grad(lambda x: S.class_score(S.params, x, tree)[0].sum())(images)

Parameters are explicit in every method (``S.params`` is the network's variables), so
``jax.jit(S.segment, static_argnums=2)(S.params, images, 2)`` compiles once for any weights.
"""

from __future__ import annotations

import os
from typing import Sequence

from .convert import SegmenterWeightsError, convert_reference, load_variables
from .prroi import prroi_pool, whole_map_prroi_pool
from gandissect_jax.segmenter_protocol import Segmenter, check_segmenter, label_index
from .quad import connected_components, quad_divide
from .unified import UnifiedParsingSegmenter

__all__ = [
    "Segmenter",
    "label_index",
    "check_segmenter",
    "load_segmenter",
    "convert_reference",
    "UnifiedParsingSegmenter",
    "SegmenterWeightsError",
    "prroi_pool",
    "whole_map_prroi_pool",
    "connected_components",
    "quad_divide",
]

REGISTRY_NAME = "upp-resnet50-upernet"


def _resolve(src: str | os.PathLike) -> str:
    path = os.fspath(src)
    if os.path.exists(path):
        return path
    try:
        from ..weights import resolve
    except ImportError as err:
        raise FileNotFoundError(f"no segmenter weights at {path!r}") from err
    return os.fspath(resolve(path, "segmenter"))


def _demo_segmenter(path: str, segdiv: str):
    """The scene world's demo segmenter if ``path`` holds one, else None."""
    try:
        from ..scenes.demo_segmenter import is_demo_segmenter_checkpoint, load_demo_segmenter
    except ImportError:
        return None
    if not is_demo_segmenter_checkpoint(path):
        return None
    if segdiv != "undivided":
        raise ValueError(f"the demo segmenter at {path} has no {segdiv!r} division")
    return load_demo_segmenter(path)


def load_segmenter(src: str | os.PathLike, segdiv: str = "undivided",
                   segsizes: Sequence[int] = (256,), *,
                   skip_last_component: bool = True) -> UnifiedParsingSegmenter:
    """Load the unified-parsing segmenter.

    Args:
      src: reference weight directory, orbax checkpoint directory, or a registry name.
      segdiv: ``"undivided"`` (3 label channels) or ``"quad"`` (5: objects also divided into
        top/bottom and left/right quarters of each connected component).
      segsizes: square input sizes whose softmax maps are summed (voting), as the reference.
      skip_last_component: quad only; ``True`` (default) replicates the reference, which never
        divides the last connected component of an image; ``False`` divides every component.

    Returns:
      A :class:`UnifiedParsingSegmenter` (implements :class:`Segmenter`). A checkpoint of the
      scene world's demo segmenter (e.g. ``"scenes64-segmenter"``) is handed to
      :func:`gandissect_jax.scenes.demo_segmenter.load_demo_segmenter` instead.
    """
    path = _resolve(src)
    demo = _demo_segmenter(path, segdiv)
    if demo is not None:
        return demo
    variables, labeldata = load_variables(path)
    return UnifiedParsingSegmenter(variables, labeldata, segdiv=segdiv, segsizes=segsizes,
                                   skip_last_component=skip_last_component)
