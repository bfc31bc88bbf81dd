"""A normal (non-editable) install works: the wheel carries the registry and the shipped demo weights.

The slow test builds a wheel from a copy of the sources, installs it with ``--no-deps`` into a fresh
virtual environment (whose dependencies come from this test's environment through a ``.pth`` file,
so nothing is downloaded but the build backend), and runs ``gandissect-jax weights list`` and a
small dissection of the shipped demo from an unrelated directory. Issue 16, section 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from gandissect_jax.cli import main
from gandissect_jax.weights import SHIPPED_WEIGHTS_PACKAGE, load_registry, shipped_weights_dir

ROOT = Path(__file__).resolve().parent.parent
# What a wheel build needs from the checkout (everything else -- tests, docs, scripts -- stays out).
BUILD_INPUTS = ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "gandissect_jax", "weights")
SHIPPED_PREFIX = SHIPPED_WEIGHTS_PACKAGE.replace(".", "/") + "/"
DISSECT_ARGS = ["dissect", "--size", "200", "--layers", "layer4", "--batch-size", "50", "--quiet"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_of_the_source_tree_is_listed_for_the_wheel():
    """pyproject lists packages by hand (for the weights/ mapping): a new subpackage must be added."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    in_tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "gandissect_jax").rglob("__init__.py")
    }
    assert in_tree | {SHIPPED_WEIGHTS_PACKAGE} == listed
    assert _pyproject()["tool"]["setuptools"]["package-dir"] == {SHIPPED_WEIGHTS_PACKAGE: "weights"}


def _pins(path: Path) -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_every_declared_floor_is_the_tested_minimum_pin():
    """Each dependency has a floor, and constraints/minimum.txt (run by .ci/run) pins exactly it."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = _pyproject()["project"]
    declared = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "torch":  # the exact torch the golden data were checked with; not in [test]
            declared += requirements
    pins = _pins(ROOT / "constraints" / "minimum.txt")
    floors = {}
    for text in declared:
        requirement = Requirement(text)
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{text!r} needs exactly one '>=' floor"
        floors[canonicalize_name(requirement.name)] = lower[0]
    assert {name: pins.get(name) for name in floors} == floors
    # jax pins its own jaxlib; the minimum run uses the matching one.
    assert pins["jaxlib"] == pins["jax"]
    assert set(pins) == set(floors) | {"jaxlib"}


def test_weights_directory_holds_no_python_files():
    """weights/ is installed as a data-only package; code there would be installed and importable."""
    assert not list((ROOT / "weights").rglob("*.py"))


def test_cache_dir_uses_the_env_override_else_the_platform_user_cache(monkeypatch, tmp_path):
    import platformdirs

    from gandissect_jax.weights import cache_dir

    monkeypatch.setenv("GANDISSECT_JAX_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GANDISSECT_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = Path(platformdirs.user_cache_dir("gandissect-jax", appauthor=False))
    assert cache_dir() == expected
    if sys.platform.startswith("linux"):
        assert expected == tmp_path / "xdg" / "gandissect-jax"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _unit_numbers(outdir: Path) -> list:
    """Every per-unit record of the dissection (labels, IoU, IQR, levels, top samples), without the
    path of its image strip (written only when images are made)."""
    units = json.loads((outdir / "dissect.json").read_text())["layers"][0]["units"]
    assert len(units) == 128 and all("iou" in unit for unit in units)
    return [{key: value for key, value in unit.items() if key != "image"} for unit in units]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_dissects_the_shipped_demo(tmp_path):
    # 1. Build a wheel from a copy of the build inputs (no build/ or egg-info left in the checkout).
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("gandissect_jax-*.whl")

    # The wheel holds every module and data file of the package (the report's and the paint app's
    # HTML, CSS and JavaScript), the registry and every shipped checkpoint, byte for byte.
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gandissect_jax").rglob("*")
                   if p.suffix in (".py", ".json", ".html", ".css", ".js") and "__pycache__" not in p.parts}
        assert modules <= names, sorted(modules - names)
        assert {f"gandissect_jax/paint/static/{n}" for n in ("index.html", "app.js", "style.css")} <= modules
        shipped = {n[len(SHIPPED_PREFIX):]: n for n in names if n.startswith(SHIPPED_PREFIX)}
        assert "registry.json" in shipped
        wanted = [e["shipped"] for e in load_registry().values() if e.get("shipped")]
        wanted.append("scenes64_train_state")  # the demo GAN's training state (G and D)
        for directory in wanted:
            files = sorted(p for p in (shipped_weights_dir() / directory).rglob("*") if p.is_file())
            assert files, directory
            for path in files:
                relative = path.relative_to(shipped_weights_dir()).as_posix()
                assert relative in shipped, f"{relative} is not in the wheel"
                data = archive.read(shipped[relative])
                assert hashlib.sha256(data).hexdigest() == _sha256(path), relative

    # 2. A fresh venv; its dependencies come from this environment's site-packages through a
    # .pth file (appended after the venv's own site-packages, and .pth files found there are not
    # run, so an editable install of the checkout in this environment is not seen).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                   .stdout.strip())
    dependencies = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    (purelib / "_test_dependencies.pth").write_text("\n".join(dict.fromkeys(dependencies)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)])
    command = venv / ("Scripts/gandissect-jax.exe" if os.name == "nt" else "bin/gandissect-jax")

    # 3. From an unrelated directory, with a private cache and no overrides.
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GANDISSECT_JAX_WEIGHTS", "PYTHONPATH")}
    env.update(GANDISSECT_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    where = _run([str(python), "-c", "import gandissect_jax; print(gandissect_jax.__file__)"],
                 cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    installed_weights = purelib / SHIPPED_PREFIX

    # the paint app's client, found where the server looks for it (gandissect_jax.paint.server.create_app)
    static = _run([str(python), "-c", "from importlib import resources; "
                   "d = resources.files('gandissect_jax.paint') / 'static'; print(sorted(p.name for p in d.iterdir()))"],
                  cwd=work, env=env).stdout
    assert "'index.html'" in static and "'app.js'" in static and "'style.css'" in static, static
    listing = _run([str(command), "weights", "list"], cwd=work, env=env).stdout
    for name, directory in (("scenes64", "scenes64/generator"), ("scenes64-segmenter", "scenes64/segmenter")):
        line = next(line for line in listing.splitlines() if line.split()[:1] == [name])
        assert line.split(" at ", 1)[1] == str(installed_weights / directory), line
    assert (installed_weights / "scenes64_train_state" / "config.json").is_file()

    _run([str(command), *DISSECT_ARGS, "--outdir", "D"], cwd=work, env=env)
    report = json.loads((work / "D" / "dissect.json").read_text())
    assert report["settings"]["source"]["model"] == "scenes64"
    assert report["layers"][0]["num_units"] == 128 and report["layers"][0]["num_samples"] == 200
    assert (work / "D" / "dissect.html").is_file()

    # 4. The installed package gives the checkout's numbers exactly.
    assert main([*DISSECT_ARGS, "--no-images", "--outdir", str(tmp_path / "checkout")]) == 0
    assert _unit_numbers(work / "D") == _unit_numbers(tmp_path / "checkout")
