"""Ctrl-C at any point of a dissection says in one line where the rerun resumes, and the rerun does
just that: inside a pass, between passes, between unit groups, while scoring, while saving the
scores, while writing the strips or the report, before the passes. Each interruption is injected
at a chosen point (a SIGINT sent while a batch is read, or a KeyboardInterrupt raised by a stage
function), and the rerun's reads of the features show how much it measured again."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal

import numpy as np
import pytest

from gandissect_jax.cli import main
from gandissect_jax.dissection import dissect_features, distributed, make_mesh, passes
from gandissect_jax.dissection import groups as unit_groups
from gandissect_jax.dissection.engine import Interrupted
from gandissect_jax.dissection.interruption import ResumeTracker, RunInterrupted
from gandissect_jax.dissection.memory import RUNTIME_BYTES, plan_dissection
from gandissect_jax.dissection.results import LayerDissection
from gandissect_jax.dissection.sources import ArraySource
from test_dissect_runs import LABELS, ReadCounter, toy

dissect_module = importlib.import_module("gandissect_jax.dissection.dissect")  # the package exports the function

N = 48  # samples: 3 batches of 16 per pass; 4 passes (3 quantile passes, then the count pass)
OPTIONS = dict(progress=False, make_images=False, batch_size=16)
QUANTILE_PASSES = "unit quantiles and top samples, quantile refinement, exact quantiles"


class SigintAt(ReadCounter):
    """Features whose read number ``at`` (1 = the content hash, then one per batch) sends this
    process SIGINT, as Ctrl-C would (``raise_instead``: raises KeyboardInterrupt, as a second Ctrl-C)."""

    def __init__(self, array, at: int, raise_instead: bool = False):
        super().__init__(array)
        self.at, self.raise_instead = at, raise_instead

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if self.reads == self.at:
            if self.raise_instead:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return value


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler for the test (it is not installed where SIGINT was ignored at start)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def data():
    feats, segs = toy(N)
    return feats, segs, dissect_features(feats, segs, LABELS, **OPTIONS)["features"]


def _raise_on_call(number: int, function):
    """``function``, raising KeyboardInterrupt on its call ``number`` (1-based) instead."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapped


def _raise_after_call(number: int, function):
    """``function``, raising KeyboardInterrupt once its call ``number`` (1-based) has returned."""
    calls = []

    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return result

    return wrapped


def _interrupted(feats, segs, outdir, **options) -> str:
    with pytest.raises(Interrupted) as stop:
        dissect_features(feats, segs, LABELS, outdir=str(outdir), **{**OPTIONS, **options})
    assert isinstance(stop.value, RunInterrupted)
    message = str(stop.value)
    assert "\n" not in message and message.startswith("interrupted: ")
    return message


def _rerun_reads(feats, segs, outdir, expected, **options) -> int:
    """Reads of the features by the rerun, whose result must equal the uninterrupted one."""
    counted = ReadCounter(feats)
    result = dissect_features(counted, segs, LABELS, outdir=str(outdir), **{**OPTIONS, **options})["features"]
    for field, value in vars(expected).items():
        if isinstance(value, np.ndarray):
            assert value.tobytes() == getattr(result, field).tobytes(), field
    assert not list(outdir.glob(".progress/passes-*"))
    return counted.reads


def _passes_dir(outdir) -> str:
    [found] = outdir.glob(".progress/passes-*")
    return str(found)


def test_ctrl_c_inside_a_pass_says_where_the_pass_resumes(data, tmp_path, python_sigint_handler):
    feats, segs, expected = data
    # read 6: the second batch of pass 2; the pass stops once that batch is done and saved
    message = _interrupted(SigintAt(feats, 6), segs, tmp_path, checkpoint_every=3600.0)
    assert message == (f"interrupted: pass 2/4: quantile refinement stopped at sample 32 of 48; progress saved in "
                       f"{_passes_dir(tmp_path)}/quantiles-1: rerun the same command to resume from there")
    assert _rerun_reads(feats, segs, tmp_path, expected) == 1 + 1 + 3 + 3  # hash, last batch of pass 2, passes 3-4


def test_second_ctrl_c_inside_a_pass_resumes_from_the_passes_last_checkpoint(data, tmp_path):
    feats, segs, expected = data
    message = _interrupted(SigintAt(feats, 6, raise_instead=True), segs, tmp_path, checkpoint_every=0.0)
    assert message == (f"interrupted: pass 2/4: quantile refinement stopped at once near sample 16 of 48; its last "
                       f"checkpoint is in {_passes_dir(tmp_path)}: rerun the same command to resume this pass from "
                       f"there")
    assert _rerun_reads(feats, segs, tmp_path, expected) == 1 + 2 + 3 + 3  # pass 2 saved after its first batch


