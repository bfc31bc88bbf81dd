"""Peak memory of a dissection against the number of units (issue 11, section 4): flat under a budget.

Each configuration runs in its own subprocess (``python benchmarks/bench_memory.py run ...``) that
dissects random features (N samples of h x w maps of U units, a random 10-label segmentation)
with ``dissect_features`` and reports the increase of its peak RSS over the RSS before the
dissection (``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``), the
absolute peak, the time, the number of unit groups and the plan's estimate.

    pytest benchmarks/bench_memory.py                  # the table of benchmarks/README.md
    python benchmarks/bench_memory.py table --units 500 2000 8000 --budget 1G

``GANDISSECT_BENCH_MEMORY_UNITS=500,2000`` shortens the pytest run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

SAMPLES = 64
LABELS = 10


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def run(units: int, size: int, seg: int, threshold: str, budget: str | None) -> dict:
    """One dissection in this process; returns its memory and time figures."""
    import jax

    from gandissect_jax.dissection import dissect_features
    from gandissect_jax.dissection.engine import make_mesh
    from gandissect_jax.dissection.memory import plan_dissection
    from gandissect_jax.dissection.sources import ArraySource

    rng = np.random.RandomState(0)
    features = rng.rand(SAMPLES, size, size, units).astype(np.float32)
    segs = rng.randint(0, LABELS, (SAMPLES, seg, seg)).astype(np.int32)
    labels = [["-", "object"]] + [[f"c{i}", "object"] for i in range(1, LABELS)]
    source = ArraySource({"features": features}, segs)
    options = dict(num_labels=LABELS, num_categories=1, threshold=threshold, search_iqr=threshold == "iqr", topk=10,
                   batch_size=32, mesh=make_mesh())
    everything = plan_dissection(source, ["features"], max_memory="1T", **options)
    plan = plan_dissection(source, ["features"], max_memory=budget, **options)
    jax.numpy.zeros(1).block_until_ready()
    before = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    start = time.perf_counter()
    dissect_features(features, segs, labels, threshold=threshold, progress=False, make_report=False,
                     make_images=False, max_memory=budget)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM:")
    return {"units": units, "size": size, "seg": seg, "threshold": threshold, "budget": budget or "default",
            "groups": len(plan.groups), "seconds": round(seconds, 1), "rss_before_mib": before >> 20,
            "peak_mib": peak >> 20, "increase_mib": (peak - before) >> 20, "estimate_mib": plan.host_peak >> 20,
            "all_at_once_estimate_mib": everything.host_peak >> 20}


def measure(units: int, size: int = 2, seg: int = 8, threshold: str = "quantile", budget: str | None = None) -> dict:
    """:func:`run` in a fresh subprocess (its own peak RSS)."""
    command = [sys.executable, __file__, "run", "--units", str(units), "--size", str(size), "--seg", str(seg),
               "--threshold", threshold] + (["--budget", budget] if budget else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    if done.returncode:
        return {"units": units, "size": size, "seg": seg, "threshold": threshold, "budget": budget or "default",
                "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _units() -> list[int]:
    value = os.environ.get("GANDISSECT_BENCH_MEMORY_UNITS", "500,2000,8000")
    return [int(u) for u in value.split(",")]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")
@pytest.mark.parametrize("threshold", ["quantile", "iqr"])
def test_peak_memory_is_flat_in_units_under_a_budget(threshold):
    budget = "1G"
    rows = [measure(units, threshold=threshold, budget=budget) for units in _units()]
    for row in rows:
        print(json.dumps(row))
    fitted = [row for row in rows if "error" not in row]
    for row in fitted:
        assert row["increase_mib"] <= row["estimate_mib"] <= 1024
    if threshold == "quantile":  # what is kept per unit until scoring is small: every size fits
        assert len(fitted) == len(rows)
        assert rows[-1]["groups"] > 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one dissection in this process; prints a JSON line")
    table = sub.add_parser("table", help="each configuration in a subprocess; prints a markdown table")
    for p in (one, table):
        p.add_argument("--size", type=int, default=2, help="feature map height and width (default 2)")
        p.add_argument("--seg", type=int, default=8, help="segmentation height and width (default 8)")
        p.add_argument("--budget", help="max_memory (default: the library's default budget)")
    one.add_argument("--units", type=int, required=True)
    one.add_argument("--threshold", default="quantile")
    table.add_argument("--units", type=int, nargs="+", default=[500, 2000, 8000])
    table.add_argument("--threshold", nargs="+", default=["quantile", "iqr"])
    args = parser.parse_args(argv)
    if args.command == "run":
        print(json.dumps(run(args.units, args.size, args.seg, args.threshold, args.budget)))
        return
    print("| rule | units | budget | groups | time s | peak RSS MiB | increase MiB | estimate MiB | "
          "all at once (estimate) MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for threshold in args.threshold:
        for units in args.units:
            row = measure(units, args.size, args.seg, threshold, args.budget)
            if "error" in row:
                print(f"| {threshold} | {units} | {row['budget']} | refused: {row['error']} |||||")
            else:
                print(f"| {threshold} | {units} | {row['budget']} | {row['groups']} | {row['seconds']} | "
                      f"{row['peak_mib']} | {row['increase_mib']} | {row['estimate_mib']} | "
                      f"{row['all_at_once_estimate_mib']} |", flush=True)


if __name__ == "__main__":
    main()
