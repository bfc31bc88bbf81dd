"""The demo segmenter: a small Flax U-Net trained on the scene world (Segmenter protocol).

It labels every pixel of a 64x64 (or any size divisible by 8) NHWC image in [-1, 1] with one
of the world's ten classes, so its segmentation has a single channel (D = 1). Every label is
in the ``object`` category: with one channel, a window pixel is not also a building pixel, so
treating window / door / roof as parts (which in the unified-parsing segmenter live in their
own channel, inside their owning object) would change the meaning of the dissection's
per-category union for no benefit; label 0 (``-``, none) is never predicted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.scenes.world import LABEL_NAMES
from .. import untrusted_json

SEGMENTER_KIND = "scenes64-segmenter"
SEGMENTER_LABELS = tuple((name, "object") for name in LABEL_NAMES)
SEGMENTER_CATEGORIES = ("object",)
DEFAULT_WIDTHS = (16, 32, 64, 96)


class UNet(nn.Module):
    """A small U-Net: NHWC float images -> logits (N, H, W, num_classes) for labels 1..num_classes.

    ``widths`` are the channel counts at resolutions 1, 1/2, 1/4, 1/8; H and W must be divisible
    by 8.
    """

    num_classes: int = len(LABEL_NAMES) - 1
    widths: Sequence[int] = DEFAULT_WIDTHS

    @nn.compact
    def __call__(self, x):
        def block(h, width, name):
            h = nn.relu(nn.Conv(width, (3, 3), name=f"{name}_conv1")(h))
            return nn.relu(nn.Conv(width, (3, 3), name=f"{name}_conv2")(h))

        skips = []
        h = x
        for level, width in enumerate(self.widths[:-1]):
            h = block(h, width, f"down{level}")
            skips.append(h)
            h = nn.max_pool(h, (2, 2), (2, 2))
        h = block(h, self.widths[-1], "bottom")
        for level in reversed(range(len(self.widths) - 1)):
            n, hh, ww, c = h.shape
            h = jax.image.resize(h, (n, hh * 2, ww * 2, c), "nearest")
            h = nn.Conv(self.widths[level], (3, 3), name=f"up{level}_proj")(h)
            h = block(jnp.concatenate([h, skips[level]], -1), self.widths[level], f"up{level}")
        return nn.Conv(self.num_classes, (1, 1), name="classifier")(h)


def _check_images(images) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be NHWC with 3 channels, got shape {tuple(images.shape)}")
    if images.shape[1] % 8 or images.shape[2] % 8:
        raise ValueError(f"image height and width must be multiples of 8, got {images.shape[1:3]}")
    return images


def _pool(x: jax.Array, downsample: int) -> jax.Array:
    """Average over downsample x downsample blocks of an (N, H, W, C) map."""
    if downsample == 1:
        return x
    n, h, w, c = x.shape
    if h % downsample or w % downsample:
        raise ValueError(f"downsample {downsample} does not divide the image size {(h, w)}")
    return x.reshape(n, h // downsample, downsample, w // downsample, downsample, c).mean((2, 4))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _probabilities(network: UNet, params, images: jax.Array, downsample: int) -> jax.Array:
    """Softmax of the U-Net on clipped images, ``downsample``-block means; one compiled program per
    network architecture, image shape and stride, shared by every set of weights."""
    logits = network.apply({"params": params}, jnp.clip(images, -1.0, 1.0))
    return _pool(jax.nn.softmax(logits, -1), downsample)


class DemoSegmenter:
    """Segmenter protocol implementation for the scene world.

    ``labels``: (name, 'object') for '-', sky, sun, cloud, grass, road, tree, building, window,
    door, roof (label numbers as in :data:`gandissect_jax.scenes.world.LABEL_NAMES`).
    Images are clipped to [-1, 1] first (generator outputs have no tanh and overshoot slightly).
    Every method takes the U-Net parameters explicitly (``S.segment(S.params, images)``) and is
    pure in them, so it can run inside an outer ``jax.jit`` that passes them as an argument.

    Attributes:
      params: the U-Net's parameter pytree.
      widths: its channel widths; network: the :class:`UNet` module.
    """

    labels = SEGMENTER_LABELS
    categories = SEGMENTER_CATEGORIES

    def __init__(self, params, widths: Sequence[int] = DEFAULT_WIDTHS):
        self.params = params
        self.widths = tuple(int(w) for w in widths)
        self.network = UNet(widths=self.widths)

    def probabilities(self, params, images, downsample: int = 1) -> jax.Array:
        """Class probabilities float32 (N, H//ds, W//ds, 10) for labels 1..10 (ds x ds block means)."""
        return _probabilities(self.network, params, _check_images(images), int(downsample))

    def segment(self, params, images, downsample: int = 1) -> jax.Array:
        """Label map int32 (N, H//ds, W//ds, 1) of NHWC images in [-1, 1]; labels 1..10."""
        probs = self.probabilities(params, images, downsample)
        return (jnp.argmax(probs, -1) + 1).astype(jnp.int32)[..., None]

    def class_scores(self, params, images, downsample: int = 1) -> jax.Array:
        """Differentiable probabilities of every label float32 (N, h, w, 11); label 0 ('-') is 0."""
        probs = self.probabilities(params, images, downsample)
        return jnp.concatenate([jnp.zeros_like(probs[..., :1]), probs], -1)

    def class_score(self, params, images, c: int, downsample: int = 1) -> tuple[jax.Array, jax.Array]:
        """Differentiable probability of label ``c`` float32 (N, h, w) and bool mask (N, h, w) where c wins.

        Label 0 ('-') gets a zero score and an empty mask. ``c`` may be traced (e.g. vmapped); a
        concrete ``c`` outside 0..10 raises ValueError.
        """
        if not isinstance(c, jax.core.Tracer):
            c = int(c)
            if not 0 <= c < len(self.labels):
                raise ValueError(f"label number {c} out of range 0..{len(self.labels) - 1}")
        scores = self.class_scores(params, images, downsample)
        score = jnp.take(scores, c, axis=-1)
        mask = (jnp.argmax(scores[..., 1:], -1) + 1 == c) & (c != 0)
        return score, mask


def init_segmenter_params(rng: jax.Array, widths: Sequence[int] = DEFAULT_WIDTHS, size: int = 64):
    """Fresh U-Net parameters (a pytree of float32 arrays)."""
    return UNet(widths=tuple(widths)).init(rng, jnp.zeros((1, size, size, 3)))["params"]


def save_demo_segmenter(directory, params, widths: Sequence[int] = DEFAULT_WIDTHS, *,
                        force: bool = False) -> str:
    """Write an orbax checkpoint (params + config.json) of the demo segmenter to ``directory``.

    ``directory`` must not exist (or be empty); ``force=True`` also allows replacing a checkpoint
    written by gandissect-jax, never anything else. Returns the absolute path.

    Raises:
      gandissect_jax.checkpoints.DestinationError: the destination may not be written.
    """
    from gandissect_jax.checkpoints import save_checkpoint

    params = jax.tree_util.tree_map(np.asarray, params)
    return save_checkpoint(directory, params, {"kind": SEGMENTER_KIND, "widths": list(widths),
                                               "labels": [list(l) for l in SEGMENTER_LABELS]},
                           force=force)


def load_demo_segmenter(src: str | Path = "scenes64-segmenter") -> DemoSegmenter:
    """Load the demo segmenter from an orbax directory or a registry name.

    ``src`` is a registry name (``'scenes64-segmenter'``, shipped in ``weights/scenes64/segmenter``;
    ``'scenes64'`` is accepted as an alias) or a directory written by :func:`save_demo_segmenter`.
    Raises FileNotFoundError for a missing checkpoint and ValueError naming the directory for
    another kind of checkpoint, ``widths`` that are not a list of positive integers,
    or parameters missing, unexpected or of another shape than ``widths`` give.
    """
    from gandissect_jax.checkpoints import check_param_shapes, config_sizes, load_checkpoint
    from gandissect_jax.weights import resolve

    if str(src) == "scenes64":
        src = "scenes64-segmenter"
    path = Path(resolve(src, kind="segmenter"))
    params, config = load_checkpoint(path)
    if config.get("kind") != SEGMENTER_KIND:
        raise ValueError(f"{path} is not a demo segmenter checkpoint (kind={config.get('kind')!r})")
    widths = config_sizes(config, "widths", str(path), DEFAULT_WIDTHS)
    expected = jax.eval_shape(lambda: init_segmenter_params(jax.random.key(0), widths))
    check_param_shapes(params, expected, str(path), "segmenter parameter")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    return DemoSegmenter(params, widths)


def is_demo_segmenter_checkpoint(directory: str | Path) -> bool:
    """True if ``directory`` holds a checkpoint written by :func:`save_demo_segmenter`."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    try:
        return untrusted_json.loads(config.read_text()).get("kind") == SEGMENTER_KIND
    except (ValueError, OSError):
        return False
