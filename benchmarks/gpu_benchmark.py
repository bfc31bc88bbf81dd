"""The LSUN-scale dissection on whatever accelerator JAX sees (GPU or TPU; CPU works too), in float32 and
bfloat16: end-to-end samples/s, the per-component split, GFLOP/s per component and its fraction of the
device's measured ``jnp.dot`` peak, and device memory. Writes a JSON file and a markdown table.

Runs unchanged on a GPU or TPU host with the project installed (``pip install -e .`` plus the
matching ``jax[cuda12]`` / ``jax[tpu]``)::

    python benchmarks/gpu_benchmark.py --samples 256 --out benchmarks/results/gpu
    python benchmarks/gpu_benchmark.py --samples 1024 --micro-batch 32 --batch-size 256 --dtypes bfloat16

Every figure is measured on this process's first device; with several local devices the engine
shards samples over all of them (``--devices 1`` keeps one). The model pair and the split's
method are those of ``bench_lsun_dissect.py``: random LSUN ProGAN weights, UPerNet-50 with random
weights and the real 1,729-label quad vocabulary, layer4, IQR thresholds, strips and report.
``--nominal-tflops`` adds the fraction of a datasheet peak (e.g. 989 for an H100 SXM's dense
bfloat16) beside the measured one. ``--labels`` also compares the demo pair's unit labels between
float32 and bfloat16 (``bench_bfloat16.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

COMPONENTS = ("generator", "segmenter", "statistics", "strips", "report")


def device_memory_peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def table(rows: list[dict], nominal_tflops: float | None) -> str:
    head = ("| dtype | samples | samples/s | device peak memory | generator / segmenter / statistics / strips / report "
            "| GFLOP/s generator / segmenter | measured dot peak GFLOP/s | fraction of dot peak (G / S) "
            + ("| fraction of nominal (G / S) " if nominal_tflops else "") + "|")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mem = r.get("device_peak_memory_gb")
        line = (f"| {r['dtype']} | {r['samples']} | {r['samples_per_s']:.2f} | "
                + (f"{mem:.1f} GB" if mem is not None else "n/a") + " | "
                + " / ".join(f"{100 * r['split_fraction'][k]:.0f}%" for k in COMPONENTS) + " | "
                + f"{r['gflops']['generator']:,.0f} / {r['gflops']['segmenter']:,.0f} | "
                + f"{r['matmul_peak_gflops_dtype']:,.0f} | "
                + f"{r['fraction_of_peak']['generator']:.2f} / {r['fraction_of_peak']['segmenter']:.2f} |")
        if nominal_tflops:
            line += (f" {r['gflops']['generator'] / nominal_tflops / 1e3:.2f} / "
                     f"{r['gflops']['segmenter'] / nominal_tflops / 1e3:.2f} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=32, help="samples per generator/segmenter call")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per engine step (all devices)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--devices", type=int, default=None, help="use only the first N local devices")
    parser.add_argument("--nominal-tflops", type=float, default=None, help="datasheet peak, for a second fraction")
    parser.add_argument("--labels", action="store_true", help="also compare the demo's unit labels f32 vs bf16")
    parser.add_argument("--out", default="benchmarks/results/gpu", help="output prefix (.json and .md)")
    args = parser.parse_args(argv)

    import jax

    import bench_lsun_dissect

    rows = []
    for dtype in args.dtypes:
        start = time.perf_counter()
        figures = bench_lsun_dissect.run_end_to_end(args.samples, args.micro_batch, args.batch_size, dtype,
                                                    devices=jax.devices()[:args.devices] if args.devices else None)
        figures["device_peak_memory_gb"] = device_memory_peak_gb()
        figures["wall_s"] = time.perf_counter() - start
        rows.append(figures)
        print(table([figures], args.nominal_tflops), flush=True)
    report = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "device_kind": jax.devices()[0].device_kind, "runs": rows}
    if args.labels:
        import bench_bfloat16

        report["bfloat16_labels"] = bench_bfloat16.compare(512, rounds=1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = (f"Device: {report['device_kind']} x {len(report['devices'])} ({report['backend']}), "
            f"jax {jax.__version__}\n\n" + table(rows, args.nominal_tflops))
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
