"""The weight registry: its entries, the shipped weights, the user cache, and resolving a name to a path.

``weights/registry.json`` (shipped as package data, :func:`shipped_weights_dir`) maps a name to an
entry::

    {"kind": "generator" | "segmenter" | "discriminator", "description": str,
     "files": [{"name": str, "url": str, "sha256": str | null, "size": int | null}],
     "convert": "module:function",     # called as function(download_dir, dest_dir)
     "shipped": null | "<directory under weights/ holding a converted checkpoint>"}

:func:`resolve` maps what a user typed (a path, or a registry name) to a local path: the entry's
shipped directory, else its fetched copy in :func:`cache_dir`. Fetching and pinning are in
:mod:`gandissect_jax.weights`, which also exports everything here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from . import untrusted_json

__all__ = ["KINDS", "SHIPPED_WEIGHTS_PACKAGE", "CACHE_APP_NAME", "shipped_weights_dir", "registry_path",
           "load_registry", "cache_dir", "fetched_path", "resolve"]

KINDS = ("generator", "segmenter", "discriminator")


SHIPPED_WEIGHTS_PACKAGE = "gandissect_jax.shipped_weights"


def _shipped_weights_candidates() -> tuple[Path, Path]:
    """Where the shipped weights live: installed package data first, then a source checkout.

    A wheel installs the top-level ``weights/`` directory as the data-only package
    :data:`SHIPPED_WEIGHTS_PACKAGE` (``pyproject.toml``, ``[tool.setuptools.package-dir]``), i.e.
    ``<site-packages>/gandissect_jax/shipped_weights``. An editable install or a checkout on
    ``sys.path`` has no such directory; there the checkout's ``weights/`` beside the package is used.
    """
    package = Path(__file__).resolve().parent
    return package / SHIPPED_WEIGHTS_PACKAGE.rpartition(".")[2], package.parent / "weights"


def shipped_weights_dir() -> Path:
    """The directory holding ``registry.json`` and the shipped checkpoints (demo ``scenes64``).

    ``$GANDISSECT_JAX_WEIGHTS`` overrides it. Otherwise it is the installed package data
    (``gandissect_jax/shipped_weights`` in a wheel install) or, in an editable install or a source
    checkout, the repository's top-level ``weights/``; the first that holds a ``registry.json``
    wins. When neither does, the installed location is returned, so that errors name where the
    registry was expected.
    """
    override = os.environ.get("GANDISSECT_JAX_WEIGHTS")
    if override:
        return Path(override).expanduser().resolve()
    candidates = _shipped_weights_candidates()
    for candidate in candidates:
        if (candidate / "registry.json").is_file():
            return candidate
    return candidates[0]


def registry_path() -> Path:
    """Path of the shipped ``registry.json`` (in :func:`shipped_weights_dir`)."""
    return shipped_weights_dir() / "registry.json"


def _validate_entry(name: str, entry: Any, source: str) -> dict:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{source}: entry {name!r} is not an object")
    if entry.get("kind") not in KINDS:
        raise ValueError(f"{source}: entry {name!r} has kind {entry.get('kind')!r}; expected one of {KINDS}")
    files = entry.get("files", [])
    if not isinstance(files, list) or any(
        not isinstance(f, Mapping) or not f.get("name") or not f.get("url") for f in files
    ):
        raise ValueError(f"{source}: entry {name!r} needs files as a list of {{name, url, ...}}")
    for f in files:
        if os.path.basename(f["name"]) != f["name"] or f["name"] in (".", ".."):
            raise ValueError(f"{source}: entry {name!r} has an unsafe file name {f['name']!r}")
    convert = entry.get("convert")
    if convert is not None and (not isinstance(convert, str) or convert.count(":") != 1):
        raise ValueError(f"{source}: entry {name!r} has convert {convert!r}; expected 'module:function'")
    return dict(entry)


def load_registry(path: str | os.PathLike | Mapping | None = None) -> dict[str, dict]:
    """The registry as ``{name: entry}`` (validated). ``path`` defaults to the shipped one.

    A mapping is accepted as an already-loaded registry (validated the same way).
    """
    if isinstance(path, Mapping):
        data, source = path, "registry"
    else:
        path = Path(path) if path is not None else registry_path()
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no weight registry at {path}")
        with open(path) as f:
            try:
                data = untrusted_json.load(f)
            except ValueError as err:  # not JSON (too deep included), or not UTF-8
                raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: the registry must be a JSON object name -> entry")
    return {str(k): _validate_entry(str(k), v, source) for k, v in data.items() if not k.startswith("_")}


CACHE_APP_NAME = "gandissect-jax"


def cache_dir() -> Path:
    """Directory for downloads and converted weights.

    ``$GANDISSECT_JAX_CACHE`` when set, else the user cache directory of ``gandissect-jax`` from
    ``platformdirs.user_cache_dir`` (Linux: ``$XDG_CACHE_HOME/gandissect-jax``, by default
    ``~/.cache/gandissect-jax``; macOS: ``~/Library/Caches/gandissect-jax``; Windows:
    ``%LOCALAPPDATA%\\gandissect-jax\\Cache``). The directory is not created here.
    """
    override = os.environ.get("GANDISSECT_JAX_CACHE")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(CACHE_APP_NAME, appauthor=False))


def fetched_path(name: str) -> Path:
    """Where :func:`fetch` puts the converted weights of registry entry ``name`` by default."""
    return cache_dir() / "weights" / name


def resolve(
    src: str | os.PathLike,
    kind: str | None = None,
    registry: str | os.PathLike | Mapping | None = None,
) -> Path:
    """Map ``src`` (an existing file or directory, or a registry name) to a local path.

    For a registry name: its shipped directory if it has one, else its fetched copy.

    Raises:
      FileNotFoundError: not an existing path nor a known name, or the named weights have not
        been fetched yet (the message says which command fetches them).
      ValueError: the registry entry is of another ``kind``.
    """
    path = Path(src).expanduser()
    if path.exists():
        return path
    name = os.fspath(src)
    if registry is None and not registry_path().is_file():
        entries, note = {}, f"; no registry at {registry_path()}"
    else:
        entries, note = load_registry(registry), ""
    if name not in entries:
        names = sorted(n for n, e in entries.items() if kind is None or e["kind"] == kind)
        raise FileNotFoundError(
            f"{name!r} is not an existing file or directory nor a registered {kind or 'weight'} name "
            f"(known: {', '.join(names) or 'none'}{note})"
        )
    entry = entries[name]
    if kind is not None and entry["kind"] != kind:
        raise ValueError(f"registry entry {name!r} is a {entry['kind']}, not a {kind}")
    if entry.get("shipped"):
        shipped = shipped_weights_dir() / entry["shipped"]
        if shipped.exists():
            return shipped
    fetched = fetched_path(name)
    if fetched.exists():
        return fetched
    raise FileNotFoundError(
        f"weights {name!r} are not downloaded yet: run `gandissect-jax weights fetch {name}` "
        f"(or convert a local copy with `gandissect-jax convert FILE DEST` and pass DEST as --model or "
        f"--segmenter)"
    )
