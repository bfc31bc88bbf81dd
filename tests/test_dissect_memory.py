"""Memory is planned, not discovered: the estimate, the unit groups, the refusal, and that grouping
changes no number."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gandissect_jax.dissection import DissectConfig, dissect_features, passes
from gandissect_jax.dissection.groups import measure_units
from gandissect_jax.dissection.engine import make_mesh
from gandissect_jax.dissection.memory import (RUNTIME_BYTES, Budget, MemoryBudgetError, PassShapes, parse_memory,
                                              plan_dissection, plan_memory)
from gandissect_jax.dissection.sources import ArraySource

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"


@pytest.fixture(scope="module")
def golden():
    data = np.load(FIXTURES / "dissect_golden.npz")
    labels = json.loads((FIXTURES / "labels.json").read_text())
    return data["features"].transpose(0, 2, 3, 1), data["segs"].transpose(0, 2, 3, 1), labels


def shapes(layers, **changes) -> PassShapes:
    base = dict(layers=layers, seg_pixels=32 * 32, seg_channels=3, num_labels=13, num_categories=3, topk=10,
                raw_ranks=10, up_ranks=200, num_levels=100, num_candidates=100, per_device=16, devices=1,
                unit_chunk=1, sample_bytes=4 * 64 * 24, shared=True)
    base.update(changes)
    return PassShapes(**base)


def covered(groups):
    units = {}
    for group in groups:
        assert len({layer for layer, _, _ in group}) == len(group)  # one slice per layer and group
        for layer, start, stop in group:
            assert 0 <= start < stop
            units.setdefault(layer, set()).update(range(start, stop))
    return units


# ----------------------------------------------------------------------------- the plan


def test_memory_plan_covers_every_unit_with_equal_slices_that_fit():
    layers = {"layer4": (512, 64), "layer6": (256, 256), "small": (10, 64)}
    everything = plan_memory(shapes(layers), Budget(1 << 40, None))
    assert everything.groups == ((("layer4", 0, 512), ("layer6", 0, 256), ("small", 0, 10)),)
    budget = Budget(RUNTIME_BYTES + (everything.host_peak - RUNTIME_BYTES) // 5, None)
    plan = plan_memory(shapes(layers), budget)
    assert len(plan.groups) > 3 and plan.host_peak <= budget.host
    assert covered(plan.groups) == {layer: set(range(count)) for layer, (count, _) in layers.items()}
    for layer in ("layer4", "layer6"):
        sizes = {stop - start for group in plan.groups for name, start, stop in group if name == layer}
        assert len(sizes) == 1  # equal slices: one compiled program per layer
    assert "each group reads the data again" in plan.describe()
    # with the quantile rule (little kept per unit until scoring) the peak stays under the same
    # budget for 16x the units: more groups, not more memory
    quantile = dict(up_ranks=0, num_levels=1, num_candidates=0)
    small = plan_memory(shapes(layers, **quantile), budget)
    bigger = plan_memory(shapes({"layer4": (16 * 512, 64), "layer6": (16 * 256, 256), "small": (10, 64)},
                                **quantile), budget)
    assert small.host_peak <= budget.host and bigger.host_peak <= budget.host
    assert len(bigger.groups) > 8 * len(small.groups)


def test_memory_plan_refuses_what_cannot_fit(golden, tmp_path):
    features, segs, labels = golden
    with pytest.raises(MemoryBudgetError, match=r"even one unit at a time needs about .*--max-memory"):
        plan_memory(shapes({"layer4": (512, 64)}), Budget(RUNTIME_BYTES, None))
    # refused before any pass reads the data
    reads = []

    class Watched(np.ndarray):
        def __getitem__(self, key):
            if not isinstance(key, (int, np.integer)):
                reads.append(key)
            return super().__getitem__(key)

    with pytest.raises(MemoryBudgetError, match="memory budget of 100.0 MiB"):
        dissect_features(features.view(Watched), segs, labels, threshold="iqr", max_memory="100M", progress=False,
                         outdir=str(tmp_path / "out"))
    assert reads == []
    # the setting itself is checked when it is made
    for bad in ("lots", "-1G", 0, "0.5K", True, float("nan")):
        with pytest.raises(ValueError, match="max_memory"):
            DissectConfig(max_memory=bad)
    assert parse_memory("1.5G") == 3 << 29 and parse_memory("800M") == 800 << 20 and parse_memory(2**30) == 2**30
    assert parse_memory("2GiB") == 2 << 30


def test_max_memory_flag_reaches_the_plan(golden, tmp_path, capsys):
    from gandissect_jax import cli

    features, segs, labels = golden
    np.save(tmp_path / "f.npy", features)
    np.save(tmp_path / "s.npy", segs)
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    code = cli.main(["dissect", "--features", str(tmp_path / "f.npy"), "--segmentations", str(tmp_path / "s.npy"),
                     "--labels", str(tmp_path / "labels.json"), "--outdir", str(tmp_path / "out"), "--quiet",
                     "--max-memory", "100M"])
    assert code != 0
    err = capsys.readouterr().err
    assert "memory budget of 100.0 MiB" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- grouping changes nothing


def test_unit_chunking_changes_no_number(golden, tmp_path):
    features, segs, labels = golden
    layers = {"a": np.ascontiguousarray(features[..., :23]), "b": np.ascontiguousarray(features[..., :5])}
    source = ArraySource(layers, segs)
    everything = plan_dissection(source, list(layers), num_labels=len(labels["labels"]), num_categories=3,
                                 threshold="iqr", search_iqr=True, topk=10, batch_size=16, mesh=make_mesh(),
                                 max_memory="1T")
    budget = RUNTIME_BYTES + (everything.host_peak - RUNTIME_BYTES) // 3
    plan = plan_dissection(source, list(layers), num_labels=len(labels["labels"]), num_categories=3, threshold="iqr",
                           search_iqr=True, topk=10, batch_size=16, mesh=make_mesh(), max_memory=budget)
    slices = [s for group in plan.groups for s in group]
    assert len(plan.groups) >= 3
    assert any(a[0] == b[0] and b[1] < a[2] for a, b in zip(slices, slices[1:]))  # an overlapping last slice
    options = dict(threshold="iqr", batch_size=16, progress=False, make_images=False)
    whole = dissect_features(layers, segs, labels, outdir=str(tmp_path / "whole"), **options)
    grouped = dissect_features(layers, segs, labels, outdir=str(tmp_path / "grouped"), max_memory=budget, **options)
    for layer in layers:
        for field, value in vars(whole[layer]).items():
            other = getattr(grouped[layer], field)
            if isinstance(value, np.ndarray):
                assert value.dtype == other.dtype and value.tobytes() == other.tobytes(), (layer, field)
            else:
                assert value == other, (layer, field)
    assert (json.loads((tmp_path / "whole" / "dissect.json").read_text())
            == json.loads((tmp_path / "grouped" / "dissect.json").read_text()))
    # fixed levels are sliced with their units
    levels = {"a": np.linspace(0, 1, 23, dtype=np.float32), "b": np.linspace(0, 1, 5, dtype=np.float32)}
    options = dict(levels=levels, batch_size=16, progress=False, make_images=False, make_report=False)
    whole = dissect_features(layers, segs, labels, **options)
    grouped = dissect_features(layers, segs, labels, max_memory=budget, **options)
    for layer in layers:
        for field in ("levels", "intersection_counts", "category_activation_counts", "iou", "unit_label",
                      "topk_indices", "raw_quantiles"):
            np.testing.assert_array_equal(getattr(whole[layer], field), getattr(grouped[layer], field))


def test_grouped_run_resumes_group_by_group(golden, tmp_path):
    features, segs, labels = golden

    class Failing(np.ndarray):
        reads = 0

        def __getitem__(self, key):
            if not isinstance(key, (int, np.integer)):
                type(self).reads += 1
                if type(self).reads > 20:
                    raise RuntimeError("simulated crash")
            return super().__getitem__(key)

    options = dict(threshold="quantile", batch_size=16, progress=False, make_images=False, max_memory="205M")
    full = dissect_features(features, segs, labels, **options)["features"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        dissect_features(features.view(Failing), segs, labels, outdir=str(tmp_path / "run"), **options)
    [passes_dir] = (tmp_path / "run" / ".progress").glob("passes-*")
    assert len(list(passes_dir.glob("units-*"))) >= 2  # the groups' checkpoints
    resumed = dissect_features(features, segs, labels, outdir=str(tmp_path / "run"), **options)["features"]
    for field in ("levels", "intersection_counts", "iou", "topk_values", "topk_indices", "raw_quantiles"):
        np.testing.assert_array_equal(getattr(full, field), getattr(resumed, field))


def test_groups_that_saw_different_segmentations_are_refused(golden):
    features, segs, labels = golden

    class Drifting(ArraySource):
        calls = 0

        def fetch(self, indices, sharding, labels=True):
            batch = super().fetch(indices, sharding, labels)
            if labels:
                type(self).calls += 1
                if type(self).calls > 4:  # the second group's count pass sees other labels
                    batch["labels"] = batch["labels"] * 0 + 1
            return batch

    source = Drifting({"features": features}, segs)
    settings = passes.PassSettings(make_mesh(), 16, 600.0, False, None, None)
    groups = ((("features", 0, 12),), (("features", 12, 24),))
    label_category = np.array([0] * 13)
    with pytest.raises(RuntimeError, match="different segmentations"):
        measure_units(source, groups, threshold="quantile", quantile=0.005, search_iqr=False, fixed_levels=None,
                             topk=5, label_category=label_category, num_categories=3, settings=settings)


@pytest.mark.parametrize("threshold", ["quantile", "levels"])
def test_a_whole_layer_group_then_another_group_of_that_layer(golden, threshold):
    """A group holding a whole layer hands its arrays over uncopied; a later group of the same layer
    writes into copies of them, not into the first group's arrays (read-only top-k, a read-only
    fixed level given by the caller, the fixed level that is a view of the raw quantiles), and
    changes no number."""
    features, segs, _ = golden
    source = ArraySource({"features": features}, segs)
    settings = passes.PassSettings(make_mesh(), 16, 600.0, False, None, None)
    units = features.shape[-1]
    fixed = np.linspace(0.1, 1.0, units).astype(np.float32)
    fixed.flags.writeable = False
    options = dict(threshold=threshold, quantile=0.005, search_iqr=False,
                   fixed_levels={"features": fixed} if threshold == "levels" else None, topk=5,
                   label_category=np.array([0] * 13), num_categories=3, settings=settings)
    _, one = measure_units(source, ((("features", 0, units),),), **options)
    _, two = measure_units(source, ((("features", 0, units),), (("features", 0, 12),)), **options)
    a, b = one["features"], two["features"]
    names = [field.name for field in dataclasses.fields(a.levels)]
    for x, y in zip([getattr(a.levels, n) for n in names] + [*a.counts, *a.topk],
                    [getattr(b.levels, n) for n in names] + [*b.counts, *b.topk]):
        assert (x is None and y is None) or np.array_equal(x, y)
    assert np.array_equal(fixed, np.linspace(0.1, 1.0, units).astype(np.float32))


# ----------------------------------------------------------------------------- the estimate against the measured peak

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from gandissect_jax.dissection import dissect_features
    from gandissect_jax.dissection.engine import make_mesh
    from gandissect_jax.dissection.memory import plan_dissection
    from gandissect_jax.dissection.sources import ArraySource

    units, hw, seg, threshold, budget = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    budget = None if budget == "-" else budget
    rng = np.random.RandomState(0)
    features = rng.rand(64, hw, hw, units).astype(np.float32)
    segs = rng.randint(0, 10, (64, seg, seg)).astype(np.int32)
    labels = [["-", "object"]] + [[f"c{i}", "object"] for i in range(1, 10)]
    plan = plan_dissection(ArraySource({"features": features}, segs), ["features"], num_labels=10, num_categories=1,
                           threshold=threshold, search_iqr=threshold == "iqr", topk=10, batch_size=32,
                           mesh=make_mesh(), max_memory=budget or "1T")

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    jax.numpy.zeros(1).block_until_ready()
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark
        handle.write("5")
    dissect_features(features, segs, labels, threshold=threshold, progress=False, make_report=False,
                     make_images=False, max_memory=budget)
    print(json.dumps({"increase": status("VmHWM:") - before, "estimate": plan.host_peak, "groups": len(plan.groups)}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc to reset the peak RSS")
@pytest.mark.parametrize("units, hw, seg, threshold, budget, devices", [
    (400, 1, 8, "quantile", "-", 1),      # 1x1 maps, one group
    (800, 1, 8, "iqr", "400M", 1),        # both quantile streams, several groups under a budget
    (800, 1, 8, "iqr", "400M", 8),        # the same on 8 devices: more threads, more malloc arenas
    (48, 8, 64, "iqr", "-", 1),           # large step temporaries (upsampled 64x64 maps)
])
def test_peak_memory_estimate_bounds_the_measured_peak(units, hw, seg, threshold, budget, devices):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(units), str(hw), str(seg), threshold, budget],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (budget == "-") == (result["groups"] == 1)
    assert result["increase"] <= result["estimate"], result
    if budget != "-":
        assert result["estimate"] <= parse_memory(budget)
    # and the estimate is not vacuous: within 2x of what was used beyond the runtime allowance
    assert result["estimate"] - RUNTIME_BYTES <= 2 * result["increase"], result


# ----------------------------------------------------------------------------- the count pass


@pytest.mark.parametrize("seg_side, channels, levels, per_device, chunk", [
    (128, 5, 100, 4, 4),  # the paper's quad segmentation with the IQR search: counted per signature
    (64, 3, 1, 8, 8),  # a fixed level: per signature, few buckets
    (64, 1, 100, 4, 8),
    (16, 2, 100, 4, 2),  # too few pixels for signatures: per pixel only
])
def test_group_overhead_bounds_the_count_steps_temporaries(seg_side, channels, levels, per_device, chunk):
    """The planner's per-group estimate covers what XLA allocates for a count step (both counting
    paths, whose buffers XLA keeps apart), for one unit per step (CPU) and many (accelerators)."""
    import jax
    import jax.numpy as jnp

    from gandissect_jax.dissection import statistics as st
    from gandissect_jax.dissection.memory import group_overhead, unit_cost

    U, L, P, m = 8, 200, seg_side * seg_side, 64
    stat = st.level_counts(U, L, levels, 3, unit_chunk=chunk)
    args = (jax.eval_shape(stat.init),
            (jax.ShapeDtypeStruct((U, per_device, P), jnp.float32), jax.ShapeDtypeStruct((U, levels), jnp.float32),
             jax.ShapeDtypeStruct((per_device, P, channels), jnp.int32),
             jax.ShapeDtypeStruct((per_device, 4), jnp.int32)), jax.ShapeDtypeStruct((per_device,), bool))
    temp = jax.jit(stat.update, donate_argnums=0).lower(*args).compile().memory_analysis().temp_size_in_bytes
    planned = shapes({"x": (U, m)}, seg_pixels=P, seg_channels=channels, num_labels=L, num_levels=levels,
                     per_device=per_device, unit_chunk=chunk, sample_bytes=0, shared=False, raw_ranks=0,
                     up_ranks=0, num_candidates=0)
    overhead, _ = group_overhead(planned)
    step_temps = U * per_device * 4 * (m + P + levels + 1)  # unit_cost's count-pass temporaries
    assert temp <= overhead + step_temps, (temp, overhead, step_temps)
    assert overhead + step_temps < 4 * temp  # and not wildly above
    assert unit_cost(planned, m).device >= step_temps // U


def test_memory_plan_keeps_count_indices_in_int32():
    """A group counts at most (2^31 - 1) / (labels x (levels + 1)) units of a layer, whatever the
    budget; one unit beyond int32 is refused by the plan, before any pass, naming the labels."""
    import jax
    import jax.numpy as jnp

    from gandissect_jax.dissection import statistics as st
    from gandissect_jax.dissection.memory import max_group_units

    many = shapes({"layer4": (512, 64), "small": (3, 64)}, num_labels=1_000_000, num_levels=100)
    most = max_group_units(many)
    assert most == (st.INT32_MAX - 1) // (1_000_000 * 101) == 21
    plan = plan_memory(many, Budget(1 << 50, None))
    assert covered(plan.groups) == {"layer4": set(range(512)), "small": set(range(3))}
    assert max(stop - start for group in plan.groups for _, start, stop in group) <= most
    for group in plan.groups:
        for layer, start, stop in group:
            st.level_counts(stop - start, 1_000_000, 100, 3)  # each group's count statistic can be built
    with pytest.raises(ValueError, match="counters do not fit int32"):
        st.level_counts(most + 1, 1_000_000, 100, 3)
    with pytest.raises(ValueError, match=r"300000000 labels \(and 16 samples per device\) x 101 level intervals"):
        plan_memory(shapes({"layer4": (512, 64)}, num_labels=300_000_000, num_levels=100), Budget(1 << 50, None))
    # more images per device than labels (e.g. --no-labels: 1 label): the per-pixel path's (image,
    # unit, bucket) histogram bounds the units instead
    few_labels = shapes({"layer4": (100_000, 64)}, num_labels=2, num_levels=100, per_device=256)
    assert max_group_units(few_labels) == (st.INT32_MAX - 1) // (256 * 101)
    groups = plan_memory(few_labels, Budget(1 << 50, None)).groups
    assert max(stop - start for group in groups for _, start, stop in group) <= max_group_units(few_labels)
    stat = st.level_counts(max_group_units(few_labels) + 1, 2, 100, 1)
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in (
        ((max_group_units(few_labels) + 1, 256, 4), jnp.float32), ((max_group_units(few_labels) + 1, 100), jnp.float32),
        ((256, 4, 1), jnp.int32), ((256, 2), jnp.int32))]
    with pytest.raises(ValueError, match="256 images x .* units x 101 buckets per step do not fit int32"):
        jax.eval_shape(stat.update, jax.eval_shape(stat.init), tuple(args), jax.ShapeDtypeStruct((256,), bool))
