"""The weight registry: shipped entries, resolve, fetch (file:// URLs, checksums, no network)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

import gandissect_jax as gj
from gandissect_jax import weights
from gandissect_jax.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "proggan"
PTH = FIXTURES / "proggan32.pth"
LSUN = ("bedroom", "churchoutdoor", "conferenceroom", "diningroom", "kitchen", "livingroom", "restaurant")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry(url: str, sha: str | None = None, size: int | None = None, **extra) -> dict:
    return {
        "kind": "generator",
        "description": "tiny 32x32 test generator",
        "files": [{"name": "tiny32.pth", "url": url, "sha256": sha, "size": size}],
        "convert": "gandissect_jax.proggan:convert_reference",
        "shipped": None,
        **extra,
    }


def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/models/tiny32.pth"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache and a weights dir (registry) of our own."""
    monkeypatch.setenv("GANDISSECT_JAX_CACHE", str(tmp_path / "cache"))
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("GANDISSECT_JAX_WEIGHTS", str(weights_dir))
    return tmp_path


def write_registry(isolated: Path, entries: dict) -> Path:
    path = isolated / "weights" / "registry.json"
    path.write_text(json.dumps(entries))
    return path


def test_shipped_registry_lists_the_lsun_models():
    entries = weights.load_registry(Path(__file__).parent.parent / "weights" / "registry.json")
    for scene in LSUN:
        e = entries[f"{scene}_lsun"]
        assert e["kind"] == "generator"
        assert e["files"][0]["url"] == f"https://netdissect.csail.mit.edu/data/ganmodel/karras/{scene}_lsun.pth"
        assert e["convert"] == "gandissect_jax.proggan:convert_reference"
    from gandissect_jax.proggan import convert_reference

    assert weights._load_converter(entries["bedroom_lsun"]["convert"]) is convert_reference


