"""Causal effects (gandissect_jax.effects) on toy models whose causal units are known by
construction, against independent numpy computations: ablation/insertion curves, context maps,
per-sample label shares, the bootstrap interval; and their composition with jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax import effects
from gandissect_jax.generator import Split
from gandissect_jax.sampling import sample_z


class Additive:
    """r (N, 2, 2, 6) = 0.5 + |z|: positive. red = r0 + r1 + r2 - 2.5, upsampled 4x; units 0, 1, 2
    cause red (each one's removal lowers red), units 3, 4, 5 do nothing. green = r4 - 1 (unused by
    the concept), blue = 0."""

    z_dim = 24
    layer_names = ("toy",)
    params = {"offset": jnp.float32(2.5)}

    def layer_shape(self, layer):
        return (2, 2, 6)

    def split(self, layer):
        if layer != "toy":
            raise ValueError(f"unknown layer {layer!r}")
        return Split(self.h, self.f)

    def apply(self, params, z):
        return self.f(params, *self.h(params, z))

    @staticmethod
    @jax.jit
    def h(params, z):
        return 0.5 + jnp.abs(jnp.asarray(z).reshape(-1, 2, 2, 6)), ()

    @staticmethod
    @jax.jit
    def f(params, r, side):
        red = r[..., 0] + r[..., 1] + r[..., 2] - params["offset"]
        green = r[..., 4] - 1.0
        x = jnp.stack([jnp.tanh(red), jnp.tanh(green), jnp.zeros_like(red)], -1)
        return x.repeat(4, 1).repeat(4, 2)


class InsertOnGreen(Additive):
    """red = tanh(3 (r0 - 1)) where green (r4 > 1) is, else -1: inserting unit 0 makes sky only
    on "buildings" (green cells), never elsewhere -- a context dependence known by construction."""

    @staticmethod
    @jax.jit
    def f(params, r, side):
        green = r[..., 4] - 1.0
        red = jnp.where(green > 0, jnp.tanh(3 * (r[..., 0] - params["offset"] + 1.5)), -1.0)
        x = jnp.stack([red, jnp.tanh(green), jnp.zeros_like(red)], -1)
        return x.repeat(4, 1).repeat(4, 2)


class RedGreen:
    """Two channels of labels: channel 0 'sky' (1) where red > 0, channel 1 'grass' (2) where
    green > 0, and 'sky' again in channel 1 where both (a label in two channels of one pixel)."""

    labels = (("-", "object"), ("sky", "object"), ("grass", "object"))
    categories = ("object",)
    params = {}

    def segment(self, params, images, downsample=1):
        x = images[:, ::downsample, ::downsample]
        sky = x[..., 0] > 0
        grass = x[..., 1] > 0
        second = jnp.where(grass, jnp.where(sky, 1, 2), 0)
        return jnp.stack([jnp.where(sky, 1, 0), second], -1).astype(jnp.int32)

    def class_score(self, params, images, c, downsample=1):
        x = images[:, ::downsample, ::downsample]
        score = jax.nn.sigmoid(8 * x[..., 0 if c == 1 else 1])
        return score, score > 0.5


def red_share(x):
    return (np.asarray(x)[..., 0] > 0).mean((1, 2))


def test_ablation_curve_falls_monotonically_with_the_causal_units():
    G, S = Additive(), RedGreen()
    z = sample_z(40, G.z_dim, 3)
    counts = (0, 1, 2, 3, 4, 6)
    causal_first = np.arange(6)
    shares = np.asarray(effects.ace_curve(G, S, G.params, S.params, z, "toy", causal_first, counts, (1,)))
    assert shares.shape == (6, 40)
    # independent: zero the first n units of the ranking in numpy and threshold red
    r = 0.5 + np.abs(z.reshape(-1, 2, 2, 6))
    for k, n in enumerate(counts):
        edited = r.copy()
        edited[..., causal_first[:n]] = 0
        red = edited[..., 0] + edited[..., 1] + edited[..., 2] - 2.5
        np.testing.assert_allclose(shares[k], (red > 0).repeat(4, 1).repeat(4, 2).mean((1, 2)))
    curve = shares.mean(1)
    assert curve[0] > 0.6 and curve[3] == 0.0
    assert np.all(np.diff(curve) <= 0) and np.all(np.diff(curve[:4]) < 0)  # falls with every causal unit
    np.testing.assert_array_equal(curve[3:], 0.0)  # the other units change nothing
    # the same units in the wrong order: nothing happens until the causal ones go
    wrong = np.asarray(effects.ace_curve(G, S, G.params, S.params, z, "toy", causal_first[::-1], counts, (1,))).mean(1)
    np.testing.assert_array_equal(wrong[:4], curve[0])
    assert wrong[-1] == 0.0
    # insertion of the causal units everywhere (value 2) makes red everywhere
    inserted = np.asarray(effects.ace_curve(G, S, G.params, S.params, z, "toy", causal_first, counts, (1,),
                                            mode="insert", value=2.0)).mean(1)
    assert inserted[0] == curve[0] and inserted[3] == 1.0 and np.all(np.diff(inserted) >= 0)


def test_ace_fit_ranks_the_causal_units_first_and_its_curve_falls_fastest():
    from gandissect_jax.ace import ace_ranking, build_ace_corpus, optimize_ace

    G, S = Additive(), RedGreen()
    corpus = build_ace_corpus(G, S, "toy", "sky", search_size=120, train_size=40, eval_size=10, seed=4,
                              probes=2, batch_size=40)
    fit = optimize_ace(G, S, corpus, objective="removal", init=np.full(6, 0.3), l2=0.01, learning_rate=0.05,
                       epochs=8, batch_size=10, max_units=3)
    order = ace_ranking(fit.alpha)
    assert set(order[:3].tolist()) == {0, 1, 2}, fit.alpha
    z = sample_z(40, G.z_dim, 9)
    curve = np.asarray(effects.ace_curve(G, S, G.params, S.params, z, "toy", order, (0, 1, 2, 3), (1,))).mean(1)
    assert np.all(np.diff(curve) < 0) and curve[-1] == 0.0


def test_context_map_equals_the_per_position_loop():
    G, S = InsertOnGreen(), RedGreen()
    z = sample_z(5, G.z_dim, 1)
    units, value = jnp.asarray([0]), 4.0
    effect = np.asarray(effects.context_map(G, S, G.params, S.params, z, "toy", units, value, (1,)))
    chunked = np.asarray(effects.context_map(G, S, G.params, S.params, z, "toy", units, value, (1,),
                                             positions_per_step=3))
    np.testing.assert_array_equal(chunked, effect)
    loop = np.zeros((5, 2, 2), np.float32)
    before = red_share(G.apply(G.params, z))
    for row in range(2):
        for col in range(2):
            where = np.zeros((2, 2), np.float32)
            where[row, col] = 1
            x = effects.insert(G, G.params, z, "toy", units, value, where=where)
            loop[:, row, col] = red_share(x) - before
    np.testing.assert_allclose(effect, loop, atol=1e-7)
    # known context dependence: inserting works on green cells only, and there it adds the cell
    r = 0.5 + np.abs(z.reshape(-1, 2, 2, 6))
    green = r[..., 4] > 1
    had_red = green & (np.tanh(3 * (r[..., 0] - 1)) > 0)
    np.testing.assert_allclose(effect, np.where(green & ~had_red, 0.25, 0.0), atol=1e-7)
    # the context of each cell, from the segmentation: grass where green and no red
    seg = S.segment(S.params, G.apply(G.params, z))
    cells = np.asarray(effects.cell_labels(seg, (2, 2), 3))
    np.testing.assert_array_equal(cells, np.where(had_red, 1, np.where(green, 2, 0)))


def test_block_context_map_equals_the_loop_over_centred_blocks():
    G, S = InsertOnGreen(), RedGreen()
    z = sample_z(5, G.z_dim, 3)
    units, value = jnp.asarray([0]), 4.0
    before = red_share(G.apply(G.params, z))
    for block in [(2, 2), (1, 2), (2, 1)]:
        effect = np.asarray(effects.context_map(G, S, G.params, S.params, z, "toy", units, value, (1,), block=block))
        loop = np.zeros((5, 2, 2), np.float32)
        for row in range(2):
            for col in range(2):
                # the block centred on (row, col): rows row - h // 2 .. row - h // 2 + h - 1, cut at the edges
                where = np.zeros((2, 2), np.float32)
                top, left = row - block[0] // 2, col - block[1] // 2
                where[max(top, 0):top + block[0], max(left, 0):left + block[1]] = 1
                x = effects.insert(G, G.params, z, "toy", units, value, where=where)
                loop[:, row, col] = red_share(x) - before
        np.testing.assert_allclose(effect, loop, atol=1e-7, err_msg=str(block))
    # the 2x2 block centred on position 1,1 covers the whole toy map: a quarter of the image gained
    # per green cell that had no red; centred on 0,0 it is cut to that one cell
    r = 0.5 + np.abs(z.reshape(-1, 2, 2, 6))
    gains = (r[..., 4] > 1) & ~(np.tanh(3 * (r[..., 0] - 1)) > 0)
    effect = np.asarray(effects.context_map(G, S, G.params, S.params, z, "toy", units, value, (1,), block=(2, 2)))
    np.testing.assert_allclose(effect[:, 1, 1], gains.sum((1, 2)) / 4, atol=1e-7)
    np.testing.assert_allclose(effect[:, 0, 0], gains[:, 0, 0] / 4, atol=1e-7)
    for bad in [(0, 1), (3, 1), (1, 3), (1,)]:
        with pytest.raises(ValueError, match="block"):
            effects.context_map(G, S, G.params, S.params, z, "toy", units, value, (1,), block=bad)


def test_block_at_centres_the_block_and_cuts_it_at_the_edges():
    grid = (5, 7)
    for block in [(1, 1), (3, 3), (2, 4), (5, 7)]:
        for position in range(35):
            row, col = divmod(position, 7)
            expected = np.zeros(grid, np.float32)
            top, left = row - block[0] // 2, col - block[1] // 2
            expected[max(top, 0):top + block[0], max(left, 0):left + block[1]] = 1
            np.testing.assert_array_equal(np.asarray(effects.block_at(position, grid, block)), expected)
    np.testing.assert_array_equal(np.asarray(effects.block_at(9, grid)), np.eye(35)[9].reshape(grid))


def test_label_pixel_shares_count_each_label_once_per_pixel():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 5, (3, 6, 7, 3)).astype(np.int32)
    seg[0, 0, 0] = [2, 2, 2]
    seg[1, 2, 3] = [7, 0, -1]  # out of range: ignored
    shares = np.asarray(effects.label_pixel_shares(jnp.asarray(seg), 5))
    expected = np.zeros((3, 5))
    for n in range(3):
        for c in range(1, 5):
            expected[n, c] = (seg[n] == c).any(-1).mean()
        valid = (seg[n] > 0) & (seg[n] < 5)
        expected[n, 0] = (~valid.any(-1)).mean()
    np.testing.assert_allclose(shares, expected, rtol=1e-6)


def test_paired_label_shares_measure_the_edit():
    G, S = Additive(), RedGreen()
    z = sample_z(12, G.z_dim, 5)
    before, after = effects.paired_label_shares(G, S, G.params, S.params, z, "toy", jnp.asarray([0, 1]))
    x0, x1 = G.apply(G.params, z), effects.ablate(G, G.params, z, "toy", jnp.asarray([0, 1]))
    np.testing.assert_allclose(before, effects.label_pixel_shares(S.segment(S.params, x0), 3))
    np.testing.assert_allclose(after, effects.label_pixel_shares(S.segment(S.params, x1), 3))
    np.testing.assert_allclose(np.asarray(after)[:, 1], red_share(x1), rtol=1e-6)


def test_edits_compose_with_jit_and_vmap():
    G = Additive()
    z = sample_z(4, G.z_dim, 2)
    h, f = G.split("toy")
    r, side = h(G.params, z)
    manual = f(G.params, r.at[..., jnp.asarray([1, 4])].set(0.0), side)
    np.testing.assert_array_equal(effects.ablate(G, G.params, z, "toy", jnp.asarray([1, 4])), manual)
    mask = np.zeros(6, np.float32)
    mask[[1, 4]] = 1
    np.testing.assert_array_equal(effects.ablate(G, G.params, z, "toy", mask), manual)
    jitted = jax.jit(lambda params, z, units: effects.ablate(G, params, z, "toy", units))
    np.testing.assert_allclose(jitted(G.params, z, jnp.asarray([1, 4])), manual, atol=1e-6)
    # vmap over unit sets (masks) and over the inserted value
    masks = jnp.eye(6)
    per_unit = jax.vmap(lambda m: effects.ablate(G, G.params, z, "toy", m))(masks)
    for u in range(6):
        np.testing.assert_allclose(per_unit[u], f(G.params, r.at[..., u].set(0.0), side), atol=1e-6)
    values = jnp.asarray([0.0, 1.0, 3.0])
    inserted = jax.vmap(lambda v: effects.insert(G, G.params, z, "toy", jnp.asarray([0]), v))(values)
    for k, v in enumerate(values):
        np.testing.assert_allclose(inserted[k], f(G.params, r.at[..., 0].set(v), side), atol=1e-6)
    with pytest.raises(ValueError, match="units must lie in 0..5"):
        effects.ablate(G, G.params, z, "toy", jnp.asarray([6]))
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        effects.ablate(G, G.params, z, "toy", np.ones(5, np.float32))
    with pytest.raises(ValueError, match="mode must be"):
        effects.ace_curve(G, RedGreen(), G.params, {}, z, "toy", np.arange(6), (0, 1), (1,), mode="paint")


def test_bootstrap_interval_is_the_percentile_interval_of_resampled_means():
    values = np.random.default_rng(3).normal(0.3, 1.0, (50, 2))
    result = effects.bootstrap_mean(values, resamples=400, level=0.9, seed=7)
    rng = np.random.RandomState(7)
    means = np.stack([values[rng.randint(0, 50, 50)].mean(0) for _ in range(400)])
    np.testing.assert_allclose(result.low, np.quantile(means, 0.05, axis=0))
    np.testing.assert_allclose(result.high, np.quantile(means, 0.95, axis=0))
    np.testing.assert_allclose(result.mean, values.mean(0))
    assert np.all(result.low < result.mean) and np.all(result.mean < result.high)
    with pytest.raises(ValueError, match="at least 2"):
        effects.bootstrap_mean(values[:1])
    assert effects.unit_counts(128) == (0, 1, 2, 4, 8, 16, 32, 64)
    assert effects.unit_counts(20, 64) == (0, 1, 2, 4, 8, 16, 20)
