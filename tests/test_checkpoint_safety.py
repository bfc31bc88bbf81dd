"""Nothing of the user's is deleted or overwritten by a checkpoint save or a conversion (issue 11 §2).

Every writer (save_checkpoint, save_generator, save_demo_segmenter, both convert_reference and the
``convert`` command) refuses a destination that exists unless it is a checkpoint this library
wrote and force is given; source and destination may not overlap; temporary directories vanish on
failure (KeyboardInterrupt included); concurrent writers of one destination are serialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gandissect_jax as gj
from gandissect_jax import checkpoints
from gandissect_jax.checkpoints import (
    DestinationBusyError,
    DestinationError,
    is_checkpoint,
    is_own_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from gandissect_jax.cli import main
from gandissect_jax.proggan import convert_reference

REPO = Path(__file__).resolve().parent.parent
PTH = REPO / "tests" / "fixtures" / "proggan" / "proggan32.pth"
SHIPPED_GENERATOR = REPO / "weights" / "scenes64" / "generator"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Locks (and any cache use) go to a directory of this test, not the user's cache."""
    monkeypatch.setenv("GANDISSECT_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))


def params(seed=1):
    rng = np.random.default_rng(seed)
    return {"layer1": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
                       "bias": rng.standard_normal(4).astype(np.float32)}}


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and '<dir>' for directories) under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def user_folder(path: Path) -> Path:
    """A directory holding a researcher's work: files, a sub-folder, a config.json of theirs."""
    (path / "notes").mkdir(parents=True)
    (path / "results.csv").write_text("unit,iou\n1,0.3\n")
    (path / "notes" / "todo.md").write_text("dissect layer4\n")
    (path / "config.json").write_text('{"mine": true}')
    return path


# ------------------------------------------------------------------------ save_checkpoint


@pytest.mark.parametrize("force", [False, True])
def test_save_checkpoint_refuses_foreign_directory(tmp_path, force):
    folder = user_folder(tmp_path / "work")
    before = snapshot(tmp_path)
    with pytest.raises(DestinationError) as err:
        save_checkpoint(folder, params(), {"kind": "test"}, force=force)
    message = str(err.value)
    assert str(folder) in message and "--force" in message and "not a gandissect-jax checkpoint" in message
    assert snapshot(tmp_path) == before  # nothing added, removed or changed, no temporary left


def test_save_checkpoint_refuses_foreign_orbax_checkpoint_even_with_force(tmp_path):
    """config.json + params/ without our marker (someone else's orbax checkpoint) is not ours."""
    target = tmp_path / "theirs"
    save_checkpoint(target, params(), {"kind": "test"})
    config = json.loads((target / "config.json").read_text())
    del config["format"]
    (target / "config.json").write_text(json.dumps(config))
    assert is_checkpoint(target) and not is_own_checkpoint(target)
    before = snapshot(tmp_path)
    with pytest.raises(DestinationError, match="not a gandissect-jax checkpoint"):
        save_checkpoint(target, params(2), {"kind": "test"}, force=True)
    assert snapshot(tmp_path) == before
    assert load_checkpoint(target)[1] == {"kind": "test"}  # loads without the marker


def test_shipped_checkpoints_without_marker_still_load():
    assert is_checkpoint(SHIPPED_GENERATOR) and not is_own_checkpoint(SHIPPED_GENERATOR)
    G = gj.load_generator(SHIPPED_GENERATOR)
    assert G.config.resolution == 64


