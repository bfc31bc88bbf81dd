"""The demo GAN's discriminator as a realism score: ``score(params, images) -> (N,)`` logits.

``scripts/train_demo_gan.py`` trained the shipped generator against a small ProGAN-style
discriminator (equalized learning rate, a minibatch-stddev feature over groups of 4, logits: high
means real). Its parameters ship in ``weights/scenes64_train_state`` beside the generator's; this
module defines the same network (same parameter names, so the trained weights load as they are),
:func:`convert_train_state` writes them into a loadable checkpoint (``weights/scenes64/
discriminator``, registry name ``scenes64-discriminator``) and :func:`load_discriminator` reads it.

The minibatch-stddev feature makes a logit depend on the other images of its group of 4. So
that a sample's score depends on that sample alone (any batch size, any order), every image is
scored in a group with three fixed *context* images: world scenes 0, 1, 2 of world seed 0 (the
training distribution), stored in the checkpoint with the network
(``params["context_images"]``). This is the realism score used to find artifact units
(:mod:`gandissect_jax.artifacts`; Tousi et al., CVPR 2021).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SceneDiscriminator", "DemoDiscriminator", "convert_train_state", "load_discriminator",
           "DISCRIMINATOR_KIND", "D_CHANNELS", "CONTEXT_SCENES"]

DISCRIMINATOR_KIND = "scenes64-discriminator"
D_CHANNELS = (16, 32, 64, 128, 128)  # at 64, 32, 16, 8, 4 px
GROUP = 4  # minibatch-stddev group size of the training code
CONTEXT_SCENES = (0, (0, 1, 2))  # world seed, scene indices of the fixed context images


class _EqualizedConv(nn.Module):
    """Conv with equalized learning rate: the N(0, 1) kernel scaled by gain / sqrt(fan_in)."""

    features: int
    kernel: int = 3
    gain: float = float(np.sqrt(2.0))

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1] * self.kernel * self.kernel
        w = self.param("kernel", nn.initializers.normal(1.0), (self.kernel, self.kernel, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y * (self.gain / np.sqrt(fan_in)) + b


class _EqualizedDense(nn.Module):
    features: int
    gain: float = float(np.sqrt(2.0))

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return x @ w * (self.gain / np.sqrt(x.shape[-1])) + b


def _lrelu(x):
    return jnp.where(x >= 0, x, 0.2 * x)


def _minibatch_stddev(x, group: int = GROUP):
    """Append the mean over features of the per-group standard deviation as one channel (NHWC);
    sample i is grouped with samples i + k * (N / group), as in the training code."""
    n, h, w, c = x.shape
    g = min(group, n)
    y = x.reshape(g, n // g, h, w, c)
    y = jnp.sqrt(jnp.var(y, axis=0) + 1e-8).mean(axis=(1, 2, 3))  # (n // g,)
    y = jnp.tile(y, g).reshape(n, 1, 1, 1)
    return jnp.concatenate([x, jnp.broadcast_to(y, (n, h, w, 1))], -1)


class SceneDiscriminator(nn.Module):
    """(N, 64, 64, 3) images in [-1, 1] -> (N,) logits; the demo GAN's discriminator, trained by
    ``scripts/train_demo_gan.py`` (which imports it)."""

    channels: tuple = D_CHANNELS

    @nn.compact
    def __call__(self, x):
        h = _lrelu(_EqualizedConv(self.channels[0], 1, name="from_rgb")(x))
        for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            h = _lrelu(_EqualizedConv(c_in, name=f"b{i}_conv1")(h))
            h = _lrelu(_EqualizedConv(c_out, name=f"b{i}_conv2")(h))
            n, hh, ww, c = h.shape
            h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean((2, 4))
        h = _minibatch_stddev(h)
        h = _lrelu(_EqualizedConv(self.channels[-1], name="final_conv")(h))
        h = _lrelu(_EqualizedDense(self.channels[-1], name="final_dense")(h.reshape(h.shape[0], -1)))
        return _EqualizedDense(1, gain=1.0, name="logit")(h)[:, 0]


CHUNK = 8  # images scored per step: every step has one shape, whatever the batch size


@functools.partial(jax.jit, static_argnums=0)
def _score(network: SceneDiscriminator, params, images):
    context = params["context_images"]

    def one(image):  # the image first, then the context: one group of GROUP
        group = jnp.concatenate([image[None], context], 0)
        return network.apply({"params": params["network"]}, group)[0]

    n = images.shape[0]
    padded = -(-n // CHUNK) * CHUNK
    images = jnp.pad(jnp.clip(images, -1.0, 1.0), ((0, padded - n), (0, 0), (0, 0), (0, 0)))
    chunks = images.reshape(padded // CHUNK, CHUNK, *images.shape[1:])
    return jax.lax.map(jax.vmap(one), chunks).reshape(-1)[:n]


class DemoDiscriminator:
    """The demo discriminator: a realism score per image, pure in explicit parameters.

    Attributes:
      params: ``{"network": the SceneDiscriminator's params, "context_images": float32
        (3, 64, 64, 3)}``.
      channels: the network's channel widths.
    """

    def __init__(self, params: Any, channels: Sequence[int] = D_CHANNELS):
        self.params = params
        self.channels = tuple(int(c) for c in channels)
        self.network = SceneDiscriminator(self.channels)

    def score(self, params: Any, images: jax.Array) -> jax.Array:
        """float32 (N,) logits of float (N, 64, 64, 3) images (clipped to [-1, 1]); higher = judged
        more real. Each image is scored in a group with the three context images, in steps of
        a fixed number of images, so a sample's score does not depend on the batch it came in
        (bit-identical for any batch size). ValueError for another image shape."""
        if tuple(np.shape(images)[1:]) != (64, 64, 3):
            raise ValueError(f"the demo discriminator scores (N, 64, 64, 3) images; got {np.shape(images)}")
        return _score(self.network, params, jnp.asarray(images, jnp.float32))


def context_images() -> np.ndarray:
    """float32 (3, 64, 64, 3): world scenes 0, 1, 2 of world seed 0."""
    from gandissect_jax.scenes import world

    seed, indices = CONTEXT_SCENES
    return world.render_scenes(seed, np.asarray(indices))[0].astype(np.float32)


def convert_train_state(src: str | Path, dest: str | Path, *, force: bool = False) -> str:
    """Write the discriminator of a ``scripts/train_demo_gan.py`` train state (``src``: a checkpoint
    directory whose params hold ``"d"``, e.g. ``weights/scenes64_train_state``) as a loadable
    discriminator checkpoint at ``dest`` (the rules of :func:`gandissect_jax.checkpoints.
    save_checkpoint`: nothing of the user's is overwritten). Returns the absolute path.

    Raises:
      ValueError naming ``src`` when it is not such a train state or its discriminator does not
      match the architecture (naming the parameter and both shapes).
    """
    from gandissect_jax.checkpoints import config_sizes, load_checkpoint, save_checkpoint

    params, config = load_checkpoint(src)
    if config.get("kind") != "scenes64-gan-train-state" or "d" not in params:
        raise ValueError(f"{src} is not a demo GAN train state (kind {config.get('kind')!r}; "
                         "expected 'scenes64-gan-train-state' with a 'd' entry)")
    channels = config_sizes(config, "d_channels", str(src), D_CHANNELS)
    network = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params["d"])
    _check_network(network, channels, str(src))
    return save_checkpoint(dest, {"network": network, "context_images": context_images()},
                           {"kind": DISCRIMINATOR_KIND, "channels": list(channels), "step": config.get("step"),
                            "context_scenes": {"world_seed": CONTEXT_SCENES[0],
                                               "indices": list(CONTEXT_SCENES[1])},
                            "source": "scripts/train_demo_gan.py train state"},
                           force=force)


def _check_network(network: Any, channels: tuple[int, ...], source: str) -> None:
    from gandissect_jax.checkpoints import check_param_shapes

    expected = jax.eval_shape(SceneDiscriminator(channels).init, jax.random.key(0),
                              jnp.zeros((GROUP, 64, 64, 3)))["params"]
    check_param_shapes(network, expected, source, "discriminator parameter")


def load_discriminator(src: str | Path = "scenes64-discriminator") -> DemoDiscriminator:
    """Load a discriminator checkpoint written by :func:`convert_train_state` (a directory or the
    registry name ``scenes64-discriminator``, shipped in ``weights/scenes64/discriminator``).

    Raises FileNotFoundError for a missing checkpoint and ValueError naming the directory for
    another kind of checkpoint or mis-shaped parameters.
    """
    from gandissect_jax.checkpoints import config_sizes, load_checkpoint
    from gandissect_jax.weights import resolve

    path = Path(resolve(src, kind="discriminator"))
    params, config = load_checkpoint(path)
    if config.get("kind") != DISCRIMINATOR_KIND:
        raise ValueError(f"{path} is not a demo discriminator checkpoint (kind={config.get('kind')!r}; "
                         f"expected {DISCRIMINATOR_KIND!r})")
    channels = config_sizes(config, "channels", str(path), D_CHANNELS)
    if set(params) != {"network", "context_images"}:
        raise ValueError(f"{path}: expected params 'network' and 'context_images', got {sorted(params)}")
    _check_network(params["network"], channels, str(path))
    if np.shape(params["context_images"]) != (GROUP - 1, 64, 64, 3):
        raise ValueError(f"{path}: context_images has shape {np.shape(params['context_images'])}, "
                         f"expected {(GROUP - 1, 64, 64, 3)}")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    return DemoDiscriminator(params, channels)
