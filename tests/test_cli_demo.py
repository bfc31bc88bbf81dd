"""`gandissect-jax dissect` with no source dissects the shipped demo pair (the README's main job)."""

import json

from gandissect_jax.cli import main


def test_dissect_defaults_to_the_shipped_demo(tmp_path, capsys):
    outdir = tmp_path / "demo"
    assert main(["dissect", "--outdir", str(outdir), "--size", "160", "--batch-size", "32",
                 "--quiet", "--no-images"]) == 0
    report = json.loads((outdir / "dissect.json").read_text())
    source = report["settings"]["source"]
    assert (source["model"], source["segmenter"], source["num_samples"]) == ("scenes64", "scenes64-segmenter", 160)
    layers = {layer["layer"]: layer for layer in report["layers"]}
    assert sorted(layers) == ["layer4", "layer6"]
    assert layers["layer4"]["num_units"] == 128 and layers["layer6"]["num_units"] == 64
    # the demo generator has units for the world's large concepts at the IQR threshold; 160 samples, as
    # the default label rule's per-image test needs them to find building and road units (96 do not)
    found = {concept["label"] for layer in layers.values() for concept in layer["concepts"]}
    assert {"sky", "grass", "road", "building", "tree"} <= found, found
    assert (outdir / "dissect.html").is_file()
    assert "report:" in capsys.readouterr().out
