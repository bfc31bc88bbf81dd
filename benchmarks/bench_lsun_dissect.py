"""The real job end to end: dissect layer4 of an LSUN 256x256 ProGAN with the unified-parsing
segmenter in quad mode (1,729 labels), IQR thresholds, strips and report, on this machine.

Models: :mod:`lsun_setup` (random LSUN-architecture generator, UPerNet-50 with random weights and
the real vocabulary's sizes). Segmentation as the paper's GAN setting: ``segsizes=(256,)``,
``seg_downsample=2`` (labels at 128x128). Each configuration runs in its own process so that
its peak RSS (``ru_maxrss``, JAX/XLA included) is its own:

    python benchmarks/bench_lsun_dissect.py run --samples 16 [--micro-batch 4] [--dtype bfloat16]
    python benchmarks/bench_lsun_dissect.py segbatch --batch 8      # segmenter alone at one batch

``pytest benchmarks/bench_lsun_dissect.py`` runs ``GANDISSECT_BENCH_LSUN_SAMPLES`` samples
(default 16) in float32 and bfloat16, and the segmenter at ``GANDISSECT_BENCH_SEG_BATCHES``
(default 4,8,16,32; a batch whose estimated peak exceeds ``GANDISSECT_BENCH_MEMORY_BUDGET`` GB,
default 8, is skipped), and writes the JSON figures to ``benchmarks/results/``.

Per-component split: the run's wall time is measured end to end; the generator (the features-only
head to layer4 in the 3 quantile passes, the full generator in the count pass), the segmenter
and the strips/report are timed on their own (same micro-batch, compiled programs, median of
rounds) and scaled to the run; *statistics* is the remainder (the tally steps, the IQR search,
label scoring and every compile). GFLOP/s per component: XLA's cost analysis of the component's
program over its measured time, against ``jnp.dot`` of two 4096 x 4096 matrices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent / "results"
QUANTILE_PASSES = 3  # threshold='iqr': exact quantiles in 3 radix stages, each a features-only pass


# --------------------------------------------------------------------------- one run (in its own process)


def run_end_to_end(samples: int, micro_batch: int, batch_size: int, dtype: str, layer: str = "layer4",
                   strips: bool = True, devices=None) -> dict:
    """Dissect ``layer`` of the LSUN pair over ``samples`` samples; figures as a JSON-able dict."""
    import jax
    import jax.numpy as jnp

    import importlib

    import lsun_setup
    from gandissect_jax.dissection import dissect_generator
    from gandissect_jax.dissection.sources import cast_floats, segment, split_at

    G, S = lsun_setup.lsun_generator(), lsun_setup.upernet_segmenter("quad", (256,))
    dissect_module = importlib.import_module("gandissect_jax.dissection.dissect")
    timers = {"strips": 0.0, "report": 0.0}

    def timed_call(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - start
        return wrapper

    originals = dissect_module.write_strips, dissect_module.write_report
    dissect_module.write_strips = timed_call("strips", originals[0])
    dissect_module.write_report = timed_call("report", originals[1])
    try:
        with tempfile.TemporaryDirectory() as outdir:
            start = time.perf_counter()
            result = dissect_generator(G, S, [layer], size=samples, seg_downsample=2, micro_batch=micro_batch,
                                       batch_size=batch_size, compute_dtype=dtype, outdir=outdir, progress=False,
                                       devices=devices, make_images=strips, checkpoint_every=3600)[layer]
            total = time.perf_counter() - start
    finally:
        dissect_module.write_strips, dissect_module.write_report = originals
    rss_run = lsun_setup.peak_rss_mb()

    # components alone, at the run's micro-batch and dtype
    low = jnp.dtype(dtype)
    head, tail = split_at(G, layer)
    z = jnp.asarray(np.random.RandomState(0).standard_normal((micro_batch, G.z_dim)), jnp.float32)

    def gen_head(params, z):
        return head(cast_floats(params, low), z.astype(low))[0]

    def gen_full(params, z):
        return G.apply(cast_floats(params, low), z.astype(low))

    images = jnp.clip(jax.jit(G.apply)(G.params, z), -1, 1)

    def seg(params, images):
        return segment(S, cast_floats(params, low), images.astype(low), 2)

    parts = {"generator_head": (gen_head, (G.params, z)), "generator": (gen_full, (G.params, z)),
             "segmenter": (seg, (S.params, images))}
    components = {}
    for name, (fn, args) in parts.items():
        first, steady = lsun_setup.timed(jax.jit(fn), *args, rounds=2)
        components[name] = {"s_per_sample": steady / micro_batch, "compile_s": max(first - steady, 0.0),
                            "gflop_per_sample": lsun_setup.flops(fn, *args) / micro_batch / 1e9}
    peak = lsun_setup.matmul_peak(jnp.float32)
    peak_low = lsun_setup.matmul_peak(low) if dtype != "float32" else peak
    gen_s = samples * (QUANTILE_PASSES * components["generator_head"]["s_per_sample"]
                       + components["generator"]["s_per_sample"])
    seg_s = samples * components["segmenter"]["s_per_sample"]
    split = {"generator": gen_s, "segmenter": seg_s, "strips": timers["strips"], "report": timers["report"]}
    split["statistics"] = max(total - sum(split.values()), 0.0)
    gflops = {name: c["gflop_per_sample"] / c["s_per_sample"] for name, c in components.items()}
    floor_s = (QUANTILE_PASSES * components["generator_head"]["gflop_per_sample"]
               + components["generator"]["gflop_per_sample"]
               + components["segmenter"]["gflop_per_sample"]) / peak_low
    return {
        "samples": samples, "micro_batch": micro_batch, "batch_size": batch_size, "dtype": dtype, "layer": layer,
        "strips": strips, "units": int(result.num_units), "labels": len(S.labels),
        "total_s": total, "samples_per_s": samples / total, "peak_rss_mb": rss_run,
        "split_s": split, "split_fraction": {k: v / total for k, v in split.items()},
        "components": components, "gflops": gflops, "matmul_peak_gflops": peak, "matmul_peak_gflops_dtype": peak_low,
        "fraction_of_peak": {k: v / peak_low for k, v in gflops.items()},
        "compute_floor_s_per_sample": floor_s,
        "machine": machine(),
    }


def segmenter_batch(batch: int, dtype: str = "float32", rounds: int = 2) -> dict:
    """Images/s and peak RSS of the quad UPerNet at 256x256 (labels at 128x128) at one batch size."""
    import jax
    import jax.numpy as jnp

    import lsun_setup
    from gandissect_jax.dissection.sources import cast_floats, segment

    S = lsun_setup.upernet_segmenter("quad", (256,))
    low = jnp.dtype(dtype)
    images = jnp.asarray(np.tanh(np.random.RandomState(0).standard_normal((batch, 256, 256, 3))), jnp.float32)
    fn = jax.jit(lambda p, x: segment(S, cast_floats(p, low), x.astype(low), 2))
    first, steady = lsun_setup.timed(fn, S.params, images, rounds=rounds)
    return {"batch": batch, "dtype": dtype, "images_per_s": batch / steady, "s_per_image": steady / batch,
            "compile_s": max(first - steady, 0.0), "peak_rss_mb": lsun_setup.peak_rss_mb(), "machine": machine()}


def machine() -> dict:
    import platform

    import jax

    from conftest import cpu_model

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "loadavg": [round(x, 2) for x in load]}


def in_subprocess(*args: str, timeout: float = 3600) -> dict:
    """Run this file's command line in a fresh process; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, __file__, *args, "--json", out.name], capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def save(name: str, figures: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=1))


