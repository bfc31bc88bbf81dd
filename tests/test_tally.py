"""The public ``tally``: your own computation and statistics, exact against numpy, identical for any
device count and batch size, resumable, and free of per-batch host round trips."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.dissection import (StreamingStatistic, make_mesh, running_covariance, running_moments,
                                       sample_ordered, tally, top_k)

# ----------------------------------------------------------------------------- a user's source and statistics
# Written only with public names, as a researcher would (the README shows the same).


class Rows:
    """A source: feature maps x (N, h, w, P) and y (N, h, w, Q), fetched by sample number."""

    def __init__(self, seed=0, n=45, h=3, w=5, p=4, q=3):
        rng = np.random.RandomState(seed)
        self.x = (rng.randn(n, h, w, p) * 3 + 1).astype(np.float32)
        self.y = (rng.randn(n, h, w, q) + self.x[..., :q] * 0.5).astype(np.float32)
        self.num_samples = n

    def fetch(self, indices, sharding):
        rows = np.clip(indices, 0, self.num_samples - 1)
        return {"x": jax.device_put(self.x[rows], sharding), "y": jax.device_put(self.y[rows], sharding)}

    def identity(self):
        return {"kind": "rows", "n": self.num_samples}


def pixels_above(num_units):
    """A user-defined exact statistic: per unit, pixels whose value exceeds params["level"] (int32 on
    device, int64 after merging)."""

    def init():
        return jnp.zeros((num_units,), jnp.int32)

    def update(state, inputs, valid):
        x, level = inputs
        above = (x > level) & valid[:, None, None, None]
        return state + jnp.sum(above, axis=(0, 1, 2), dtype=jnp.int32)

    def merge(a, b):
        return np.asarray(a, np.int64) + np.asarray(b, np.int64)

    def capacity(inputs):
        pixels = inputs[0].shape[1] * inputs[0].shape[2]
        return (2**31 - 1) // pixels

    return StreamingStatistic(init, update, merge, lambda state: np.asarray(state, np.int64), capacity)


def peak_mean(num_units):
    """A user-defined float statistic, deterministic by construction: the mean over samples of each
    unit's peak, folded in sample order on the host (sample_ordered)."""

    def partial(x):
        return (jnp.max(x, axis=(1, 2)),)

    def fold(total, part):
        count, acc = total
        return count + 1, acc + part[0]

    def empty():
        return 0, np.zeros(num_units)

    return sample_ordered(partial, fold, empty, ((num_units,),), lambda t, n: t[1] / max(t[0], 1), buffer=16)


STATISTICS = {"moments": running_moments(4), "cov": running_covariance(4, 3), "self_cov": running_covariance(4),
              "top": top_k(4, 5), "above": pixels_above(4), "peaks": peak_mean(4)}


def compute(params, batch):
    x, y, index = batch["x"], batch["y"], batch["index"]
    return {"moments": (x, index), "cov": ((x, y), index), "self_cov": (x, index),
            "top": (x.max(axis=(1, 2)), index), "above": (x, params["level"]), "peaks": (x, index)}


def flat(results):
    """Every result array by a name, for bit-for-bit comparison."""
    m, c, s = results["moments"], results["cov"], results["self_cov"]
    return {"moments.mean": m.mean, "moments.variance": m.variance, "cov.mean_a": c.mean_a, "cov.mean_b": c.mean_b,
            "cov.covariance": c.covariance, "self_cov.covariance": s.covariance, "top.values": results["top"][0],
            "top.indices": results["top"][1], "above": results["above"], "peaks": results["peaks"]}


def run(batch_size=8, devices=None, **kwargs):
    params = {"level": jnp.float32(1.5)}
    mesh = make_mesh(devices)
    return tally(compute, Rows(), STATISTICS, params=params, batch_size=batch_size, mesh=mesh, progress=False,
                 **kwargs)


