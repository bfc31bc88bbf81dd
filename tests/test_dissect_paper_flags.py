"""The paper's setup from the command line (--segmenter upp-resnet50-upernet --segdiv quad --segsizes 256
--seg-downsample 2, --thumbsize, --no-report) reaches the segmenter, the run's identity and the
outputs, and every flag, as the multi-host flags, is checked before any work."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import gandissect_jax
import gandissect_jax.dissection
from gandissect_jax.cli import main
from gandissect_jax.dissection import DissectConfig, dissect_features, distributed

LABELS = {"labels": [["-", "object"], ["sky", "object"], ["grass", "object"]], "categories": ["object"]}


class _QuadSegmenter:
    """Stands for the unified-parsing segmenter (its weights need a download)."""

    segdiv = "quad"


def test_paper_segmenter_flags_reach_the_segmenter_the_identity_and_the_config(monkeypatch, tmp_path, capsys):
    calls = {}

    def load_segmenter(src, **options):
        calls["segmenter"] = (src, options)
        return _QuadSegmenter()

    def dissect_generator(generator, segmenter, layers, config, **kwargs):
        calls["run"] = (generator, segmenter, layers, config, kwargs)
        return {}

    monkeypatch.setattr(gandissect_jax, "load_generator", lambda src: ("G", src))
    monkeypatch.setattr(gandissect_jax, "load_segmenter", load_segmenter)
    monkeypatch.setattr(gandissect_jax.dissection, "dissect_generator", dissect_generator)
    code = main(["dissect", "--model", "churchoutdoor_lsun", "--segmenter", "upp-resnet50-upernet", "--segdiv", "quad",
                 "--segsizes", "256", "--seg-downsample", "2", "--layers", "layer4", "--topk", "5", "--thumbsize", "100",
                 "--no-report", "--quiet", "--outdir", str(tmp_path / "out")])
    assert code == 0
    assert calls["segmenter"] == ("upp-resnet50-upernet", {"segdiv": "quad", "segsizes": (256,)})
    generator, segmenter, layers, config, kwargs = calls["run"]
    assert generator == ("G", "churchoutdoor_lsun") and isinstance(segmenter, _QuadSegmenter) and layers == ["layer4"]
    assert kwargs["seg_downsample"] == 2 and kwargs["size"] == 10000
    # the division and the sizes change the segmentations, so a rerun with others is another run
    assert kwargs["identity"] == {"model": "churchoutdoor_lsun", "segmenter": "upp-resnet50-upernet", "segdiv": "quad",
                                  "segsizes": (256,)}
    assert (config.topk, config.thumbsize, config.make_report, config.make_images) == (5, 100, False, True)
    assert "dissect.html" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, status, message", [
    (["--features", "f.npy", "--segdiv", "quad"], 2, "--segdiv and --segsizes choose how --segmenter segments"),
    (["--features", "f.npy", "--segsizes", "256"], 2, "--segdiv and --segsizes choose how --segmenter segments"),
    (["--segdiv", "quad"], 1, "has no 'quad' division"),
    (["--segsizes", "256"], 1, "--segdiv and --segsizes apply to the unified-parsing segmenter"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], 2, r"missing \['--process-id'\]"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], 2, "--coordinator must be HOST:PORT"),
    (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"], 2,
     r"--process-id must be an integer in \[0, 1\]"),
])
def test_flags_are_refused_with_a_clear_error_before_any_work(argv, status, message, tmp_path, capsys):
    """Status 2 with the usage line when the command line alone decides (flags that do not go
    together), 1 when the segmenter must be loaded to know."""
    outdir = tmp_path / "out"
    if status == 2:
        with pytest.raises(SystemExit) as stop:
            main(["dissect", *argv, "--quiet", "--outdir", str(outdir)])
        assert stop.value.code == 2
    else:
        assert main(["dissect", *argv, "--quiet", "--outdir", str(outdir)]) == 1
    text = capsys.readouterr().err
    err = text.strip().splitlines()[-1]
    assert err.startswith("gandissect-jax dissect: error: ")
    assert ("usage: gandissect-jax dissect" in text) == (status == 2)
    assert __import__("re").search(message, err), err
    assert not outdir.exists()


@pytest.mark.parametrize("flag, value", [("--segsizes", "16"), ("--segsizes", "5000"), ("--thumbsize", "8"),
                                         ("--thumbsize", "2000"), ("--num-processes", "0"), ("--process-id", "-1")])
def test_numeric_flags_are_range_checked_at_parse_time(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["dissect", f"{flag}={value}", "--outdir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert f"argument {flag}: must be an integer in [" in capsys.readouterr().err


def test_environment_variables_name_the_processes(monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "h:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="GANDISSECT_NUM_PROCESSES must be an integer, got 'two'"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match=r"missing \['--process-id'\]"):
        distributed.initialize()
    monkeypatch.delenv(distributed.ENV_COORDINATOR)
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
    assert distributed.initialize() is False  # nothing given: one process, nothing joined
    assert not distributed.multiprocess() and distributed.is_leader()


def test_thumbsize_sets_the_strip_height_and_no_report_writes_scores_only(tmp_path):
    rng = np.random.RandomState(0)
    features = rng.rand(12, 4, 4, 3).astype(np.float32)
    segmentations = rng.randint(0, 3, size=(12, 16, 16, 1)).astype(np.int32)
    for thumbsize, report in ((24, False), (40, True)):
        outdir = tmp_path / f"t{thumbsize}"
        dissect_features(features, segmentations, LABELS, threshold="quantile", topk=3, thumbsize=thumbsize,
                         make_report=report, progress=False, outdir=str(outdir))
        strip = Image.open(outdir / "features" / "image" / "0-top.jpg")
        assert strip.size == (3 * thumbsize + 2 * 4, thumbsize)  # 3 thumbnails, gaps of 4 pixels
        assert (outdir / "features" / "scores.npz").exists()
        assert (outdir / "dissect.json").exists() == report and (outdir / "dissect.html").exists() == report


@pytest.mark.parametrize("value", [8, 1025, 32.0, True, "64"])
def test_thumbsize_is_range_checked_by_the_api(value):
    with pytest.raises(ValueError, match=r"thumbsize must be None or an integer in \[16, 1024\]"):
        DissectConfig(thumbsize=value)


def test_no_labels_gives_the_labelled_runs_levels_and_top_samples_without_running_the_segmenter(tmp_path):
    from gandissect_jax.dissection import dissect_generator
    from test_dissect_pipeline import TinyGenerator, TinySegmenter

    class CountingSegmenter(TinySegmenter):
        """Counts its calls (traces): the source's shape probe is one, each compiled program one more."""

        calls = 0

        def segment(self, params, images, downsample=1):
            type(self).calls += 1
            return super().segment(params, images, downsample)

    options = dict(size=24, topk=3, progress=False)
    labelled = dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1"], threshold="quantile", **options)["layer1"]
    outdir = tmp_path / "unlabelled"
    bare = dissect_generator(TinyGenerator(), CountingSegmenter(), ["layer1"], make_labels=False, outdir=str(outdir),
                             **options)["layer1"]
    assert CountingSegmenter.calls == 1  # the shape probe (jax.eval_shape) only: no program segments anything
    assert bare.threshold == "quantile"  # the default without labels
    for name in ("levels", "raw_quantiles", "topk_values", "topk_indices", "activation_fraction"):
        np.testing.assert_array_equal(getattr(bare, name), getattr(labelled, name), err_msg=name)
    assert list(bare.label_names) == ["-"] and not bare.unit_label.any() and bare.iou.shape == (1, bare.num_units)
    assert (outdir / "layer1" / "image" / "0-top.jpg").exists() and (outdir / "dissect.html").exists()
    with pytest.raises(ValueError, match=r"make_labels=False \(--no-labels\) needs the 'quantile' threshold rule"):
        dissect_generator(TinyGenerator(), TinySegmenter(), ["layer1"], make_labels=False, threshold="iqr", **options)


def test_examples_is_the_references_name_for_topk(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(gandissect_jax.dissection, "dissect_features",
                        lambda *args, **kwargs: calls.setdefault("config", args[3]) and {})
    for flag in ("--examples", "--topk"):
        calls.clear()
        for name in ("f.npy", "s.npy"):
            np.save(tmp_path / name, np.zeros((2, 2, 2, 1), np.float32))
        (tmp_path / "l.json").write_text('{"labels": [["-", "object"]], "categories": ["object"]}')
        main(["dissect", "--features", str(tmp_path / "f.npy"), "--segmentations", str(tmp_path / "s.npy"),
              "--labels", str(tmp_path / "l.json"), flag, "7", "--outdir", str(tmp_path / "out"), "--quiet"])
        assert calls["config"].topk == 7