def markdown_row(r: dict) -> str:
    f = r["gflops"]
    return (f"| {r['samples']} | {r['dtype']} | {r['samples_per_s']:.3f} | {r['peak_rss_mb']:,.0f} MB | "
            + " / ".join(f"{100 * r['split_fraction'][k]:.0f}%" for k in ("generator", "segmenter", "statistics",
                                                                         "strips", "report"))
            + f" | {f['generator']:.0f} / {f['segmenter']:.0f} of {r['matmul_peak_gflops_dtype']:.0f} "
            f"| {r['machine']['loadavg'][0]} |")


# --------------------------------------------------------------------------- pytest suite


def _env_list(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lsun_dissection_end_to_end(dtype):
    samples = _env_list("GANDISSECT_BENCH_LSUN_SAMPLES", "16")[0]
    figures = in_subprocess("run", "--samples", str(samples), "--micro-batch", "4", "--batch-size", "16",
                            "--dtype", dtype)
    save(f"lsun-e2e-{dtype}-n{samples}", figures)
    print("\n" + markdown_row(figures))
    assert figures["units"] == 512 and figures["labels"] == 1729
    assert figures["samples_per_s"] > 0 and math.isfinite(figures["peak_rss_mb"])


# approximate peak RSS of the segmenter alone at 256x256 (measured on CPU: 2.0, 3.0 and 5.1 GB at
# batch 4, 8 and 16: about 0.26 GB per image plus 1 GB for JAX, the weights and XLA's buffers)
def _estimated_segmenter_gb(batch: int) -> float:
    return 1.0 + 0.26 * batch


@pytest.mark.parametrize("batch", _env_list("GANDISSECT_BENCH_SEG_BATCHES", "4,8,16,32"))
def test_segmenter_throughput_vs_memory(batch):
    budget = float(os.environ.get("GANDISSECT_BENCH_MEMORY_BUDGET", "8"))
    if _estimated_segmenter_gb(batch) > budget:
        pytest.skip(f"batch {batch}: estimated {_estimated_segmenter_gb(batch):.1f} GB exceeds the "
                    f"{budget:g} GB budget (GANDISSECT_BENCH_MEMORY_BUDGET)")
    figures = in_subprocess("segbatch", "--batch", str(batch))
    save(f"lsun-segmenter-b{batch}", figures)
    print(f"\nbatch {batch}: {figures['images_per_s']:.3f} images/s, peak RSS {figures['peak_rss_mb']:,.0f} MB, "
          f"load {figures['machine']['loadavg'][0]}")
    assert figures["images_per_s"] > 0


def test_reference_end_to_end():
    """The reference's generator, segmenter and IQR statistics on the same z (see reference_lsun.py)."""
    from reference_harness import skip_reason

    reason = skip_reason()
    if reason is not None:
        pytest.skip(f"reference not available: {reason}")
    import reference_lsun

    samples = _env_list("GANDISSECT_BENCH_LSUN_SAMPLES", "16")[0]
    figures = reference_lsun.interleaved(samples, lambda: in_subprocess(
        "run", "--samples", str(samples), "--micro-batch", "4", "--batch-size", "16", "--dtype", "float32"))
    save(f"lsun-e2e-reference-n{samples}", figures)
    assert figures["reference_samples_per_s"] > 0


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one end-to-end dissection")
    run.add_argument("--samples", type=int, default=16)
    run.add_argument("--micro-batch", type=int, default=4)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    run.add_argument("--no-strips", action="store_true")
    seg = sub.add_parser("segbatch", help="the segmenter alone at one batch size")
    seg.add_argument("--batch", type=int, required=True)
    seg.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    for p in (run, seg):
        p.add_argument("--json", help="write the figures here (default: print)")
    args = parser.parse_args(argv)
    if args.command == "run":
        figures = run_end_to_end(args.samples, args.micro_batch, args.batch_size, args.dtype,
                                 strips=not args.no_strips)
    else:
        figures = segmenter_batch(args.batch, args.dtype)
    text = json.dumps(figures, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
