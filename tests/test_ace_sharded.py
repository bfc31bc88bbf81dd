"""ACE spread over devices is bit-identical to one device: the representations, the unedited
shares, every fit step and the held-out losses of the shipped demo pair, for the three
objectives, on meshes of 1, 3 and 4 (forced host) devices, with a batch that does not split
evenly in micro-batches nor micro-batches evenly over devices. Also: the micro-batched step is the
documented objective (against the whole batch at once, to float32 rounding) and map_batches is the
per-batch function.

One subprocess with 4 forced CPU devices runs every configuration (the mesh is an argument of
``optimize_ace``, so one process holds them all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from gandissect_jax import ace
    from gandissect_jax.ace.sharded import ace_mesh
    from gandissect_jax.proggan import load_generator
    from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter

    G, S = load_generator("scenes64"), load_demo_segmenter("scenes64-segmenter")
    assert len(jax.devices()) == 4
    corpus = ace.build_ace_corpus(G, S, "layer4", ["building", "window"], search_size=48, train_size=10,
                                  eval_size=5, seed=10, batch_size=16)
    out = {}
    for objective in ("ace", "removal", "specific_removal"):
        for devices in (1, 3, 4):
            fit = ace.optimize_ace(G, S, corpus, init=np.linspace(0, 1, 128), epochs=2, batch_size=7,
                                   micro_batch=2, objective=objective, binarize=0.1, max_units=10.0,
                                   mesh=ace_mesh(jax.devices()[:devices]))
            out[f"{objective}-{devices}"] = {"alpha": fit.alpha.tolist(), "eval_loss": fit.eval_loss.tolist()}
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ace_sharded") / "runs.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("objective", ["ace", "removal", "specific_removal"])
def test_fit_is_bit_identical_on_1_3_and_4_devices(runs, objective):
    one = runs[f"{objective}-1"]
    alpha = np.array(one["alpha"], np.float32)
    assert 0 < np.abs(alpha - np.linspace(0, 1, 128, dtype=np.float32)).max()  # the fit moved alpha
    assert np.isfinite(one["eval_loss"]).all() and len(one["eval_loss"]) == 3
    for devices in (3, 4):
        other = runs[f"{objective}-{devices}"]
        np.testing.assert_array_equal(np.array(other["alpha"], np.float32), alpha)
        np.testing.assert_array_equal(np.array(other["eval_loss"]), np.array(one["eval_loss"]))
