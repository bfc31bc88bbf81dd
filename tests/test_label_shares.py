"""label_shares: pixel shares of segmenter labels under an edit, against independent counts."""

import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.intervention import ablation_edit, insertion_edit, label_shares
from gandissect_jax.sampling import sample_z


@pytest.fixture(scope="module")
def pair():
    from gandissect_jax.proggan import load_generator
    from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter

    return load_generator("scenes64"), load_demo_segmenter("scenes64-segmenter")


def independent_shares(segmenter, images):
    labels = np.asarray(segmenter.segment(segmenter.params, jnp.clip(jnp.asarray(images), -1, 1)))
    counts = np.bincount(labels.ravel(), minlength=len(segmenter.labels))
    return counts / counts.sum()


def test_unedited_shares_count_the_segmented_images(pair):
    G, S = pair
    z = sample_z(24, G.z_dim, 3)
    expected = independent_shares(S, G(z))
    shares = label_shares(G, S, z, batch_size=24)
    assert shares.dtype == np.float64 and shares.shape == (len(S.labels),)
    np.testing.assert_array_equal(shares, expected)
    assert abs(shares.sum() - 1) < 1e-12
    # batching only regroups the same images (XLA's convolutions may round differently per batch
    # size, so allow a few flipped pixels out of 24 * 64 * 64)
    np.testing.assert_allclose(label_shares(G, S, z, batch_size=5), expected, atol=2e-4)


@pytest.mark.parametrize("kind", ["ablation", "insertion"])
def test_edited_shares_count_the_edited_images(pair, kind):
    G, S = pair
    layer = "layer4"
    h, f = G.split(layer)
    z = sample_z(16, G.z_dim, 4)
    r, side = h(G.params, z)
    r = np.asarray(r)
    units = [3, 17, 40, 99]
    if kind == "ablation":
        edit = ablation_edit(units, r.shape[-1])
        edited = r.copy()
        edited[..., units] = 0
    else:
        edit = insertion_edit(units, 5.0, r.shape[1:], positions=[(2, 3), (4, 4)])
        edited = r.copy()
        for row, col in [(2, 3), (4, 4)]:
            edited[:, row, col, units] = 5.0
    expected = independent_shares(S, f(G.params, jnp.asarray(edited), side))
    shares = label_shares(G, S, z, layer=layer, edit=edit, batch_size=16)
    np.testing.assert_allclose(shares, expected, atol=1e-12)
    # the edit really changes the picture
    assert np.abs(shares - label_shares(G, S, z, batch_size=16)).max() > 1e-3


def test_bad_arguments_are_refused(pair):
    G, S = pair
    z = sample_z(2, G.z_dim, 0)
    with pytest.raises(ValueError, match="both layer and edit"):
        label_shares(G, S, z, layer="layer4")
    with pytest.raises(ValueError, match=r"\(N, z_dim\)"):
        label_shares(G, S, z[0])
    with pytest.raises(ValueError, match="no images"):
        label_shares(G, S, z[:0])
    with pytest.raises(ValueError, match="unknown layer|layer9000"):
        label_shares(G, S, z, layer="layer9000", edit=ablation_edit([0], 4))


def test_out_of_range_labels_are_refused(pair):
    G, _ = pair

    class Broken:
        labels = [("-", "object"), ("thing", "object")]
        params = ()

        def segment(self, params, images, downsample=1):
            return jnp.full(images.shape[:3] + (1,), 2, jnp.int32)

    with pytest.raises(ValueError, match="outside 0..1"):
        label_shares(G, Broken(), sample_z(2, G.z_dim, 0))
