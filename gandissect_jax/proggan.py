"""The Progressive GAN generator of GAN Dissection, in Flax, split cleanly at any layer.

The network is the one of the PyTorch reference (``netdissect.proggan.ProgressiveGenerator``),
computed in NHWC: a latent ``z`` of shape ``(N, z_dim)`` is viewed as a ``1x1`` feature map and
passed through named layers ``layer1 ... layerK`` and a final ``output_RxR`` layer that gives an
``(N, R, R, 3)`` float32 image, unclamped (about [-1, 1] for trained models).

Each conv block is PixelNorm (eps 1e-8) -> [nearest 2x upsample] -> conv (no bias) ->
equalized-learning-rate scale ``sqrt(2 / (C_in * k * k))`` -> + bias -> LeakyReLU(0.2).
``layer1`` is a 4x4 conv with padding 3 applied to the 1x1 latent (giving 4x4); every odd layer
after it doubles the resolution. The output block is PixelNorm -> 1x1 conv -> scale
``1 / sqrt(C_in)`` -> + bias (-> clip to [-1, 1] only if ``output_tanh``, the reference's Hardtanh).

Building and using a generator::

    config = GeneratorConfig(sizes=(128, 256, 256, 128, 64, 32))   # reference `sizes`: z_dim first
    config = GeneratorConfig.from_channels(z_dim=128, channels=(256, 256, 128, 64, 32))  # same
    params = init_params(jax.random.key(0), config)   # equalized-lr init: weights N(0,1), biases 0
    G = ProgressiveGenerator(params, config)          # implements the Generator protocol
    x = G(z)                                          # (N, 64, 64, 3)
    x = G.apply(params, z)                            # the same as a pure function of params
    h, f = G.split("layer4")                          # h(params, z) -> (r, ()); f(params, r, ()) -> x
    x, feats = G.features(z, ["layer4", "layer7"])    # images + NHWC layer outputs, one pass
    G.layer_shape("layer4")                           # (H, W, C) of one sample's r
    save_generator(G, "runs/g")                       # orbax checkpoint dir (atomic)
    G = load_generator("runs/g")                      # or a .pth file, or a registry name

Parameters are a plain pytree ``{layer_name: {"kernel": (k, k, C_in, C_out), "bias": (C_out,)}}``
(HWIO kernels; the reference's OIHW ``layerK.conv.weight`` / ``layerK.wscale.b`` map onto them),
so training code can differentiate and update them with optax directly.

Upsample-then-3x3-conv layers are computed without materialising the upsampled map
(:func:`upsample_conv3x3`), about 2x faster than the reference on CPU at equal results up to
float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gandissect_jax.generator import Split

__all__ = [
    "GeneratorConfig",
    "LayerSpec",
    "ProgressiveGAN",
    "ProgressiveGenerator",
    "init_params",
    "load_generator",
    "save_generator",
    "generator_from_state_dict",
    "params_from_state_dict",
    "state_dict_from_params",
    "convert_reference",
    "images_to_uint8",
    "PIXEL_NORM_EPS",
]

PIXEL_NORM_EPS = 1e-8
LEAKY_SLOPE = 0.2
CHECKPOINT_KIND = "generator"
ARCHITECTURE = "proggan"

# The reference's `resolution=` presets (used only by GeneratorConfig.for_resolution).
_RESOLUTION_SIZES = {
    8: (512, 512, 512),
    16: (512, 512, 512, 512),
    32: (512, 512, 512, 512, 256),
    64: (512, 512, 512, 512, 256, 128),
    128: (512, 512, 512, 512, 256, 128, 64),
    256: (512, 512, 512, 512, 256, 128, 64, 32),
    1024: (512, 512, 512, 512, 512, 256, 128, 64, 32, 16),
}


# --------------------------------------------------------------------------------------------
# Architecture description


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One named layer: channels, kernel, padding, whether it upsamples, its weight scale."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    padding: int
    upsample: bool
    is_output: bool
    resolution: int  # spatial size of this layer's output
    clip: bool = False  # output block only: the reference's Hardtanh (clip to [-1, 1])

    @property
    def scale(self) -> float:
        """Equalized-learning-rate factor applied to the conv output (before the bias)."""
        gain = 1.0 if self.is_output else np.sqrt(2.0) / self.kernel_size
        return float(gain / np.sqrt(self.in_channels))

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """HWIO shape of the kernel parameter."""
        return (self.kernel_size, self.kernel_size, self.in_channels, self.out_channels)


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a Progressive GAN generator.

    Attributes:
      sizes: the reference's ``sizes``: ``(z_dim, depth at 4x4, depth at 8x8, ...)``. The output
        resolution is ``4 * 2 ** (len(sizes) - 2)``.
      output_tanh: clip the image to [-1, 1] (the reference's Hardtanh); off for released models.
    """

    sizes: tuple[int, ...]
    output_tanh: bool = False

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(
                f"sizes must list z_dim then at least one positive channel depth, got {self.sizes!r}"
            )
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "output_tanh", bool(self.output_tanh))

    @classmethod
    def from_channels(cls, z_dim: int, channels: Sequence[int], output_tanh: bool = False):
        """Config from a latent size and the channel depth at 4x4, 8x8, 16x16, ..."""
        return cls(sizes=(int(z_dim), *map(int, channels)), output_tanh=output_tanh)

    @classmethod
    def for_resolution(cls, resolution: int, output_tanh: bool = False):
        """The reference's preset for ``ProgressiveGenerator(resolution=...)`` (8..1024)."""
        if resolution not in _RESOLUTION_SIZES:
            raise ValueError(
                f"no preset for resolution {resolution}; presets: {sorted(_RESOLUTION_SIZES)}"
            )
        return cls(sizes=_RESOLUTION_SIZES[resolution], output_tanh=output_tanh)

    @property
    def z_dim(self) -> int:
        """Dimension of the latent z."""
        return self.sizes[0]

    @property
    def resolution(self) -> int:
        """Side of the square output image."""
        return 4 * 2 ** (len(self.sizes) - 2)

    @functools.cached_property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Every layer in forward order, ending with the output layer."""
        s = self.sizes
        specs = [
            LayerSpec("layer1", s[0], s[1], 4, 3, False, False, 4),
            LayerSpec("layer2", s[1], s[1], 3, 1, False, False, 4),
        ]
        resolution = 4
        for c_in, c_out in zip(s[1:-1], s[2:]):
            resolution *= 2
            n = len(specs)
            specs.append(LayerSpec(f"layer{n + 1}", c_in, c_out, 3, 1, True, False, resolution))
            specs.append(LayerSpec(f"layer{n + 2}", c_out, c_out, 3, 1, False, False, resolution))
        name = f"output_{resolution}x{resolution}"
        specs.append(LayerSpec(name, s[-1], 3, 1, 0, False, True, resolution, self.output_tanh))
        return tuple(specs)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Layer names in forward order: ``('layer1', ..., 'layerK', 'output_RxR')``."""
        return tuple(spec.name for spec in self.layers)

    def layer_index(self, layer: str) -> int:
        """Position of ``layer`` in :attr:`layer_names`; ValueError listing valid names if unknown."""
        names = self.layer_names
        if layer not in names:
            raise ValueError(f"unknown layer {layer!r}; valid layers are: {', '.join(names)}")
        return names.index(layer)

    def param_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Expected params pytree structure, with shapes instead of arrays."""
        return {
            spec.name: {"kernel": spec.kernel_shape, "bias": (spec.out_channels,)}
            for spec in self.layers
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (stored in checkpoints' ``config.json``)."""
        return {
            "kind": CHECKPOINT_KIND,
            "architecture": ARCHITECTURE,
            "sizes": list(self.sizes),
            "output_tanh": self.output_tanh,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GeneratorConfig":
        """Inverse of :meth:`to_dict`; ValueError if ``data`` is not a ProGAN generator config."""
        kind = data.get("kind", CHECKPOINT_KIND)
        architecture = data.get("architecture", ARCHITECTURE)
        if kind != CHECKPOINT_KIND or architecture != ARCHITECTURE:
            raise ValueError(
                f"checkpoint is a {kind!r}/{architecture!r}, not a {CHECKPOINT_KIND}/{ARCHITECTURE}"
            )
        if "sizes" not in data:
            raise ValueError("generator config has no 'sizes'")
        return cls(sizes=tuple(data["sizes"]), output_tanh=bool(data.get("output_tanh", False)))


# --------------------------------------------------------------------------------------------
# Flax modules


def pixel_norm(x: jax.Array) -> jax.Array:
    """Normalise every position's feature vector: ``x / sqrt(mean_c(x**2) + 1e-8)``; NHWC."""
    return x / jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + PIXEL_NORM_EPS)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of an NHWC map (each pixel becomes a 2x2 block)."""
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


def _conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


def _fold_taps(k: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """3 taps along ``axis`` -> the 2-tap kernels seen by even and odd rows of a 2x upsample."""
    t0, t1, t2 = (jnp.take(k, i, axis=axis) for i in range(3))
    even = jnp.stack([t0, t1 + t2], axis=axis)  # input offsets (-1, 0)
    odd = jnp.stack([t0 + t1, t2], axis=axis)  # input offsets (0, +1)
    return even, odd


def upsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv3x3(upsample_nearest_2x(x), kernel)`` with zero padding 1, without upsampling first.

    Each of the four output phases (row, column parity) is a 2x2 conv of the low-resolution
    input with the 3x3 taps summed pairwise, so it costs 16 instead of 36 multiply-adds per input
    pixel and channel pair. Equal to the direct computation up to float rounding.
    x: (N, H, W, C_in); kernel: (3, 3, C_in, C_out) HWIO -> (N, 2H, 2W, C_out).
    """
    n, h, w, _ = x.shape
    pads = ((1, 0), (0, 1))  # even phase reads offsets (-1, 0), odd phase (0, +1)
    rows = _fold_taps(kernel, 0)
    phases = []
    for a in range(2):
        cols = _fold_taps(rows[a], 1)
        phases.append(jnp.stack([_conv(x, cols[b], (pads[a], pads[b])) for b in range(2)], axis=3))
    y = jnp.stack(phases, axis=2)  # (N, H, 2, W, 2, C_out)
    return y.reshape(n, 2 * h, 2 * w, y.shape[-1])


