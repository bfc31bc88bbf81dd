"""The output directory is the user's: layer names cannot write outside it, two layers never share a
directory, and two runs cannot write into one directory at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from gandissect_jax.dissection import dissect_features
from gandissect_jax.dissection.report import OUTPUT_FILES, safe_dir_name
from gandissect_jax.dissection.resume import LOCK_NAME

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"

HOSTILE = ["..", ".", "../x", "../../etc/passwd", "a/b", "a\\b", "/abs", "C:\\x", "\\\\server\\share", ".progress",
           ".hidden", "a/../..", "~", "a b", "%2F", "a%2Fb", "nul\x01", "ümlaut", "層", "-rf", "layer4", "Layer4.",
           "..\\..", "a:b", "a\nb", "...", "x" * 200]


def golden_small():
    data = np.load(FIXTURES / "dissect_golden.npz")
    labels = json.loads((FIXTURES / "labels.json").read_text())
    return data["features"].transpose(0, 2, 3, 1)[:16, :, :, :4], data["segs"].transpose(0, 2, 3, 1)[:16], labels


def is_one_safe_component(name: str) -> bool:
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name and not name.startswith(".")
            and not os.path.isabs(name) and os.path.basename(name) == name and ":" not in name
            and all(32 < ord(c) < 127 for c in name))


def test_every_layer_name_becomes_one_safe_distinct_directory():
    rng = np.random.RandomState(0)
    alphabet = list("abc./\\:%_- \x00\x7fé層") + ["..", "%2E"]
    names = HOSTILE + ["".join(rng.choice(alphabet, size=rng.randint(1, 12))) for _ in range(500)]
    names = list(dict.fromkeys(names))
    encoded = {}
    for name in names:
        try:
            directory = safe_dir_name(name)
        except ValueError:
            continue
        assert is_one_safe_component(directory), (name, directory)
        assert directory not in encoded, (name, encoded.get(directory))  # distinct names, distinct directories
        encoded[directory] = name
    assert safe_dir_name("layer4") == "layer4" and safe_dir_name("..") == "%2E."
    assert safe_dir_name("a/b") == "a%2Fb" and safe_dir_name("a%2Fb") == "a%252Fb"


@pytest.mark.parametrize("name", ["", "x" * 201, *OUTPUT_FILES, "DISSECT.JSON"])
def test_names_that_cannot_name_a_directory_are_refused(name):
    with pytest.raises(ValueError, match="layer name"):
        safe_dir_name(name)


def test_a_layer_named_dotdot_writes_inside_the_outdir(tmp_path):
    features, segs, labels = golden_small()
    outdir = tmp_path / "out"
    dissect_features(features, segs, labels, layer="../escape", outdir=str(outdir), progress=False, batch_size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written beside the outdir
    assert (outdir / "%2E.%2Fescape" / "scores.npz").exists()
    document = json.loads((outdir / "dissect.json").read_text())
    assert document["layers"][0]["layer"] == "../escape"
    assert document["layers"][0]["dirname"] == "%2E.%2Fescape"
    assert (outdir / "%2E.%2Fescape" / "image" / "0-top.jpg").exists()


def test_two_layers_that_would_share_a_directory_are_refused(tmp_path):
    features, segs, labels = golden_small()
    with pytest.raises(ValueError, match="share the output directory"):
        dissect_features({"Layer4": features, "layer4": features}, segs, labels, outdir=str(tmp_path),
                         progress=False)


def test_a_second_run_into_a_busy_outdir_is_refused_then_runs(tmp_path):
    features, segs, labels = golden_small()
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "notes.txt").write_text("the user's")
    holder = FileLock(str(outdir / LOCK_NAME))  # another run holding the directory
    holder.acquire()
    try:
        with pytest.raises(ValueError, match="another dissection is writing into"):
            dissect_features(features, segs, labels, outdir=str(outdir), progress=False, make_images=False)
        assert sorted(p.name for p in outdir.iterdir()) == [LOCK_NAME, "notes.txt"]  # nothing touched
    finally:
        holder.release()
    result = dissect_features(features, segs, labels, outdir=str(outdir), progress=False, make_images=False)
    assert result["features"].num_units == 4
    assert (outdir / "notes.txt").read_text() == "the user's"


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under root: a file's bytes, a link's target."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            found[relative] = "-> " + os.readlink(path)
        elif path.is_file():
            found[relative] = path.read_bytes()
    return found


def test_no_output_path_of_a_run_overwrites_a_file_no_run_wrote(tmp_path):
    """Every path a run writes (found by running it), placed beforehand by someone else (e.g. the
    reference's own output directory, same names): a fresh run and a restart are refused before
    writing anything, and the user's files stay byte for byte; a run of ours resumes and restarts."""
    features, segs, labels = golden_small()
    ours = tmp_path / "ours"
    dissect_features(features, segs, labels, outdir=str(ours), progress=False, batch_size=16, topk=2)
    written = sorted(p for p, v in _snapshot(ours).items() if not p.startswith(".") and isinstance(v, bytes))
    assert "dissect.html" in written and "features/scores.npz" in written and "features/image/0-top.jpg" in written
    for index, relative in enumerate(written):
        outdir = tmp_path / f"user{index}"
        (outdir / relative).parent.mkdir(parents=True)
        (outdir / relative).write_bytes(b"the user's " + relative.encode())
        (outdir / "notes.txt").write_text("mine")
        before = _snapshot(outdir)
        for restart in (False, True):
            with pytest.raises(ValueError, match=f"already holds {relative}.*no gandissect-jax run wrote"):
                dissect_features(features, segs, labels, outdir=str(outdir), progress=False, batch_size=16,
                                 topk=2, restart=restart)
            assert {k: v for k, v in _snapshot(outdir).items() if k != LOCK_NAME} == before, relative
    # a run's own outputs are not foreign: it resumes, and restarts
    dissect_features(features, segs, labels, outdir=str(ours), progress=False, batch_size=16, topk=2)
    dissect_features(features, segs, labels, outdir=str(ours), progress=False, batch_size=16, topk=2, restart=True)
    # nor when a run of ours was killed before it saved its manifest: a restart runs again
    reference = _snapshot(ours)
    (ours / ".progress" / "outputs.json").unlink()
    dissect_features(features, segs, labels, outdir=str(ours), progress=False, batch_size=16, topk=2, restart=True)
    again = _snapshot(ours)
    assert {k: v for k, v in again.items() if not k.startswith(".")} == \
        {k: v for k, v in reference.items() if not k.startswith(".")}


@pytest.mark.parametrize("link", ["features", "features/image"])
def test_a_layer_directory_that_is_a_symbolic_link_is_refused(tmp_path, link):
    features, segs, labels = golden_small()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "scores.npz").write_text("the user's")
    outdir = tmp_path / "out"
    (outdir / link).parent.mkdir(parents=True, exist_ok=True)
    (outdir / link).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=f"{link} is a symbolic link"):
        dissect_features(features, segs, labels, outdir=str(outdir), progress=False, make_images=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["scores.npz"]
    assert (elsewhere / "scores.npz").read_text() == "the user's"
