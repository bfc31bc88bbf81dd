"""Images per second of the ProGAN generator at the released 256x256 LSUN architecture.

Architecture: sizes [512, 512, 512, 512, 512, 256, 128, 64] (Karras et al.'s channel schedule, as
inferred from the released ``*_lsun.pth`` files; 23.0M parameters), random weights (throughput does
not depend on them). For each batch size the XLA compile time is measured separately
(``extra_info['compile_s']``) and the timed rounds run the compiled executable only.

With ``$GANDISSECT_REFERENCE`` set and torch installed, the reference ``ProgressiveGenerator``
runs on the same z with the same weights in the same session (``test_reference_...``); its output
is checked against ours first. Round counts are small because one 256x256 image costs about
60 GFLOP: set ``GANDISSECT_BENCH_ROUNDS`` to override.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import pytest

from gandissect_jax.proggan import GeneratorConfig, ProgressiveGenerator, init_params, state_dict_from_params
from gandissect_jax.sampling import sample_z

LSUN_SIZES = (512, 512, 512, 512, 512, 256, 128, 64)
BATCHES = (1, 8, 32, 64)
DEFAULT_ROUNDS = {1: 5, 8: 3, 32: 2, 64: 2}


def rounds_for(batch: int) -> int:
    override = os.environ.get("GANDISSECT_BENCH_ROUNDS")
    return int(override) if override else DEFAULT_ROUNDS[batch]


@pytest.fixture(scope="module")
def lsun_generator() -> ProgressiveGenerator:
    config = GeneratorConfig(sizes=LSUN_SIZES)
    return ProgressiveGenerator(init_params(jax.random.key(0), config), config)


@pytest.mark.parametrize("batch", BATCHES)
def test_generator_images_per_second(benchmark, lsun_generator, batch):
    G = lsun_generator
    z = sample_z(batch, G.z_dim, seed=1)
    start = time.perf_counter()
    compiled = jax.jit(G.apply).lower(G.params, z).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    first = compiled(G.params, z).block_until_ready()
    first_call_s = time.perf_counter() - start
    assert first.shape == (batch, 256, 256, 3) and bool(np.isfinite(np.asarray(first)).all())

    benchmark.group = f"generator 256x256 batch {batch}"
    benchmark.pedantic(lambda: compiled(G.params, z).block_until_ready(),
                       rounds=rounds_for(batch), iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        implementation="gandissect-jax",
        batch=batch,
        compile_s=round(compile_s, 3),
        first_call_s=round(first_call_s, 3),
        images_per_s=round(batch / mean, 3),
        params=sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(G.params)),
    )


@pytest.mark.parametrize("batch", BATCHES)
def test_reference_images_per_second(benchmark, lsun_generator, batch):
    from reference_harness import import_reference

    proggan = import_reference("netdissect.proggan")
    import torch

    G = lsun_generator
    reference = proggan.ProgressiveGenerator(sizes=list(LSUN_SIZES)).eval()
    state = state_dict_from_params(G.params, G.config)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    z = sample_z(batch, G.z_dim, seed=1)
    z_torch = torch.from_numpy(z)

    def run():
        with torch.no_grad():
            return reference(z_torch)

    if batch == 1:  # same computation: check before timing
        ours = np.asarray(G(z))
        theirs = run().permute(0, 2, 3, 1).numpy()
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()

    benchmark.group = f"generator 256x256 batch {batch}"
    benchmark.pedantic(run, rounds=rounds_for(batch), iterations=1, warmup_rounds=1 if batch == 1 else 0)
    benchmark.extra_info.update(
        implementation="reference (PyTorch %s, %d threads)" % (torch.__version__, torch.get_num_threads()),
        batch=batch,
        images_per_s=round(batch / benchmark.stats.stats.mean, 3),
    )
