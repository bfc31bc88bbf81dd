"""`gandissect-jax generate` and `gandissect-jax convert` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gandissect_jax as gj
from gandissect_jax.cli import main
from gandissect_jax.commands.convert import detect_kind
from gandissect_jax.proggan import images_to_uint8

FIXTURES = Path(__file__).parent / "fixtures" / "proggan"
PTH = FIXTURES / "proggan32.pth"


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURES / "proggan32_outputs_subset.npz")


def test_generate_images_and_features(tmp_path, golden):
    out = tmp_path / "gen"
    rc = main(["generate", "--model", str(PTH), "--n", "5", "--seed", "1", "--out", str(out),
               "--layers", "layer4", "output_32x32", "--batch-size", "2"])
    assert rc == 0
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    pixels = np.stack([np.asarray(Image.open(p)) for p in pngs])
    assert pixels.shape == (5, 32, 32, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(np.load(out / "z.npy"), gj.sample_z(5, 128, seed=1))

    # the reference's own images of samples 0 and 3, mapped to uint8 as the reference does
    reference = images_to_uint8(np.transpose(golden["output_32x32"], (0, 2, 3, 1)))
    ours = pixels[golden["sample_index"]].astype(int)
    assert np.abs(ours - reference).max() <= 1  # float32 noise may flip a truncation
    assert (ours == reference).mean() > 0.99
    assert pixels.std() > 20  # real pictures, not a constant

    layer4 = np.load(out / "features" / "layer4.npy")
    assert layer4.shape == (5, 8, 8, 128) and layer4.dtype == np.float32
    ref4 = np.transpose(golden["layer4"], (0, 2, 3, 1))
    assert np.abs(layer4[golden["sample_index"]] - ref4).max() <= 1e-4 * np.abs(ref4).max()
    image = np.load(out / "features" / "output_32x32.npy")
    np.testing.assert_array_equal(images_to_uint8(image), pixels)
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_convert_then_generate_from_directory(tmp_path, capsys):
    dest = tmp_path / "g32"
    assert main(["convert", str(PTH), str(dest)]) == 0
    assert "converted generator" in capsys.readouterr().out
    assert main(["generate", "--model", str(dest), "--n", "2", "--out", str(tmp_path / "o")]) == 0
    direct = main(["generate", "--model", str(PTH), "--n", "2", "--out", str(tmp_path / "p")])
    assert direct == 0
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "o" / "images" / f"{i:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "p" / "images" / f"{i:06d}.png"))
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "o" / "features").exists()


def test_generate_bad_input(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["generate", "--model", str(PTH), "--n", "2", "--out", str(out), "--layers", "layer99"]) == 1
    err = capsys.readouterr().err
    assert "layer99" in err and "layer8" in err and "output_32x32" in err
    assert not out.exists()
    assert main(["generate", "--model", str(tmp_path / "none.pth"), "--n", "1", "--out", str(out)]) == 1
    assert "none.pth" in capsys.readouterr().err
    notes = tmp_path / "notes.pth"
    notes.write_text("hello")
    assert main(["convert", str(notes), str(tmp_path / "dest")]) == 1
    assert "notes.pth" in capsys.readouterr().err
    assert not (tmp_path / "dest").exists()


def test_convert_detects_segmenter_directories(tmp_path):
    seg = tmp_path / "upp"
    seg.mkdir()
    (seg / "encoder_epoch_40.pth").write_bytes(b"")
    (seg / "decoder_epoch_40.pth").write_bytes(b"")
    assert detect_kind(seg) == "segmenter"
    assert detect_kind(PTH) == "generator"
    assert detect_kind(tmp_path) == "generator"


def _tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_generate_never_overwrites_or_mixes_in_what_it_did_not_write(tmp_path, capsys):
    # a user's folder that happens to hold the names generate writes: refused, untouched
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "000000.png").write_bytes(b"my photo")
    (mine / "z.npy").write_bytes(b"my latents")
    before = _tree(mine)
    assert main(["generate", "--model", str(PTH), "--n", "2", "--out", str(mine)]) == 1
    err = capsys.readouterr().err
    assert f"--out {mine}" in err and "images" in err and "nothing was written" in err
    assert _tree(mine) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    assert main(["generate", "--model", str(PTH), "--n", "2", "--out", str(tmp_path / "notes")]) == 1
    assert "todo.txt" in capsys.readouterr().err and _tree(tmp_path / "notes") == {"todo.txt": b"x"}

    # the same command again rewrites the same files; another one needs --force and leaves
    # nothing of the earlier run (no image 000002.png of seed 1 beside seed 2's two)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(PTH), "--n", "3", "--out", str(out), "--layers", "layer4"]) == 0
    first = _tree(out)
    assert main(["generate", "--model", str(PTH), "--n", "3", "--out", str(out), "--layers", "layer4"]) == 0
    assert _tree(out) == first
    capsys.readouterr()
    assert main(["generate", "--model", str(PTH), "--n", "2", "--seed", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "n was 3, now 2" in err and "seed was 1, now 2" in err and "--force" in err
    assert _tree(out) == first
    assert main(["generate", "--model", str(PTH), "--n", "2", "--seed", "2", "--out", str(out), "--force"]) == 0
    assert main(["generate", "--model", str(PTH), "--n", "2", "--seed", "2", "--out", str(tmp_path / "fresh")]) == 0
    assert _tree(out) == _tree(tmp_path / "fresh")
    assert sorted(_tree(out)) == ["generate.json", "images/000000.png", "images/000001.png", "z.npy"]
    np.testing.assert_array_equal(np.load(out / "z.npy"), gj.sample_z(2, 128, seed=2))

    # a user's file inside an earlier output, or a forged settings file, stops --force
    (out / "images" / "edited.png").write_bytes(b"mine")
    before = _tree(out)
    assert main(["generate", "--model", str(PTH), "--n", "1", "--out", str(out), "--force"]) == 1
    assert "images/edited.png" in capsys.readouterr().err and _tree(out) == before
    (out / "images" / "edited.png").unlink()
    (out / "images" / "000001.png").rename(tmp_path / "kept.png")
    (out / "images" / "000001.png").symlink_to(tmp_path / "kept.png")  # a link where an image was
    before = _tree(out)
    assert main(["generate", "--model", str(PTH), "--n", "1", "--out", str(out), "--force"]) == 1
    assert "images/000001.png" in capsys.readouterr().err and _tree(out) == before
    (out / "images" / "000001.png").unlink()
    (tmp_path / "kept.png").rename(out / "images" / "000001.png")
    huge = json.dumps({"model": "x", "n": 2147483647, "seed": 1, "layers": []})  # decided by name, never listed
    (out / "generate.json").write_text(huge)
    assert main(["generate", "--model", str(PTH), "--n", "2", "--seed", "2", "--out", str(out), "--force"]) == 0
    assert _tree(out) == _tree(tmp_path / "fresh")
    for forged in ('{"n": "3", "layers": []}', '{"n": 3, "layers": ["../../x"]}', "[" * 100_000 + "]" * 100_000):
        (out / "generate.json").write_text(forged)
        before = _tree(out)
        assert main(["generate", "--model", str(PTH), "--n", "1", "--out", str(out), "--force"]) == 1
        assert "no gandissect-jax generate run wrote" in capsys.readouterr().err and _tree(out) == before


def test_generate_refuses_what_cannot_fit_in_memory_before_any_work(tmp_path, capsys):
    out = tmp_path / "huge"
    assert main(["generate", "--model", str(PTH), "--n", "2147483647", "--out", str(out), "--layers", "layer4"]) == 1
    err = capsys.readouterr().err
    assert "--n 2147483647 needs" in err and "GiB" in err and "--n in [1, " in err
    assert not out.exists()


def test_generated_features_are_what_dissect_features_reads(tmp_path):
    out = tmp_path / "g"
    assert main(["generate", "--model", str(PTH), "--n", "6", "--layers", "layer4", "--out", str(out)]) == 0
    layer4 = np.load(out / "features" / "layer4.npy")
    assert layer4.shape == (6, 8, 8, 128) and layer4.dtype == np.float32
    segmentation = np.zeros((6, 16, 16), np.int32)
    segmentation[:, :8] = 1  # "top": the upper half of every image
    np.save(tmp_path / "seg.npy", segmentation)
    (tmp_path / "labels.json").write_text(json.dumps({"labels": [["-", "-"], ["top", "object"]]}))
    assert main(["dissect", "--features", str(out / "features" / "layer4.npy"), "--segmentations",
                 str(tmp_path / "seg.npy"), "--labels", str(tmp_path / "labels.json"), "--threshold", "quantile",
                 "--outdir", str(tmp_path / "d"), "--quiet", "--no-images"]) == 0
    document = json.loads((tmp_path / "d" / "dissect.json").read_text())
    assert [len(record["units"]) for record in document["layers"]] == [128]
