"""Deterministic means bit-identical: every output of a dissection is the same bits for 1 and 8
(forced host) devices and for any batch size, on the generator path (the shipped demo generator
and segmenter) and on the features path.

One subprocess with 8 forced CPU devices runs every configuration; the tests compare every
``scores.npz`` array, every ``dissect.json`` and every image strip, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gandissect_jax.dissection import dissect_features
from gandissect_jax.dissection.engine import make_mesh, per_device_batch
from gandissect_jax.dissection.sources import GeneratorSource, micro_batched

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"

# name: (devices, batch size). The generator path dissects 64 samples of the demo pair's layer4 at a
# micro-batch of 8 (not the default 32, which these small batches would all round up to): one device
# runs 4 micro-batches per step at batch 32, eight devices 1 each, and batch 4 is rounded up to 8.
GENERATOR_RUNS = {"gen-1dev-b32": (1, 32), "gen-8dev-b32": (8, 32), "gen-1dev-b4": (1, 4)}
MICRO_BATCH = 8
FEATURE_RUNS = {"feat-1dev-b16": (1, 16), "feat-8dev-b16": (8, 16), "feat-1dev-b5": (1, 5), "feat-8dev-b48": (8, 48)}

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    import gandissect_jax
    from gandissect_jax.dissection import dissect_features, dissect_generator

    fixtures, out, generator_runs, feature_runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    micro_batch = int(sys.argv[5])
    assert len(jax.devices()) == 8, jax.devices()
    G = gandissect_jax.load_generator("scenes64")
    S = gandissect_jax.load_segmenter("scenes64-segmenter")
    for name, (devices, batch) in generator_runs.items():
        dissect_generator(G, S, ["layer4"], size=64, batch_size=batch, devices=jax.devices()[:devices],
                          outdir=out + "/" + name, progress=False, topk=4, micro_batch=micro_batch)
    data = np.load(fixtures + "/dissect_golden.npz")
    labels = json.load(open(fixtures + "/labels.json"))
    features = data["features"].transpose(0, 2, 3, 1)
    segs = data["segs"].transpose(0, 2, 3, 1)
    for name, (devices, batch) in feature_runs.items():
        dissect_features(features, segs, labels, threshold="iqr", batch_size=batch, devices=jax.devices()[:devices],
                         outdir=out + "/" + name, progress=False, make_images=False)
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{run name: output directory} of every configuration, dissected in one 8-device subprocess."""
    out = tmp_path_factory.mktemp("bit-identity")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(FIXTURES), str(out), json.dumps(GENERATOR_RUNS),
                           json.dumps(FEATURE_RUNS), str(MICRO_BATCH)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: out / name for name in {**GENERATOR_RUNS, **FEATURE_RUNS}}


def output_files(outdir: Path) -> list[str]:
    """Every output file of a dissection (relative paths), without the run's bookkeeping."""
    return sorted(str(p.relative_to(outdir)) for p in outdir.rglob("*")
                  if p.is_file() and ".progress" not in p.parts and not p.name.startswith(".dissect.lock"))


def assert_bit_identical(a: Path, b: Path) -> None:
    """Same output files; every scores.npz array equal in dtype, shape and bits (NaN included); every
    dissect.json equal as JSON; every other file (image strips, bar graphs, HTML) equal byte for byte."""
    files = output_files(a)
    assert files == output_files(b)
    assert any(f.endswith("scores.npz") for f in files) and "dissect.json" in files
    arrays = 0
    for name in files:
        if name.endswith("scores.npz"):
            with np.load(a / name, allow_pickle=False) as x, np.load(b / name, allow_pickle=False) as y:
                assert sorted(x.files) == sorted(y.files), name
                for key in x.files:
                    u, v = x[key], y[key]
                    assert u.dtype == v.dtype and u.shape == v.shape, (name, key)
                    assert u.tobytes() == v.tobytes(), f"{name}/{key} differs"
                    arrays += 1
        elif name.endswith(".json"):
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert arrays >= 30  # every array of the IQR run was compared


def test_generator_path_is_bit_identical_across_device_counts(runs):
    assert_bit_identical(runs["gen-1dev-b32"], runs["gen-8dev-b32"])
    assert any((runs["gen-8dev-b32"] / "layer4" / "image").glob("*-top.jpg"))  # the strips were compared too


def test_generator_path_is_bit_identical_across_batch_sizes(runs):
    assert_bit_identical(runs["gen-1dev-b32"], runs["gen-1dev-b4"])


def test_features_path_is_bit_identical_across_device_counts_and_batch_sizes(runs):
    for other in ("feat-8dev-b16", "feat-1dev-b5", "feat-8dev-b48"):
        assert_bit_identical(runs["feat-1dev-b16"], runs[other])