def test_ctrl_c_between_quantile_passes_resumes_at_the_next_pass(data, tmp_path, monkeypatch):
    feats, segs, expected = data
    monkeypatch.setattr(passes, "_save_plan", _raise_after_call(1, passes._save_plan))  # just after pass 1
    message = _interrupted(feats, segs, tmp_path)
    assert message == (f"interrupted: pass 1 of 4 done (unit quantiles and top samples); progress saved in "
                       f"{_passes_dir(tmp_path)}: rerun the same command to resume at pass 2/4: quantile refinement")
    monkeypatch.undo()
    assert _rerun_reads(feats, segs, tmp_path, expected) == 1 + 3 + 3 + 3  # the hash, passes 2-4


def test_ctrl_c_before_a_finished_pass_is_saved_says_it_runs_again(data, tmp_path, monkeypatch):
    feats, segs, expected = data
    # the stop lands after pass 1 ended but before its results (the quantile plan) were written
    monkeypatch.setattr(passes, "_save_plan", _raise_on_call(1, passes._save_plan))
    message = _interrupted(feats, segs, tmp_path, checkpoint_every=3600.0)
    assert message == (f"interrupted: pass 1/4: unit quantiles and top samples finished but not yet saved; progress "
                       f"saved in {_passes_dir(tmp_path)}: rerun the same command to run pass 1/4: unit quantiles "
                       f"and top samples again")
    monkeypatch.undo()
    assert _rerun_reads(feats, segs, tmp_path, expected) == 1 + 3 + 3 + 3 + 3  # the hash, passes 1-4


def test_ctrl_c_before_the_count_pass_resumes_at_the_count_pass(data, tmp_path, monkeypatch):
    feats, segs, expected = data
    monkeypatch.setattr(unit_groups, "count_levels", _raise_on_call(1, unit_groups.count_levels))
    message = _interrupted(feats, segs, tmp_path)
    assert message == (f"interrupted: passes 1-3 of 4 done ({QUANTILE_PASSES}); progress saved in "
                       f"{_passes_dir(tmp_path)}: rerun the same command to resume at pass 4/4: concept counts")
    monkeypatch.undo()
    assert _rerun_reads(feats, segs, tmp_path, expected) == 1 + 3


def test_ctrl_c_between_unit_groups_resumes_at_the_group(data, tmp_path, monkeypatch):
    feats, segs, _ = data
    layers = {"features": feats}
    options = dict(num_labels=len(LABELS["labels"]), num_categories=1, threshold="quantile", search_iqr=False,
                   topk=10, batch_size=16, mesh=make_mesh())
    everything = plan_dissection(ArraySource(layers, segs), ["features"], max_memory="1T", **options)
    budget = RUNTIME_BYTES + (everything.host_peak - RUNTIME_BYTES) // 3
    groups = len(plan_dissection(ArraySource(layers, segs), ["features"], max_memory=budget, **options).groups)
    assert groups >= 3
    expected = dissect_features(feats, segs, LABELS, max_memory=budget, **OPTIONS)["features"]
    monkeypatch.setattr(unit_groups, "count_levels", _raise_on_call(2, unit_groups.count_levels))  # in the second group
    message = _interrupted(feats, segs, tmp_path, max_memory=budget)
    assert message == (f"interrupted: unit group 1 of {groups} done, unit group 2/{groups}: passes 1-3 of 4 done "
                       f"({QUANTILE_PASSES}); progress saved in {_passes_dir(tmp_path)}: rerun the same command to "
                       f"resume at unit group 2/{groups}, pass 4/4: concept counts")
    monkeypatch.undo()
    reads = _rerun_reads(feats, segs, tmp_path, expected, max_memory=budget)
    assert reads == 1 + 3 + (groups - 2) * 4 * 3  # the hash, group 2's count pass, the later groups


@pytest.mark.parametrize("checkpoint_every, resume, reads", [
    (3600.0, "run pass 4/4: concept counts again", 1 + 3),  # no periodic save: the count pass again
    (0.0, "resume pass 4/4: concept counts from sample 32 (its last checkpoint)", 1 + 1),  # its last batch again
])
def test_ctrl_c_while_scoring_redoes_the_unsaved_count_pass_from_its_last_save(data, tmp_path, monkeypatch,
                                                                               checkpoint_every, resume, reads):
    feats, segs, expected = data
    # the last count pass writes no final checkpoint: its results are saved with the scores
    monkeypatch.setattr(dissect_module, "score_layer", _raise_on_call(1, dissect_module.score_layer))
    message = _interrupted(feats, segs, tmp_path, checkpoint_every=checkpoint_every)
    assert message == (f"interrupted: after the passes: all 4 passes done, pass 4/4: concept counts not saved (its "
                       f"results are saved with the scores); progress saved in {_passes_dir(tmp_path)}: rerun the "
                       f"same command to {resume}, score features, then save the scores and write the report")
    monkeypatch.undo()
    assert _rerun_reads(feats, segs, tmp_path, expected) == reads  # the hash, then what the line says


