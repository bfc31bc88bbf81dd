"""Every intervention command end to end on the shipped demo model (small sizes): ace, ablate,
insert, artifacts, segment-units read a dissection directory, write JSON, PNG and a page that
renders in headless Chromium without console errors, resume, refuse conflicting settings, merge
their rankings into dissect.json and are linked from the dissection report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax.cli import main

SMALL = ["--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("interventions") / "demo"
    assert main(["dissect", "--outdir", str(path), "--layers", "layer4", "--size", "96", "--batch-size", "32",
                 "--no-images", "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def models():
    from gandissect_jax.proggan import load_generator
    from gandissect_jax.segmenter import load_segmenter

    return load_generator("scenes64"), load_segmenter("scenes64-segmenter")


@pytest.fixture(scope="module")
def ace_run(outdir):
    args = ["ace", "--outdir", str(outdir), "--layer", "layer4", "--concept", "tree", "--search-size", "40",
            "--train-size", "8", "--eval-size", "4", "--epochs", "1", "--train-batch", "4", "--curve-samples", "4",
            "--curve-max", "4", "--show-units", "4", *SMALL]
    assert main(args) == 0
    return args, outdir / "intervention" / "ace" / "layer4" / "tree-ace"


def test_ace_ranks_merges_into_dissect_json_and_resumes(ace_run, outdir, capsys):
    args, folder = ace_run
    result = json.loads((folder / "ace.json").read_text())
    alpha = np.asarray(result["alpha"])
    assert alpha.shape == (128,) and alpha.min() >= 0 and alpha.max() <= 1
    assert sorted(result["ranking"]) == list(range(128))
    assert np.all(np.diff(alpha[result["ranking"]]) <= 0)  # units by alpha, largest first
    assert result["counts"] == [0, 1, 2, 4] and set(result["curves"]) == {
        "ablate_ACE", "ablate_IoU", "insert_ACE", "insert_IoU"}
    for key, curve in result["curves"].items():
        assert len(curve["mean_share"]) == 4
    # no unit ablated: both rankings measure the same images
    assert result["curves"]["ablate_ACE"]["mean_share"][0] == result["curves"]["ablate_IoU"]["mean_share"][0]
    for name in ("curves.png", "insertion.png", "alpha.png", "loss.png", "ablation.png", "page.html"):
        assert (folder / name).stat().st_size > 1000, name
    # merged: dissect.json of the layer lists the ACE ranking beside the IoU rankings
    document = json.loads((outdir / "dissect.json").read_text())
    rankings = {r["name"]: r for r in document["layers"][0]["rankings"]}
    assert rankings["tree-ace"]["units"] == result["ranking"][:64] and rankings["tree-ace"]["metric"] == "ace"
    assert rankings["tree-iou"]["metric"] == "iou"
    iou = np.asarray(rankings["tree-iou"]["score"])
    assert np.all(np.diff(iou[rankings["tree-iou"]["units"]]) <= 0)
    assert document["intervention"]["index"] == "intervention/index.html"
    assert "intervention/ace/layer4/tree-ace/page.html" in (outdir / "dissect.html").read_text()
    # a rerun resumes: nothing is computed again
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    assert set(stamps) == {"corpus.npz", "fit.npz", "curves.npz"}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")} == stamps
    assert json.loads((folder / "ace.json").read_text())["ranking"] == result["ranking"]
    # other settings under the same name are refused before any work, naming the difference
    capsys.readouterr()
    assert main([a if a != "1" else "2" for a in args]) == 1
    assert "other settings (epochs: 1 != 2)" in capsys.readouterr().err


def test_ablate_reports_every_label_with_a_bootstrap_interval(outdir, models, ace_run):
    from gandissect_jax import effects
    from gandissect_jax.sampling import sample_z

    G, S = models
    assert main(["ablate", "--outdir", str(outdir), "--layer", "layer4", "--concept", "tree", "--top", "4",
                 "--rank", "ace", "--samples", "6", "--resamples", "50", *SMALL]) == 0
    result = json.loads((outdir / "intervention/ablate/layer4/tree-top4-ace/ablate.json").read_text())
    ranking = json.loads((ace_run[1] / "ace.json").read_text())["ranking"]
    assert result["units"] == ranking[:4]
    first = result["effects"][0]
    assert first["label"] == "tree" and first["ci_low"] <= first["ace"] <= first["ci_high"]
    # recomputed independently: segment both image sets at the dissection's stride 2
    z = jnp.asarray(sample_z(6, G.z_dim, 2))
    tree = S.labels.index(("tree", "object"))

    def tree_share(images):
        return (np.asarray(S.segment(S.params, jnp.clip(images, -1, 1), 2))[..., 0] == tree).mean((1, 2))

    before = tree_share(G(z))
    after = tree_share(effects.ablate(G, G.params, z, "layer4", jnp.asarray(result["units"])))
    assert first["share_before"] == pytest.approx(before.mean(), abs=1e-6)
    assert first["ace"] == pytest.approx((after - before).mean(), abs=1e-6)
    assert main(["ablate", "--outdir", str(outdir), "--layer", "layer4", "--units", "3,17,42", "--samples", "4",
                 "--resamples", "20", *SMALL]) == 0
    units = json.loads((outdir / "intervention/ablate/layer4/units-3_17_42/ablate.json").read_text())
    assert units["units"] == [3, 17, 42] and units["concept"] is None


def test_insert_measures_the_position_and_the_context_map(outdir):
    assert main(["insert", "--outdir", str(outdir), "--layer", "layer4", "--concept", "tree", "--top", "8",
                 "--at", "5,2", "--samples", "4", "--context-samples", "2", "--resamples", "20", *SMALL]) == 0
    folder = outdir / "intervention/insert/layer4/tree-top8-iou-at5_2"
    result = json.loads((folder / "insert.json").read_text())
    assert result["at"] == [5, 2] and len(result["units"]) == 8
    cells = sum(r["cells"] for r in result["context_effect_by_label"])
    assert cells == 2 * 8 * 8
    mean = sum(r["cells"] * r["mean_effect"] for r in result["context_effect_by_label"]) / cells
    assert mean == pytest.approx(result["context_effect_mean"], abs=1e-6)
    with np.load(folder / "context.npz") as data:
        assert data["effect"].shape == (2, 8, 8) and data["context"].shape == (2, 8, 8)
    for name in ("grid.png", "context.png", "context_by_label.png", "page.html"):
        assert (folder / name).stat().st_size > 1000, name


def test_insert_in_a_block_edits_the_block_and_maps_blocks_centred_on_each_position(outdir, models):
    from gandissect_jax import effects
    from gandissect_jax.experiment import DissectionSource
    from gandissect_jax.sampling import sample_z

    assert main(["insert", "--outdir", str(outdir), "--layer", "layer4", "--concept", "tree", "--top", "8",
                 "--at", "4:6,1:4", "--samples", "4", "--context-samples", "2", "--resamples", "20", *SMALL]) == 0
    folder = outdir / "intervention/insert/layer4/tree-top8-iou-at4-6_1-4"
    result = json.loads((folder / "insert.json").read_text())
    assert result["at"] == [4, 1] and result["block"] == [2, 3]
    # the measured shares are those of the 2x3 block edited, computed independently
    G, S = models
    source = DissectionSource(str(outdir))
    units, value = np.asarray(result["units"]), source.insertion_value("layer4")
    where = np.zeros((8, 8), np.float32)
    where[4:6, 1:4] = 1
    z = sample_z(4, G.z_dim, 4)
    x = effects.insert(G, G.params, jnp.asarray(z), "layer4", jnp.asarray(units), value, where=where)
    ds = source.seg_downsample
    after = (np.asarray(S.segment(S.params, jnp.clip(x, -1, 1), ds)) == 6).any(-1).mean((1, 2))
    assert result["concept_share_after"] == pytest.approx(after.mean(), abs=1.5 / 4096)
    with np.load(folder / "context.npz") as data:
        expected = effects.context_map(G, S, G.params, S.params, sample_z(2, G.z_dim, 5), "layer4", units, value, (6,),
                                       block=(2, 3), downsample=ds)
        np.testing.assert_allclose(data["effect"], np.asarray(expected), atol=1.5 / 4096)
        effect, context = data["effect"], data["context"]
    for row in result["context_effect_by_label"]:  # per context: the mean over images of each image's mean
        means = [effect[n][context[n] == row["labelnum"]].mean() for n in range(2) if (context[n] == row["labelnum"]).any()]
        assert row["images"] == len(means) and row["image_mean_effect"] == pytest.approx(np.mean(means), abs=1e-7)
        if len(means) > 1:
            assert row["image_ci_low"] <= row["image_mean_effect"] <= row["image_ci_high"]
    assert "2x3 block" in (folder / "page.html").read_text()


def test_artifacts_and_unit_segmentation(outdir, models):
    from gandissect_jax.sampling import sample_z
    from gandissect_jax.scenes.discriminator import load_discriminator

    G, S = models
    assert main(["artifacts", "--outdir", str(outdir), "--layer", "layer4", "--discriminator",
                 "scenes64-discriminator", "--search-samples", "12", "--top-samples", "2", "--samples", "4",
                 "--top", "3", "--resamples", "20", *SMALL]) == 0
    result = json.loads((outdir / "intervention/artifacts/layer4/top3/artifacts.json").read_text())
    assert result["ablated"] == result["ranking"][:3]
    gains = np.asarray(result["gain"])
    assert np.all(np.diff(gains[result["ranking"]]) <= 0)
    D = load_discriminator("scenes64-discriminator")
    before = np.asarray(D.score(D.params, G(jnp.asarray(sample_z(4, G.z_dim, 6)))))
    assert result["realism_before_mean"] == pytest.approx(before.mean(), abs=1e-5)
    assert main(["segment-units", "--outdir", str(outdir), "--layer", "layer4", "--samples", "4", *SMALL]) == 0
    seg = json.loads((outdir / "intervention/segment-units/layer4/iou0.05/segment-units.json").read_text())
    assert 0 < seg["coverage"] <= 1 and 0 < seg["accuracy"] <= 1 and seg["interpretable_units"] > 0
    with np.load(outdir / "intervention/segment-units/layer4/iou0.05/segmentation.npz") as data:
        assert data["predicted"].shape == (4, 32, 32) and data["segmentation"].shape == (4, 32, 32, 1)


@pytest.mark.parametrize("argv, message, status", [
    (["ablate", "--layer", "layer12", "--units", "1"], "unknown layer 'layer12'", 1),
    (["ablate", "--layer", "layer4", "--units", "1,128"], "argument --units: units [128] out of range", 2),
    (["ablate", "--layer", "layer4", "--concept", "trees"], "unknown concept 'trees'", 1),
    (["ablate", "--layer", "layer4", "--concept", "tree", "--top", "200"], "argument --top: 200 exceeds", 2),
    (["ablate", "--layer", "layer4", "--concept", "sky", "--rank", "ace"], "no ACE ranking of sky", 1),
    (["insert", "--layer", "layer4", "--concept", "tree", "--at", "8,0"],
     "argument --at: 8,0 is outside the 8x8 feature map", 2),
    (["artifacts", "--layer", "layer4", "--discriminator", "no-such-discriminator"], "no-such-discriminator", 1),
    (["segment-units", "--layer", "layer6"], "layer 'layer6' was not dissected", 1),
])
def test_bad_arguments_are_named_before_any_work(outdir, capsys, argv, message, status):
    """A flag outside the range the model allows is a usage error (status 2); a fault of the
    dissection or a model (an unknown layer or concept, a missing ranking) an input error (1)."""
    assert main([argv[0], "--outdir", str(outdir), *argv[1:], "--quiet"]) == status
    assert message in capsys.readouterr().err


def test_without_a_dissection_the_models_must_be_given(tmp_path, capsys):
    assert main(["ablate", "--outdir", str(tmp_path / "new"), "--layer", "layer4", "--units", "1"]) == 1
    assert "give --model and --segmenter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablate", "--outdir", str(tmp_path), "--layer", "layer4", "--units", "1,x"])


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_pages_render_in_chromium_without_console_errors(outdir, ace_run, tmp_path):
    # after the other commands of this module; their pages are listed in the index
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); CI installs it")
    index = json.loads((outdir / "intervention" / "index.json").read_text())
    pages = [outdir / "dissect.html", outdir / "intervention" / "index.html"]
    pages += [outdir / e["page"] for e in index["experiments"]]
    assert len(pages) >= 3
    for page in pages:
        html = page.read_text()
        for src in re.findall(r'<img src="([^"]+)"', html):
            assert (page.parent / src).is_file(), (page, src)
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                   f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                   "--virtual-time-budget=3000", "--window-size=1200,2000", "--dump-dom", page.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
        assert console == [], (page, console)
        assert 'data-rendered="yes"' in done.stdout, page
