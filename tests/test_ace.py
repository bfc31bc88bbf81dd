"""ACE optimization: corpus collection and the alpha fit, on a toy generator whose causal unit is
known by construction, and on the shipped demo pair against independent recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.ace import (
    _pool_to_grid,
    ace_ranking,
    build_ace_corpus,
    concept_score,
    optimize_ace,
)
from gandissect_jax.generator import Generator, Split
from gandissect_jax.intervention import edit_representation
from gandissect_jax.sampling import sample_z


class ToyGenerator:
    """r = z as a 2x2 map of 4 channels; the image's red channel is tanh(2 r_0), upsampled x4.
    Only unit 0 can make pixels red."""

    z_dim = 16
    layer_names = ("toy",)
    params = {"gain": jnp.float32(2.0)}

    def layer_shape(self, layer):
        if layer != "toy":
            raise ValueError(f"unknown layer {layer!r}")
        return (2, 2, 4)

    def apply(self, params, z):
        return self.f(params, *self.h(params, z))

    def split(self, layer):
        self.layer_shape(layer)
        return Split(self.h, self.f)

    @staticmethod
    def h(params, z):
        return jnp.asarray(z).reshape(-1, 2, 2, 4), ()

    @staticmethod
    def f(params, r, side):
        red = jnp.tanh(params["gain"] * r[..., 0])
        rest = jnp.tanh(r[..., 1:3])
        x = jnp.concatenate([red[..., None], rest], -1)
        return x.repeat(4, 1).repeat(4, 2)


class RedIsSky:
    """Label 1 'sky' wherever the red channel is positive (score sigmoid(4 red)); label 2 'sun'
    where green exceeds 1.5, which a tanh output never does."""

    labels = (("-", "object"), ("sky", "object"), ("sun", "object"))
    categories = ("object",)
    params = {"sharpness": jnp.float32(4.0)}

    def class_score(self, params, images, c, downsample=1):
        x = images[:, ::downsample, ::downsample]
        k = params["sharpness"]
        score = jax.nn.sigmoid(k * x[..., 0]) if c == 1 else jax.nn.sigmoid(k * (x[..., 1] - 1.5))
        return score, score > 0.5

    def segment(self, params, images, downsample=1):
        sky, _ = self.class_score(params, images, 1, downsample)
        return (sky > 0.5).astype(jnp.int32)[..., None]


def test_toys_implement_the_protocols():
    from gandissect_jax.generator import verify_split
    from gandissect_jax.segmenter_protocol import Segmenter

    assert isinstance(ToyGenerator(), Generator) and isinstance(TwoWaysToRemoveSky(), Generator)
    assert isinstance(RedIsSky(), Segmenter) and isinstance(SkyAndSun(), Segmenter)
    assert verify_split(ToyGenerator(), "toy") == 0.0


def test_corpus_matches_an_independent_search():
    G, S = ToyGenerator(), RedIsSky()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=60, train_size=20, eval_size=10,
                              seed=3, probes=2, batch_size=16)
    assert corpus.labels == (1,) and corpus.layer == "toy"
    # present: sky covers the 4x4 block of a location exactly where r_0 > 0, so presence is
    # 1 at those locations; the chosen images are those with any, the location the first of them
    z = sample_z(60, 16, 3)
    r = z.reshape(-1, 2, 2, 4)
    presence = (np.tanh(2 * r[..., 0]) > 0).reshape(60, 4).astype(np.float64)
    best = presence.max(1)
    chosen = np.sort(np.argsort(-best, kind="stable")[:30])
    np.testing.assert_array_equal(corpus.present_z, z[chosen[:20]])
    np.testing.assert_array_equal(corpus.eval_present_z, z[chosen[-10:]])
    np.testing.assert_array_equal(corpus.present_location, presence.argmax(1)[chosen[:20]])
    weighted = (r * presence.reshape(60, 2, 2, 1)).sum((0, 1, 2)) / presence.sum()
    np.testing.assert_allclose(corpus.insertion_value, weighted, rtol=1e-5)
    assert corpus.insertion_value[0] > 0  # the typical sky feature has a positive unit 0
    # candidates: where the location had no sky, inserting the typical feature there adds sky
    rc = corpus.candidate_z.reshape(-1, 2, 2, 4)
    flat = rc.reshape(-1, 4, 4)
    at = flat[np.arange(len(flat)), corpus.candidate_location]
    assert (at[:, 0] <= 0).all()  # the concept was absent there
    h, f = G.split("toy")
    m = jax.nn.one_hot(corpus.candidate_location, 4).reshape(-1, 2, 2, 1)
    edited = f(G.params, edit_representation(jnp.asarray(rc), m, jnp.asarray(corpus.insertion_value)), ())
    gained = (np.asarray(S.segment(S.params, edited)).sum((1, 2, 3))
              - np.asarray(S.segment(S.params, f(G.params, rc, ()))).sum((1, 2, 3)))
    np.testing.assert_array_equal(gained, 16)  # one 4x4 block turned to sky


def test_optimization_finds_the_causal_unit():
    G, S = ToyGenerator(), RedIsSky()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=200, train_size=60, eval_size=20,
                              seed=5, probes=4, batch_size=50)
    fit = optimize_ace(G, S, corpus, init=np.full(4, 0.5), l2=0.005, epochs=20, batch_size=10)
    # unit 0 causes sky: its weight rises to 1; the others only pay the L2 price and fall to 0
    assert fit.alpha[0] == pytest.approx(1.0)
    np.testing.assert_allclose(fit.alpha[1:], 0.0, atol=0.02)
    assert fit.eval_loss.shape == (21,)
    assert fit.eval_loss[-1] < fit.eval_loss[0] - 0.3
    assert ace_ranking(fit.alpha)[0] == 0
    # deterministic by seed
    again = optimize_ace(G, S, corpus, init=np.full(4, 0.5), l2=0.005, epochs=20, batch_size=10)
    np.testing.assert_array_equal(again.alpha, fit.alpha)


def test_eval_loss_is_the_documented_objective():
    """The held-out loss before training equals the objective recomputed from its definition."""
    G, S = ToyGenerator(), RedIsSky()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=80, train_size=20, eval_size=8,
                              seed=1, probes=2, batch_size=40)
    alpha = np.array([0.7, 0.2, 0.0, 1.0], np.float32)
    fits = {mb: optimize_ace(G, S, corpus, init=alpha, epochs=0, batch_size=4, micro_batch=mb) for mb in (1, 3, 4)}
    fit = fits[4]
    h, f = G.split("toy")

    def mean_score_at(z, loc, replacement):
        m = jax.nn.one_hot(loc, 4).reshape(-1, 2, 2, 1) * alpha
        r, side = h(G.params, z)
        x = f(G.params, edit_representation(r, m, replacement), side)
        score = np.asarray(S.class_score(S.params, x, 1)[0])  # (N, 8, 8)
        blocks = score.reshape(-1, 2, 4, 2, 4).mean((2, 4)).reshape(-1, 4)
        return blocks[np.arange(len(loc)), loc].mean()

    expected = (mean_score_at(corpus.eval_present_z, corpus.eval_present_location, None)
                - mean_score_at(corpus.eval_candidate_z, corpus.eval_candidate_location,
                                corpus.insertion_value))
    assert fit.eval_loss.shape == (1,)
    for mb, each in fits.items():  # whole micro-batches, and 3 + 1 padded with weight 0
        assert each.eval_loss[0] == pytest.approx(expected, abs=1e-5), mb
    np.testing.assert_array_equal(fit.alpha, alpha)
    # the removal objective: alpha ablated at every position of the present samples, the
    # concept's score summed over the whole feature grid (4 locations of 4x4 pixels)
    removal = optimize_ace(G, S, corpus, init=alpha, epochs=0, batch_size=4, objective="removal")
    r, side = h(G.params, corpus.eval_present_z)
    x = f(G.params, edit_representation(r, alpha), side)
    score = np.asarray(S.class_score(S.params, x, 1)[0])
    assert removal.eval_loss[0] == pytest.approx(score.mean((1, 2)).mean() * 4, abs=1e-5)


def test_union_concept_scores_and_masks():
    S = RedIsSky()
    images = jnp.asarray(np.random.default_rng(0).uniform(-3, 3, (3, 8, 8, 3)), jnp.float32)
    score, mask = concept_score(S, S.params, images, (1, 2))
    sky, sky_mask = S.class_score(S.params, images, 1)
    sun, sun_mask = S.class_score(S.params, images, 2)
    np.testing.assert_allclose(score, np.asarray(sky) + np.asarray(sun), rtol=1e-6)
    assert np.asarray(sun_mask).any() and np.asarray(sky_mask).any()
    np.testing.assert_array_equal(mask, np.asarray(sky_mask) | np.asarray(sun_mask))


def test_ranking_breaks_ties_by_the_second_score():
    alpha = np.array([1.0, 0.3, 1.0, 0.0, 1.0, 0.3])
    iou = np.array([0.1, 0.5, 0.4, 0.9, 0.1, 0.2])
    # alpha 1: units 2 (iou .4), then 0 and 4 (iou .1, by number); alpha .3: 1, 5; then 3
    np.testing.assert_array_equal(ace_ranking(alpha, iou), [2, 0, 4, 1, 5, 3])
    np.testing.assert_array_equal(ace_ranking(alpha), [0, 2, 4, 1, 5, 3])
    with pytest.raises(ValueError, match="tie_break"):
        ace_ranking(alpha, iou[:3])


def test_bad_arguments_are_named():
    G, S = ToyGenerator(), RedIsSky()
    with pytest.raises(ValueError, match="unknown label|not a label|cloud"):
        build_ace_corpus(G, S, "toy", "cloud", search_size=10, train_size=2, eval_size=2, probes=2)
    with pytest.raises(ValueError, match="unknown layer"):
        build_ace_corpus(G, S, "layer9", "sky", search_size=10, train_size=2, eval_size=2, probes=2)
    with pytest.raises(ValueError, match="exceeds search_size"):
        build_ace_corpus(G, S, "toy", "sky", search_size=10, train_size=8, eval_size=4, probes=2)
    with pytest.raises(ValueError, match="only .* images show"):
        build_ace_corpus(G, S, "toy", "sun", search_size=4, train_size=3, eval_size=1, probes=2)
    with pytest.raises(ValueError, match="probes = 5 exceeds the 4 locations"):
        build_ace_corpus(G, S, "toy", "sky", search_size=10, train_size=2, eval_size=2)
    with pytest.raises(ValueError, match="not a whole multiple"):
        _pool_to_grid(jnp.zeros((1, 7, 8)), (2, 2))
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=40, train_size=8, eval_size=4, seed=2, probes=2)
    with pytest.raises(ValueError, match="init has shape"):
        optimize_ace(G, S, corpus, init=np.zeros(3), epochs=0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        optimize_ace(G, S, corpus, batch_size=9, epochs=0)
    with pytest.raises(ValueError, match="objective must be"):
        optimize_ace(G, S, corpus, objective="fast", epochs=0, batch_size=4)


@pytest.mark.slow
def test_demo_pair_corpus_candidates_really_gain_the_concept():
    """On the shipped generator and segmenter: each candidate's recorded location is where
    inserting the corpus feature adds building pixels, recomputed independently."""
    from gandissect_jax.proggan import load_generator
    from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter

    G, S = load_generator("scenes64"), load_demo_segmenter("scenes64-segmenter")
    corpus = build_ace_corpus(G, S, "layer4", ["building", "window"], search_size=64,
                              train_size=12, eval_size=4, seed=10, batch_size=32)
    assert corpus.labels == (7, 8)
    h, f = G.split("layer4")
    z = jnp.asarray(corpus.candidate_z)
    r, side = h(G.params, z)
    m = jax.nn.one_hot(corpus.candidate_location, 64).reshape(-1, 8, 8, 1)
    before = np.isin(np.asarray(S.segment(S.params, f(G.params, r, side)))[..., 0], (7, 8))
    edited = f(G.params, edit_representation(r, m, corpus.insertion_value), side)
    after = np.isin(np.asarray(S.segment(S.params, edited))[..., 0], (7, 8))
    gained = after.sum((1, 2)).astype(int) - before.sum((1, 2)).astype(int)
    assert (gained[:6] > 0).all()  # the best candidates gain building pixels
    # and the concept was absent in the 8x8 block of each candidate location
    rows, cols = np.divmod(corpus.candidate_location, 8)
    for i in range(len(z)):
        if gained[i] > 0:
            assert not before[i, 8 * rows[i]: 8 * rows[i] + 8, 8 * cols[i]: 8 * cols[i] + 8].any()


class TwoWaysToRemoveSky(ToyGenerator):
    """r0 is noise the image ignores but for blue; r1 and r2 are always >= 1 unless ablated;
    r3 says where the sky is. Sky (red > 0) needs r1 and r2 above 0.5, so ablating either removes
    it (red drops to -0.5); but with r2 ablated the same places turn green, which
    :class:`SkyAndSun` calls sun. Ablating r1 removes the sky and nothing else."""

    params = {}

    @staticmethod
    def h(params, z):
        r = jnp.asarray(z).reshape(-1, 2, 2, 4)
        return r.at[..., 1:3].set(1 + jnp.abs(r[..., 1:3])), ()

    @staticmethod
    def f(params, r, side):
        gate1, gate2 = (jax.nn.sigmoid(10 * (r[..., k] - 0.5)) for k in (1, 2))
        red = jnp.tanh(2 * (r[..., 3] + 0.5)) * gate1 * gate2 - 0.5
        green = jnp.tanh(3 * (r[..., 3] + 0.5)) * (1 - gate2)
        x = jnp.stack([red, green, jnp.tanh(r[..., 0])], -1)
        return x.repeat(4, 1).repeat(4, 2)


class SkyAndSun(RedIsSky):
    """Sky where red > 0 (score sigmoid(8 red)), sun where green > 0.5 (sigmoid(8 (green - 0.5)))."""

    def class_score(self, params, images, c, downsample=1):
        x = images[:, ::downsample, ::downsample]
        score = jax.nn.sigmoid(8 * x[..., 0]) if c == 1 else jax.nn.sigmoid(8 * (x[..., 1] - 0.5))
        return score, score > 0.5


def test_budget_projection_is_the_euclidean_projection():
    from scipy.optimize import minimize

    from gandissect_jax.ace import project_to_budget

    rng = np.random.default_rng(4)
    for budget in (0.5, 2.0, 3.7):
        x = rng.uniform(-0.5, 1.6, 9)
        got = np.asarray(project_to_budget(x, budget))
        assert got.sum() <= budget + 1e-6 and got.min() >= 0 and got.max() <= 1
        best = minimize(lambda a: ((a - x) ** 2).sum(), np.full(9, budget / 9), jac=lambda a: 2 * (a - x),
                        bounds=[(0, 1)] * 9, constraints=[{"type": "ineq", "fun": lambda a: budget - a.sum()}],
                        method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
        np.testing.assert_allclose(got, best.x, atol=1e-5)
    # under the budget, or with none, it only clips
    x = np.array([-0.2, 0.3, 1.4, 0.5], np.float32)
    np.testing.assert_array_equal(project_to_budget(x, 5.0), np.clip(x, 0, 1))
    np.testing.assert_array_equal(project_to_budget(x, None), np.clip(x, 0, 1))


def test_specific_removal_avoids_the_unit_that_turns_sky_into_sun():
    G, S = TwoWaysToRemoveSky(), SkyAndSun()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=200, train_size=60, eval_size=20,
                              seed=5, probes=4, batch_size=50)
    kwargs = dict(init=np.full(4, 0.25), l2=0.0, learning_rate=0.05, epochs=15, batch_size=10, max_units=1)
    specific = optimize_ace(G, S, corpus, objective="specific_removal", **kwargs)
    # one unit's worth of ablation: all of it on unit 1, the clean way to remove the sky
    assert specific.alpha[1] == pytest.approx(1.0, abs=0.02)
    np.testing.assert_allclose(specific.alpha[[0, 2, 3]], 0.0, atol=0.02)
    assert ace_ranking(specific.alpha)[0] == 1
    # held-out losses of ablating one unit: the removal objective rates units 1 and 2 alike
    # (both erase the sky), the specific one rates unit 2 far worse (its sky becomes sun)
    def held_out(objective, unit):
        return optimize_ace(G, S, corpus, objective=objective, init=np.eye(4)[unit], epochs=0,
                            batch_size=10).eval_loss[0]

    assert held_out("removal", 1) == pytest.approx(held_out("removal", 2), rel=0.05)
    assert held_out("removal", 1) < 0.2 * held_out("removal", 0)
    assert held_out("specific_removal", 1) < 0.1
    assert held_out("specific_removal", 2) > 10


def test_binarize_ends_with_whole_units():
    G, S = TwoWaysToRemoveSky(), SkyAndSun()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=200, train_size=60, eval_size=20,
                              seed=5, probes=4, batch_size=50)
    fit = optimize_ace(G, S, corpus, objective="specific_removal", init=np.full(4, 0.4), l2=0.0,
                       learning_rate=0.05, epochs=15, batch_size=10, max_units=2, binarize=2.0)
    # every weight ends at 0 or 1: the clean unit 1 at 1, the sun-making unit 2 at 0
    np.testing.assert_allclose(fit.alpha, np.round(fit.alpha), atol=1e-3)
    assert fit.alpha[1] == 1.0 and fit.alpha[2] == 0.0
    assert fit.alpha.sum() <= 2


def test_specific_removal_loss_is_the_documented_objective():
    G, S = TwoWaysToRemoveSky(), SkyAndSun()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=80, train_size=20, eval_size=12,
                              seed=1, probes=2, batch_size=40)
    alpha = np.array([0.3, 0.4, 0.6, 0.1], np.float32)
    fit = optimize_ace(G, S, corpus, init=alpha, epochs=0, batch_size=8,
                       objective="specific_removal", specificity=2.5)
    h, f = G.split("toy")

    def image_means(z, a):
        r, side = h(G.params, jnp.asarray(z))
        x = f(G.params, r * (1 - a), side)
        return (np.asarray(S.class_score(S.params, x, 1)[0]).mean((1, 2)),
                np.asarray(S.class_score(S.params, x, 2)[0]).mean((1, 2)))

    reference = max(image_means(corpus.present_z, 0.0)[1].mean(), 1e-3)  # sun in the training images
    expected, n = 0.0, len(corpus.eval_present_z)
    for start in range(0, n, 8):  # the held-out loss is the size-weighted mean over batches of 8
        z = corpus.eval_present_z[start : start + 8]
        sky0, sun0 = image_means(z, 0.0)
        sky1, sun1 = image_means(z, alpha)
        expected += (sky1.mean() / sky0.mean() + 2.5 * ((sun1.mean() - sun0.mean()) / reference) ** 2) * len(z) / n
    assert fit.eval_loss[0] == pytest.approx(expected, rel=1e-5)


def test_label_scores_one_pass_matches_per_label_scores():
    """The demo segmenter's all-label ``class_scores`` fast path equals ``class_score`` per label,
    and a segmenter without it (the toy) is scored label by label."""
    from gandissect_jax.ace import label_scores
    from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter

    S = load_demo_segmenter("scenes64-segmenter")
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    wanted = (7, 0, 3, 10)
    fast = np.asarray(label_scores(S, S.params, images, wanted, 2))
    assert fast.shape == (2, 8, 8, 4)
    for k, c in enumerate(wanted):
        np.testing.assert_allclose(fast[..., k], S.class_score(S.params, images, c, 2)[0], rtol=1e-6, atol=1e-7)
    toy = RedIsSky()
    slow = np.asarray(label_scores(toy, toy.params, images, (2, 1)))
    np.testing.assert_array_equal(slow[..., 1], toy.class_score(toy.params, images, 1)[0])
    np.testing.assert_array_equal(slow[..., 0], toy.class_score(toy.params, images, 2)[0])


def test_label_scores_asks_a_segmenter_that_takes_labels_for_those_labels_only():
    """A ``class_scores`` with a ``labels`` argument is given the labels (so it can skip work the
    other labels need, as the UPerNet skips its part and material heads for objects); one
    without it is sliced."""
    from gandissect_jax.ace import label_scores

    calls = []

    class Selective(RedIsSky):
        def class_scores(self, params, images, downsample=1, labels=None):
            calls.append(labels)
            every = jnp.stack([self.class_score(params, images, c, downsample)[0] * 0 + c
                               for c in range(len(self.labels))], -1)
            return every if labels is None else every[..., jnp.asarray(labels)]

    S = Selective()
    images = jnp.zeros((1, 4, 4, 3), jnp.float32)
    scores = np.asarray(label_scores(S, S.params, images, (2, 1)))
    assert calls == [(2, 1)]
    np.testing.assert_array_equal(scores[0, 0, 0], [2.0, 1.0])


@pytest.mark.parametrize("objective", ["ace", "removal"])
def test_micro_batched_gradient_is_the_whole_batch_gradient(objective):
    """The step's gradient, summed over micro-batches of 1, 4 (the last padded) and 6 samples,
    is jax.grad of the whole batch's objective written out independently."""
    from gandissect_jax.ace.fit import _batch_objective, prepare_ace

    G, S = ToyGenerator(), RedIsSky()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=80, train_size=20, eval_size=8,
                              seed=1, probes=2, batch_size=40)
    alpha = jnp.asarray([0.7, 0.2, 0.1, 0.9], jnp.float32)
    ip, ic = jnp.arange(6), jnp.arange(3, 9)
    h, f = G.split("toy")

    def score_at(a, z, loc, insert):
        m = a * jax.nn.one_hot(loc, 4).reshape(-1, 2, 2, 1)
        r, side = h(G.params, jnp.asarray(z))
        r = r * (1 - m) + (jnp.asarray(corpus.insertion_value) * m if insert else 0)
        score = S.class_score(S.params, f(G.params, r, side), 1)[0]
        return score.reshape(-1, 2, 4, 2, 4).mean((2, 4)).reshape(-1, 4)[jnp.arange(len(loc)), loc]

    def whole(a):
        if objective == "ace":
            return (score_at(a, corpus.present_z[:6], corpus.present_location[:6], False).mean()
                    - score_at(a, corpus.candidate_z[3:9], corpus.candidate_location[3:9], True).mean())
        r, side = h(G.params, jnp.asarray(corpus.present_z[:6]))
        return S.class_score(S.params, f(G.params, r * (1 - a), side), 1)[0].mean((1, 2)).sum() * 4 / 6

    expected_value, expected_grad = jax.value_and_grad(whole)(alpha)
    assert np.abs(np.asarray(expected_grad)).max() > 1e-3
    for mb in (1, 4, 6):
        problem = prepare_ace(G, S, corpus, init=alpha, batch_size=6, micro_batch=mb, objective=objective)
        value, grad = _batch_objective(alpha, problem.consts, problem.train, ip, ic, problem.spec, grad=True)
        assert float(value) == pytest.approx(float(expected_value), abs=1e-6), mb
        np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-5, atol=1e-7, err_msg=str(mb))