def test_ctrl_c_while_saving_scores_names_the_layers_measured_again(data, tmp_path, monkeypatch):
    feats, segs, _ = data
    layers = {"a": feats[..., :8], "b": feats[..., 8:]}
    expected = dissect_features(layers, segs, LABELS, **OPTIONS)
    monkeypatch.setattr(LayerDissection, "save_npz", _raise_on_call(2, LayerDissection.save_npz))
    with pytest.raises(Interrupted) as stop:
        dissect_features(layers, segs, LABELS, outdir=str(tmp_path), **OPTIONS)
    assert str(stop.value) == ("interrupted: while saving the scores: those of a are saved, those of b not: rerun "
                               "the same command to measure b again (from pass 1) and write the rest")
    monkeypatch.undo()
    saved_a = (tmp_path / "a" / "scores.npz").stat().st_mtime_ns
    assert not (tmp_path / "b" / "scores.npz").exists()
    counted = ReadCounter(layers["b"])
    result = dissect_features({"a": layers["a"], "b": counted}, segs, LABELS, outdir=str(tmp_path), **OPTIONS)
    assert counted.reads == 1 + 4 * 3  # b measured again, from pass 1 ...
    assert (tmp_path / "a" / "scores.npz").stat().st_mtime_ns == saved_a  # ... a not
    for layer in layers:
        assert expected[layer].iou.tobytes() == result[layer].iou.tobytes()


def test_ctrl_c_while_writing_strips_or_report_redoes_only_those(data, tmp_path, monkeypatch):
    feats, segs, expected = data
    images = (np.repeat(segs[..., None], 3, axis=-1) * 60).astype(np.uint8)
    monkeypatch.setattr(dissect_module, "write_strips", _raise_on_call(1, dissect_module.write_strips))
    message = _interrupted(feats, segs, tmp_path / "strips", images=images, make_images=True)
    assert message == ("interrupted: while writing the strips: the scores of every layer are saved, the strips of "
                       "features not: rerun the same command to write only the strips of features and the report")
    monkeypatch.undo()
    straight = ReadCounter(feats)  # an uninterrupted run reads the hash, 4 passes, then the strips' samples
    dissect_features(straight, segs, LABELS, outdir=str(tmp_path / "straight"), **{**OPTIONS, "make_images": True},
                     images=images)
    strip_reads = straight.reads - 1 - 4 * 3
    assert strip_reads > 0
    assert _rerun_reads(feats, segs, tmp_path / "strips", expected, images=images, make_images=True) == 1 + strip_reads
    assert (tmp_path / "strips" / "dissect.json").exists()

    monkeypatch.setattr(dissect_module, "write_report", _raise_on_call(1, dissect_module.write_report))
    message = _interrupted(feats, segs, tmp_path / "report")
    assert message == ("interrupted: while writing the report: the scores of every layer are saved: rerun the same "
                       "command to write only the report")
    monkeypatch.undo()
    assert _rerun_reads(feats, segs, tmp_path / "report", expected) == 1
    assert json.loads((tmp_path / "report" / "dissect.json").read_text())


def test_ctrl_c_before_the_passes_says_whether_earlier_progress_is_kept(data, tmp_path, monkeypatch,
                                                                        python_sigint_handler):
    feats, segs, expected = data
    original = dissect_module.check_label_values
    monkeypatch.setattr(dissect_module, "check_label_values", _raise_on_call(1, original))
    assert _interrupted(feats, segs, tmp_path) == ("interrupted: before the passes (checking the input); nothing was "
                                                   "measured yet: rerun the same command to start")
    monkeypatch.undo()
    _interrupted(SigintAt(feats, 3), segs, tmp_path)  # an earlier run stopped in pass 1 ...
    monkeypatch.setattr(dissect_module, "check_label_values", _raise_on_call(1, original))
    assert _interrupted(feats, segs, tmp_path) == (  # ... then this one before the passes
        f"interrupted: before the passes (checking the input); the progress of an earlier run is kept in "
        f"{tmp_path}/.progress: rerun the same command to resume from it")
    monkeypatch.undo()
    assert _rerun_reads(feats, segs, tmp_path, expected) == 1 + 1 + 3 + 3 + 3  # pass 1 resumed after 2 batches


