"""Multi-host ends of a dissection: every process returns only once process 0 has written the
outputs (dissect.json, scores, report); a failure of process 0 while writing fails every process
with process 0's error instead of leaving them done (or waiting); an argument refused on one
process only stops every process at once.

Two processes x 2 CPU devices on localhost (gloo), each running ``dissect_features`` on small
arrays through the Python API (the CLI's multi-host runs: tests/test_dissect_multihost.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
from multihost_helpers import finish, free_port, process_env
from test_dissect_runs import LABELS, toy

TIMEOUT = 300  # far above what a run takes; a hung collective must not hang the suite

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from gandissect_jax.dissection import distributed
    port, rank, work, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    distributed.initialize(f"127.0.0.1:{port}", 2, rank)
    import importlib
    from gandissect_jax.dissection import dissect_features
    module = importlib.import_module("gandissect_jax.dissection.dissect")

    real_write_report = module.write_report

    def slow_report(*args, **kwargs):  # process 0 writes the report late: it waits up to 8 s for
        returned = os.path.join(work, "returned1")  # process 1 to return (it must not, before this)
        for _ in range(80):
            if os.path.exists(returned):
                print("PROCESS 1 RETURNED BEFORE THE REPORT WAS WRITTEN", flush=True)
                break
            time.sleep(0.1)
        return real_write_report(*args, **kwargs)

    def failing_report(*args, **kwargs):
        raise OSError("No space left on device: dissect.json")

    def interrupted_report(*args, **kwargs):  # Ctrl-C on process 0 while it writes
        raise KeyboardInterrupt

    if rank == 0:
        module.write_report = {"slow": slow_report, "interrupt": interrupted_report}.get(mode, failing_report)
    outdir = os.path.join(work, f"out{rank}")
    labels = json.load(open(os.path.join(work, "labels.json")))
    try:
        dissect_features(np.load(os.path.join(work, "f.npy")), np.load(os.path.join(work, "s.npy")), labels,
                         outdir=outdir, progress=False, make_images=False,
                         batch_size=0 if (mode == "bad" and rank == 1) else 8)
    except BaseException as err:
        print(f"FAILED {type(err).__name__}: {err}", flush=True)
        sys.exit(3)
    open(os.path.join(work, f"returned{rank}"), "w").close()
    print("RETURNED", "dissect.json exists" if os.path.exists(os.path.join(work, "out0", "dissect.json"))
          else "no dissect.json", flush=True)
""")


def _run(tmp_path, mode):
    feats, seg = toy(n=16)
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "s.npy", seg)
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(port), str(rank), str(tmp_path), mode],
                                  env=process_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in range(2)]
    return finish(processes, TIMEOUT)


def test_every_process_returns_only_after_process_0_wrote_the_outputs(tmp_path):
    (code0, log0), (code1, log1) = _run(tmp_path, "slow")
    assert code0 == 0 and code1 == 0, (log0[-3000:], log1[-3000:])
    assert "RETURNED dissect.json exists" in log0, log0[-3000:]
    assert "RETURNED dissect.json exists" in log1, log1[-3000:]  # process 1 waited for process 0's report
    assert "PROCESS 1 RETURNED BEFORE" not in log0, log0[-3000:]
    assert not (tmp_path / "out1").exists()  # only process 0 writes


def test_a_failure_of_process_0_while_writing_fails_every_process(tmp_path):
    (code0, log0), (code1, log1) = _run(tmp_path, "fail")
    assert code0 == 3 and "FAILED OSError: No space left on device: dissect.json" in log0, log0[-3000:]
    assert code1 == 3, log1[-3000:]
    assert "FAILED RemoteError: process 0: OSError: No space left on device: dissect.json" in log1, log1[-3000:]


def test_an_argument_refused_on_one_process_stops_every_process(tmp_path):
    """``dissect_features``' own checks (here ``batch_size=0`` on process 1 only) run under
    ``distributed.fail_together``: process 0 stops with one clear error, not in a collective."""
    (code0, log0), (code1, log1) = _run(tmp_path, "bad")
    assert code1 == 3 and "FAILED ValueError" in log1 and "batch_size" in log1, log1[-3000:]
    assert code0 == 3, log0[-3000:]
    assert "FAILED ValueError: another process of this run stopped before the passes" in log0, log0[-3000:]


def test_ctrl_c_on_process_0_while_writing_stops_every_process(tmp_path):
    """Ctrl-C reaching process 0 in the last collective's write (strips, report) is told to the
    others, which stop too, instead of waiting for it there while it waits for them at JAX's
    shutdown barrier (hours: distributed.SHUTDOWN_TIMEOUT)."""
    (code0, log0), (code1, log1) = _run(tmp_path, "interrupt")
    assert code0 == 3 and "FAILED RunInterrupted: interrupted: while writing the report" in log0, log0[-3000:]
    assert code1 == 3 and "FAILED RunInterrupted" in log1, log1[-3000:]