def test_micro_batched_specific_removal_gradient_is_the_whole_batch_gradient():
    """specific_removal's two-phase step (share sums, then a vector-Jacobian product with the
    objective's cotangent) against jax.grad of the whole batch's objective written out."""
    from gandissect_jax.ace.fit import _batch_objective, prepare_ace

    G, S = TwoWaysToRemoveSky(), SkyAndSun()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=80, train_size=20, eval_size=12,
                              seed=1, probes=2, batch_size=40)
    alpha = jnp.asarray([0.3, 0.4, 0.6, 0.1], jnp.float32)
    h, f = G.split("toy")
    ip = jnp.arange(2, 8)
    z = jnp.asarray(corpus.present_z)[2:8]

    def shares(a, z):
        r, side = h(G.params, z)
        x = f(G.params, r * (1 - a), side)
        return S.class_score(S.params, x, 1)[0].mean((1, 2)), S.class_score(S.params, x, 2)[0].mean((1, 2))

    reference = jnp.maximum(shares(0.0, jnp.asarray(corpus.present_z))[1].mean(), 1e-3)

    def whole(a):
        sky1, sun1 = shares(a, z)
        sky0, sun0 = shares(0.0, z)
        return sky1.mean() / sky0.mean() + 2.5 * ((sun1.mean() - sun0.mean()) / reference) ** 2

    expected_value, expected_grad = jax.value_and_grad(whole)(alpha)
    assert np.abs(np.asarray(expected_grad)).max() > 1e-3
    for mb in (1, 4, 6):
        problem = prepare_ace(G, S, corpus, init=alpha, batch_size=6, micro_batch=mb, objective="specific_removal",
                              specificity=2.5)
        value, grad = _batch_objective(alpha, problem.consts, problem.train, ip, ip, problem.spec, grad=True)
        assert float(value) == pytest.approx(float(expected_value), rel=1e-5), mb
        np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-4, atol=1e-6, err_msg=str(mb))