def test_sharded_features_match_this_process(runs):
    """The subprocess's results are the ones this (single-device) process computes."""
    data = np.load(FIXTURES / "dissect_golden.npz")
    labels = json.loads((FIXTURES / "labels.json").read_text())
    local = dissect_features(data["features"].transpose(0, 2, 3, 1), data["segs"].transpose(0, 2, 3, 1), labels,
                             threshold="iqr", batch_size=16, progress=False)["features"]
    with np.load(runs["feat-8dev-b16"] / "features" / "scores.npz", allow_pickle=False) as sharded:
        for field in ("levels", "intersection_counts", "iou", "iqr", "unit_label", "topk_values", "topk_indices",
                      "max_iqr", "candidate_levels", "raw_quantiles"):
            np.testing.assert_array_equal(sharded[field], getattr(local, field), err_msg=field)


# ----------------------------------------------------------------------------- the micro-batch mechanism


def test_micro_batched_runs_fixed_size_chunks_in_order():
    shapes = []

    def fn(scale, x):
        shapes.append(x.shape)
        return {"y": x * scale, "first": x[:, :1]}

    x = jnp.arange(24.0).reshape(12, 2)
    out = jax.jit(micro_batched(fn, 4))(jnp.float32(2.0), x)
    np.testing.assert_array_equal(out["y"], np.arange(24.0).reshape(12, 2) * 2)
    np.testing.assert_array_equal(out["first"], np.arange(0.0, 24.0, 2).reshape(12, 1))
    assert shapes == [(4, 2)]  # traced once, at the micro-batch shape
    with pytest.raises(ValueError, match="micro-batches of 4"):
        micro_batched(fn, 4)(jnp.float32(1.0), jnp.zeros((6, 2)))
    with pytest.raises(ValueError, match="micro_batch must be an integer >= 1"):
        micro_batched(fn, 0)


def test_engine_batches_are_whole_micro_batches_per_device():
    assert per_device_batch(32, 1) == 32 and per_device_batch(32, 8) == 4 and per_device_batch(5, 2) == 3
    assert per_device_batch(4, 1, 8) == 8  # rounded up to one micro-batch
    assert per_device_batch(32, 8, 8) == 8
    assert per_device_batch(36, 1, 8) == 40
    assert per_device_batch(1, 3, 8) == 8


def test_generator_source_is_batch_invariant_and_refuses_partial_micro_batches():
    from test_dissect_pipeline import TinyGenerator, TinySegmenter

    source = GeneratorSource(TinyGenerator(), TinySegmenter(), ["layer1"], 50, micro_batch=4)
    assert source.batch_invariant and source.features_only().batch_invariant
    assert source.identity()["micro_batch"] == 4 and source.features_only().micro_batch == 4
    sharding = NamedSharding(make_mesh(jax.devices()[:1]), P("devices"))
    whole = source.fetch(np.arange(8), sharding)
    assert whole["layer1"].shape == (8, 4, 4, 5) and whole["labels"].dtype == jnp.int32
    with pytest.raises(ValueError, match="micro-batches of 4"):
        source.fetch(np.arange(6), sharding)
    with pytest.raises(ValueError, match="micro_batch must be an integer >= 1"):
        GeneratorSource(TinyGenerator(), TinySegmenter(), ["layer1"], 50, micro_batch=0)


def test_default_micro_batch_is_the_segmenters_own():
    """The UPerNet segments as fast at 4 images per call as at 32 and needs a quarter of the
    memory: dissections with it default to its ``dissection_micro_batch``; others keep 32; an
    explicit micro_batch wins; the default is recorded in the run's identity."""
    from test_dissect_pipeline import TinyGenerator, TinySegmenter

    from gandissect_jax.dissection.sources import DEFAULT_MICRO_BATCH, default_micro_batch
    from gandissect_jax.segmenter.unified import UnifiedParsingSegmenter

    class Lean(TinySegmenter):
        dissection_micro_batch = 2

    class Broken(TinySegmenter):
        dissection_micro_batch = 0

    assert UnifiedParsingSegmenter.dissection_micro_batch == 4 and DEFAULT_MICRO_BATCH == 32
    assert default_micro_batch(TinySegmenter()) == 32 and default_micro_batch(Lean()) == 2
    assert GeneratorSource(TinyGenerator(), TinySegmenter(), ["layer1"], 50).identity()["micro_batch"] == 32
    assert GeneratorSource(TinyGenerator(), Lean(), ["layer1"], 50).identity()["micro_batch"] == 2
    assert GeneratorSource(TinyGenerator(), Lean(), ["layer1"], 50, micro_batch=8).micro_batch == 8
    with pytest.raises(ValueError, match="micro_batch must be an integer >= 1"):
        GeneratorSource(TinyGenerator(), Broken(), ["layer1"], 50)
