"""Multi-host dissection on JAX's distributed runtime: 2 processes x 4 CPU devices on localhost give
the 1-process, 1-device result array for array (scores.npz, dissect.json, strips), only process 0
writes, and a run whose process was killed fails and resumes when both are relaunched.

Each process is a ``gandissect-jax dissect`` subprocess (``--coordinator 127.0.0.1:PORT
--num-processes 2 --process-id I``, ``XLA_FLAGS=--xla_force_host_platform_device_count=4``, gloo
collectives), on the shipped demo model (layer4, 16 samples)."""

from __future__ import annotations

import glob
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from multihost_helpers import finish, free_port, process_env

ARGS = ["dissect", "--size", "16", "--topk", "3", "--layers", "layer4", "--quiet", "--batch-size", "16"]
TIMEOUT = 600  # seconds per run, far above what it takes (a hung collective must not hang the suite)




def _command(outdir, extra=()) -> list[str]:
    return [sys.executable, "-m", "gandissect_jax.cli", *ARGS, "--outdir", str(outdir), *extra]


def _launch(outdirs, port: int, extra=(), per_process=((), ())) -> list[subprocess.Popen]:
    """Both processes of a 2-process run; process i writes (if at all) into outdirs[i] and gets
    ``per_process[i]`` as further flags."""
    return [subprocess.Popen(_command(outdirs[i], ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                   "--process-id", str(i), *extra, *per_process[i]]),
                             env=process_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The 1-process, 1-device dissection."""
    outdir = tmp_path_factory.mktemp("single") / "out"
    done = subprocess.run(_command(outdir), env=process_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return outdir


def _assert_same_results(single: Path, outdir: Path) -> None:
    with np.load(single / "layer4" / "scores.npz") as a, np.load(outdir / "layer4" / "scores.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
            assert a[name].tobytes() == b[name].tobytes(), f"scores.npz {name} differs"
    assert (single / "dissect.json").read_bytes() == (outdir / "dissect.json").read_bytes()
    strips = sorted(p.name for p in (single / "layer4" / "image").iterdir())
    assert len(strips) == json.loads((single / "dissect.json").read_text())["layers"][0]["num_units"]
    for name in strips:
        assert (single / "layer4" / "image" / name).read_bytes() == (outdir / "layer4" / "image" / name).read_bytes()


def test_two_processes_of_four_devices_equal_one_device_and_only_process_0_writes(single, tmp_path):
    outdirs = [tmp_path / "out0", tmp_path / "out1"]
    results = finish(_launch(outdirs, free_port()), TIMEOUT)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"process {rank}: {log[-3000:]}"
    _assert_same_results(single, outdirs[0])
    assert not outdirs[1].exists()  # process 1 needs no outdir and writes nothing
    assert "interpretable" in results[0][1] and "interpretable" not in results[1][1]  # the summary: process 0


def test_killed_process_fails_the_run_and_a_relaunch_resumes(single, tmp_path):
    outdirs = [tmp_path / "out0", tmp_path / "out1"]
    processes = _launch(outdirs, free_port(), ["--checkpoint-every", "0", "--keep-progress"])
    deadline = time.monotonic() + TIMEOUT
    # kill process 1 once process 0 has saved the first quantile stage
    while not glob.glob(str(outdirs[0] / ".progress" / "passes-*" / "plan.npz")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), finish(processes, TIMEOUT)
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    (code0, log0), (code1, _) = finish(processes, TIMEOUT)
    assert code1 == -signal.SIGKILL
    assert code0 == 1, log0[-3000:]  # the survivor fails (its collective loses its peer) and says how to go on
    assert "error: process 0 of 2" in log0 and "relaunch every process with the same command" in log0
    assert "Traceback" not in log0
    assert time.monotonic() - killed_at < 60  # at once, not after JAX's heartbeat timeout (100 s)
    with np.load(glob.glob(str(outdirs[0] / ".progress" / "passes-*" / "plan.npz"))[0]) as plan:
        saved_stage = int(plan["stage_index"])
    assert saved_stage >= 1

    results = finish(_launch(outdirs, free_port(), ["--checkpoint-every", "0", "--keep-progress"]), TIMEOUT)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"process {rank}: {log[-3000:]}"
    _assert_same_results(single, outdirs[0])
    assert not outdirs[1].exists()


@pytest.mark.parametrize("flags", [("--size", "8"), ("--seed", "2")], ids=["size", "seed"])
def test_processes_given_other_commands_are_refused_naming_what_differs(tmp_path, flags):
    """Process 1 launched with another --size or --seed than process 0: both stop before any pass
    with one line, process 1's naming the setting and both values, no Traceback, nothing written."""
    outdirs = [tmp_path / "out0", tmp_path / "out1"]
    (code0, log0), (code1, log1) = finish(_launch(outdirs, free_port(), per_process=((), flags)), TIMEOUT)
    assert code0 == 1 and code1 == 1, (log0[-2000:], log1[-2000:])
    key = {"--size": "source.num_samples was 16, now 8", "--seed": "source.seed was 1, now 2"}[flags[0]]
    assert "this process was given other inputs or settings than process 0" in log1 and key in log1, log1[-2000:]
    assert "another process of this run was given other inputs or settings" in log0, log0[-2000:]
    assert "Traceback" not in log0 + log1
    assert not any(p.name != ".dissect.lock" for p in outdirs[0].iterdir()) if outdirs[0].exists() else True


def test_a_process_that_fails_to_load_its_inputs_stops_every_process(tmp_path):
    """Process 1 given a layer its generator lacks fails while loading; process 0 stops at once
    with one line saying another process stopped, instead of waiting for it in a collective
    (``distributed.fail_together``; on CPU, gloo may also see process 1 leave first)."""
    outdirs = [tmp_path / "out0", tmp_path / "out1"]
    started = time.monotonic()
    (code0, log0), (code1, log1) = finish(_launch(outdirs, free_port(), per_process=((), ("--layers", "layer99"))),
                                          TIMEOUT)
    assert code0 == 1 and code1 == 1, (log0[-2000:], log1[-2000:])
    assert "unknown layer(s) layer99" in log1, log1[-2000:]
    # (either the failure flag arrived, or gloo saw process 1 leave first: both say so in one line)
    assert "error: process 0 of 2" in log0 or "another process of this run stopped" in log0, log0[-2000:]
    assert "another process of this run" in log0, log0[-2000:]
    assert "Traceback" not in log0 + log1
    assert time.monotonic() - started < 120
