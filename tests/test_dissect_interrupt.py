"""Ctrl-C: a running dissection stops cleanly (exit 130, one line saying where it resumes, no
traceback), and the rerun's results are identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gandissect_jax.cli import main
from gandissect_jax.dissection import tally
from gandissect_jax.dissection.engine import Interrupted
from gandissect_jax.dissection.resume import checkpoint_meta
from gandissect_jax.dissection.statistics import top_k
from test_dissect_runs import LABELS, toy


def _write_data(directory: Path, n: int) -> list[str]:
    feats, seg = toy(n)
    np.save(directory / "features.npy", feats)
    np.save(directory / "segs.npy", seg)
    (directory / "labels.json").write_text(json.dumps(LABELS))
    return ["dissect", "--features", str(directory / "features.npy"), "--segmentations", str(directory / "segs.npy"),
            "--labels", str(directory / "labels.json"), "--batch-size", "4", "--quiet", "--no-images"]


def _checkpoints(outdir: Path) -> list[Path]:
    return sorted(outdir.glob(".progress/passes-*/*/tally.npz"))


def _same_outputs(a: Path, b: Path) -> None:
    assert json.loads((a / "dissect.json").read_text()) == json.loads((b / "dissect.json").read_text())
    with np.load(a / "features" / "scores.npz") as x, np.load(b / "features" / "scores.npz") as y:
        assert sorted(x.files) == sorted(y.files)
        for name in x.files:
            assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
            assert x[name].tobytes() == y[name].tobytes(), name


def test_sigint_stops_cleanly_and_resumes_identically(tmp_path):
    argv = _write_data(tmp_path, 3000)
    outdir = tmp_path / "interrupted"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the console script's main, with Python's Ctrl-C handler as in an interactive shell (also when
    # these tests run where SIGINT is ignored, e.g. in a background job)
    launcher = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "from gandissect_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", launcher, *argv, "--outdir", str(outdir),
                                "--checkpoint-every", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    deadline = time.monotonic() + 240
    try:
        while not _checkpoints(outdir) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert _checkpoints(outdir), "no checkpoint appeared"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gandissect-jax dissect: interrupted: pass "), lines[0]
    assert "stopped at sample" in lines[0] and "rerun the same command to resume" in lines[0], lines[0]
    [saved] = _checkpoints(outdir)
    done = checkpoint_meta(str(saved))["samples_done"]
    assert f"stopped at sample {done:,} of 3,000" in lines[0]  # the message says where the saved state ends
    assert not (outdir / "dissect.json").exists()

    assert main([*argv, "--outdir", str(outdir)]) == 0  # the rerun resumes ...
    assert main([*argv, "--outdir", str(tmp_path / "straight")]) == 0  # ... an uninterrupted run
    _same_outputs(outdir, tmp_path / "straight")
    assert not list(outdir.glob(".progress/passes-*"))  # progress checkpoints removed once complete


class Rows:
    """30 samples of 4 values; fetching sample 12 sends this process SIGINT (a Ctrl-C mid-pass)."""

    num_samples = 30

    def __init__(self, interrupt_at: int | None = None):
        self.interrupt_at = interrupt_at
        self.fetched = []

    def fetch(self, indices, sharding):
        import jax

        self.fetched.append(int(indices[0]))
        if self.interrupt_at is not None and self.interrupt_at in indices:
            os.kill(os.getpid(), signal.SIGINT)
        x = np.stack([np.random.RandomState(int(i)).rand(4) for i in indices]).astype(np.float32)
        return {"x": jax.device_put(x, sharding)}

    def identity(self):
        return {"rows": self.num_samples}


def _peaks(params, batch):
    return batch["x"], batch["index"]


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler for the test (it is not installed where SIGINT was ignored at start)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_a_tally_saves_at_the_batch_boundary_and_resumes_identically(tmp_path, python_sigint_handler):
    options = dict(batch_size=4, progress=False, checkpoint_every=3600.0, checkpoint_dir=str(tmp_path))
    full = tally(_peaks, Rows(), top_k(4, 5), **{**options, "checkpoint_dir": None})
    with pytest.raises(Interrupted) as stop:
        tally(_peaks, Rows(interrupt_at=12), top_k(4, 5), desc="peaks", **options)
    assert stop.value.samples_done == 16  # the batch with sample 12 finished, then the pass stopped
    assert str(stop.value).startswith("interrupted: peaks stopped at sample 16 of 30; progress saved in ")
    assert checkpoint_meta(str(tmp_path / "tally.npz"))["samples_done"] == 16  # saved though the interval is an hour
    again = Rows()
    resumed = tally(_peaks, again, top_k(4, 5), desc="peaks", **options)
    assert again.fetched == [16, 20, 24, 28]
    for a, b in zip(full, resumed):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # the default handler is back: a Ctrl-C outside a pass is a plain KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
