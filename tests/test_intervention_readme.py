"""The README's "Interventions in Python" example runs as written, gives the documented shapes,
and its ACE ranking's ablation curve falls as units are added, removing over half of the trees with
16 units."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_block(heading, index=0):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]


def test_readme_interventions_in_python():
    namespace = {}
    exec(compile(python_block("## Interventions in Python"), "README: Interventions in Python", "exec"), namespace)
    n = namespace
    assert n["fit"].alpha.shape == (128,) and n["ranking"].shape == (128,)
    assert n["x"].shape == (16, 64, 64, 3)
    assert n["curve"].shape == (7, 16) and n["effect"].shape == (4, 8, 8)
    assert n["before"].shape == n["after"].shape == (16, 11)
    assert n["scores"].gain.shape == (128,) and n["labels"].shape == (16, 32, 32)
    assert n["many"].shape == (3, 16, 64, 64, 3)
    # no unit ablated: the tree share of the unedited images, computed independently
    G, S, z = n["G"], n["S"], n["z"]
    segmentation = np.asarray(S.segment(S.params, np.clip(np.asarray(G(z)), -1, 1)))
    # (another compiled program: a pixel on a class boundary may flip, 1/4096 of an image)
    np.testing.assert_allclose(np.asarray(n["curve"])[0], (segmentation == 6).mean((1, 2, 3)), atol=1.5 / 4096)
    shares = np.asarray(n["curve"]).mean(1)  # counts 0, 1, 2, 4, 8, 16, 32
    assert np.all(np.diff(shares[:6]) <= 0), shares  # each added causal unit removes more trees, up to 16
    assert shares[5] < 0.5 * shares[0], shares  # the 16 most causal units remove over half of the trees
