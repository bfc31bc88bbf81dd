"""The dissection pipeline: both entry points agree, runs resume, bad input is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.dissection import LayerDissection, dissect_features, dissect_generator
from gandissect_jax.dissection.sources import GeneratorSource
from gandissect_jax.generator import Split

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"


# ----------------------------------------------------------------------------- stand-ins


def _quantize(x):
    """Round to multiples of 1/64 within [-4, 4]: every later product and sum is exact in float32,
    so results do not depend on fusion (FMA) or batch size."""
    return jnp.clip(jnp.round(x * 64.0) / 64.0, -4.0, 4.0)


def _mix(x, weights):
    out = 0.0
    for c in range(weights.shape[0]):
        out = out + x[..., c:c + 1] * weights[c]
    return out


def _double(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class TinyGenerator:
    """A 3-layer generator following the project's generator contract (z -> 4x4 -> 8x8 -> 16x16 RGB)."""

    layer_names = ("layer1", "layer2", "output_16x16")
    z_dim = 6

    def __init__(self):
        rng = np.random.RandomState(0)

        def weights(*shape):
            return jnp.asarray(np.round(rng.randn(*shape) * 4) / 8, jnp.float32)  # multiples of 1/8

        self.params = {"w1": weights(6, 16 * 5), "w2": weights(5, 7), "w3": weights(7, 3)}

    @staticmethod
    def _layer1(params, z):
        z = _quantize(z)
        out = 0.0
        for i in range(z.shape[1]):
            out = out + z[:, i:i + 1] * params["w1"][i]
        return _quantize(out).reshape(z.shape[0], 4, 4, 5)

    @staticmethod
    def _layer2(params, r):
        x = _mix(_double(r), params["w2"])
        return _quantize(jnp.where(x > 0, x, 0.25 * x))

    @staticmethod
    def _output(params, r):
        return jnp.clip(_mix(_double(r), params["w3"]) / 4.0, -1.0, 1.0)

    def split(self, layer):
        if layer == "layer1":
            return Split(lambda p, z: (self._layer1(p, z), ()), lambda p, r, side: self._output(p, self._layer2(p, r)))
        if layer == "layer2":
            return Split(lambda p, z: (self._layer2(p, self._layer1(p, z)), ()), lambda p, r, side: self._output(p, r))
        raise ValueError(f"unknown layer {layer}")

    def apply(self, params, z):
        return self._output(params, self._layer2(params, self._layer1(params, z)))

    def __call__(self, z):
        return self.apply(self.params, z)


class TinySegmenter:
    """Labels by colour: channel 0 objects (reddish=1 'red', greenish=2 'green'), channel 1 a
    material (bright=3 'shiny'); follows the Segmenter protocol."""

    labels = (("-", "object"), ("red", "object"), ("green", "object"), ("shiny", "material"))
    categories = ("object", "material")
    params = ()

    def segment(self, params, images, downsample=1):
        x = images[:, ::downsample, ::downsample]
        obj = jnp.where(x[..., 0] > x[..., 1] + 0.1, 1, jnp.where(x[..., 1] > x[..., 0] + 0.1, 2, 0))
        mat = jnp.where(x.mean(-1) > 0.2, 3, 0)
        return jnp.stack([obj, mat], axis=-1).astype(jnp.int32)

    def class_score(self, params, images, c, downsample=1):
        raise NotImplementedError


@pytest.fixture(scope="module")
def golden():
    data = np.load(FIXTURES / "dissect_golden.npz")
    labels = json.loads((FIXTURES / "labels.json").read_text())
    return data["features"].transpose(0, 2, 3, 1), data["segs"].transpose(0, 2, 3, 1), labels, data