def test_registry_validation(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        weights.load_registry({"x": {"kind": "model", "files": []}})
    with pytest.raises(ValueError, match="unsafe file name"):
        weights.load_registry({"x": {"kind": "generator", "files": [{"name": "../evil", "url": "file:///x"}]}})
    with pytest.raises(ValueError, match="module:function"):
        weights.load_registry({"x": {"kind": "generator", "files": [], "convert": "nofunction"}})
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        weights.load_registry(bad)


def test_fetch_file_url_verifies_converts_and_reuses_cache(isolated):
    url = PTH.resolve().as_uri()
    registry = write_registry(isolated, {"tiny32": entry(url, sha256(PTH), PTH.stat().st_size)})
    with pytest.raises(FileNotFoundError, match="weights fetch tiny32"):
        gj.load_generator("tiny32")
    logs = []
    dest = weights.fetch("tiny32", progress=False, log=logs.append)
    assert dest == weights.fetched_path("tiny32")
    record = json.loads((isolated / "cache" / "downloads" / "tiny32" / "fetch-record.json").read_text())
    assert record["tiny32.pth"]["sha256"] == sha256(PTH) and record["tiny32.pth"]["verified_sha256"]
    G = gj.load_generator("tiny32")  # registry name -> fetched checkpoint
    z = gj.sample_z(2, 128, seed=3)
    np.testing.assert_array_equal(np.asarray(G(z)), np.asarray(gj.load_generator(PTH)(z)))

    # the verified cached download is reused: a dead URL does not matter any more
    write_registry(isolated, {"tiny32": entry(closed_port_url(), sha256(PTH), PTH.stat().st_size)})
    other = weights.fetch("tiny32", isolated / "elsewhere", registry=registry, progress=False, log=None)
    assert gj.load_generator(other).config == G.config


def test_fetch_without_checksum_reports_the_observed_sha(isolated):
    write_registry(isolated, {"tiny32": entry(PTH.resolve().as_uri())})
    logs = []
    weights.fetch("tiny32", progress=False, log=logs.append)
    assert any(sha256(PTH) in line and "not verified" in line for line in logs)
    record = json.loads((isolated / "cache" / "downloads" / "tiny32" / "fetch-record.json").read_text())
    assert record["tiny32.pth"] == {**record["tiny32.pth"], "sha256": sha256(PTH),
                                    "verified_sha256": False, "bytes": PTH.stat().st_size}


@pytest.mark.parametrize("mismatch", ["sha256", "size"])
def test_fetch_refuses_mismatching_data(isolated, mismatch):
    sha = "0" * 64 if mismatch == "sha256" else sha256(PTH)
    size = PTH.stat().st_size + (1 if mismatch == "size" else 0)
    write_registry(isolated, {"tiny32": entry(PTH.resolve().as_uri(), sha, size)})
    with pytest.raises(weights.ChecksumError, match=mismatch):
        weights.fetch("tiny32", progress=False, log=None)
    downloads = isolated / "cache" / "downloads" / "tiny32"
    assert [p.name for p in downloads.iterdir()] == []  # no partial or unverified file
    assert not weights.fetched_path("tiny32").exists()


def test_fetch_without_network_fails_clearly(isolated):
    url = closed_port_url()
    write_registry(isolated, {"tiny32": entry(url)})
    with pytest.raises(weights.DownloadError) as err:
        weights.fetch("tiny32", progress=False, log=None, timeout=5)
    message = str(err.value)
    assert url in message and "could not download" in message and "gandissect-jax convert" in message
    assert list((isolated / "cache" / "downloads" / "tiny32").iterdir()) == []
    missing = (isolated / "absent.pth").as_uri()
    write_registry(isolated, {"tiny32": entry(missing)})
    with pytest.raises(weights.DownloadError, match="absent.pth"):
        weights.fetch("tiny32", progress=False, log=None)


def test_failing_converter_leaves_nothing(isolated):
    write_registry(isolated, {"tiny32": entry(PTH.resolve().as_uri(), convert="json:dumps")})
    with pytest.raises(TypeError):
        weights.fetch("tiny32", progress=False, log=None)
    assert not (isolated / "cache" / "weights").exists() or os.listdir(isolated / "cache" / "weights") == []


def test_resolve_paths_shipped_and_kinds(isolated):
    shipped = gj.save_generator(gj.load_generator(PTH), isolated / "weights" / "tiny32_shipped")
    write_registry(isolated, {
        "tiny32": entry("file:///nonexistent.pth", shipped="tiny32_shipped"),
        "seg": {"kind": "segmenter", "files": [], "convert": None, "shipped": None},
    })
    assert weights.resolve("tiny32", kind="generator") == Path(shipped)
    assert weights.resolve(PTH) == PTH
    with pytest.raises(ValueError, match="is a segmenter, not a generator"):
        weights.resolve("seg", kind="generator")
    with pytest.raises(FileNotFoundError) as err:
        weights.resolve("nothing_here", kind="generator")
    assert "tiny32" in str(err.value) and "seg" not in str(err.value).split("known:")[1]
    assert gj.load_generator("tiny32").config.resolution == 32


def test_cli_weights_list_and_fetch(isolated, capsys):
    registry = write_registry(isolated, {"tiny32": entry(PTH.resolve().as_uri())})
    assert main(["weights", "list", "--registry", str(registry)]) == 0
    listing = capsys.readouterr().out
    assert "tiny32" in listing and "not fetched" in listing
    dest = isolated / "converted"
    assert main(["weights", "fetch", "tiny32", "--registry", str(registry), "--dest", str(dest)]) == 0
    assert str(dest) in capsys.readouterr().out
    assert gj.load_generator(dest).z_dim == 128
    write_registry(isolated, {"tiny32": entry(closed_port_url())})
    assert main(["weights", "fetch", "tiny32", "--force", "--timeout", "5"]) == 1
    assert "could not download" in capsys.readouterr().err