def test_without_an_outdir_ctrl_c_says_nothing_was_saved(data, monkeypatch):
    feats, segs, _ = data
    monkeypatch.setattr(unit_groups, "count_levels", _raise_on_call(1, unit_groups.count_levels))
    with pytest.raises(Interrupted) as stop:
        dissect_features(feats, segs, LABELS, **OPTIONS)
    assert str(stop.value) == (f"interrupted: passes 1-3 of 4 done ({QUANTILE_PASSES}); nothing was saved "
                               f"(no outdir)")


def test_a_multi_process_run_says_to_relaunch_every_process(monkeypatch, tmp_path):
    tracker = ResumeTracker(str(tmp_path))
    names = ["quantiles-0", "quantiles-1", "quantiles-2", "counts"]
    tracker.passes(False, names, 1, str(tmp_path / ".progress" / "passes-x"))
    tracker.opened(object(), ["layer4"], {"layer4": "layer4"}, lambda: [], images=True, report=True)
    bar = tracker.bar("quantiles-0", 16, 0)
    bar.update(16)
    bar.close()
    tracker.result_saved("quantiles-0")  # the quantile plan is written
    monkeypatch.setattr(distributed, "multiprocess", lambda: True)
    assert str(tracker.interrupted(KeyboardInterrupt())).endswith(
        ": relaunch every process with the same command to resume at pass 2/4: quantile refinement")


@pytest.mark.parametrize("stage, start", [
    ("count_levels", "interrupted: passes 1-3 of 4 done"),
    ("write_report", "interrupted: while writing the report: the scores of every layer are saved: rerun the same"),
])
def test_cli_prints_one_line_and_exits_130_at_any_stage(data, tmp_path, monkeypatch, capsys, stage, start):
    feats, segs, _ = data
    np.save(tmp_path / "features.npy", feats)
    np.save(tmp_path / "segs.npy", segs)
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    module = unit_groups if stage == "count_levels" else dissect_module
    monkeypatch.setattr(module, stage, _raise_on_call(1, getattr(module, stage)))
    argv = ["dissect", "--features", str(tmp_path / "features.npy"), "--segmentations", str(tmp_path / "segs.npy"),
            "--labels", str(tmp_path / "labels.json"), "--batch-size", "16", "--quiet", "--no-images",
            "--outdir", str(tmp_path / "out")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"gandissect-jax dissect: {start}"), err
    assert re.search(r"rerun the same command to \w", err)


def test_a_foreign_pass_checkpoint_is_refused_without_discarding_the_progress(data, tmp_path, python_sigint_handler):
    """A pass checkpoint of another kind is not bad input: the run's other progress (here the
    quantile plan) stays, and the error names the file."""
    from gandissect_jax.dissection import resume
    from gandissect_jax.dissection.engine import CheckpointMismatch

    feats, segs, _ = data
    message = _interrupted(SigintAt(feats, 12), segs, tmp_path, checkpoint_every=3600.0)  # inside the count pass
    assert "pass 4/4: concept counts stopped at sample 32 of 48" in message
    [checkpoint] = (tmp_path / ".progress").glob("passes-*/counts/*.npz")
    resume.save_checkpoint(str(checkpoint), {"other": np.zeros(3)}, {"signature": {"other": 1}, "samples_done": 16})
    with pytest.raises(CheckpointMismatch, match=str(checkpoint)):
        dissect_features(feats, segs, LABELS, outdir=str(tmp_path), **OPTIONS)
    assert list((tmp_path / ".progress").glob("passes-*/plan.npz"))  # not discarded


@pytest.mark.parametrize("damage", ["truncated", "junk"])
@pytest.mark.parametrize("which", ["counts/tally.npz", "plan.npz"])
def test_a_damaged_progress_file_gives_one_line_naming_it(data, tmp_path, python_sigint_handler, damage, which):
    """A truncated or foreign checkpoint or quantile plan: a ValueError naming the file and how to
    start afresh (the CLI's one line), never a zip or numpy traceback."""
    feats, segs, _ = data
    _interrupted(SigintAt(feats, 12), segs, tmp_path, checkpoint_every=3600.0)  # inside the count pass
    [path] = (tmp_path / ".progress").glob(f"passes-*/{which}")
    path.write_bytes(path.read_bytes()[:300] if damage == "truncated" else b"junk\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*remove it to start afresh"):
        dissect_features(feats, segs, LABELS, outdir=str(tmp_path), **OPTIONS)
    assert path.exists() and list((tmp_path / ".progress").glob("passes-*/plan.npz"))  # nothing discarded
