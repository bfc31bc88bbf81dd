"""The reference's end-to-end GAN dissection (CSAILVision/gandissect ``netdissect.dissection.dissect``) on the
LSUN pair of :mod:`lsun_setup`, timed alternately with ours (:func:`interleaved`).

What runs on the reference side is what ``python -m netdissect --gen --model ... --layers layer4``
runs: an ``InstrumentedModel`` retaining layer4 of the reference ``ProgressiveGenerator`` (loaded
with *our* generator's weights, so both sides see the same images), ``z_dataset_for_model``
(seed 1, and seed 2 for the train set, as the reference), ``GeneratorSegRunner`` around the
reference ``UnifiedParsingSegmenter(segsizes=[256], segdiv='quad')`` and ``dissect(...,
quantile_threshold='iqr', examples_per_unit=10, make_images=True, make_report=True)``.

The reference segmenter is built with the same vocabulary (:func:`lsun_setup.quad_labeldata`,
1,729 labels) but with PyTorch's own random initialisation: converting our flax weights into its
state dict is not done here, so its labels differ from ours and only the timings are comparable
(the work per sample does not depend on the weights). Its CUDA-only PrRoI pooling is replaced by
``prroi_torch_cpu`` and ``.cuda()`` is the identity (:mod:`reference_harness`).

Run on 2026-12-01 at N = 4, 16 and 256 (benchmarks/README.md, "The real job end to end");
``bench_lsun_dissect.py::test_reference_end_to_end`` skips with the reason when
``$GANDISSECT_REFERENCE`` is unset. The reference's worker pool forks a process that can keep the
interpreter from exiting after the run (a standalone script hung at exit once; pytest does not).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import numpy as np

import lsun_setup


def reference_pipeline():
    """(run(samples, outdir) -> seconds) of the reference's GAN dissection on the LSUN pair."""
    import prroi_torch_cpu
    from reference_harness import import_reference

    extra = {"netdissect.upsegmodel.prroi_pool": prroi_torch_cpu}
    proggan = import_reference("netdissect.proggan", extra_modules=extra)
    dissection = import_reference("netdissect.dissection", extra_modules=extra)
    nethook = import_reference("netdissect.nethook", extra_modules=extra)
    zdataset = import_reference("netdissect.zdataset", extra_modules=extra)
    segmenter_module = import_reference("netdissect.segmenter", extra_modules=extra)
    upsegmodel = import_reference("netdissect.upsegmodel", extra_modules=extra)
    resnet = import_reference("netdissect.upsegmodel.resnet", extra_modules=extra)
    import torch

    from gandissect_jax.proggan import state_dict_from_params

    G = lsun_setup.lsun_generator()
    generator = proggan.ProgressiveGenerator(sizes=list(lsun_setup.LSUN_SIZES)).eval()
    generator.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                               state_dict_from_params(G.params, G.config).items()})
    model = nethook.InstrumentedModel(generator).eval()
    model.retain_layer("layer4")

    labeldata = lsun_setup.quad_labeldata()
    nr_classes = {k: len(labeldata[k]) for k in ("object", "scene", "material")}
    nr_classes["part"] = sum(len(p) for p in labeldata["object_part"].values())
    encoder = upsegmodel.models.Resnet(resnet.resnet50(pretrained=False))
    decoder = upsegmodel.ModelBuilder().build_decoder(arch="upernet", fc_dim=2048, use_softmax=True,
                                                      nr_classes=nr_classes)
    network = upsegmodel.SegmentationModule(encoder, decoder, labeldata).eval()
    network.categories = ["object", "part", "material"]
    segmenter_module.load_unified_parsing_segmentation_model = lambda *args: network
    segmenter = segmenter_module.UnifiedParsingSegmenter(segsizes=[256], segdiv="quad")
    # its numpy-2 cache writer fails and the caches are unused; it also made the layer directories
    dissection.save_state_dict = lambda obj, path: os.makedirs(os.path.dirname(path), exist_ok=True)

    def run(samples: int, outdir: str) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            dissection.dissect(outdir, model, zdataset.z_dataset_for_model(model, samples),
                               train_dataset=zdataset.z_dataset_for_model(model, samples, seed=2),
                               segrunner=dissection.GeneratorSegRunner(segmenter), examples_per_unit=10,
                               quantile_threshold="iqr", make_images=True, make_labels=True, make_maxiou=False,
                               make_covariance=False, make_report=True, make_row_images=True,
                               make_single_images=True, batch_size=8, num_workers=0, settings={})
        return time.perf_counter() - start

    return run


def interleaved(samples: int, ours: Callable[[], dict], rounds: int = 1) -> dict:
    """Ours (a subprocess run's figures) and the reference, alternately; the median ratio."""
    reference = reference_pipeline()
    ours_runs, reference_s = [], []
    for _ in range(rounds):
        ours_runs.append(ours())
        with tempfile.TemporaryDirectory() as outdir:
            reference_s.append(reference(samples, outdir))
    ours_s = [r["total_s"] for r in ours_runs]
    return {"samples": samples, "ours_s": ours_s, "reference_s": reference_s,
            "ours_samples_per_s": samples / float(np.median(ours_s)),
            "reference_samples_per_s": samples / float(np.median(reference_s)),
            "speedup_median": float(np.median(np.array(reference_s) / np.array(ours_s))),
            "ours": ours_runs[-1], "machine": ours_runs[-1]["machine"]}
