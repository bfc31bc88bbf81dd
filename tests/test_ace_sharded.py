"""ACE spread over devices: the fit of the shipped demo pair (representations, unedited shares,
every step, the held-out losses), for the three objectives, with a batch that splits evenly
neither in micro-batches nor over devices, is bit-identical on meshes of 3 and 4 (forced host)
devices, and (checked for the ``ace`` objective, whose program differs from the others' only
in the loss) equal to 1 device to float32 rounding: XLA compiles the generator's backward pass
in a program partitioned over 2 or more devices differently from the unpartitioned 1-device
program (asserted: alpha within 1e-6, the held-out loss within 1e-5 relative; 1.5e-8 measured for alpha).

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
    # the corpus search (forward passes by map_batches): the bits of one device on 4
    corpora = [ace.build_ace_corpus(G, S, "layer4", ["building", "window"], search_size=24, train_size=6,
                                    eval_size=3, seed=3, batch_size=4, mesh=ace_mesh(jax.devices()[:d]))
               for d in (1, 4)]
    out["corpus_equal"] = all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                              for a, b in zip(corpora[0][2:], corpora[1][2:]))
    for objective in ("ace", "removal", "specific_removal"):
        for devices in ((1, 3, 4) if objective == "ace" else (3, 4)):  # the 1-device program: once
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
def test_fit_is_bit_identical_on_3_and_4_devices_and_equal_to_1_device_to_rounding(runs, objective):
    three, four, one = (runs.get(f"{objective}-{devices}") for devices in (3, 4, 1))
    alpha = np.array(four["alpha"], np.float32)
    assert 1e-3 < np.abs(alpha - np.linspace(0, 1, 128, dtype=np.float32)).max()  # the fit moved alpha
    assert np.isfinite(four["eval_loss"]).all() and len(four["eval_loss"]) == 3
    np.testing.assert_array_equal(np.array(three["alpha"], np.float32), alpha)
    np.testing.assert_array_equal(np.array(three["eval_loss"]), np.array(four["eval_loss"]))
    if one is not None:
        np.testing.assert_allclose(np.array(one["alpha"], np.float32), alpha, rtol=0, atol=1e-6)
        np.testing.assert_allclose(one["eval_loss"], four["eval_loss"], rtol=1e-5)


def test_corpus_search_is_bit_identical_on_1_and_4_devices(runs):
    assert runs["corpus_equal"] is True
