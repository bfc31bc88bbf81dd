"""The ACE corpus search over all batches at once (``map_batches``) equals the per-batch loop it
replaced, bit for bit: the same zero-padded batches, the probes of every candidate batch drawn in
batch order from one RandomState, the weighted feature sums added in float64 in batch order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax._structure import Static
from gandissect_jax.ace import build_ace_corpus, corpus as corpus_module
from gandissect_jax.sampling import sample_z
from test_ace import RedIsSky, ToyGenerator


def per_batch_corpus(G, S, layer, labels, *, search_size, train_size, eval_size, seed, probes, batch_size,
                     seg_downsample=1):
    """The corpus by a Python loop over batches, one jitted pass per batch (the former implementation)."""
    rows, cols, channels = corpus_module.layer_shape(G, layer)
    locations = rows * cols
    static = dict(split=tuple(G.split(layer)), segmenter=Static(S), labels=tuple(labels),
                  downsample=seg_downsample, grid=(rows, cols))
    presence_pass = jax.jit(corpus_module._presence_pass, static_argnames=tuple(static))
    candidate_pass = jax.jit(corpus_module._candidate_pass, static_argnames=tuple(static))
    z_present = sample_z(search_size, G.z_dim, seed)
    presence = np.zeros((search_size, locations), np.float32)
    feature_sum = np.zeros(channels, np.float64)
    for start in range(0, search_size, batch_size):
        z = z_present[start:start + batch_size]
        count = len(z)
        z = np.concatenate([z, np.zeros((batch_size - count, z.shape[1]), z.dtype)])
        valid = jnp.asarray(np.arange(batch_size) < count, jnp.float32)
        p, s = presence_pass((G.params, S.params), jnp.asarray(z), valid, **static)
        presence[start:start + count] = np.asarray(p)[:count]
        feature_sum += np.asarray(s, np.float64)
    best = presence.max(1)
    order = np.sort(np.argsort(-best, kind="stable")[:train_size + eval_size])
    train, held_out = order[:train_size], order[len(order) - eval_size:]
    present_location = presence.argmax(1).astype(np.int32)
    insertion_value = (feature_sum / (1e-20 + presence.sum(dtype=np.float64))).astype(np.float32)
    popularity = np.bincount(present_location[train], minlength=locations).astype(np.float64)
    weights = popularity + popularity.mean() / 10.0
    weights /= weights.sum()
    z_candidate = sample_z(search_size, G.z_dim, seed + 1)
    scores = np.zeros((search_size, locations), np.float32)
    rng = np.random.RandomState(seed)
    for start in range(0, search_size, batch_size):
        probe = rng.choice(locations, size=probes, replace=False, p=weights)
        z = z_candidate[start:start + batch_size]
        count = len(z)
        z = np.concatenate([z, np.zeros((batch_size - count, z.shape[1]), z.dtype)])
        g = candidate_pass((G.params, S.params, jnp.asarray(insertion_value)), jnp.asarray(z), jnp.asarray(probe),
                           **static)
        scores[start:start + count, probe] = np.asarray(g)[:count]
    order = np.sort(np.argsort(-scores.max(1), kind="stable")[:train_size + eval_size])
    c_train, c_held_out = order[:train_size], order[len(order) - eval_size:]
    location = scores.argmax(1).astype(np.int32)
    return dict(present_z=z_present[train], present_location=present_location[train],
                candidate_z=z_candidate[c_train], candidate_location=location[c_train],
                eval_present_z=z_present[held_out], eval_present_location=present_location[held_out],
                eval_candidate_z=z_candidate[c_held_out], eval_candidate_location=location[c_held_out],
                insertion_value=insertion_value)


def assert_same_corpus(corpus, expected):
    for name, value in expected.items():
        got = getattr(corpus, name)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert got.tobytes() == value.tobytes(), f"{name} differs"


def test_toy_corpus_equals_the_per_batch_loop_with_a_padded_last_batch():
    G, S = ToyGenerator(), RedIsSky()
    sizes = dict(search_size=60, train_size=20, eval_size=10, seed=3, probes=2, batch_size=16)  # 4 batches, 12 pad
    corpus = build_ace_corpus(G, S, "toy", "sky", **sizes)
    assert_same_corpus(corpus, per_batch_corpus(G, S, "toy", (1,), **sizes))


@pytest.mark.slow
def test_demo_pair_corpus_equals_the_per_batch_loop():
    from gandissect_jax.proggan import load_generator
    from gandissect_jax.segmenter import load_segmenter

    G, S = load_generator("scenes64"), load_segmenter("scenes64-segmenter")
    sizes = dict(search_size=40, train_size=8, eval_size=4, seed=10, probes=5, batch_size=16)  # 3 batches, 8 pad
    corpus = build_ace_corpus(G, S, "layer4", "tree", **sizes)
    expected = per_batch_corpus(G, S, "layer4", corpus.labels, **sizes)
    assert_same_corpus(corpus, expected)
    assert (expected["candidate_location"] != expected["candidate_location"][0]).any()  # not a degenerate corpus
