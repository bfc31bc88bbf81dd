"""Convert generator images in [-1, 1] to uint8 pixels: the one rule every PNG, strip and report uses."""

from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
    """Map float images in [-1, 1] (any shape; numpy or jax) to uint8 [0, 255], rounding half up.

    ``floor(clip((x + 1) * 127.5 + 0.5, 0, 255))`` in float32 on the host, so -1 -> 0, 0 -> 128,
    1 -> 255, and values outside [-1, 1] saturate (generators are unclamped). NaN maps to 0.
    The reference truncates instead (``((x + 1) / 2 * 255).byte()``); the two differ by at most 1.
    uint8 input is returned unchanged (as a numpy array).
    """
    array = np.asarray(images)
    if array.dtype == np.uint8:
        return array
    x = array.astype(np.float32)
    x = np.clip((x + np.float32(1)) * np.float32(127.5) + np.float32(0.5), 0, 255)
    return np.floor(np.nan_to_num(x, nan=0.0)).astype(np.uint8)


__all__ = ["to_uint8"]