def assert_same(a: LayerDissection, b: LayerDissection):
    for name in ("levels", "label_counts", "total_counts", "category_activation_counts", "intersection_counts",
                 "iou", "iqr", "unit_label", "topk_values", "topk_indices", "max_iqr", "max_iqr_level",
                 "candidate_levels", "activation_fraction"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        np.testing.assert_array_equal(x, y, err_msg=name)


# ----------------------------------------------------------------------------- entry points


def test_generator_and_features_entry_points_agree(tmp_path):
    generator, segmenter = TinyGenerator(), TinySegmenter()
    z = np.random.RandomState(3).standard_normal(37 * 6).reshape(37, 6).astype(np.float32)
    from_generator = dissect_generator(generator, segmenter, ["layer1", "layer2"], size=37, seed=3, batch_size=8,
                                       threshold="iqr", progress=False, outdir=str(tmp_path / "gen"), k=5)
    images = generator(jnp.asarray(z))
    features = {name: np.asarray(generator.split(name)[0](generator.params, jnp.asarray(z))[0])
                for name in ("layer1", "layer2")}
    segs = np.asarray(segmenter.segment(segmenter.params, images, 2))
    from_arrays = dissect_features(features, segs, list(segmenter.labels), categories=segmenter.categories,
                                   threshold="iqr", batch_size=8, progress=False, k=5)
    assert list(from_generator) == ["layer1", "layer2"]
    for name in ("layer1", "layer2"):
        assert_same(from_generator[name], from_arrays[name])
    # the generator report exists, with image strips of generated samples
    assert (tmp_path / "gen" / "dissect.html").exists()
    assert (tmp_path / "gen" / "layer2" / "image" / "0-top.jpg").exists()
    assert (tmp_path / "gen" / "layer1" / "scores.npz").exists()


def test_generator_z_stream_matches_sample_z():
    source = GeneratorSource(TinyGenerator(), TinySegmenter(), ["layer1"], 50, seed=5, seg_downsample=2)
    expected = np.random.RandomState(5).standard_normal(50 * 6).reshape(50, 6).astype(np.float32)
    got = np.concatenate([source._z(np.arange(i, min(i + 16, 50))) for i in range(0, 50, 16)])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(source._z(np.array([40, 41])), expected[40:42])  # restarts the stream
    np.testing.assert_array_equal(source._z(np.array([3])), expected[3:4])
    try:
        from gandissect_jax import sample_z
    except ImportError:
        return
    np.testing.assert_array_equal(got, sample_z(50, 6, 5))


def test_unknown_layer_is_refused():
    with pytest.raises(ValueError, match="unknown layer"):
        dissect_generator(TinyGenerator(), TinySegmenter(), ["layer9"], size=4, progress=False)


# ----------------------------------------------------------------------------- resume


class CountingArray:
    """Array stand-in that counts reads of slices (batches, and the content hash) and can fail after a number of them."""

    def __init__(self, array, fail_after=None):
        self.array = array
        self.shape, self.ndim, self.dtype = array.shape, array.ndim, array.dtype
        self.reads = 0
        self.fail_after = fail_after

    def __getitem__(self, key):
        if not isinstance(key, (int, np.integer)):  # slices: batches and the content hash
            self.reads += 1
            if self.fail_after is not None and self.reads > self.fail_after:
                raise RuntimeError("simulated crash")
        return self.array[key]


def test_interrupted_run_resumes_to_identical_results(golden, tmp_path):
    features, segs, labels, _ = golden
    options = dict(threshold="iqr", batch_size=16, progress=False, make_images=False, checkpoint_every=0.0)
    full = dissect_features(features, segs, labels, outdir=str(tmp_path / "full"), **options)["features"]
    # one read hashes the features (the run's identity); then 4 batches per pass: 3 quantile passes,
    # then the count pass; crash in the middle of the count pass
    crashing = CountingArray(features, fail_after=1 + 14)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dissect_features(crashing, segs, labels, outdir=str(tmp_path / "run"), **options)
    progress = tmp_path / "run" / ".progress"
    [passes] = progress.glob("passes-*")  # the pending layers' pass checkpoints
    assert (passes / "counts" / "tally.npz").exists() and (passes / "plan.npz").exists()
    resumed_reads = CountingArray(features)
    resumed = dissect_features(resumed_reads, segs, labels, outdir=str(tmp_path / "run"), **options)["features"]
    assert resumed_reads.reads == 1 + 2  # the hash, then only the last two batches of the count pass
    assert_same(full, resumed)
    # a finished layer is not recomputed
    again = CountingArray(features)
    rerun = dissect_features(again, segs, labels, outdir=str(tmp_path / "run"), **options)["features"]
    assert again.reads == 1  # the hash only
    assert_same(full, rerun)
    assert not passes.exists()


def test_outdir_with_other_settings_is_refused(golden, tmp_path):
    features, segs, labels, data = golden
    dissect_features(features[:8], segs[:8], labels, levels=data["levels"], progress=False, make_images=False,
                     outdir=str(tmp_path))
    with pytest.raises(ValueError, match="other inputs or settings"):
        dissect_features(features[:8], segs[:8], labels, threshold="quantile", progress=False, make_images=False,
                         outdir=str(tmp_path))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_get_clear_errors(golden):
    features, segs, labels, data = golden
    bad = features[:8].copy()
    bad[3, 2, 2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dissect_features(bad, segs[:8], labels, progress=False)
    with pytest.raises(ValueError, match="outside"):
        dissect_features(features[:8], segs[:8] + 20, labels, levels=data["levels"], progress=False)
    with pytest.raises(ValueError, match="number of samples"):
        dissect_features(features[:8], segs[:7], labels, progress=False)
    with pytest.raises(ValueError, match="24 units"):
        dissect_features(features[:8], segs[:8], labels, levels=np.zeros(5), progress=False)
    with pytest.raises(ValueError, match=r"\(N, h, w, U\)"):
        dissect_features(features[0], segs[:8], labels, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        dissect_features(features[:8], segs[:8], labels, threshold="best", progress=False)


def test_single_device_batch_size_does_not_change_results(golden):
    features, segs, labels, _ = golden
    a = dissect_features(features, segs, labels, threshold="iqr", batch_size=16, progress=False)["features"]
    b = dissect_features(features, segs, labels, threshold="iqr", batch_size=7, progress=False)["features"]
    assert_same(a, b)


class SometimesNaN(TinyGenerator):
    """TinyGenerator whose image is NaN where layer2's mean activation exceeds ``limit`` (its
    features stay finite): a generator that breaks for a few z only."""

    limit = np.inf

    def _output(self, params, r):
        return jnp.where(r.mean(axis=(1, 2, 3))[:, None, None, None] > self.limit, jnp.nan,
                         TinyGenerator._output(params, r))


def test_generated_images_that_are_not_finite_are_refused_naming_how_many_and_the_first(tmp_path, monkeypatch):
    from gandissect_jax.sampling import sample_z

    G = SometimesNaN()
    means = lambda z: np.asarray(G._layer2(G.params, G._layer1(G.params, jnp.asarray(z))).mean(axis=(1, 2, 3)))
    G.limit = float(means(sample_z(2, G.z_dim, seed=0)).max())  # verify_split's probe batch stays finite
    bad = np.flatnonzero(means(sample_z(24, G.z_dim, seed=3)) > G.limit)
    assert 0 < len(bad) < 24
    from gandissect_jax.dissection import passes

    dirs = []
    real_counts_dir = passes._counts_dir
    monkeypatch.setattr(passes, "_counts_dir", lambda *a: dirs.append(real_counts_dir(*a)) or dirs[-1])
    for make_images in (False, True):  # with and without the strips' thumbnails in the count pass
        outdir = tmp_path / f"out-{make_images}"
        with pytest.raises(ValueError, match=rf"^{len(bad)} of the 24 generated images are not finite \(NaN/inf\); "
                                             rf"the first is sample {bad[0]}: "):
            dissect_generator(G, TinySegmenter(), ["layer2"], size=24, seed=3, batch_size=8, progress=False,
                              make_images=make_images, outdir=str(outdir))
        assert not (outdir / "layer2" / "scores.npz").exists() and not (outdir / "dissect.json").exists()
    # both count-pass kinds ran: images checked alone, then with the strips' gallery
    assert dirs[0] == "counts-images-checked" and dirs[1].startswith("counts-strips-"), dirs
    # the same generator where every image is finite dissects
    G.limit = np.inf
    dissect_generator(G, TinySegmenter(), ["layer2"], size=24, seed=3, batch_size=8, progress=False)


def test_the_count_of_non_finite_images_merges_exactly_across_devices_steps_and_checkpoints():
    from gandissect_jax.dissection import statistics as st
    from gandissect_jax.dissection.statistics import INT32_MAX

    stat = st.nonfinite_samples()
    empty = stat.init()
    assert stat.finalize(empty) == (0, INT32_MAX)
    # two devices' states after a step each: samples 7, 12 bad on one, 3 on the other (9 padding, masked)
    one = stat.update(empty, (jnp.array([False, True, False, True]), jnp.array([5, 7, 9, 12])),
                      jnp.array([True, True, True, True]))
    two = stat.update(empty, (jnp.array([True, False, True]), jnp.array([3, 4, 9])), jnp.array([True, True, False]))
    assert [int(v) for v in stat.finalize(one)] == [2, 7] and [int(v) for v in stat.finalize(two)] == [1, 3]
    merged = stat.merge(stat.merge(empty, one), two)
    assert [int(v) for v in stat.finalize(merged)] == [3, 3]
    # a host state (int64, as reloaded from a checkpoint) merges the same way, in either order
    host = tuple(np.int64(v) for v in merged)
    assert [int(v) for v in stat.finalize(stat.merge(host, empty))] == [3, 3]
    assert [int(v) for v in stat.finalize(stat.merge(two, one))] == [3, 3]


def test_non_finite_images_are_counted_over_8_devices_as_over_1(tmp_path):
    """The count and the first sample are the same whatever the devices and batch size (one
    subprocess with 8 forced CPU devices)."""
    import subprocess
    import sys

    from multihost_helpers import process_env

    script = (
        "import jax, sys\n"
        "from test_dissect_pipeline import SometimesNaN, TinySegmenter\n"
        "from gandissect_jax.dissection import dissect_generator\n"
        "from gandissect_jax.sampling import sample_z\n"
        "import numpy as np, jax.numpy as jnp\n"
        "G = SometimesNaN()\n"
        "means = lambda z: np.asarray(G._layer2(G.params, G._layer1(G.params, jnp.asarray(z))).mean(axis=(1, 2, 3)))\n"
        "G.limit = float(means(sample_z(2, G.z_dim, seed=0)).max())\n"
        "for devices, batch in ((1, 8), (8, 8), (8, 24), (3, 5)):\n"
        "    try:\n"
        "        dissect_generator(G, TinySegmenter(), ['layer2'], size=37, seed=14, batch_size=batch, progress=False,\n"
        "                          devices=jax.devices()[:devices])\n"
        "    except ValueError as err:\n"
        "        print(devices, batch, str(err).split(':')[0], flush=True)\n"
    )
    env = process_env(8)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 4, done.stdout + done.stderr[-3000:]
    from gandissect_jax.sampling import sample_z

    G = SometimesNaN()
    means = lambda z: np.asarray(G._layer2(G.params, G._layer1(G.params, jnp.asarray(z))).mean(axis=(1, 2, 3)))
    bad = np.flatnonzero(means(sample_z(37, G.z_dim, seed=14)) > means(sample_z(2, G.z_dim, seed=0)).max())
    assert len(bad) > 1
    expected = f"{len(bad)} of the 37 generated images are not finite (NaN/inf); the first is sample {bad[0]}"
    assert [line.split(" ", 2)[2] for line in lines] == [expected] * 4, lines