class ProgressiveBlock(nn.Module):
    """One named layer of the generator (conv block or output block), NHWC in and out."""

    spec: LayerSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        kernel = self.param("kernel", nn.initializers.normal(stddev=1.0), spec.kernel_shape)
        bias = self.param("bias", nn.initializers.zeros_init(), (spec.out_channels,))
        x = pixel_norm(x)
        kernel = kernel.astype(x.dtype)
        if spec.upsample and spec.kernel_size == 3 and spec.padding == 1:
            x = upsample_conv3x3(x, kernel)
        else:
            if spec.upsample:
                x = upsample_nearest_2x(x)
            x = _conv(x, kernel, ((spec.padding, spec.padding),) * 2)
        x = x * jnp.asarray(spec.scale, x.dtype) + bias.astype(x.dtype)
        if spec.is_output:
            return jnp.clip(x, -1.0, 1.0) if spec.clip else x
        return jnp.where(x >= 0, x, LEAKY_SLOPE * x)


class ProgressiveGAN(nn.Module):
    """The generator as a Flax module; ``start``/``stop`` select a slice of its layers.

    ``__call__(x, start=0, stop=None)`` runs layers ``config.layers[start:stop]`` on ``x``
    (``x`` is the NHWC input of layer ``start``: for ``start == 0`` the latent as ``(N, 1, 1, z_dim)``).
    """

    config: GeneratorConfig

    @nn.compact
    def __call__(self, x: jax.Array, start: int = 0, stop: int | None = None) -> jax.Array:
        layers = self.config.layers
        stop = len(layers) if stop is None else stop
        for spec in layers[start:stop]:
            x = ProgressiveBlock(spec, name=spec.name)(x)
        return x


