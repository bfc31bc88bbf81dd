"""The Python examples of README.md and docs/segmenter.md run as written and do what they say."""

import os
import re

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_block(path, heading, index=0):
    """The ``index``-th ```python block of the section ``heading`` of a Markdown file."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]


def test_readme_python_in_a_few_lines():
    code = python_block("README.md", "## Python in a few lines")
    code = code.split("# which units *cause*")[0]  # the ACE fit takes minutes; tested in test_ace
    namespace = {}
    exec(compile(code, "README: Python in a few lines", "exec"), namespace)
    G, S, z, r, side, x, labels, shares, edit = (namespace[k] for k in (
        "G", "S", "z", "r", "side", "x", "labels", "shares", "edit"))
    assert r.shape == (8, 8, 8, 128) and side == () and x.shape == (8, 64, 64, 3)
    assert labels.shape == (8, 64, 64, 1) and labels.dtype == jnp.int32
    assert shares.shape == (11,) and abs(shares.sum() - 1) < 1e-12
    np.testing.assert_array_equal(np.asarray(x), np.asarray(namespace["gd"].edited_generator(G, "layer4")(
        G.params, z, edit)))
    assert np.abs(np.asarray(x) - np.asarray(G(z))).max() > 0.01  # the units mattered


def test_readme_your_own_generator():
    namespace = {}
    exec(compile(python_block("README.md", "## Your own generator"), "README: Your own generator", "exec"),
         namespace)
    G, z, r, side, x, h, f = (namespace[k] for k in ("G", "z", "r", "side", "x", "h", "f"))
    assert G.layer_names == ("mapping", "block1/Dense_0", "block1/Conv_0", "block1", "block2/Dense_0",
                             "block2/Conv_0", "block2", "torgb")
    assert r.shape == (4, 8, 8, 32) and x.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(side), np.asarray(z))
    np.testing.assert_array_equal(np.asarray(f(G.params, r, side)), np.asarray(G(z)))
    assert np.abs(np.asarray(x) - np.asarray(G(z))).max() > 1e-3


def test_segmenter_doc_minimal_segmenter():
    namespace = {}
    exec(compile(python_block("docs/segmenter.md", "## The protocol", 1), "docs/segmenter.md", "exec"),
         namespace)
    assert namespace["sky"] == 1
    # d sum((x @ colour + 1) / 2) / d images = colour / 2 at every pixel
    np.testing.assert_allclose(np.asarray(namespace["grad"]), np.full((1, 8, 8, 3), 1 / 6), rtol=1e-6)
    # d / d colour = sum over pixels of (x / 2) = 0 for black images
    np.testing.assert_array_equal(np.asarray(namespace["grad_params"]["colour"]), 0.0)
    np.testing.assert_array_equal(np.asarray(namespace["labels"]), 0)
