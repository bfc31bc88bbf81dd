"""Unit ablation and insertion against the reference's nethook.edit_layer golden edits."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gandissect_jax as gj
from gandissect_jax.intervention import (
    Edit,
    ablation_edit,
    edit_representation,
    edited_generator,
    insertion_edit,
)

FIXTURES = Path(__file__).parent / "fixtures" / "proggan"


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def edits():
    return np.load(FIXTURES / "proggan32_edits_subset.npz")


@pytest.fixture(scope="module")
def G():
    return gj.load_generator(FIXTURES / "proggan32.pth")


def test_helpers_build_the_reference_masks(edits, G):
    layer = str(edits["edit_layer"])
    ablate = ablation_edit(edits["ablate_units"], G.layer_shape(layer)[-1])
    np.testing.assert_array_equal(np.asarray(ablate.ablation), edits["ablate_ablation"])
    assert ablate.replacement is None
    insert = insertion_edit(
        edits["insert_units"], float(edits["insert_value"]), G.layer_shape(layer),
        positions=[edits["insert_pos"]],
    )
    # the reference's (C, H, W) ablation is (H, W, C) here
    np.testing.assert_array_equal(np.asarray(insert.ablation), np.transpose(edits["insert_ablation"], (1, 2, 0)))
    np.testing.assert_array_equal(np.asarray(insert.replacement), edits["insert_replacement"])


@pytest.mark.parametrize("kind", ["ablate", "insert"])
def test_edited_map_is_bit_exact(kind, edits):
    r = jnp.asarray(nhwc(edits["layer_unedited"]))
    if kind == "ablate":
        edit = Edit(edits["ablate_ablation"])
    else:
        edit = Edit(np.transpose(edits["insert_ablation"], (1, 2, 0)), edits["insert_replacement"])
    expected = nhwc(edits[f"{kind}_layer_edited"])
    np.testing.assert_array_equal(np.asarray(edit.apply(r)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(edit_representation)(r, *edit)), expected)
    changed = np.any(expected != nhwc(edits["layer_unedited"]), axis=(0, 1, 2))
    units = edits["ablate_units"] if kind == "ablate" else edits["insert_units"]
    assert sorted(np.flatnonzero(changed)) == sorted(units)


@pytest.mark.parametrize("kind", ["ablate", "insert"])
def test_edited_images_match_reference(kind, edits, G):
    layer = str(edits["edit_layer"])
    if kind == "ablate":
        edit = ablation_edit(edits["ablate_units"], G.layer_shape(layer)[-1])
    else:
        edit = insertion_edit(edits["insert_units"], float(edits["insert_value"]), G.layer_shape(layer),
                              positions=[edits["insert_pos"]])
    x = np.asarray(edited_generator(G, layer)(G.params, edits["z"], edit))
    reference = nhwc(edits[f"{kind}_output"])
    unedited = nhwc(edits["output_unedited"])
    assert np.abs(reference - unedited).max() > 0.1  # the edit visibly matters
    assert np.abs(x - reference).max() <= 1e-4 * np.abs(reference).max()
    # and the same through the split by hand
    h, f = G.split(layer)
    r, side = h(G.params, edits["z"])
    by_hand = np.asarray(f(G.params, edit.apply(r), side))
    np.testing.assert_allclose(by_hand, x, atol=1e-6)


def test_broadcasting_semantics():
    r = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    rn = np.asarray(r)
    # scalar; per channel (C,); per position (H, W, C) and (H, W, 1); batch (N, H, W, C)
    channel = np.linspace(0, 1, 5, dtype=np.float32)
    position = np.random.RandomState(0).rand(3, 4, 5).astype(np.float32)
    shared = np.random.RandomState(1).rand(3, 4, 1).astype(np.float32)
    full = np.random.RandomState(2).rand(2, 3, 4, 5).astype(np.float32)
    value = np.float32(2.5)
    for a in (np.float32(0.25), channel, position, shared, full):
        expected = rn * (1 - a) + value * a
        np.testing.assert_allclose(np.asarray(edit_representation(r, a, value)), expected, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(edit_representation(r, a)), rn * (1 - a), rtol=1e-6)
    # replacement alone means ablation 1; nothing means no edit
    np.testing.assert_array_equal(np.asarray(edit_representation(r, None, channel)),
                                  np.broadcast_to(channel, rn.shape))
    np.testing.assert_array_equal(np.asarray(edit_representation(r)), rn)
    # one sample (H, W, C) under vmap
    out = jax.vmap(lambda x: edit_representation(x, position, value))(r)
    np.testing.assert_allclose(np.asarray(out), rn * (1 - position) + value * position, rtol=1e-6)


def test_bad_shapes_are_clear_errors():
    r = jnp.zeros((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\(4,\).*\(2, 3, 4, 5\)"):
        edit_representation(r, np.ones(4))
    with pytest.raises(ValueError, match=r"\(H, W, 1\)"):
        edit_representation(r, np.ones((3, 4)))
    with pytest.raises(ValueError, match="replacement"):
        edit_representation(r, 1.0, np.ones((5, 3, 4)))
    with pytest.raises(ValueError, match=r"units \[7\]"):
        ablation_edit([1, 7], num_channels=5)
    with pytest.raises(ValueError, match="outside the 3x4 map"):
        insertion_edit([0], 1.0, (3, 4, 5), positions=[(3, 0)])


def test_insertion_everywhere_and_soft_ablation():
    r = jax.random.normal(jax.random.key(1), (1, 2, 2, 4))
    edit = insertion_edit([2], 7.0, (2, 2, 4))
    out = np.asarray(edit.apply(r))
    np.testing.assert_array_equal(out[..., 2], 7.0)
    np.testing.assert_array_equal(out[..., [0, 1, 3]], np.asarray(r)[..., [0, 1, 3]])
    half = ablation_edit([1], 4, strength=0.5)
    np.testing.assert_allclose(np.asarray(half.apply(r))[..., 1], 0.5 * np.asarray(r)[..., 1], rtol=1e-6)


def test_gradient_with_respect_to_the_ablation(edits, G):
    """ACE-style: the image is differentiable in a soft ablation mask."""
    layer = str(edits["edit_layer"])
    run = edited_generator(G, layer)
    z = edits["z"]
    replacement = jnp.asarray(edits["insert_replacement"])

    def loss(a):
        return run(G.params, z, Edit(a, replacement)).mean()

    a0 = jnp.full(G.layer_shape(layer), 0.1)
    g = jax.grad(loss)(a0)
    assert g.shape == a0.shape
    direction = jax.random.normal(jax.random.key(2), a0.shape)
    eps = 1e-3
    fd = (loss(a0 + eps * direction) - loss(a0 - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(g, direction)), float(fd), rtol=2e-2)
