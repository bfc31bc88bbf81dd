"""Latent sampling identical to the reference's ``netdissect.zdataset.standard_z_sample``.

The same ``(n, dim, seed)`` gives bit-identical z, so the same images as the PyTorch reference;
the first ``m`` rows do not depend on ``n``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sample_z"]


def sample_z(n: int, dim: int, seed: int = 1) -> np.ndarray:
    """Standard-normal latents ``(n, dim)`` float32 from ``numpy.random.RandomState(seed)``.

    Draws ``n * dim`` float64 normals, reshapes row-major and rounds to float32, exactly as the
    reference (so row ``i`` is the same for any ``n > i``).
    """
    n, dim = int(n), int(dim)
    if n < 0 or dim <= 0:
        raise ValueError(f"sample_z needs n >= 0 and dim > 0, got n={n}, dim={dim}")
    rng = np.random.RandomState(seed)
    return rng.standard_normal(n * dim).reshape(n, dim).astype(np.float32)
