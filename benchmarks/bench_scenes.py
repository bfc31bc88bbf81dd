"""Scene world throughput (scenes/s) and demo segmenter throughput (images/s) on the current backend.

    pytest benchmarks/bench_scenes.py
"""

import numpy as np
import pytest

from gandissect_jax.scenes import world


@pytest.mark.parametrize("batch", [64, 256])
def test_world_scenes_per_second(benchmark, batch):
    counter = iter(range(10**9))

    def render():
        start = next(counter) * batch
        return world.render_scenes(0, np.arange(start, start + batch))

    benchmark.extra_info["scenes_per_round"] = batch
    images, labels = benchmark(render)
    assert images.shape == (batch, 64, 64, 3)
    benchmark.extra_info["scenes_per_s"] = batch / benchmark.stats.stats.mean


@pytest.mark.parametrize("batch", [64])
def test_demo_segmenter_images_per_second(benchmark, batch):
    from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter

    try:
        segmenter = load_demo_segmenter("scenes64-segmenter")
    except FileNotFoundError as err:
        pytest.skip(f"demo segmenter not shipped: {err}")
    images, _ = world.render_scenes(0, np.arange(batch))
    segmenter.segment(segmenter.params, images).block_until_ready()  # compile outside the timing
    benchmark(lambda: segmenter.segment(segmenter.params, images).block_until_ready())
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.mean
