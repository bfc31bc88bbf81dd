"""The bfloat16 compute path of the generator source: float32 features close to float32's, its own identity."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gandissect_jax
from gandissect_jax.dissection.engine import make_mesh
from gandissect_jax.dissection.sources import GeneratorSource


@pytest.fixture(scope="module")
def demo_pair():
    return gandissect_jax.load_generator("scenes64"), gandissect_jax.load_segmenter("scenes64-segmenter")


def test_bfloat16_features_are_float32_and_near_the_float32_path(demo_pair):
    G, S = demo_pair
    full = GeneratorSource(G, S, ["layer4"], 16, micro_batch=8)
    low = GeneratorSource(G, S, ["layer4"], 16, micro_batch=8, compute_dtype="bfloat16")
    mesh = make_mesh(jax.devices()[:1])
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    a = full.fetch(np.arange(16), sharding)
    b = low.fetch(np.arange(16), sharding)
    assert b["layer4"].dtype == np.float32 and b["labels"].dtype == np.int32
    fa, fb = np.asarray(a["layer4"]), np.asarray(b["layer4"])
    assert not np.array_equal(fa, fb)  # it really computed in bfloat16
    # bfloat16 keeps 8 significant bits: a few per cent of the activation scale after several layers
    assert np.abs(fa - fb).max() < 0.1 * np.abs(fa).max()
    assert (np.asarray(a["labels"]) == np.asarray(b["labels"])).mean() > 0.95
    images, features = low.visual_batch(np.arange(4), "layer4")
    assert images.dtype == np.uint8 and features.dtype == np.float32


def test_compute_dtype_is_part_of_the_identity_and_checked(demo_pair):
    G, S = demo_pair
    full = GeneratorSource(G, S, ["layer4"], 16, micro_batch=8)
    assert "compute_dtype" not in full.identity()  # float32 runs keep their identity (resume)
    low = GeneratorSource(G, S, ["layer4"], 16, micro_batch=8, compute_dtype="bfloat16")
    assert low.identity()["compute_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        GeneratorSource(G, S, ["layer4"], 16, compute_dtype="float16")
