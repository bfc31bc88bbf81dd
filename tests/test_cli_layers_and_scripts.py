"""`gandissect-jax layers` lists a generator's layers for every way of naming it, `generate` defaults to
the shipped model as `dissect` does, and the scripts never write into the shipped weights/ by default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gandissect_jax as gd
from gandissect_jax.cli import main

ROOT = Path(__file__).resolve().parent.parent
PTH = Path(__file__).parent / "fixtures" / "proggan" / "proggan32.pth"
SCENES64 = [("layer1", "4 x 4 x 128"), ("layer2", "4 x 4 x 128"), ("layer3", "8 x 8 x 128"), ("layer4", "8 x 8 x 128"),
            ("layer5", "16 x 16 x 64"), ("layer6", "16 x 16 x 64"), ("layer7", "32 x 32 x 32"),
            ("layer8", "32 x 32 x 32"), ("layer9", "64 x 64 x 16"), ("layer10", "64 x 64 x 16"),
            ("output_64x64", "64 x 64 x 3")]


def listed(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split(None, 1)) for line in text.splitlines()[1:]]


def test_layers_of_the_shipped_model(capsys):
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "scenes64: z_dim 128, 11 layers (height x width x units)"
    assert listed(out) == SCENES64
    G = gd.load_generator("scenes64")
    r, _ = G.split("layer5").h(G.params, gd.sample_z(1, 128, 0))
    assert "x".join(map(str, r.shape[1:])) == "16x16x64"  # the listed shape is the real one


def test_layers_of_a_pth_file_and_of_its_converted_checkpoint(tmp_path, capsys):
    assert main(["layers", str(PTH)]) == 0
    from_pth = listed(capsys.readouterr().out)
    G = gd.load_generator(PTH)
    assert [name for name, _ in from_pth] == list(G.layer_names)
    assert from_pth[-1] == ("output_32x32", "32 x 32 x 3")
    r, _ = G.split("layer4").h(G.params, gd.sample_z(1, G.z_dim, 0))
    assert dict(from_pth)["layer4"] == " x ".join(map(str, r.shape[1:]))  # the listed shape is the real one
    assert main(["convert", str(PTH), str(tmp_path / "g32")]) == 0
    capsys.readouterr()
    assert main(["layers", str(tmp_path / "g32")]) == 0
    assert listed(capsys.readouterr().out) == from_pth


def test_layers_of_a_generator_without_layer_shape():
    """Any Generator: shapes come from split(layer).h, evaluated abstractly."""
    from gandissect_jax.commands.layers import layer_shapes
    from test_dissect_pipeline import TinyGenerator

    assert layer_shapes(TinyGenerator()) == [("layer1", (4, 4, 5)), ("layer2", (8, 8, 7)),
                                             ("output_16x16", "cannot be split: unknown layer output_16x16")]


def test_layers_of_a_missing_model_is_one_line(capsys):
    assert main(["layers", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gandissect-jax layers: error:")


def test_generate_defaults_to_the_shipped_model(tmp_path):
    assert main(["generate", "--n", "2", "--out", str(tmp_path / "g"), "--layers", "layer4"]) == 0
    G = gd.load_generator("scenes64")
    z = np.load(tmp_path / "g" / "z.npy")
    np.testing.assert_array_equal(z, gd.sample_z(2, G.z_dim, 1))
    features = np.load(tmp_path / "g" / "features" / "layer4.npy")
    assert features.shape == (2, 8, 8, 128)
    assert len(list((tmp_path / "g" / "images").glob("*.png"))) == 2


SCRIPTS = ["demo_ablation", "demo_label_frequencies", "train_demo_segmenter", "train_demo_gan"]


def _parse_outputs(script: str, *argvs: list[str]) -> list[tuple[int, str]]:
    """(exit code, output directory or error) of the script's argument parsing for each argv, in one process."""
    code = (f"import sys, io, contextlib; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import _outputs\n"
            f"import {script} as s\n"
            "real = _outputs.output_dir\n"
            "def stop(parser, args):\n"
            "    print('OUT', real(parser, args).resolve(), file=sys.stderr); raise SystemExit(0)\n"
            "s.output_dir = stop\n"
            f"for argv in {list(argvs)!r}:\n"
            "    try:\n"
            "        s.main(argv)\n"
            "    except SystemExit as e:\n"
            "        print('EXIT', e.code, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    results, lines = [], []
    for line in done.stderr.splitlines():
        if line.startswith("EXIT "):
            results.append((int(line.split()[1]), "\n".join(lines)))
            lines = []
        else:
            lines.append(line)
    assert len(results) == len(argvs), done.stderr
    return results


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_write_under_results_by_default_and_into_weights_only_on_purpose(script):
    flag = "--weights" if script == "train_demo_gan" else "--out"
    default, refused, shipped = _parse_outputs(script, [], [flag, "weights/scenes64"], ["--update-shipped"])
    assert default[0] == 0, default[1]
    out = Path(default[1].split("OUT ", 1)[1].strip())
    assert (ROOT / "results") in out.parents and (ROOT / "weights") not in out.parents
    assert refused[0] == 2
    assert "is inside the shipped weights/ directory; pass --update-shipped" in refused[1]
    assert shipped[0] == 0, shipped[1]
    out = Path(shipped[1].split("OUT ", 1)[1].strip())
    assert out == ROOT / "weights" or (ROOT / "weights") in out.parents
