"""One compiled program per architecture: repeated ACE fits, ablations, label shares, context
maps, curves and artifact rankings compile nothing more, and neither does a second weight set of
the same generator, segmenter and discriminator architectures (their parameters are arguments of
the programs, never constants in them)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax import effects
from gandissect_jax.ace import build_ace_corpus, optimize_ace
from gandissect_jax.artifacts import artifact_ranking
from gandissect_jax.intervention import ablation_edit, label_shares
from gandissect_jax.proggan import GeneratorConfig, ProgressiveGenerator
from gandissect_jax.sampling import sample_z
from gandissect_jax.scenes.demo_segmenter import DemoSegmenter, UNet
from compilations import compilations


def random_like(shapes, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape, np.float32)), shapes)


class LinearCritic:
    """A discriminator: realism = mean of the images times a weight per colour."""

    def __init__(self, weights):
        self.params = {"w": jnp.asarray(weights, jnp.float32)}

    def score(self, params, images):
        return (images * params["w"]).mean((1, 2, 3))


def models():
    config = GeneratorConfig.from_channels(z_dim=16, channels=(16, 8, 8))  # 16x16 images
    g_shapes = {layer: {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in tensors.items()}
                for layer, tensors in config.param_shapes().items()}
    widths = (4, 4, 8, 8)
    s_shapes = jax.eval_shape(UNet(widths=widths).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    pairs = []
    for seed in (1, 2):
        G = ProgressiveGenerator(random_like(g_shapes, seed, 1.0), config)
        S = DemoSegmenter(random_like(s_shapes, seed + 10), widths)
        pairs.append((G, S, LinearCritic(np.random.default_rng(seed).normal(size=3))))
    return pairs


def run_everything(G, S, D, z, corpus):
    fit = optimize_ace(G, S, corpus, epochs=2, batch_size=4)
    fit_specific = optimize_ace(G, S, corpus, epochs=1, batch_size=4, objective="specific_removal", max_units=2)
    units = jnp.asarray([0, 3])
    return (
        fit.alpha, fit.eval_loss, fit_specific.alpha,
        label_shares(G, S, z, batch_size=5),
        label_shares(G, S, z, layer="layer3", edit=ablation_edit([0, 3], 8), batch_size=5),
        effects.ablate(G, G.params, z[:5], "layer3", units),
        effects.paired_label_shares(G, S, G.params, S.params, z[:5], "layer3", units)[1],
        effects.context_map(G, S, G.params, S.params, z[:5], "layer3", units, 2.0, (6,)),
        effects.ace_curve(G, S, G.params, S.params, z[:5], "layer3", np.arange(8), (0, 1, 2, 4), (6,)),
        artifact_ranking(G, D, G.params, D.params, z, "layer3", top_samples=3).gain,
    )


def test_nothing_recompiles_for_repeated_calls_or_other_weights():
    (G1, S1, D1), (G2, S2, D2) = models()
    z = sample_z(10, 16, seed=0)
    labels = [name for name, _ in S1.labels]
    concept = max(range(1, len(labels)), key=lambda c: float(
        (np.asarray(S1.segment(S1.params, jnp.clip(G1(jnp.asarray(sample_z(40, 16, 10))), -1, 1))) == c).mean()))
    corpus = build_ace_corpus(G1, S1, "layer3", labels[concept], search_size=40, train_size=8, eval_size=4,
                              probes=2, batch_size=8)
    first = run_everything(G1, S1, D1, z, corpus)  # compiles
    with compilations() as compiled:
        again = run_everything(G1, S1, D1, z, corpus)
        other = run_everything(G2, S2, D2, z, corpus)
        build_ace_corpus(G2, S2, "layer3", labels[concept], search_size=40, train_size=2, eval_size=1,
                         probes=2, batch_size=8)
    assert compiled == [], f"{len(compiled)} recompilations"
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # other weights, other results (the programs really read the parameters)
    assert np.abs(np.asarray(other[3]) - np.asarray(first[3])).max() > 0
    assert np.abs(np.asarray(other[5]) - np.asarray(first[5])).max() > 0
    assert np.abs(np.asarray(other[-1]) - np.asarray(first[-1])).max() > 0


def test_a_program_from_the_persistent_compilation_cache_counts_as_a_compilation():
    """tests/conftest.py turns on JAX's persistent compilation cache: a program compiled again
    is then loaded, not compiled, and must still count, or the tests above would miss it."""
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("no persistent compilation cache in this session")
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        x = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
        jax.jit(lambda v: jnp.tanh(v) * 3.25 + 1.0)(x).block_until_ready()  # compiled, written to the cache
        hits = []

        def listener(event, **kwargs):
            hits.append(event)

        jax.monitoring.register_event_listener(listener)
        try:
            with compilations() as compiled:
                jax.jit(lambda v: jnp.tanh(v) * 3.25 + 1.0)(x).block_until_ready()  # a new jit: the same program
        finally:
            unregister = getattr(jax.monitoring, "unregister_event_listener", None)
            if unregister is None:  # jax < 0.8.1
                from jax._src.monitoring import _unregister_event_listener_by_callback as unregister
            unregister(listener)
        assert "/jax/compilation_cache/cache_hits" in hits  # loaded from the cache, not compiled
        assert len(compiled) == 1  # and counted
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
