"""A checkpoint's config.json is taken as written or refused at load, naming the file and the key:
architecture widths must be lists of positive integers (128.5 is not read as 128, "abc" does not
fail inside int()), flags must be booleans (the string "false" is not true), and a demo segmenter's
parameters must fit its widths (not a Flax shape error at its first call, mid-run)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gandissect_jax as gd
from gandissect_jax.checkpoints import CheckpointError, config_flag, config_sizes, load_checkpoint
from gandissect_jax.proggan import convert_reference
from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter, save_demo_segmenter

ROOT = Path(__file__).parent.parent
PTH = ROOT / "tests" / "fixtures" / "proggan" / "proggan32.pth"

# (loader, key, a value that loads, hostile values)
WIDTHS = [128.5, "abc", "128", [], [128, True], [128, -4], [128, 0], [128, None], [[128]], None, {"a": 1}, 1e400]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    return convert_reference(PTH, tmp_path_factory.mktemp("g") / "g32")


def _copy_with(tmp_path, source, key, value):
    dest = tmp_path / "ckpt"
    shutil.copytree(source, dest)
    dest.chmod(0o755)
    config_path = dest / "config.json"
    config_path.chmod(0o644)
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    return dest


CASES = [
    ("generator sizes", "generator", gd.load_generator, "sizes",
     [[128, 128.5, 128, 64, 32], [128, 128, 128, "64", 32], [128, 128, 128, 64, True], [128], 5] + WIDTHS),
    ("generator output_tanh", "generator", gd.load_generator, "output_tanh", ["false", "true", 0, 1, None, []]),
    ("segmenter widths", "segmenter", load_demo_segmenter, "widths", [[16, 32.0, 64, 96]] + WIDTHS),
    ("discriminator channels", "discriminator", gd.load_discriminator, "channels", WIDTHS),
]


@pytest.mark.parametrize("kind, loader, key, values", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_config_values_are_taken_as_written_or_refused_naming_the_file_and_key(tmp_path, generator_dir, kind,
                                                                              loader, key, values):
    source = {"generator": generator_dir, "segmenter": ROOT / "weights" / "scenes64" / "segmenter",
              "discriminator": ROOT / "weights" / "scenes64" / "discriminator"}[kind]
    loader(source)  # the checkpoint as written loads
    for index, value in enumerate(values):
        directory = tmp_path / str(index)
        directory.mkdir()
        dest = _copy_with(directory, source, key, value)
        with pytest.raises(ValueError, match=rf"{dest}/config\.json: '{key}' must"):
            loader(dest)


def test_a_demo_segmenter_whose_parameters_do_not_fit_its_widths_is_refused_at_load(tmp_path):
    dest = _copy_with(tmp_path, ROOT / "weights" / "scenes64" / "segmenter", "widths", [8, 16, 32, 48])
    with pytest.raises(CheckpointError, match=rf"{dest}: segmenter parameter .* has shape \(\d+,?.*\), expected"):
        load_demo_segmenter(dest)
    params, _ = load_checkpoint(ROOT / "weights" / "scenes64" / "segmenter")
    first = sorted(params)[0]
    dest = save_demo_segmenter(tmp_path / "fewer", {k: v for k, v in params.items() if k != first})
    with pytest.raises(CheckpointError, match=rf"{dest}: segmenter parameter \['{first}'\]\[.*\] is missing"):
        load_demo_segmenter(dest)
    dest = save_demo_segmenter(tmp_path / "more", dict(params, extra={"kernel": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{dest}: unexpected segmenter parameter \['extra'\]"):
        load_demo_segmenter(dest)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False) | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(value=JSON)
def test_fuzz_config_values_are_never_converted(value):
    where = "some/dir"
    exact = (isinstance(value, list) and value
             and all(type(v) is int and v > 0 for v in value))  # noqa: E721 - bool is not an int here
    if exact:
        assert config_sizes({"k": value}, "k", where) == tuple(value)
    else:
        with pytest.raises(CheckpointError, match=r"some/dir/config\.json: 'k' must be a non-empty list of positive"):
            config_sizes({"k": value}, "k", where)
    if isinstance(value, bool):
        assert config_flag({"k": value}, "k", where) is value
    else:
        with pytest.raises(CheckpointError, match=r"some/dir/config\.json: 'k' must be true or false"):
            config_flag({"k": value}, "k", where)
    assert config_sizes({}, "k", where, (4, 5)) == (4, 5) and config_flag({}, "k", where, True) is True
