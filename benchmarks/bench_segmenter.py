"""Images per second of the unified-parsing segmenter (UPerNet-50) at 256x256, undivided.

Weights: the golden synthetic recipe (tests/fixtures/segmenter/golden_recipe.py; throughput does
not depend on the values, but the recipe keeps the softmax unsaturated so the reference check
below is meaningful). ``segsizes=(256,)``, ``downsample=1``: the reference's default settings.
We time ``S.segment(S.params, images)`` -- the public call, including input validation -- after one
warm-up call; the XLA compile time is reported separately in ``extra_info['compile_s']``.

With ``$GANDISSECT_REFERENCE`` set and torch importable, the reference ``UnifiedParsingSegmenter``
runs ``segment_batch`` under ``torch.no_grad()`` on the same images and weights in the same
session (its PrRoI pooling replaced by ``prroi_torch_cpu``, ``.cuda()`` the identity); its labels
are first checked against ours. Because a shared machine's load drifts between tests, the
reference test also times both implementations alternately and records the median ratio
(``extra_info['interleaved_speedup_median']``). Set ``GANDISSECT_BENCH_ROUNDS`` to change the
round counts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.segmenter import UnifiedParsingSegmenter
from gandissect_jax.segmenter.convert import state_dicts_to_variables

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "segmenter"))
import golden_recipe  # noqa: E402

SIZE = 256
BATCHES = (8, 32)
DEFAULT_ROUNDS = {8: 3, 32: 2}


def rounds_for(batch: int) -> int:
    override = os.environ.get("GANDISSECT_BENCH_ROUNDS")
    return int(override) if override else DEFAULT_ROUNDS[batch]


def smooth_images(batch: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """float32 (batch, size, size, 3) in [-1, 1]: tanh of low-frequency cosine sums."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((batch, size, size, 3))
    for _ in range(6):
        fy, fx = rng.uniform(0.5, 4, size=(2, batch, 1, 1, 3))
        phase = rng.uniform(0, 2 * np.pi, size=(batch, 1, 1, 3))
        out += rng.uniform(0.3, 1.0) * np.cos(2 * np.pi * (fy * yy[None, :, :, None]
                                                           + fx * xx[None, :, :, None]) + phase)
    return np.tanh(out).astype(np.float32)


@pytest.fixture(scope="module")
def labeldata():
    import json

    with open(ROOT / "tests" / "fixtures" / "segmenter" / "labels.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def state_dicts():
    return golden_recipe.build_state_dicts()


@pytest.fixture(scope="module")
def segmenter(state_dicts, labeldata):
    variables = state_dicts_to_variables(*state_dicts, labeldata)
    return UnifiedParsingSegmenter(variables, labeldata, segdiv="undivided", segsizes=(SIZE,))


@pytest.mark.parametrize("batch", BATCHES)
def test_segmenter_images_per_second(benchmark, segmenter, batch):
    images = jnp.asarray(smooth_images(batch))
    start = time.perf_counter()
    first = segmenter.segment(segmenter.params, images).block_until_ready()
    first_call_s = time.perf_counter() - start
    assert first.shape == (batch, SIZE, SIZE, 3)
    start = time.perf_counter()
    segmenter.segment(segmenter.params, images).block_until_ready()
    steady_s = time.perf_counter() - start

    benchmark.group = f"segmenter 256x256 batch {batch}"
    benchmark.pedantic(lambda: segmenter.segment(segmenter.params, images).block_until_ready(),
                       rounds=rounds_for(batch), iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        implementation="gandissect-jax",
        backend=jax.default_backend(),
        batch=batch,
        compile_s=round(max(first_call_s - steady_s, 0.0), 3),
        images_per_s=round(batch / mean, 3),
    )


def _reference_segmenter(state_dicts, labeldata):
    import prroi_torch_cpu
    from reference_harness import import_reference

    extra = {"netdissect.upsegmodel.prroi_pool": prroi_torch_cpu}
    segmenter_module = import_reference("netdissect.segmenter", extra_modules=extra)
    upsegmodel = import_reference("netdissect.upsegmodel", extra_modules=extra)
    resnet = import_reference("netdissect.upsegmodel.resnet", extra_modules=extra)
    import torch

    nr_classes = {k: len(labeldata[k]) for k in ("object", "scene", "material")}
    nr_classes["part"] = sum(len(p) for p in labeldata["object_part"].values())
    # the reference loader's calls, minus its file I/O (build_encoder would fetch ImageNet weights
    # when given no file): same classes, our weights loaded strictly
    encoder = upsegmodel.models.Resnet(resnet.resnet50(pretrained=False))
    decoder = upsegmodel.ModelBuilder().build_decoder(
        arch="upernet", fc_dim=2048, use_softmax=True, nr_classes=nr_classes)
    encoder.load_state_dict({k: torch.from_numpy(v) for k, v in state_dicts[0].items()})
    decoder.load_state_dict({k: torch.from_numpy(v) for k, v in state_dicts[1].items()})
    model = upsegmodel.SegmentationModule(encoder, decoder, labeldata)
    model.categories = ["object", "part", "material"]
    model.eval()
    segmenter_module.load_unified_parsing_segmentation_model = lambda *args: model
    return segmenter_module.UnifiedParsingSegmenter(segsizes=[SIZE])


@pytest.mark.parametrize("batch", BATCHES)
def test_reference_images_per_second(benchmark, segmenter, state_dicts, labeldata, batch):
    reference = _reference_segmenter(state_dicts, labeldata)
    import torch

    images = smooth_images(batch)
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    def run():
        with torch.no_grad():
            return reference.segment_batch(torch_images)

    ours = np.asarray(segmenter.segment(segmenter.params, jnp.asarray(images))).transpose(0, 3, 1, 2)
    theirs = run().numpy()
    agreement = float((ours == theirs).mean())
    assert agreement >= 0.999, f"labels agree on only {agreement:.4%} of pixels"

    benchmark.group = f"segmenter 256x256 batch {batch}"
    benchmark.pedantic(run, rounds=rounds_for(batch), iterations=1)
    mean = benchmark.stats.stats.mean

    # On a shared machine the load drifts between tests, so also time the two implementations
    # alternately, round by round, and report the median ratio.
    jax_images = jnp.asarray(images)
    ratios, ours_s, theirs_s = [], [], []
    for _ in range(rounds_for(batch)):
        start = time.perf_counter()
        segmenter.segment(segmenter.params, jax_images).block_until_ready()
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        run()
        theirs_s.append(time.perf_counter() - start)
        ratios.append(theirs_s[-1] / ours_s[-1])
    benchmark.extra_info.update(
        implementation="reference (PyTorch, CPU PrRoI stand-in)",
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        batch=batch,
        images_per_s=round(batch / mean, 3),
        label_agreement_with_ours=agreement,
        interleaved_ours_images_per_s=round(batch / float(np.mean(ours_s)), 3),
        interleaved_reference_images_per_s=round(batch / float(np.mean(theirs_s)), 3),
        interleaved_speedup_median=round(float(np.median(ratios)), 3),
    )
