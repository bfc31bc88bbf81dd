"""Unit segmentation (Network Dissection's) and artifact-unit ranking (Tousi et al.) against
independent computations; the demo discriminator converted from the training state."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax import unitseg
from gandissect_jax.artifacts import artifact_ranking, ranking
from gandissect_jax.dissection.upsample import bilinear_matrix
from gandissect_jax.generator import Split
from gandissect_jax.sampling import sample_z

ROOT = Path(__file__).resolve().parent.parent


def toy_layer(n=24, seed=0):
    """(features (n, 7, 7, 6) NHWC, segmentation (n, 28, 28)): units 0-2 respond to label 1 (a top
    band), units 3-4 to label 2 (a moving square), unit 5 is noise (the case of
    /work/shared/cases/turn2/make_toy_data.py, smaller)."""
    rng = np.random.RandomState(seed)
    seg = np.zeros((n, 28, 28), np.int32)
    feats = rng.rand(n, 7, 7, 6).astype(np.float32) * 0.1
    for i in range(n):
        r0, c0 = rng.randint(0, 14, 2)
        seg[i, :10] = 1
        seg[i, r0:r0 + 12, c0:c0 + 12] = 2
        small = seg[i, 2::4, 2::4]
        for u, label in ((0, 1), (1, 1), (2, 1), (3, 2), (4, 2)):
            feats[i, :, :, u] += (small == label) * (1.0 + 0.1 * u)
    return feats, seg


def numpy_unit_segmentation(feats, levels, unit_label, interpretable, size):
    """Explicit float64 version: upsample with the dense bilinear matrices, loop over pixels."""
    rows, cols = bilinear_matrix(feats.shape[1], size[0]), bilinear_matrix(feats.shape[2], size[1])
    up = np.einsum("ah,nhwu,bw->nabu", rows, feats.astype(np.float64), cols)
    out = np.zeros((len(feats), *size), np.int32)
    for n in range(len(feats)):
        for y in range(size[0]):
            for x in range(size[1]):
                best, best_margin = 0, 0.0
                for u in np.flatnonzero(interpretable):
                    margin = (up[n, y, x, u] - levels[u]) / max(abs(levels[u]), 1e-6)
                    if margin > best_margin:
                        best, best_margin = unit_label[u], margin
                out[n, y, x] = best
    return out


def test_unit_segmentation_matches_an_independent_computation():
    from gandissect_jax.dissection import dissect_features

    feats, seg = toy_layer()
    labels = {"labels": [["-", "object"], ["sky", "object"], ["tree", "object"]], "categories": ["object"]}
    # the reference's label rule: 24 toy samples are too few for the default significance test,
    # and this test is about the unit segmentation, not the labelling
    result = dissect_features(feats, seg, labels, threshold="quantile", quantile=0.2, progress=False,
                              make_images=False, make_report=False, label_rule="reference")["features"]
    interpretable = result.interpretable(0.05)
    assert interpretable[:5].all() and list(result.unit_label[:5]) == [1, 1, 1, 2, 2]
    got = np.asarray(unitseg.unit_segmentation(feats, result.levels, result.unit_label, interpretable, (28, 28)))
    expected = numpy_unit_segmentation(feats, result.levels, result.unit_label, interpretable, (28, 28))
    assert got.shape == (24, 28, 28) and got.dtype == np.int32
    assert (got != expected).mean() < 1e-3  # float32 vs float64 near-ties only
    agreement = unitseg.agreement(got, seg[..., None])
    # it segments the toy world (a label swap would give accuracy ~0.2 and IoUs near 0)
    assert agreement.accuracy > 0.6 and agreement.coverage > 0.4
    assert set(agreement.per_label) == {1, 2} and min(v[0] for v in agreement.per_label.values()) > 0.4
    manual = (got > 0) & (got == seg)
    assert agreement.accuracy == pytest.approx(manual.sum() / (got > 0).sum())
    # composes with vmap over samples and jit
    one = jax.jit(lambda f: unitseg.unit_segmentation(f[None], result.levels, result.unit_label, interpretable,
                                                      (28, 28))[0])
    np.testing.assert_array_equal(one(feats[3]), got[3])
    with pytest.raises(ValueError, match="levels has shape"):
        unitseg.unit_segmentation(feats, result.levels[:3], result.unit_label, interpretable, (28, 28))


class NoisyUnit:
    """r (N, 2, 2, 4) = z; the image is tanh(r0) in red, plus 3 * r2 of 'noise' in green; unit 2
    causes the artifact (green), the others do not."""

    z_dim = 16
    layer_names = ("toy",)
    params = {"noise": jnp.float32(3.0)}

    def layer_shape(self, layer):
        return (2, 2, 4)

    def split(self, layer):
        return Split(self.h, self.f)

    def apply(self, params, z):
        return self.f(params, *self.h(params, z))

    @staticmethod
    @jax.jit
    def h(params, z):
        return jnp.asarray(z).reshape(-1, 2, 2, 4), ()

    @staticmethod
    @jax.jit
    def f(params, r, side):
        x = jnp.stack([jnp.tanh(r[..., 0]), jnp.tanh(params["noise"] * jnp.abs(r[..., 2])), jnp.tanh(r[..., 1])], -1)
        return x.repeat(4, 1).repeat(4, 2)


class HatesGreen:
    """Realism = minus the mean green."""

    params = {"w": jnp.asarray([0.0, -1.0, 0.0])}

    def score(self, params, images):
        return (images * params["w"]).mean((1, 2, 3)) * 3


def test_artifact_ranking_finds_the_unit_and_equals_a_per_unit_loop():
    G, D = NoisyUnit(), HatesGreen()
    z = sample_z(12, G.z_dim, 1)
    scores = artifact_ranking(G, D, G.params, D.params, z, "toy", top_samples=4, units_per_step=3)
    assert ranking(scores)[0] == 2
    r = np.asarray(z).reshape(-1, 2, 2, 4)
    base = np.asarray(D.score(D.params, G.f(G.params, jnp.asarray(r), ())))
    np.testing.assert_allclose(scores.realism, base, rtol=1e-6)
    for u in range(4):
        top = np.argsort(-r[..., u].max((1, 2)), kind="stable")[:4]
        np.testing.assert_array_equal(np.sort(np.asarray(scores.top_samples[u])), np.sort(top))
        ablated = r[top].copy()
        ablated[..., u] = 0
        gain = np.asarray(D.score(D.params, G.f(G.params, jnp.asarray(ablated), ()))) - base[top]
        np.testing.assert_allclose(scores.gain[u], gain.mean(), rtol=1e-5, atol=1e-6)
    assert float(scores.gain[2]) > 0.3 and abs(float(scores.gain[3])) < 1e-6
    with pytest.raises(ValueError, match="top_samples"):
        artifact_ranking(G, D, G.params, D.params, z[:2], "toy", top_samples=4)


def train_script():
    name = "train_demo_gan_for_tests"
    if name not in sys.modules:
        if str(ROOT / "scripts") not in sys.path:  # the scripts import their sibling _outputs.py
            sys.path.insert(0, str(ROOT / "scripts"))
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "train_demo_gan.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_shipped_discriminator_is_the_trained_one_and_scores_real_above_generated():
    from gandissect_jax.checkpoints import load_checkpoint
    from gandissect_jax.proggan import load_generator
    from gandissect_jax.scenes import world
    from gandissect_jax.scenes.discriminator import context_images, load_discriminator
    from gandissect_jax.weights import shipped_weights_dir

    D = load_discriminator("scenes64-discriminator")
    state, config = load_checkpoint(shipped_weights_dir() / "scenes64_train_state")
    assert config["kind"] == "scenes64-gan-train-state"
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(state["d"]),
                                 jax.tree_util.tree_leaves_with_path(D.params["network"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    np.testing.assert_array_equal(np.asarray(D.params["context_images"]), context_images())
    real, _ = world.render_scenes(1000, np.arange(16))
    fake = np.asarray(load_generator("scenes64")(sample_z(16, 128, 5)))
    # the training code's own discriminator, on the same groups of four
    script = train_script()
    group = np.concatenate([real[:1], context_images()])
    theirs = script.Discriminator().apply({"params": state["d"]}, group)[0]
    ours = D.score(D.params, real[:1])[0]
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    real_scores, fake_scores = np.asarray(D.score(D.params, real)), np.asarray(D.score(D.params, fake))
    assert real_scores.mean() > fake_scores.mean() + 0.5
    # a sample's score does not depend on its batch
    np.testing.assert_array_equal(np.asarray(D.score(D.params, real[3:5])), real_scores[3:5])
    with pytest.raises(ValueError, match="not a demo discriminator"):
        load_discriminator(shipped_weights_dir() / "scenes64" / "generator")
    with pytest.raises(ValueError, match="64, 64, 3"):
        D.score(D.params, np.zeros((1, 32, 32, 3), np.float32))


def test_convert_train_state_refuses_other_checkpoints(tmp_path):
    from gandissect_jax.scenes.discriminator import convert_train_state
    from gandissect_jax.weights import shipped_weights_dir

    with pytest.raises(ValueError, match="not a demo GAN train state"):
        convert_train_state(shipped_weights_dir() / "scenes64" / "segmenter", tmp_path / "d")
    assert not (tmp_path / "d").exists()
