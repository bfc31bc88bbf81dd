"""The Progressive GAN's architecture description: GeneratorConfig (the reference's `sizes`) and its layers."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np



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
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> "GeneratorConfig":
        """Inverse of :meth:`to_dict`. ValueError naming ``source`` (the checkpoint directory) if
        ``data`` is not a ProGAN generator config: another kind or architecture, no ``sizes``,
        ``sizes`` not a list of positive integers or ``output_tanh`` not a boolean (values are
        never converted: 128.5 is not read as 128, nor the string "false" as true)."""
        from gandissect_jax.checkpoints import config_flag, config_sizes

        kind = data.get("kind", CHECKPOINT_KIND)
        architecture = data.get("architecture", ARCHITECTURE)
        if kind != CHECKPOINT_KIND or architecture != ARCHITECTURE:
            raise ValueError(
                f"{source}: checkpoint is a {kind!r}/{architecture!r}, not a {CHECKPOINT_KIND}/{ARCHITECTURE}"
            )
        if "sizes" not in data:
            raise ValueError(f"{source}: generator config has no 'sizes'")
        sizes = config_sizes(data, "sizes", source)
        if len(sizes) < 2:
            raise ValueError(f"{source}/config.json: 'sizes' must list z_dim then at least one channel depth, "
                             f"got {list(sizes)}")
        return cls(sizes=sizes, output_tanh=config_flag(data, "output_tanh", source))
