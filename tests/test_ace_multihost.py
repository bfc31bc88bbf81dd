"""Multi-host ACE on JAX's distributed runtime: 2 processes x 2 CPU devices on localhost give the
1-process result array for array (corpus.npz, fit.npz, curves.npz, ace.json), only process 0
writes, and the other process needs no output directory (process 0 sends it the dissection).
The 1-process run has 2 devices: XLA compiles a fit step spread over 2 or more devices the same
way, and the unpartitioned 1-device program differently, to float32 rounding
(``tests/test_ace_sharded.py`` measures that difference).

Each process is a ``gandissect-jax ace`` subprocess (``--coordinator 127.0.0.1:PORT --num-processes 2
--process-id I``, ``XLA_FLAGS=--xla_force_host_platform_device_count=2``, gloo collectives), on a
small dissection of the shipped demo model (layer4, 32 samples) with tiny corpus and curve sizes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multihost_helpers import finish, free_port, process_env

pytestmark = pytest.mark.slow  # about 2 minutes on a 2-core CPU (3 runs of 2 processes, 1 of 1)

ARGS = ["ace", "--layer", "layer4", "--concept", "tree", "--search-size", "40", "--train-size", "8",
        "--eval-size", "4", "--epochs", "2", "--train-batch", "4", "--train-micro-batch", "1", "--curve-samples", "6", "--curve-max", "4",
        "--show-units", "4", "--batch-size", "4", "--quiet"]
FOLDER = Path("intervention", "ace", "layer4", "tree-ace")
STEPS = ("corpus", "fit", "curves")
TIMEOUT = 600  # seconds per run, far above what it takes (a hung collective must not hang the suite)




def _command(args, outdir, extra=()) -> list[str]:
    return [sys.executable, "-m", "gandissect_jax.cli", *args, "--outdir", str(outdir), *extra]


def _launch(outdirs, extra=(), per_process=((), ())) -> list[tuple[int, str]]:
    """A 2-process run of ``ace``, 2 devices each; process i is given outdirs[i] and ``per_process[i]``."""
    port = free_port()
    return finish([subprocess.Popen(
        _command(ARGS, outdirs[i], ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                    "--process-id", str(i), *extra, *per_process[i]]),
        env=process_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)], TIMEOUT)


@pytest.fixture(scope="module")
def dissection(tmp_path_factory) -> Path:
    """A small dissection of the demo model (layer4), made once; tests work on copies."""
    outdir = tmp_path_factory.mktemp("dissection") / "demo"
    done = subprocess.run(_command(["dissect", "--layers", "layer4", "--size", "32", "--batch-size", "16",
                                    "--no-images", "--quiet"], outdir),
                          env=process_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return outdir


def _copy(dissection: Path, to: Path) -> Path:
    shutil.copytree(dissection, to)
    return to


@pytest.fixture(scope="module")
def single(dissection, tmp_path_factory) -> Path:
    """The 1-process, 2-device ACE experiment's folder."""
    outdir = _copy(dissection, tmp_path_factory.mktemp("single") / "demo")
    done = subprocess.run(_command(ARGS, outdir), env=process_env(2), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return outdir / FOLDER


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_of_two_devices_equal_one_process_and_only_process_0_writes(dissection, single, tmp_path):
    outdirs = [_copy(dissection, tmp_path / "out0"), tmp_path / "out1"]  # process 1 gets no dissection at all
    before = _files(outdirs[0])
    results = _launch(outdirs)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"process {rank}: {log[-3000:]}"
    folder = outdirs[0] / FOLDER
    for step in STEPS:
        with np.load(single / f"{step}.npz") as a, np.load(folder / f"{step}.npz") as b:
            assert sorted(a.files) == sorted(b.files), step
            for name in a.files:
                assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, (step, name)
                assert a[name].tobytes() == b[name].tobytes(), f"{step}.npz {name} differs"
    one, two = (json.loads((f / "ace.json").read_text()) for f in (single, folder))
    for key in ("ranking", "alpha", "eval_loss", "curves", "removed_fraction", "baseline_share", "iou"):
        assert one[key] == two[key], key
    assert len(one["eval_loss"]) == 3 and len(one["ranking"]) == 128
    # process 0 wrote the experiment, the ranking and the index; process 1 wrote nothing anywhere
    after = _files(outdirs[0])
    assert {"ace.json", "page.html", "curves.png", "ablation.png"} <= {Path(p).name for p in after}
    assert "intervention/index.json" in after and after["dissect.json"] != before["dissect.json"]
    assert not outdirs[1].exists()
    assert "top units by ACE" in results[0][1] and "top units by ACE" not in results[1][1]


def test_a_rerun_of_two_processes_resumes_from_process_0s_steps(dissection, single, tmp_path):
    outdirs = [_copy(dissection, tmp_path / "out0"), tmp_path / "out1"]
    shutil.copytree(single, outdirs[0] / FOLDER)  # the finished single-device run, its steps marked done
    stamps = {step: (outdirs[0] / FOLDER / f"{step}.npz").stat().st_mtime_ns for step in STEPS}
    results = _launch(outdirs)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"process {rank}: {log[-3000:]}"
    # every process skipped every step with process 0's arrays: nothing recomputed, the same summary
    assert {step: (outdirs[0] / FOLDER / f"{step}.npz").stat().st_mtime_ns for step in STEPS} == stamps
    assert json.loads((outdirs[0] / FOLDER / "ace.json").read_text())["ranking"] == \
        json.loads((single / "ace.json").read_text())["ranking"]
    assert not outdirs[1].exists()


def test_process_0s_refusal_of_other_settings_stops_every_process(dissection, single, tmp_path):
    outdirs = [_copy(dissection, tmp_path / "out0"), tmp_path / "out1"]
    shutil.copytree(single, outdirs[0] / FOLDER)
    results = _launch(outdirs, ["--epochs", "3"])  # other settings under the same name
    for rank, (code, log) in enumerate(results):
        assert code == 1, f"process {rank}: {log[-3000:]}"
        assert f"error: process {rank} of 2:" in log and "other settings" in log and "Traceback" not in log, log
    assert "process 0:" in results[1][1]  # process 1 tells that process 0 refused


def test_processes_given_other_commands_are_refused_naming_what_differs(dissection, tmp_path):
    """Process 1 launched with another --seed than process 0: both stop before the corpus search
    with one line, process 1's naming the setting and both values; nothing is written."""
    outdirs = [_copy(dissection, tmp_path / "out0"), tmp_path / "out1"]
    before = _files(outdirs[0])
    (code0, log0), (code1, log1) = _launch(outdirs, per_process=((), ("--seed", "5")))
    assert code0 == 1 and code1 == 1, (log0[-2000:], log1[-2000:])
    assert "this process was given other inputs or settings than process 0" in log1 and "seed was 10, now 5" in log1, \
        log1[-2000:]
    assert "another process of this run was given other inputs or settings" in log0, log0[-2000:]
    assert "Traceback" not in log0 + log1
    assert _files(outdirs[0]) == before and not outdirs[1].exists()
