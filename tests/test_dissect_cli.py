"""``gandissect-jax dissect --features ...`` reproduces the reference, and its HTML report renders
in headless Chromium without console errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gandissect_jax.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "dissect"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """Run the precomputed-activations CLI on the golden data at the reference's 0.995 levels, labelled
    by the reference's rule (the default rule finds nothing significant in 60 images at 0.5% activation)."""
    data = np.load(FIXTURES / "dissect_golden.npz")
    work = tmp_path_factory.mktemp("cli")
    np.save(work / "features.npy", data["features"].transpose(0, 2, 3, 1))
    np.save(work / "segs.npy", data["segs"].transpose(0, 2, 3, 1))
    np.save(work / "levels.npy", data["levels"])
    shutil.copy(FIXTURES / "labels.json", work / "labels.json")
    outdir = work / "out"
    code = main(["dissect", "--features", str(work / "features.npy"), "--segmentations", str(work / "segs.npy"),
                 "--labels", str(work / "labels.json"), "--levels", str(work / "levels.npy"),
                 "--outdir", str(outdir), "--batch-size", "16", "--quiet", "--title", "golden",
                 "--label-rule", "reference"])
    assert code == 0
    return data, outdir, work


def test_cli_reproduces_reference_iou(cli_run):
    data, outdir, _ = cli_run
    with np.load(outdir / "features" / "scores.npz") as scores:
        assert scores["iou"].shape == (13, 24) and scores["iqr"].shape == (13, 24)
        assert scores["levels"].shape == (24,)
        np.testing.assert_array_equal(scores["levels"], data["levels"])
        np.testing.assert_allclose(scores["iou"], data["iou_scores"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(scores["iqr"][1:], data["iqr_scores"][1:], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(scores["intersection_counts"], data["intersection_counts"])
        np.testing.assert_array_equal(scores["unit_label"], data["iou_best_label"])
    document = json.loads((outdir / "dissect.json").read_text())
    layer = document["layers"][0]
    assert layer["layer"] == "features" and layer["num_units"] == 24 and layer["num_samples"] == 60
    names = [name for name, _ in document["labels"]]
    for unit in layer["units"]:
        u = unit["unit"]
        assert unit["label"] == names[data["iou_best_label"][u]]
        assert abs(unit["iou"] - data["iou_best_score"][u]) < 1e-6
        assert unit["level"] == pytest.approx(float(data["levels"][u]), abs=0)
        if u != 16:  # unit 16 is constant: any order of its tied samples is right
            assert [t["sample"] for t in unit["top"]] == data["topk_indices"][u].tolist()
    # 11 of the 12 indicator units win their own label at the 0.995 level (all but lamp)
    interpretable = {unit["unit"]: unit["label"] for unit in layer["units"] if unit["interpretable"]}
    assert interpretable == {u["unit"]: u["label"] for u in layer["units"] if u["iou"] >= 0.05 and u["labelnum"] > 0}
    assert layer["interpretable"] == len(interpretable) > 0
    assert sum(len(c["units"]) for c in layer["concepts"]) == layer["interpretable"]


def test_cli_writes_strips_and_resumes(cli_run, capsys):
    data, outdir, work = cli_run
    strip = Image.open(outdir / "features" / "image" / "0-top.jpg")
    assert strip.size[0] > 9 * strip.size[1]  # 10 thumbnails side by side
    assert len(list((outdir / "features" / "image").glob("*-top.jpg"))) == 24
    # rerun: everything is already done, the same outputs are rewritten from scores.npz
    before = (outdir / "features" / "scores.npz").stat().st_mtime_ns
    code = main(["dissect", "--features", str(work / "features.npy"), "--segmentations", str(work / "segs.npy"),
                 "--labels", str(work / "labels.json"), "--levels", str(work / "levels.npy"),
                 "--outdir", str(outdir), "--batch-size", "16", "--quiet", "--title", "golden",
                 "--label-rule", "reference"])
    assert code == 0
    assert (outdir / "features" / "scores.npz").stat().st_mtime_ns == before
    assert "units interpretable" in capsys.readouterr().out


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    for argv, message in [(["--model", "scenes64", "--features", "f.npy"], "not both"),
                          (["--features", "f.npy"], "--segmentations and --labels")]:
        with pytest.raises(SystemExit) as stop:  # usage errors: decided by the command line alone
            main(["dissect", *argv, "--outdir", str(tmp_path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: gandissect-jax dissect") and message in err.strip().splitlines()[-1]
    assert main(["dissect", "--features", str(tmp_path / "missing.npy"), "--segmentations", "x", "--labels", "y",
                 "--outdir", str(tmp_path)]) == 1
    assert "not found" in capsys.readouterr().err


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def render(page: Path, tmp_path: Path, fragment: str = "") -> str:
    """The DOM of a report after its script ran in headless Chromium; fails on any console message."""
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); CI installs it")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", "--window-size=1200,3000", "--dump-dom",
               page.resolve().as_uri() + fragment]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    assert 'data-rendered="yes"' in done.stdout  # the page's script ran to the end
    return done.stdout


def test_html_report_renders_without_console_errors(cli_run, tmp_path):
    _, outdir, _ = cli_run
    dom = render(outdir / "dissect.html", tmp_path)
    assert len(re.findall(r'class="unit(?: interp)?"', dom)) == 24
    assert dom.count("data:image/svg+xml;base64,") >= 2  # concept bar graph and the cross-layer comparison
    assert "features/image/0-top.jpg" in dom
    assert "(object)" in dom  # three categories: labels say which


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory):
    """The CLI on the toy scenes (sky, tree, road; one category), default label rule."""
    from test_dissect_labelling import TOY_LABELS, toy

    feats, seg = toy(48)
    work = tmp_path_factory.mktemp("toy")
    np.save(work / "features.npy", feats)
    np.save(work / "segs.npy", seg)
    (work / "labels.json").write_text(json.dumps(TOY_LABELS))
    outdir = work / "out"
    assert main(["dissect", "--features", str(work / "features.npy"), "--segmentations", str(work / "segs.npy"),
                 "--labels", str(work / "labels.json"), "--threshold", "iqr", "--layer-name", "toy",
                 "--outdir", str(outdir), "--quiet"]) == 0
    return outdir


def test_report_explains_itself(toy_report, tmp_path):
    document = json.loads((toy_report / "dissect.json").read_text())
    layer = document["layers"][0]
    assert document["title"] == "Dissection of precomputed features"
    assert layer["label_rule"] == "significant" and layer["fdr"] == 0.05 and layer["interpretable"] == 8
    for unit in layer["units"]:
        assert unit["second"]["labelnum"] not in (0, unit["labelnum"])
        assert 0 <= unit["chance_iou"] < 1 and 0 <= unit["p_value"] <= unit["q_value"] <= 1
        assert unit["interpretable"] == (unit["significant"] and unit["iou"] >= 0.05 and unit["labelnum"] > 0)
    dom = render(toy_report / "dissect.html", tmp_path)
    header = dom[dom.index("<h1>"):dom.index('id="comparison"')]
    # a real title and the facts of the run
    assert "<h1>Dissection of precomputed features</h1>" in header
    for fact in ("layers: <b>toy</b>", "samples: <b>48</b>", "segmenter: <b>given segmentations, 3 concepts</b>",
                 "threshold rule: <b>IQR (the paper's)</b>", "label rule: <b>beats chance (FDR 0.05)"):
        assert fact in header, fact
    # a legend with every term a row uses
    legend = dom[dom.index('id="legend"'):dom.index("</details>")]
    for term in ("<dt>IoU</dt>", "<dt>IQR</dt>", "<dt>level</dt>", "<dt>top %</dt>", "<dt>chance</dt>",
                 "<dt>q, \u2713</dt>", "<dt>concept</dt>", "<dt>image strip</dt>", "yellow outline"):
        assert term in legend, term
    # every unit row: its concept with chance and q, its second-best concept; no '(object)' anywhere
    rows = re.findall(r'<div class="unit(?: interp)?" id="unit-(\d+)">(.*?)</div>', dom)
    assert len(rows) == 16 and len(re.findall(r'<div class="unit interp"', dom)) == 8
    for _, head in rows:
        assert "2nd: " in head and "chance " in head and "top " in head and "level " in head
    assert "(object)" not in dom
    assert dom.count("data:image/svg+xml;base64,") == 2
    # a link to one unit opens its layer, scrolls to it and marks it
    linked = render(toy_report / "dissect.html", tmp_path, "#layer=toy&unit=5")
    assert re.findall(r'<div class="unit[^"]*target[^"]*" id="unit-(\d+)"', linked) == ["5"]


def test_cli_generator_source(tmp_path, monkeypatch):
    import gandissect_jax
    from test_dissect_pipeline import TinyGenerator, TinySegmenter

    loaded = []
    monkeypatch.setattr(gandissect_jax, "load_generator", lambda src: loaded.append(src) or TinyGenerator(),
                        raising=False)
    monkeypatch.setattr(gandissect_jax, "load_segmenter", lambda src: loaded.append(src) or TinySegmenter(),
                        raising=False)
    outdir = tmp_path / "gen"
    code = main(["dissect", "--model", "tiny", "--segmenter", "colours", "--layers", "layer2", "--size", "37",
                 "--seed", "3", "--batch-size", "8", "--topk", "5", "--outdir", str(outdir), "--quiet"])
    assert code == 0 and loaded == ["tiny", "colours"]
    document = json.loads((outdir / "dissect.json").read_text())
    assert document["layers"][0]["threshold"] == "iqr"  # the paper's rule is the generator default
    assert document["settings"]["source"]["model"] == "tiny"
    assert document["title"] == "Dissection of tiny"  # the model names the report
    with np.load(outdir / "layer2" / "scores.npz") as scores:
        assert scores["iou"].shape == (4, 7) and scores["levels"].shape == (7,)
        assert scores["max_iqr"].shape == (4, 7)
    assert len(list((outdir / "layer2" / "image").glob("*-top.jpg"))) == 7


def _toy_files(directory: Path, seed: int = 0, layout: str = "nhwc") -> list[str]:
    from test_dissect_runs import LABELS, toy

    feats, seg = toy(seed=seed)
    np.save(directory / "f.npy", feats if layout == "nhwc" else np.ascontiguousarray(feats.transpose(0, 3, 1, 2)))
    np.save(directory / "s.npy", seg)
    (directory / "labels.json").write_text(json.dumps(LABELS))
    return ["dissect", "--features", str(directory / "f.npy"), "--segmentations", str(directory / "s.npy"),
            "--labels", str(directory / "labels.json"), "--quiet", "--no-images", "--batch-size", "16"]


def test_cli_refuses_other_data_in_an_outdir_and_restarts_on_request(tmp_path, capsys):
    argv = _toy_files(tmp_path) + ["--outdir", str(tmp_path / "out")]
    assert main(argv) == 0
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    _toy_files(tmp_path, seed=1)  # the same files, other data
    capsys.readouterr()
    assert main(argv) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"gandissect-jax dissect: error: {tmp_path / 'out'} holds a dissection of other inputs")
    assert "source.content.features.features was sha256" in line and "--restart" in line
    assert main(argv + ["--restart"]) == 0
    assert (tmp_path / "out" / "mine.txt").read_text() == "the user's"
    assert main(argv) == 0  # the restarted run is now the one that resumes


def test_cli_layout_flag_reads_channels_first_features(tmp_path, capsys):
    argv = _toy_files(tmp_path, layout="nchw")
    assert main(argv + ["--outdir", str(tmp_path / "refused")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "pass --layout nchw" in line and not (tmp_path / "refused").exists()
    assert main(argv + ["--layout", "nchw", "--outdir", str(tmp_path / "nchw")]) == 0
    assert main(_toy_files(tmp_path) + ["--outdir", str(tmp_path / "nhwc")]) == 0
    with np.load(tmp_path / "nchw" / "features" / "scores.npz") as a, \
            np.load(tmp_path / "nhwc" / "features" / "scores.npz") as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cli_bad_labels_get_one_line_before_any_work(tmp_path, capsys):
    argv = _toy_files(tmp_path)
    seg = np.load(tmp_path / "s.npy")
    seg[40, 3, 3] = 255
    np.save(tmp_path / "s.npy", seg)
    assert main(argv + ["--outdir", str(tmp_path / "out")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "hold label 255, outside [0, 3]" in line and "map 'ignore' values such as 255 or -1 to 0" in line
    assert not (tmp_path / "out").exists()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["labels", "categories", "x"]),
                                                                  inner, max_size=3), max_leaves=12)
LABEL_DOCUMENTS = st.fixed_dictionaries(
    {"labels": st.lists(st.lists(JSON_VALUES | st.text(max_size=3), min_size=1, max_size=3), max_size=4) | JSON_VALUES},
    optional={"categories": st.lists(JSON_VALUES | st.text(max_size=3), max_size=3) | JSON_VALUES})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=LABEL_DOCUMENTS | JSON_VALUES)
def test_a_labels_file_is_taken_as_written_or_refused_naming_the_file(tmp_path, document):
    """Any JSON in --labels: either every name and category is a non-empty string, taken as
    written (nothing is turned into a string silently), or one ValueError names the file."""
    from gandissect_jax.commands.dissect import _load_labels

    path = tmp_path / "labels.json"
    path.write_text(json.dumps(document))
    try:
        loaded = _load_labels(str(path))
    except ValueError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert loaded == document and loaded["labels"]
    for entry in loaded["labels"]:
        assert isinstance(entry, list) and len(entry) == 2
        assert all(isinstance(part, str) and part.strip() for part in entry)
    if "categories" in loaded:
        assert loaded["categories"] and all(isinstance(c, str) and c.strip() for c in loaded["categories"])


def test_a_labels_file_that_is_not_text_is_refused_naming_the_file(tmp_path):
    from gandissect_jax.commands.dissect import _load_labels

    path = tmp_path / "labels.json"
    path.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ValueError, match=f"labels file {re.escape(str(path))} is not UTF-8 text"):
        _load_labels(str(path))


NOT_REAL = [np.complex64, np.dtype([("a", "<f4")]), np.dtype("U3"), np.dtype("datetime64[s]"), np.dtype("V4")]


@pytest.mark.parametrize("flag", ["--features", "--levels"])
@pytest.mark.parametrize("dtype", NOT_REAL, ids=str)
def test_arrays_that_do_not_hold_real_numbers_are_refused_naming_the_flag(tmp_path, capsys, flag, dtype):
    """A .npy whose dtype is not a real number (complex, structured, text, dates, raw bytes) is
    refused in one line naming the flag and the file, before any work (complex was silently cut
    to its real part)."""
    argv = _toy_files(tmp_path)
    source = np.load(tmp_path / "f.npy")
    if flag == "--levels":
        source = np.zeros(source.shape[-1], np.float32)
        argv += ["--levels", str(tmp_path / "levels.npy")]
    path = tmp_path / ("f.npy" if flag == "--features" else "levels.npy")
    np.save(path, np.zeros(source.shape, dtype))
    capsys.readouterr()
    assert main(argv + ["--outdir", str(tmp_path / "out")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"{flag} {path} must hold real numbers" in line, line
    assert not (tmp_path / "out").exists()