def test_force_replaces_only_our_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(target, params(1), {"kind": "first"})
    config = json.loads((target / "config.json").read_text())
    assert config["format"] == "gandissect-jax-checkpoint" and is_own_checkpoint(target)
    with pytest.raises(DestinationError, match="already holds a gandissect-jax checkpoint.*--force"):
        save_checkpoint(target, params(2), {"kind": "second"})
    assert load_checkpoint(target)[1] == {"kind": "first"}
    save_checkpoint(target, params(2), {"kind": "second"}, force=True)
    loaded, config = load_checkpoint(target)
    assert config == {"kind": "second"}
    np.testing.assert_array_equal(loaded["layer1"]["bias"], params(2)["layer1"]["bias"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    # a file of the user's put into our checkpoint makes it not only ours: never replaced
    (target / "my_notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(DestinationError, match="not a gandissect-jax checkpoint"):
        save_checkpoint(target, params(3), {"kind": "third"}, force=True)
    assert snapshot(tmp_path) == before


def test_save_checkpoint_uses_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", params(), {"kind": "x"})
    assert load_checkpoint(tmp_path / "empty")[1] == {"kind": "x"}


def test_save_checkpoint_refuses_files_and_symbolic_links(tmp_path):
    (tmp_path / "file").write_text("data")
    ours = tmp_path / "ours"
    save_checkpoint(ours, params(), {"kind": "x"})
    (tmp_path / "link").symlink_to(ours, target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(DestinationError, match="is a file"):
        save_checkpoint(tmp_path / "file", params(), {"kind": "x"}, force=True)
    with pytest.raises(DestinationError, match="symbolic link"):
        save_checkpoint(tmp_path / "link", params(2), {"kind": "y"}, force=True)
    assert snapshot(tmp_path) == before


def test_save_checkpoint_never_replaces_the_current_directory(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_checkpoint(target, params(), {"kind": "x"})
    for cwd in (target, target / "params"):
        monkeypatch.chdir(cwd)
        with pytest.raises(DestinationError, match="current directory"):
            save_checkpoint(target, params(2), {"kind": "y"}, force=True)
        with pytest.raises(DestinationError, match="current directory"):
            save_checkpoint(".", params(2), {"kind": "y"}, force=True)
    assert load_checkpoint(target)[1] == {"kind": "x"}


def test_reserved_marker_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c", params(), {"format": "mine"})
    assert not (tmp_path / "c").exists()


class _FailingCheckpointer:
    """Writes part of a checkpoint, then fails the way a crash or Ctrl-C would."""

    def __init__(self, error):
        self.error = error

    def save(self, path, tree):
        os.makedirs(path)
        Path(path, "partial").write_bytes(b"half a checkpoint")
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_no_temporary_files(tmp_path, monkeypatch, error):
    target = tmp_path / "ckpt"
    save_checkpoint(target, params(1), {"kind": "kept"})
    before = snapshot(tmp_path)
    monkeypatch.setattr(checkpoints, "_checkpointer", lambda: _FailingCheckpointer(error))
    with pytest.raises(type(error)):
        save_checkpoint(target, params(2), {"kind": "new"}, force=True)
    with pytest.raises(type(error)):
        save_checkpoint(tmp_path / "fresh", params(2), {"kind": "new"})
    assert snapshot(tmp_path) == before  # old checkpoint intact, no .tmp- directory, no "fresh"


def test_interrupted_replacement_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    """Ctrl-C after the old checkpoint was moved aside, before the new one is in place."""
    target = tmp_path / "ckpt"
    save_checkpoint(target, params(1), {"kind": "kept"})
    before = snapshot(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".ckpt.tmp-"):
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, params(2), {"kind": "new"}, force=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert snapshot(tmp_path) == before
    assert load_checkpoint(target)[1] == {"kind": "kept"}


CONCURRENT_SAVE = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from gandissect_jax import checkpoints

    target, seed, log, force = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    real = checkpoints._checkpointer

    class Slow:
        def save(self, path, tree):
            with open(log, "a") as f:
                f.write(json.dumps(["start", seed, time.time()]) + "\\n")
            real().save(path, tree)
            time.sleep(1.5)
            with open(log, "a") as f:
                f.write(json.dumps(["end", seed, time.time()]) + "\\n")

    checkpoints._checkpointer = lambda: Slow()
    params = {"w": np.full((4,), seed, np.float32)}
    checkpoints.save_checkpoint(target, params, {"seed": seed}, force=force)
    print("saved", seed)
    """
)


def run_two_savers(tmp_path, force):
    script = tmp_path / "save.py"
    script.write_text(CONCURRENT_SAVE)
    target, log = tmp_path / "out" / "ckpt", tmp_path / "log.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), str(target), str(seed), str(log),
                               "1" if force else "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return target, results, events


def test_concurrent_saves_are_serialised(tmp_path):
    """Two processes replacing one checkpoint: both succeed, one after the other, no crash."""
    target, results, events = run_two_savers(tmp_path, force=True)
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    spans = {}
    for kind, seed, t in events:
        spans.setdefault(seed, {})[kind] = t
    (a, b) = sorted(spans.values(), key=lambda s: s["start"])
    assert a["end"] <= b["start"], f"the two saves overlapped: {spans}"
    loaded, config = load_checkpoint(target)
    last = max(spans, key=lambda s: spans[s]["start"])
    assert config == {"seed": last} and np.all(loaded["w"] == last)
    assert os.listdir(target.parent) == ["ckpt"]  # no temporary or aside directory left


def test_concurrent_saves_without_force_one_wins_the_other_is_refused(tmp_path):
    target, results, _ = run_two_savers(tmp_path, force=False)
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], [r[2][-2000:] for r in results]
    loser = next(r for r in results if r[0] == 1)[2]
    assert "already holds a gandissect-jax checkpoint" in loser and "--force" in loser
    assert "No such file" not in loser
    assert is_own_checkpoint(target) and os.listdir(target.parent) == ["ckpt"]


def test_lock_timeout_is_a_clear_error(tmp_path):
    target = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from gandissect_jax.checkpoints import destination_lock
            with destination_lock({str(target)!r}):
                print("held", flush=True)
                time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DestinationBusyError, match="another process"):
            save_checkpoint(target, params(), {"kind": "x"}, lock_timeout=0.5)
    finally:
        holder.kill()
        holder.wait()
    assert not target.exists() and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- conversions


def test_convert_never_deletes_unrelated_files(tmp_path, capsys):
    folder = user_folder(tmp_path / "project")
    before = snapshot(tmp_path)
    for extra in ([], ["--force"]):
        assert main(["convert", str(PTH), str(folder), *extra]) == 1
        err = capsys.readouterr().err
        assert str(folder) in err and "--force" in err
        assert snapshot(tmp_path) == before
    with pytest.raises(DestinationError):
        convert_reference(PTH, folder, force=True)
    assert snapshot(tmp_path) == before


def test_convert_refuses_source_equal_to_destination(tmp_path, capsys):
    src_dir = tmp_path / "download"
    src_dir.mkdir()
    pth = src_dir / "g.pth"
    pth.write_bytes(PTH.read_bytes())
    before = snapshot(tmp_path)
    cases = [
        (src_dir, src_dir, "same path"),
        (pth, pth, "same path"),
        (src_dir, src_dir / "converted", "inside the source"),
        (pth, src_dir, "source .* lies inside the destination"),
    ]
    for src, dest, why in cases:
        assert main(["convert", str(src), str(dest), "--force"]) == 1
        assert why.split(" .* ")[0] in capsys.readouterr().err
        with pytest.raises(DestinationError, match=why):
            convert_reference(src, dest, force=True)
    assert snapshot(tmp_path) == before


def test_convert_refuses_overlap_through_symbolic_links(tmp_path):
    src_dir = tmp_path / "download"
    src_dir.mkdir()
    (src_dir / "g.pth").write_bytes(PTH.read_bytes())
    (tmp_path / "alias").symlink_to(src_dir, target_is_directory=True)
    with pytest.raises(DestinationError, match="same path"):
        convert_reference(src_dir, tmp_path / "alias", force=True)
    assert sorted(os.listdir(src_dir)) == ["g.pth"]


def test_convert_command_replaces_its_own_checkpoint_only_with_force(tmp_path, capsys):
    dest = tmp_path / "g32"
    assert main(["convert", str(PTH), str(dest)]) == 0
    capsys.readouterr()
    assert main(["convert", str(PTH), str(dest)]) == 1
    err = capsys.readouterr().err
    assert str(dest) in err and "already holds a gandissect-jax checkpoint" in err and "--force" in err
    assert main(["convert", str(PTH), str(dest), "--force"]) == 0
    assert gj.load_generator(dest).config.resolution == 32
    assert os.listdir(tmp_path) == ["g32"]


def test_destination_is_checked_before_the_source_is_read(tmp_path):
    folder = user_folder(tmp_path / "project")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DestinationError):  # not PthError: no reading of a large source first
        convert_reference(garbage, folder)
    from gandissect_jax.segmenter import convert_reference as convert_segmenter

    with pytest.raises(DestinationError, match="not a gandissect-jax checkpoint"):
        convert_segmenter(tmp_path / "no-such-segmenter", folder, force=True)


def test_every_save_function_refuses_foreign_directories(tmp_path):
    from gandissect_jax.scenes.demo_segmenter import save_demo_segmenter

    folder = user_folder(tmp_path / "project")
    before = snapshot(tmp_path)
    G = gj.load_generator(PTH)
    with pytest.raises(DestinationError, match="--force"):
        gj.save_generator(G, folder, force=True)
    with pytest.raises(DestinationError, match="--force"):
        save_demo_segmenter(folder, params(), force=True)
    assert snapshot(tmp_path) == before
    path = gj.save_generator(G, tmp_path / "g")
    with pytest.raises(DestinationError, match="already holds"):
        gj.save_generator(G, path)
    assert gj.save_generator(G, path, force=True) == path