def test_statistics_match_numpy_float64():
    source = Rows()
    results = run(batch_size=7)
    x = source.x.astype(np.float64).reshape(-1, 4)
    y = source.y.astype(np.float64).reshape(-1, 3)
    moments = results["moments"]
    assert moments.count == x.shape[0]
    np.testing.assert_allclose(moments.mean, x.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(moments.variance, x.var(0, ddof=1), rtol=1e-5)
    cov = results["cov"]
    expected = (x - x.mean(0)).T @ (y - y.mean(0)) / (x.shape[0] - 1)
    np.testing.assert_allclose(cov.covariance, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results["self_cov"].covariance, np.cov(x.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results["self_cov"].correlation(), np.corrcoef(x.T), atol=1e-6)
    np.testing.assert_array_equal(results["above"], (source.x > 1.5).sum(axis=(0, 1, 2)))
    peaks = source.x.max(axis=(1, 2)).astype(np.float64)
    np.testing.assert_allclose(results["peaks"], peaks.mean(0), rtol=1e-12)
    values, indices = results["top"]
    for u in range(4):
        order = np.lexsort((np.arange(45), -peaks[:, u]))[:5]
        np.testing.assert_array_equal(indices[u], order)


def test_batch_size_does_not_change_any_bit():
    a, b = flat(run(batch_size=8)), flat(run(batch_size=3))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


def test_user_statistics_identical_on_one_and_eight_devices(tmp_path):
    """The acceptance test: a user-defined statistic (and the built-in float ones) through tally
    sharded over 8 devices gives the same bits as 1 device, for two batch sizes."""
    script = textwrap.dedent('''
        import sys
        import jax
        import jax.numpy as jnp
        import numpy as np
        from gandissect_jax.dissection import make_mesh, tally
        sys.path.insert(0, sys.argv[2])
        from test_tally import STATISTICS, Rows, compute, flat
        assert len(jax.devices()) == 8, jax.devices()
        arrays = {}
        for name, devices, batch in (("eight16", jax.devices(), 16), ("eight5", jax.devices(), 5),
                                     ("one16", jax.devices()[:1], 16), ("one7", jax.devices()[:1], 7)):
            results = tally(compute, Rows(), STATISTICS, params={"level": jnp.float32(1.5)}, batch_size=batch,
                            mesh=make_mesh(devices), progress=False)
            for key, value in flat(results).items():
                arrays[name + "/" + key] = value
        np.savez(sys.argv[1], **arrays)
    ''')
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "sharded.npz"
    done = subprocess.run([sys.executable, "-c", script, str(out), os.path.dirname(os.path.abspath(__file__))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    local = flat(run(batch_size=16))
    with np.load(out) as sharded:
        for key, value in local.items():
            for name in ("eight16", "eight5", "one7", "one16"):
                other = sharded[f"{name}/{key}"]
                assert other.dtype == value.dtype and other.tobytes() == value.tobytes(), (name, key)


# ----------------------------------------------------------------------------- resume, errors, host syncs


class Crashing:
    """Rows that fail after a number of fetches, counting them."""

    def __init__(self, fail_after=None):
        self.rows = Rows()
        self.num_samples = self.rows.num_samples
        self.fetches = 0
        self.fail_after = fail_after

    def fetch(self, indices, sharding):
        self.fetches += 1
        if self.fail_after is not None and self.fetches > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.rows.fetch(indices, sharding)

    def identity(self):
        return self.rows.identity()


def test_interrupted_tally_resumes_to_identical_results(tmp_path):
    options = dict(params={"level": jnp.float32(1.5)}, batch_size=4, progress=False, checkpoint_every=0.0,
                   checkpoint_dir=str(tmp_path / "ckpt"))
    full = flat(tally(compute, Rows(), STATISTICS, **{**options, "checkpoint_dir": None}))
    with pytest.raises(RuntimeError, match="simulated crash"):
        tally(compute, Crashing(fail_after=7), STATISTICS, **options)
    assert (tmp_path / "ckpt" / "tally.npz").exists()
    again = Crashing()
    resumed = flat(tally(compute, again, STATISTICS, **options))
    assert again.fetches == 12 - 7  # 12 batches; 7 were done and checkpointed when the 8th fetch failed
    for name in full:
        assert full[name].tobytes() == resumed[name].tobytes(), name
    finished = Crashing()
    tally(compute, finished, STATISTICS, **options)
    assert finished.fetches == 0  # a finished pass is not run again
    with pytest.raises(ValueError, match="different tally"):
        tally(compute, Rows(), {"moments": running_moments(4)}, **options)


def test_finished_pass_without_final_checkpoint_writes_nothing_and_keeps_its_last_save(tmp_path):
    options = dict(params={"level": jnp.float32(1.5)}, batch_size=4, progress=False, final_checkpoint=False)
    full = flat(tally(compute, Rows(), STATISTICS, **options))
    short = tmp_path / "short"
    tally(compute, Rows(), STATISTICS, checkpoint_dir=str(short), checkpoint_every=600.0, **options)
    assert not (short / "tally.npz").exists()  # finished before its first periodic save: no write at all
    saved = tmp_path / "saved"
    with pytest.raises(RuntimeError, match="simulated crash"):
        tally(compute, Crashing(fail_after=7), STATISTICS, checkpoint_dir=str(saved), checkpoint_every=0.0, **options)
    again = Crashing()
    resumed = flat(tally(compute, again, STATISTICS, checkpoint_dir=str(saved), checkpoint_every=600.0, **options))
    assert again.fetches == 12 - 7  # resumed from the last periodic save, which the finished pass left as it was
    assert all(full[name].tobytes() == resumed[name].tobytes() for name in full)
    assert tally(compute, Rows(), STATISTICS, checkpoint_dir=str(tmp_path / "final"), checkpoint_every=600.0,
                 **{**options, "final_checkpoint": True}) is not None
    assert (tmp_path / "final" / "tally.npz").exists()


def test_a_full_statistic_is_drained_alone():
    merges = {"small": 0, "large": 0}

    def counting(name, stat):
        def merge(a, b):
            merges[name] += 1
            return stat.merge(a, b)
        return stat._replace(merge=merge)

    stats = {"small": counting("small", peak_mean(4)),  # 16 slots: drained every 2 steps of 8
             "large": counting("large", running_moments(4))}
    stats["large"] = stats["large"]._replace(capacity=None)
    results = tally(lambda p, b: {"small": (b["x"], b["index"]), "large": (b["x"], b["index"])}, Rows(), stats,
                    batch_size=8, progress=False, mesh=make_mesh(jax.devices()[:1]))
    assert merges == {"small": 3, "large": 1}  # 6 steps: drains after steps 2 and 4, and at the end
    assert np.allclose(results["small"], Rows().x.max(axis=(1, 2)).mean(axis=0))


def test_batch_that_could_overflow_between_drains_is_refused():
    stat = STATISTICS["peaks"]  # a 16-sample buffer per device
    with pytest.raises(ValueError, match="batch size of at most 16"):
        tally(lambda p, b: (b["x"], b["index"]), Rows(), stat, batch_size=32, progress=False, mesh=make_mesh())


def test_compute_without_a_statistics_inputs_is_named():
    with pytest.raises(ValueError, match=r"no inputs for statistic\(s\) \['above'\]"):
        tally(lambda p, b: {"moments": (b["x"], b["index"])}, Rows(),
              {"moments": running_moments(4), "above": STATISTICS["above"]}, progress=False)


def test_single_statistic_returns_its_result():
    result = tally(lambda p, b: (b["x"], b["index"]), Rows(), running_moments(4), progress=False)
    assert result.count == 45 * 15 and result.mean.shape == (4,)


def test_no_implicit_device_to_host_transfer_in_the_loop():
    """The pass loop never reads a device value implicitly (no int(...) / np.asarray per batch):
    drains use explicit jax.device_get, and the drain schedule is decided from sample counts."""
    with jax.transfer_guard_device_to_host("disallow"):
        results = run(batch_size=2)  # 23 batches; the 16-sample buffers drain 5 times
    assert results["moments"].count == 45 * 15


def test_compiled_step_is_reused_for_the_same_statistics_and_shapes():
    from gandissect_jax.dissection import engine

    run(batch_size=6)
    before = engine._step.cache_info()
    run(batch_size=6)
    after = engine._step.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1


def test_sample_ordered_merge_waits_for_missing_samples():
    stat = running_moments(2, buffer=4)
    rows = np.arange(12, dtype=np.float32).reshape(6, 1, 2)

    def state_of(indices):
        state = stat.init()
        return jax.device_get(stat.update(state, (jnp.asarray(rows[indices]), jnp.asarray(indices, jnp.int32)),
                                          jnp.ones(len(indices), bool)))

    early, late = state_of(np.array([3, 4, 5])), state_of(np.array([0, 1, 2]))
    host = stat.merge(jax.device_get(stat.init()), early)
    assert int(host.samples) == 0  # samples 3..5 wait for 0..2
    with pytest.raises(ValueError, match="sample 0 never arrived"):
        stat.finalize(host)
    host = stat.merge(host, late)
    assert int(host.samples) == 6
    in_order = stat.merge(stat.merge(jax.device_get(stat.init()), late), early)
    for a, b in zip(stat.finalize(host), stat.finalize(in_order)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    with pytest.raises(ValueError, match="merged twice"):
        stat.merge(host, late)


def test_statistic_protocol_is_a_plain_namedtuple():
    stat = StreamingStatistic(lambda: jnp.zeros(()), lambda s, x, v: s + jnp.sum(v), np.add, np.asarray)
    assert stat.capacity is None
    total = tally(lambda p, b: b["x"], Rows(), stat, batch_size=10, progress=False)
    assert float(total) == 45.0


def test_readme_example_runs_and_is_right():
    """The user-defined statistic shown in gandissect_jax/dissection/README.md runs as printed."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "gandissect_jax" / "dissection" / "README.md").read_text()
    section = readme[readme.index("## Your own statistics"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- our own documentation
    x = np.stack([np.random.RandomState(i).randn(4, 4, 8) for i in range(200)]).astype(np.float32)
    results = namespace["results"]
    np.testing.assert_array_equal(results["active"], (x > 1.0).sum(axis=(0, 1, 2)))
    flat_x = x.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(results["moments"].variance, flat_x.var(0, ddof=1), rtol=1e-5)
    expected = np.cov(flat_x.T)[:4, 4:]
    np.testing.assert_allclose(results["cov"].covariance, expected, atol=1e-5)
