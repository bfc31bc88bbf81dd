"""The LSUN-scale dissection's models, shared by the end-to-end suite and the GPU/TPU script.

- Generator: the 256x256 LSUN ProGAN architecture (sizes 512, 512, 512, 512, 512, 256, 128, 64;
  23.0M parameters) with random weights (``init_params``, key 0).
- Segmenter: the unified-parsing UPerNet-50 with random (flax ``init``, key 0) weights and a
  synthetic vocabulary of the real ``upp-resnet50-upernet`` sizes: 335 objects, 25 materials and
  28 parts of sky, building and person (every head the real size, so every convolution is); with
  ``segdiv="quad"`` that is 1 + 5 x 335 + 25 + 28 = 1,729 labels. The real ``labels.json`` ships
  with the weights, which cannot be downloaded here; throughput does not depend on the names.
- Measurement helpers: the FLOPs of a jitted call (XLA's cost analysis), a ``jnp.dot`` 4096 x
  4096 float32 (or bfloat16) peak, and the process's peak RSS.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LSUN_SIZES = (512, 512, 512, 512, 512, 256, 128, 64)
NUM_OBJECTS, NUM_MATERIALS, PARTS = 335, 25, {"sky": 2, "building": 16, "person": 10}


def quad_labeldata() -> dict:
    """A labels.json of the real vocabulary's sizes (1,729 labels with ``segdiv='quad'``)."""
    objects = ["-", "sky", "building", "person"] + [f"object{i}" for i in range(NUM_OBJECTS - 3)]
    return {"object": objects, "material": ["-"] + [f"material{i}" for i in range(NUM_MATERIALS)],
            "part": [f"{owner}-part{i}" for owner, n in PARTS.items() for i in range(n)],
            "scene": [f"scene{i}" for i in range(365)],
            "object_part": {owner: [f"{owner}-part{i}" for i in range(n)] for owner, n in PARTS.items()}}


def lsun_generator():
    """ProgressiveGenerator at the LSUN 256x256 architecture, random weights (key 0)."""
    from gandissect_jax.proggan import GeneratorConfig, ProgressiveGenerator, init_params

    config = GeneratorConfig(sizes=LSUN_SIZES)
    return ProgressiveGenerator(init_params(jax.random.key(0), config), config)


def upernet_segmenter(segdiv: str = "quad", segsizes=(256,)):
    """UnifiedParsingSegmenter (UPerNet-50) with random weights and :func:`quad_labeldata`."""
    from gandissect_jax.segmenter import UnifiedParsingSegmenter
    from gandissect_jax.segmenter.unified import build_label_scheme
    from gandissect_jax.segmenter.upernet import UnifiedParsingNetwork

    labeldata = quad_labeldata()
    heads = build_label_scheme(labeldata, segdiv).heads
    variables = jax.jit(UnifiedParsingNetwork(heads).init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return UnifiedParsingSegmenter(variables, labeldata, segdiv=segdiv, segsizes=segsizes)


def flops(fn: Callable, *args) -> float:
    """FLOPs of one call of ``jax.jit(fn)(*args)`` by XLA's cost analysis (nan when unavailable)."""
    try:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - cost analysis is optional on some backends
        return float("nan")


def timed(fn: Callable, *args, rounds: int = 3) -> tuple[float, float]:
    """(compile + first call s, median steady s) of ``fn(*args)`` with block_until_ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def matmul_peak(dtype=jnp.float32, size: int = 4096, rounds: int = 5) -> float:
    """Achieved GFLOP/s of ``jnp.dot`` of two ``size x size`` matrices (best of ``rounds``)."""
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (``ru_maxrss``; KB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024

