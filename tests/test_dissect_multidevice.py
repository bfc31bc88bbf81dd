"""Sharding over 8 (forced host) devices gives exactly the single-device results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from gandissect_jax.dissection import dissect_features

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"
FIELDS = ("levels", "label_counts", "total_counts", "category_activation_counts", "intersection_counts", "iou", "iqr",
          "unit_label", "topk_values", "topk_indices", "max_iqr", "max_iqr_level", "candidate_levels", "raw_quantiles")

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from gandissect_jax.dissection import dissect_features

    fixtures, out = sys.argv[1], sys.argv[2]
    data = np.load(fixtures + "/dissect_golden.npz")
    labels = json.load(open(fixtures + "/labels.json"))
    features = data["features"].transpose(0, 2, 3, 1)
    segs = data["segs"].transpose(0, 2, 3, 1)
    assert len(jax.devices()) == 8, jax.devices()
    arrays = {}
    for name, devices in (("eight", jax.devices()), ("one", jax.devices()[:1])):
        result = dissect_features(features, segs, labels, threshold="iqr", batch_size=16, devices=devices,
                                  progress=False)["features"]
        for field in %r:
            arrays[name + "/" + field] = getattr(result, field)
    np.savez(out, **arrays)
""" % (FIELDS,))


def test_eight_devices_match_one(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "sharded.npz"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(FIXTURES), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = np.load(FIXTURES / "dissect_golden.npz")
    labels = json.loads((FIXTURES / "labels.json").read_text())
    local = dissect_features(data["features"].transpose(0, 2, 3, 1), data["segs"].transpose(0, 2, 3, 1), labels,
                             threshold="iqr", batch_size=16, progress=False)["features"]
    with np.load(out) as sharded:
        for field in FIELDS:
            np.testing.assert_array_equal(sharded["eight/" + field], sharded["one/" + field], err_msg=field)
            np.testing.assert_array_equal(sharded["eight/" + field], getattr(local, field), err_msg=field)