def init_params(rng: jax.Array, config: GeneratorConfig) -> dict:
    """Fresh parameters with equalized-learning-rate init: kernels N(0, 1), biases 0, float32.

    Args:
      rng: a ``jax.random.key``.
      config: the architecture.

    Returns:
      ``{layer_name: {"kernel": (k, k, C_in, C_out), "bias": (C_out,)}}``.
    """
    # One normal stream for all kernels, cut into layers: the same distribution as
    # ``ProgressiveGAN(config).init`` but compiles in a second instead of ~15 s at 256x256.
    shapes = [spec.kernel_shape for spec in config.layers]
    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = jax.jit(jax.random.normal, static_argnums=1)(rng, (sum(sizes),))
    params, offset = {}, 0
    for spec, shape, size in zip(config.layers, shapes, sizes):
        params[spec.name] = {
            "kernel": flat[offset : offset + size].reshape(shape),
            "bias": jnp.zeros((spec.out_channels,), jnp.float32),
        }
        offset += size
    return params


# --------------------------------------------------------------------------------------------
# The ProgressiveGenerator object and its split


def _check_params(params: Mapping, config: GeneratorConfig, source: str = "params") -> dict:
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
        checked = _check_params(params, config)
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


# --------------------------------------------------------------------------------------------
# Reference state dicts (.pth) <-> params


