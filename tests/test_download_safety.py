"""Downloads enter the cache only verified; corrupt cached files are fetched again; pins (issue 11 §4, 16 §5).

A local HTTP server (http.server in a thread) plays the weights host: it serves a good file, a
truncated file, a transfer cut short, and data whose sha256 differs from the registry's.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import gandissect_jax as gj
from gandissect_jax import downloads as download_module
from gandissect_jax import weights
from gandissect_jax.checkpoints import DestinationError
from gandissect_jax.cli import main

PTH = Path(__file__).parent / "fixtures" / "proggan" / "proggan32.pth"
GOOD = PTH.read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Host:
    """What the fake weights host serves: path -> bytes, and paths whose transfer is cut short."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.hits: dict[str, int] = {}


@pytest.fixture
def host():
    state = Host()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            # a cut transfer announces the whole file but the connection ends half-way
            self.wfile.write(data[: len(data) // 2] if self.path in state.cut else data)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANDISSECT_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def registry(url: str, sha: str | None = None, size: int | None = None) -> dict:
    return {"tiny": {"kind": "generator", "description": "tiny 32x32 generator",
                     "convert": "gandissect_jax.proggan:convert_reference", "shipped": None,
                     "files": [{"name": "tiny.pth", "url": url, "sha256": sha, "size": size}]}}


def downloads(cache: Path) -> list[str]:
    folder = cache / "downloads" / "tiny"
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_truncated_download_is_never_cached_and_a_good_one_then_is(host, cache):
    """The case of shared/cases/turn2/case_corrupt_download.sh: no checksum in the registry."""
    host.files["/tiny.pth"] = GOOD[: len(GOOD) // 2]
    reg = registry(host.url + "/tiny.pth")
    with pytest.raises(weights.CorruptFileError) as err:
        weights.fetch("tiny", registry=reg, progress=False, log=None)
    message = str(err.value)
    assert "tiny.pth" in message and "truncated or corrupt" in message and "--force" in message
    assert downloads(cache) == []  # no partial file, no unverified file, no record
    assert not weights.fetched_path("tiny").exists()
    host.files["/tiny.pth"] = GOOD
    logs = []
    dest = weights.fetch("tiny", registry=reg, progress=False, log=logs.append)
    assert gj.load_generator(dest).config.resolution == 32
    record = json.loads((cache / "downloads" / "tiny" / "fetch-record.json").read_text())["tiny.pth"]
    assert record["sha256"] == sha256(GOOD) and record["verified"] == "parse"
    assert any("whole file was read" in line and sha256(GOOD) in line for line in logs)


def test_transfer_cut_short_is_refused(host, cache):
    host.files["/tiny.pth"] = GOOD
    host.cut.add("/tiny.pth")
    with pytest.raises(weights.DownloadError, match="cut short"):
        weights.fetch("tiny", registry=registry(host.url + "/tiny.pth"), progress=False, log=None)
    assert downloads(cache) == []


def test_wrong_sha256_is_refused_naming_file_and_force(host, cache):
    host.files["/tiny.pth"] = GOOD
    reg = registry(host.url + "/tiny.pth", sha="ab" * 32, size=len(GOOD))
    with pytest.raises(weights.ChecksumError) as err:
        weights.fetch("tiny", registry=reg, progress=False, log=None)
    message = str(err.value)
    assert "tiny.pth" in message and "sha256" in message and "--force" in message
    assert downloads(cache) == []
    assert main(["weights", "fetch", "tiny", "--registry", _write(cache.parent / "r.json", reg)]) == 1


def _write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("pinned", [False, True])
def test_corrupt_cached_file_is_detected_and_fetched_again(host, cache, pinned):
    host.files["/tiny.pth"] = GOOD
    reg = registry(host.url + "/tiny.pth", *((sha256(GOOD), len(GOOD)) if pinned else ()))
    weights.fetch("tiny", registry=reg, progress=False, log=None)
    cached = cache / "downloads" / "tiny" / "tiny.pth"
    cached.write_bytes(GOOD[:1000])  # bit rot, a disk full, an interrupted copy ...
    logs = []
    weights.fetch("tiny", registry=reg, progress=False, log=logs.append)
    assert host.hits["/tiny.pth"] == 2
    assert any("is corrupt" in line and str(cached) in line for line in logs)
    assert cached.read_bytes() == GOOD


def test_unverified_file_cached_by_an_old_version_is_parsed_and_fetched_again(host, cache):
    """Before this fix a truncated download was cached, with its sha256 in the record."""
    host.files["/tiny.pth"] = GOOD
    folder = cache / "downloads" / "tiny"
    folder.mkdir(parents=True)
    (folder / "tiny.pth").write_bytes(GOOD[: len(GOOD) // 2])
    (folder / "fetch-record.json").write_text(json.dumps({"tiny.pth": {
        "sha256": sha256(GOOD[: len(GOOD) // 2]), "bytes": len(GOOD) // 2, "verified_sha256": False}}))
    (folder / ".tiny.pth.part-stale").write_bytes(b"left by a killed run")
    logs = []
    dest = weights.fetch("tiny", registry=registry(host.url + "/tiny.pth"), progress=False,
                         log=logs.append)
    assert host.hits["/tiny.pth"] == 1 and any("is corrupt" in line for line in logs)
    assert gj.load_generator(dest).config.resolution == 32
    assert downloads(cache) == ["fetch-record.json", "tiny.pth"]


def test_verified_cache_is_reused_without_parsing_or_downloading(host, cache, monkeypatch):
    host.files["/tiny.pth"] = GOOD
    reg = registry(host.url + "/tiny.pth")
    weights.fetch("tiny", registry=reg, progress=False, log=None)
    monkeypatch.setattr(download_module, "check_structure", lambda *a: pytest.fail("parsed again"))
    weights.fetch("tiny", registry=reg, progress=False, log=None)
    assert host.hits["/tiny.pth"] == 1


def test_fetch_refuses_a_foreign_dest_before_downloading(host, cache, tmp_path):
    host.files["/tiny.pth"] = GOOD
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "paper.tex").write_text("\\section{Results}")
    reg = registry(host.url + "/tiny.pth")
    for force in (False, True):
        with pytest.raises(DestinationError) as err:
            weights.fetch("tiny", folder, registry=reg, force=force, progress=False, log=None)
        assert str(folder) in str(err.value) and "--force" in str(err.value)
    assert sorted(os.listdir(folder)) == ["paper.tex"] and host.hits == {}
    dest = tmp_path / "converted"
    weights.fetch("tiny", dest, registry=reg, progress=False, log=None)
    with pytest.raises(DestinationError, match="already holds a gandissect-jax checkpoint"):
        weights.fetch("tiny", dest, registry=reg, progress=False, log=None)
    weights.fetch("tiny", dest, registry=reg, force=True, progress=False, log=None)
    # the cache's own converted copy is refreshed without --force
    weights.fetch("tiny", registry=reg, progress=False, log=None)
    weights.fetch("tiny", registry=reg, progress=False, log=None)
    assert sorted(os.listdir(cache / "weights")) == ["tiny"]


CONCURRENT_FETCH = textwrap.dedent(
    """
    import sys
    from gandissect_jax import weights
    reg = {"tiny": {"kind": "generator", "convert": "gandissect_jax.proggan:convert_reference",
                    "files": [{"name": "tiny.pth", "url": sys.argv[1]}]}}
    print(weights.fetch("tiny", registry=reg, progress=False, log=None))
    """
)


def test_concurrent_fetches_are_serialised(host, cache, tmp_path):
    host.files["/tiny.pth"] = GOOD
    script = tmp_path / "fetch.py"
    script.write_text(CONCURRENT_FETCH)
    procs = [subprocess.Popen([sys.executable, str(script), host.url + "/tiny.pth"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu")) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [r[0] for r in results] == [0, 0], [r[1][-2000:] for r in results]
    assert host.hits["/tiny.pth"] == 1  # the second waited, then found the verified download
    assert downloads(cache) == ["fetch-record.json", "tiny.pth"]
    assert sorted(os.listdir(cache / "weights")) == ["tiny"]
    assert gj.load_generator(cache / "weights" / "tiny").config.resolution == 32


def test_pin_writes_sums_into_the_users_registry_and_fetch_then_verifies_them(host, cache, tmp_path, capsys):
    host.files["/tiny.pth"] = GOOD
    source = _write(tmp_path / "source.json", registry(host.url + "/tiny.pth"))
    pins = tmp_path / "my-registry.json"
    pins.write_text(json.dumps({"_comment": "mine", "other": {"kind": "segmenter", "files": []}}))
    with pytest.raises(FileNotFoundError, match="weights fetch tiny"):
        weights.pin("tiny", pins, registry=source, log=None)
    assert main(["weights", "fetch", "tiny", "--registry", source]) == 0
    assert main(["weights", "pin", "tiny", "--registry", source, "--into", str(pins)]) == 0
    assert sha256(GOOD) in capsys.readouterr().out
    written = json.loads(pins.read_text())
    assert written["_comment"] == "mine" and "other" in written
    assert written["tiny"]["files"][0] == {"name": "tiny.pth", "url": host.url + "/tiny.pth",
                                           "sha256": sha256(GOOD), "size": len(GOOD)}
    # the host's file changes (another valid .pth): the pinned registry refuses it
    from gandissect_jax.pth import read_pth, write_legacy_pth

    other = tmp_path / "other.pth"
    write_legacy_pth(other, {k: v * 2 for k, v in read_pth(PTH).items()})
    host.files["/tiny.pth"] = other.read_bytes()
    assert main(["weights", "fetch", "tiny", "--registry", str(pins), "--force"]) == 1
    err = capsys.readouterr().err
    assert "tiny.pth from" in err and "the registry says" in err and "--force" in err
    assert (cache / "downloads" / "tiny" / "tiny.pth").read_bytes() == GOOD  # the verified copy
    # pinning again from a cache that disagrees with the pin needs --force
    (cache / "downloads" / "tiny" / "tiny.pth").write_bytes(other.read_bytes())
    (cache / "downloads" / "tiny" / "fetch-record.json").unlink()
    with pytest.raises(ValueError, match="is pinned as sha256"):
        weights.pin("tiny", pins, log=None)
    assert json.loads(pins.read_text())["tiny"]["files"][0]["sha256"] == sha256(GOOD)


def test_pin_never_writes_into_the_package_or_shipped_weights(cache, tmp_path):
    package = Path(weights.__file__).resolve().parent
    for target in (weights.registry_path(), package / "registry.json",
                   weights.shipped_weights_dir() / "pins.json"):
        before = target.read_bytes() if target.exists() else None
        with pytest.raises(ValueError, match="never writes into the installed package"):
            weights.pin("scenes64", target, log=None)
        assert (target.read_bytes() if target.exists() else None) == before


def test_pin_refuses_a_corrupt_cached_file(host, cache, tmp_path):
    host.files["/tiny.pth"] = GOOD
    reg = registry(host.url + "/tiny.pth")
    weights.fetch("tiny", registry=reg, progress=False, log=None)
    (cache / "downloads" / "tiny" / "tiny.pth").write_bytes(GOOD[:500])
    with pytest.raises(weights.ChecksumError, match="corrupt.*--force"):
        weights.pin("tiny", tmp_path / "pins.json", registry=reg, log=None)
    assert not (tmp_path / "pins.json").exists()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


_NOISE = np.random.RandomState(0)  # fixed contents: pytest-xdist workers must collect the same tests


@pytest.mark.parametrize("name, good", [
    ("w.pth", GOOD),
    ("a.zip", _zip({"a.txt": _NOISE.bytes(5000), "b.bin": _NOISE.bytes(5000)})),
    ("a.tar.gz", _tar({"a.bin": _NOISE.bytes(20000)})),
    ("labels.json", json.dumps({"object": ["-", "sky"] * 50}).encode()),
    ("x.npy", _npy(np.arange(1000.0))),
], ids=["w.pth", "a.zip", "a.tar.gz", "labels.json", "x.npy"])
def test_structural_check_reads_every_byte(tmp_path, name, good):
    path = tmp_path / name
    path.write_bytes(good)
    assert weights.check_structure(path) == "parse"
    for cut in (len(good) // 2, len(good) - 7):
        path.write_bytes(good[:cut])
        with pytest.raises(weights.CorruptFileError, match=name.replace(".", r"\.")):
            weights.check_structure(path)
    if name.endswith(".zip"):  # a flipped byte inside a member's data fails its CRC
        flipped = bytearray(good)
        flipped[good.index(b"b.bin") + 40] ^= 0xFF
        path.write_bytes(bytes(flipped))
        with pytest.raises(weights.CorruptFileError):
            weights.check_structure(path)


def test_structural_check_of_unknown_types_says_none(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x00" * 10)
    assert weights.check_structure(tmp_path / "model.bin") == "none"


@pytest.mark.parametrize("stage", ["verify", "convert"])
def test_interrupted_fetch_leaves_no_temporary_files(host, cache, monkeypatch, stage):
    host.files["/tiny.pth"] = GOOD
    reg = registry(host.url + "/tiny.pth")
    if stage == "verify":
        def interrupt(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(download_module, "check_structure", interrupt)
    else:
        import gandissect_jax.proggan as proggan

        def interrupt(src, dest, **kwargs):
            os.makedirs(dest)
            Path(dest, "half").write_bytes(b"x")
            raise KeyboardInterrupt
        monkeypatch.setattr(proggan, "convert_reference", interrupt)
    with pytest.raises(KeyboardInterrupt):
        weights.fetch("tiny", registry=reg, progress=False, log=None)
    assert downloads(cache) == ([] if stage == "verify" else ["fetch-record.json", "tiny.pth"])
    leftovers = os.listdir(cache / "weights") if (cache / "weights").exists() else []
    assert leftovers == []  # no .tiny.converting- directory, no tiny
