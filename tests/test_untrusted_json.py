"""Every JSON file a stranger can hand us (labels.json, a checkpoint's config.json, dissect.json, an
outdir's .progress files, a weight registry, an experiment's settings) fails as the reader's own
clean error naming the file -- never a RecursionError or UnicodeDecodeError traceback -- however
deeply it nests or whatever bytes it holds."""

import json
import os

import numpy as np
import pytest

from gandissect_jax import untrusted_json
from gandissect_jax.checkpoints import CheckpointError, is_own_checkpoint, load_checkpoint, save_checkpoint
from gandissect_jax.commands.dissect import _load_labels
from gandissect_jax.dissection.rankings import read_rankings
from gandissect_jax.dissection.resume import IdentityMismatch, RunDirectory, read_manifest
from gandissect_jax.dissection.schema import read_dissect_json
from gandissect_jax.experiment import Experiment
from gandissect_jax.segmenter.convert import SegmenterWeightsError, read_labels_json
from gandissect_jax.weight_registry import load_registry

DEPTH = 100_000  # far past the interpreter's recursion limit (1,000 by default)
HOSTILE = {
    "deep array": b"[" * DEPTH + b"]" * DEPTH,
    "deep object": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    "deep inside a valid key": b'{"labels": ' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "not UTF-8": b'{"labels": [["\xff\xfe", "object"]]}',
    "truncated": b'{"labels": [["-", "obj',
}


@pytest.mark.parametrize("text", [b"[" * DEPTH + b"]" * DEPTH, '{"a":' * DEPTH + "1" + "}" * DEPTH])
def test_deep_nesting_is_a_json_decode_error(text):
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        untrusted_json.loads(text)
    assert untrusted_json.loads('{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}  # ordinary JSON unchanged


def _write(path, content: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(content)
    return str(path)


def _checkpoint(tmp_path, content):
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, {"w": np.zeros(3, np.float32)}, {"kind": "generator"})
    _write(directory / "config.json", content)
    assert not is_own_checkpoint(directory)  # the ownership check answers False, no traceback
    return lambda: load_checkpoint(directory), CheckpointError, "config.json"


def _labels_cli(tmp_path, content):
    path = _write(tmp_path / "labels.json", content)
    return lambda: _load_labels(path), ValueError, "labels.json"


def _labels_segmenter(tmp_path, content):
    path = _write(tmp_path / "labels.json", content)
    return lambda: read_labels_json(path), SegmenterWeightsError, "labels.json"


def _dissect_json(tmp_path, content):
    path = _write(tmp_path / "dissect.json", content)
    return lambda: read_dissect_json(path), ValueError, "dissect.json"


def _settings(tmp_path, content):
    _write(tmp_path / "out" / ".progress" / "settings.json", content)
    return lambda: RunDirectory(str(tmp_path / "out"), {"a": 1}), IdentityMismatch, "settings.json"


def _rankings(tmp_path, content):
    _write(tmp_path / "out" / "intervention" / "rankings.json", content)
    return lambda: read_rankings(str(tmp_path / "out")), ValueError, "rankings.json"


def _registry(tmp_path, content):
    path = _write(tmp_path / "registry.json", content)
    return lambda: load_registry(path), ValueError, "registry.json"


def _experiment(tmp_path, content):
    _write(tmp_path / "out" / "intervention" / "ablate" / "layer4" / "x" / ".progress" / "settings.json", content)

    def run():
        with Experiment(str(tmp_path / "out"), "ablate", "layer4", "x", {"a": 1}):
            pass
    return run, ValueError, "settings.json"


READERS = [_checkpoint, _labels_cli, _labels_segmenter, _dissect_json, _settings, _rankings, _registry, _experiment]


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_every_reader_refuses_hostile_json_naming_the_file(tmp_path, reader, kind):
    call, error, name = reader(tmp_path, HOSTILE[kind])
    with pytest.raises(error, match=name.replace(".", r"\.")):
        call()


def test_an_unreadable_manifest_is_no_manifest(tmp_path):
    for content in HOSTILE.values():
        _write(tmp_path / ".progress" / "outputs.json", content)
        assert read_manifest(str(tmp_path / ".progress")) == {"files": [], "directories": []}