_OLD_LAYER = re.compile(r"^features\.(\d+)\.(.+)$")
_NEW_LAYER = re.compile(r"^layer(\d+)\.(conv\.weight|wscale\.b)$")
_OUTPUT = re.compile(r"^output_(\d+)x(\d+)\.(conv\.weight|wscale\.b)$")


def _rename_old_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map the older ``features.N.*`` / ``output.*`` names onto ``layerN+1.*`` / ``output_RxR.*``."""
    count = 0
    while f"features.{count}.conv.weight" in state_dict:
        count += 1
    resolution = 4 * 2 ** ((count - 1) // 2)
    renamed = {}
    for key, value in state_dict.items():
        match = _OLD_LAYER.match(key)
        if match:
            renamed[f"layer{int(match.group(1)) + 1}.{match.group(2)}"] = value
        elif key.startswith("output."):
            renamed[f"output_{resolution}x{resolution}.{key[len('output.'):]}"] = value
        else:
            renamed[key] = value
    return renamed


def _sizes_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str) -> tuple[int, ...]:
    """Infer ``sizes`` as the reference does, with a clear error for gaps or bad ranks."""
    indices = sorted(
        int(m.group(1)) for m in map(_NEW_LAYER.match, state_dict) if m and m.group(2) == "conv.weight"
    )
    if not indices:
        raise ValueError(
            f"{source}: no 'layer1.conv.weight' (or 'features.0.conv.weight'): "
            "not a Progressive GAN generator state dict"
        )
    for k in range(1, max(indices) + 1):
        if f"layer{k}.conv.weight" not in state_dict:
            raise ValueError(f"{source}: missing tensor 'layer{k}.conv.weight'")
    sizes = []
    for k in range(1, max(indices) + 1):
        weight = state_dict[f"layer{k}.conv.weight"]
        if np.ndim(weight) != 4:
            raise ValueError(
                f"{source}: tensor 'layer{k}.conv.weight' has shape {tuple(np.shape(weight))}, "
                "expected a 4-d OIHW conv weight"
            )
        if k == 1:
            sizes.append(int(weight.shape[1]))
        if k % 2 == 1:
            sizes.append(int(weight.shape[0]))
    return tuple(sizes)


def _expected_state_shapes(config: GeneratorConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for spec in config.layers:
        k = spec.kernel_size
        shapes[f"{spec.name}.conv.weight"] = (spec.out_channels, spec.in_channels, k, k)
        shapes[f"{spec.name}.wscale.b"] = (spec.out_channels,)
    return shapes


# Wrappers and key prefixes that training code puts around a generator's state dict, in the
# order they are looked for: the EMA generator first (what a trainer samples with), then the
# trained one, then generic names.
STATE_DICT_WRAPPERS = ("g_ema", "G", "generator", "state_dict")
# Prefixes of every key: nn.DataParallel / DistributedDataParallel, torch.compile.
STATE_DICT_PREFIXES = ("module.", "_orig_mod.")
_MAX_WRAPPING = 4


def _keys_text(obj: Mapping, limit: int = 20) -> str:
    keys = [repr(k) for k in list(obj)[:limit]]
    return "[" + ", ".join(keys) + (f", ... ({len(obj)} in all)" if len(obj) > limit else "") + "]"


def _strip_prefixes(state_dict: Mapping) -> Mapping:
    """Remove a prefix shared by every key (repeatedly: ``module.module.`` is seen in the wild)."""
    while state_dict and all(isinstance(k, str) for k in state_dict):
        for prefix in STATE_DICT_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                break
        else:
            return state_dict
    return state_dict


def _is_generator_state_dict(obj: Mapping) -> bool:
    return "layer1.conv.weight" in obj or "features.0.conv.weight" in obj


def unwrap_state_dict(obj: Any, source: str = "state dict") -> Mapping[str, Any]:
    """Find the generator state dict in what a ``.pth`` file holds, as training code saves it.

    Accepted: the state dict itself; every key prefixed by ``module.`` (``nn.DataParallel``) or
    ``_orig_mod.`` (``torch.compile``); wrapped in a dict under ``'g_ema'``, ``'G'``,
    ``'generator'`` or ``'state_dict'`` (looked for in that order, so a training checkpoint
    ``{'G': ..., 'g_ema': ..., 'D': ..., 'optimizer': ...}`` gives the EMA generator); and any
    nesting of these up to four deep (``{'state_dict': {'module.layer1.conv.weight': ...}}``).

    Raises:
      ValueError naming ``source`` and listing the top-level keys found, for anything else.
    """
    top = obj
    path: list[str] = []
    for _ in range(_MAX_WRAPPING + 1):
        if not isinstance(obj, Mapping):
            where = f" under {'/'.join(repr(p) for p in path)}" if path else ""
            raise ValueError(f"{source}: holds a {type(obj).__name__}{where}, not a generator state dict")
        obj = _strip_prefixes(obj)
        if _is_generator_state_dict(obj):
            return obj
        wrapper = next((k for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        path.append(wrapper)
        obj = obj[wrapper]
    where = f" (looked inside {'/'.join(repr(p) for p in path)}, keys {_keys_text(obj)})" if path else ""
    raise ValueError(
        f"{source}: not a Progressive GAN generator state dict, nor one wrapped as training "
        "code saves it; top-level keys: "
        f"{_keys_text(top) if isinstance(top, Mapping) else type(top).__name__}{where}. Accepted: a "
        "state dict with 'layer1.conv.weight' (or 'features.0.conv.weight'), keys optionally "
        f"prefixed by {' or '.join(repr(p) for p in STATE_DICT_PREFIXES)}, optionally wrapped as "
        f"{{{' | '.join(repr(k) for k in STATE_DICT_WRAPPERS)}: state_dict}}"
    )


def params_from_state_dict(
    state_dict: Mapping[str, Any], source: str = "state dict"
) -> tuple[dict, GeneratorConfig]:
    """Convert a reference ``ProgressiveGenerator`` state dict to ``(params, config)``.

    Accepts ``layerK.*`` / ``output_RxR.*`` names or the older ``features.N.*`` / ``output.*``,
    wrapped or prefixed as training code saves them (see :func:`unwrap_state_dict`); tensors are
    numpy arrays in PyTorch layout. Sizes are inferred from the conv weights as the reference's
    ``sizes_from_state_dict`` does.

    Raises:
      ValueError naming ``source`` and the key (and both shapes) for a missing, mis-shaped or
      unexpected tensor, or listing the top-level keys when no generator state dict is found.
    """
    state_dict = unwrap_state_dict(state_dict, source)
    if "features.0.conv.weight" in state_dict:
        state_dict = _rename_old_state_dict(state_dict)
    config = GeneratorConfig(sizes=_sizes_from_state_dict(state_dict, source))
    expected = _expected_state_shapes(config)
    for key, shape in expected.items():
        if key not in state_dict:
            raise ValueError(f"{source}: missing tensor {key!r} (expected shape {shape})")
        actual = tuple(np.shape(state_dict[key]))
        if actual != shape:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {actual}, but the architecture inferred from "
                f"the conv weights (sizes {list(config.sizes)}) needs {shape}"
            )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensors {unexpected[:8]} for a generator with layers "
            f"{', '.join(config.layer_names)}"
        )
    params = {}
    for spec in config.layers:
        weight = np.asarray(state_dict[f"{spec.name}.conv.weight"], dtype=np.float32)
        params[spec.name] = {
            "kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
            "bias": np.asarray(state_dict[f"{spec.name}.wscale.b"], dtype=np.float32),
        }
    return params, config


def state_dict_from_params(params: Mapping, config: GeneratorConfig) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_state_dict`: reference names, OIHW float32 numpy arrays."""
    params = _check_params(params, config)
    state = {}
    for spec in config.layers:
        kernel = np.asarray(params[spec.name]["kernel"], dtype=np.float32)
        state[f"{spec.name}.conv.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        state[f"{spec.name}.wscale.b"] = np.asarray(params[spec.name]["bias"], dtype=np.float32)
    return state


def generator_from_state_dict(
    state_dict: Mapping[str, Any], source: str = "state dict"
) -> ProgressiveGenerator:
    """A :class:`ProgressiveGenerator` from a reference state dict (see :func:`params_from_state_dict`)."""
    params, config = params_from_state_dict(state_dict, source)
    return ProgressiveGenerator(params, config)


# --------------------------------------------------------------------------------------------
# Loading, saving, converting


def _single_pth_in(directory: Path) -> Path | None:
    files = sorted(directory.glob("*.pth"))
    if len(files) == 1:
        return files[0]
    return None


def _load_pth(path: Path) -> ProgressiveGenerator:
    from gandissect_jax.pth import read_pth

    return generator_from_state_dict(read_pth(path), source=str(path))


def load_generator(src: "str | os.PathLike | ProgressiveGenerator") -> ProgressiveGenerator:
    """Load a generator from a ``.pth`` file, an orbax checkpoint directory or a registry name.

    ``.pth`` files may be legacy (PyTorch 0.4) or zip format; they are read without torch.
    Registry names (see ``gandissect-jax weights list``) resolve to their converted checkpoint.

    Raises:
      FileNotFoundError: no such file, directory or registry name (or weights not fetched yet).
      ValueError: not a generator checkpoint, or a missing / mis-shaped tensor (named).
    """
    if isinstance(src, ProgressiveGenerator):
        return src
    from gandissect_jax import checkpoints, weights

    path = Path(weights.resolve(src, kind=CHECKPOINT_KIND))
    if path.is_dir():
        if checkpoints.is_checkpoint(path):
            params, config_dict = checkpoints.load_checkpoint(path)
            config = GeneratorConfig.from_dict(config_dict)
            if not isinstance(params, Mapping):
                raise ValueError(f"{path}: params are a {type(params).__name__}, not a mapping")
            return ProgressiveGenerator(_check_params(params, config, source=str(path)), config)
        pth = _single_pth_in(path)
        if pth is None:
            raise ValueError(
                f"{path} is neither a gandissect-jax checkpoint (config.json + params/) nor a "
                "directory holding exactly one .pth file"
            )
        return _load_pth(pth)
    return _load_pth(path)


def save_generator(G: ProgressiveGenerator, directory: "str | os.PathLike", *, force: bool = False) -> str:
    """Write ``G`` as an orbax checkpoint directory (atomic); returns its absolute path.

    ``directory`` must not exist (or be empty); with ``force=True`` it may also be a checkpoint
    written by this library, which is replaced. Anything else there is refused and left untouched
    (see :mod:`gandissect_jax.checkpoints`).

    Raises:
      gandissect_jax.checkpoints.DestinationError: the destination may not be written.
    """
    from gandissect_jax.checkpoints import save_checkpoint

    params = jax.tree_util.tree_map(np.asarray, G.params)
    return save_checkpoint(directory, params, G.config.to_dict(), force=force)


def convert_reference(src: "str | os.PathLike", dest: "str | os.PathLike", *, force: bool = False) -> str:
    """Convert a reference ``.pth`` (or a directory holding exactly one) into a checkpoint at ``dest``.

    Needs no torch; ``dest`` is written atomically, and nothing is written if ``src`` is invalid.
    The destination is checked before ``src`` is read: it must not exist (or be empty), or --
    with ``force=True`` -- be a checkpoint written by this library; ``src`` and ``dest`` must not
    overlap. Returns the absolute path of ``dest``. This is the registry's converter for
    generators.

    Raises:
      gandissect_jax.checkpoints.DestinationError: ``dest`` may not be written, or overlaps ``src``.
      FileNotFoundError: ``src`` does not exist.
      ValueError (``PthError`` included): ``src`` is not a readable generator checkpoint (named).
    """
    from gandissect_jax.checkpoints import check_destination, check_distinct

    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"no such file or directory: {src}")
    check_distinct(src, dest)
    check_destination(dest, force)
    if src.is_dir():
        pth = _single_pth_in(src)
        if pth is None:
            raise ValueError(f"{src}: expected exactly one .pth file in the directory")
        src = pth
    G = _load_pth(src)
    return save_generator(G, dest, force=force)


def images_to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """Kept for existing callers: :func:`gandissect_jax.images.to_uint8` (the one [-1, 1] -> uint8 rule)."""
    from gandissect_jax.images import to_uint8

    return to_uint8(images)
