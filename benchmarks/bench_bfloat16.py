"""bfloat16 against float32 on the shipped demo pair: speed, and whether the units' labels change.

Dissects the demo generator's layers (``scenes64``, layer4 and layer6, with the demo segmenter)
over ``GANDISSECT_BENCH_BF16_SAMPLES`` samples (default 512) with ``compute_dtype='float32'``
and ``'bfloat16'``, timed alternately (``GANDISSECT_BENCH_ROUNDS`` rounds, default 2; the first
run of each pays compilation and is not timed), and compares per unit: the top concept
(``unit_label``), whether the unit is interpretable, and its IoU. Writes
``benchmarks/results/bf16-demo-n<N>.json``.

    python benchmarks/bench_bfloat16.py --samples 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
LAYERS = ("layer4", "layer6")


def compare(samples: int, rounds: int, batch_size: int = 64, micro_batch: int = 32) -> dict:
    import gandissect_jax
    from gandissect_jax.dissection import dissect_generator

    from bench_lsun_dissect import machine

    G = gandissect_jax.load_generator("scenes64")
    S = gandissect_jax.load_segmenter("scenes64-segmenter")

    def run(dtype):
        return dissect_generator(G, S, list(LAYERS), size=samples, batch_size=batch_size, micro_batch=micro_batch,
                                 compute_dtype=dtype, progress=False, make_images=False, make_report=False)

    results = {dtype: run(dtype) for dtype in ("float32", "bfloat16")}  # compile
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(rounds):
        for dtype in times:
            start = time.perf_counter()
            run(dtype)
            times[dtype].append(time.perf_counter() - start)
    layers = {}
    for layer in LAYERS:
        a, b = results["float32"][layer], results["bfloat16"][layer]
        same_label = a.unit_label == b.unit_label
        interpretable, interpretable_low = a.interpretable(), b.interpretable()
        layers[layer] = {
            "units": int(a.num_units),
            "top_concept_changed": int((~same_label).sum()),
            "interpretable_float32": int(interpretable.sum()),
            "interpretable_bfloat16": int(interpretable_low.sum()),
            "interpretable_top_concept_changed": int((~same_label & interpretable).sum()),
            "interpretable_status_changed": int((interpretable != interpretable_low).sum()),
            "unit_iou_max_abs_diff": float(np.abs(np.asarray(a.unit_iou) - np.asarray(b.unit_iou)).max()),
            "changed_units": [{"unit": int(u), "float32": a.label_names[a.unit_label[u]],
                               "bfloat16": b.label_names[b.unit_label[u]], "iou_float32": float(a.unit_iou[u]),
                               "iou_bfloat16": float(b.unit_iou[u])} for u in np.flatnonzero(~same_label)],
        }
    median = {dtype: float(np.median(t)) for dtype, t in times.items()}
    return {"samples": samples, "layers": layers, "seconds": times, "samples_per_s": {
        dtype: samples / t for dtype, t in median.items()},
        "speedup_bfloat16": float(np.median(np.array(times["float32"]) / np.array(times["bfloat16"]))),
        "machine": machine()}


def test_bfloat16_keeps_unit_labels_on_the_demo():
    samples = int(os.environ.get("GANDISSECT_BENCH_BF16_SAMPLES", "512"))
    figures = compare(samples, int(os.environ.get("GANDISSECT_BENCH_ROUNDS", "2")))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"bf16-demo-n{samples}.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k != "layers"}, indent=1))
    for layer, info in figures["layers"].items():
        print(layer, {k: v for k, v in info.items() if k != "changed_units"})
    assert all(info["units"] > 0 for info in figures["layers"].values())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(compare(args.samples, args.rounds), indent=1))
