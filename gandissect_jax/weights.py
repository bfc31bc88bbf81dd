"""Registry of downloadable weights: list, resolve, fetch (download + verify + convert).

``weights/registry.json`` maps a name to an entry::

    {"kind": "generator" | "segmenter", "description": str,
     "files": [{"name": str, "url": str, "sha256": str | null, "size": int | null}],
     "convert": "module:function",     # called as function(download_dir, dest_dir)
     "shipped": null | "<directory under weights/ holding a converted checkpoint>"}

:func:`fetch` downloads every file of an entry into ``<cache>/downloads/<name>/`` (each through a
temporary file renamed into place when complete), checks its size and sha256 when the registry
gives them (refusing mismatching data), records what it observed in ``fetch-record.json``, then
converts into ``<cache>/weights/<name>/`` (or ``dest``) atomically. The cache is
``$GANDISSECT_JAX_CACHE``, else ``$XDG_CACHE_HOME/gandissect-jax``, else ``~/.cache/gandissect-jax``.
URLs may be ``http(s)://`` or ``file://``.

:func:`resolve` maps what a user typed (a path, or a registry name) to a local path.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = [
    "DownloadError",
    "ChecksumError",
    "shipped_weights_dir",
    "registry_path",
    "load_registry",
    "cache_dir",
    "resolve",
    "fetch",
    "download",
    "fetched_path",
    "KINDS",
]

KINDS = ("generator", "segmenter")
RECORD_FILE = "fetch-record.json"


class DownloadError(OSError):
    """A file of a registry entry could not be downloaded (no network, host down, 404, ...)."""


class ChecksumError(ValueError):
    """Downloaded data does not match the size or sha256 listed in the registry."""


def shipped_weights_dir() -> Path:
    """The repository's ``weights/`` directory (registry and shipped checkpoints).

    ``$GANDISSECT_JAX_WEIGHTS`` overrides it (useful when the package is installed without the
    checkout).
    """
    override = os.environ.get("GANDISSECT_JAX_WEIGHTS")
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "weights"


def registry_path() -> Path:
    """Path of the shipped ``registry.json``."""
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
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: the registry must be a JSON object name -> entry")
    return {str(k): _validate_entry(str(k), v, source) for k, v in data.items() if not k.startswith("_")}


def cache_dir() -> Path:
    """Directory for downloads and converted weights (see module docstring)."""
    if os.environ.get("GANDISSECT_JAX_CACHE"):
        return Path(os.environ["GANDISSECT_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gandissect-jax"


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
        f"(or convert a local copy with `gandissect-jax convert FILE DEST`)"
    )


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, size: int | None, sha256: str | None, observed_sha: str, url: str) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != int(size):
        raise ChecksumError(f"{url}: size is {actual_size} bytes, the registry says {size}")
    if sha256 is not None and observed_sha.lower() != sha256.lower():
        raise ChecksumError(f"{url}: sha256 is {observed_sha}, the registry says {sha256}")


def download(
    url: str,
    path: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Download ``url`` to ``path`` through a temporary file; returns the observed sha256.

    The file appears at ``path`` only if the transfer completed and matches ``size`` and
    ``sha256`` (when given); otherwise nothing is left behind.

    Raises:
      DownloadError: the URL could not be read (message names the URL and the reason).
      ChecksumError: size or sha256 mismatch.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.part-", dir=path.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
                with tqdm(
                    total=int(total) if total else size,
                    unit="B",
                    unit_scale=True,
                    desc=path.name,
                    disable=not progress,
                ) as bar:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(
                f"could not download {url}: {reason}. If this machine has no network, fetch the "
                f"file on another machine, copy it here and run `gandissect-jax convert FILE DEST`."
            ) from err
        observed = digest.hexdigest()
        _verify(tmp, size, sha256, observed, url)
        os.replace(tmp, path)
        return observed
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_converter(spec: str) -> Callable[[Path, Path], Any]:
    module_name, function_name = spec.split(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, function_name)
    except AttributeError as err:
        raise ValueError(f"converter {spec!r}: {module_name} has no {function_name}") from err


def _atomic_convert(convert: Callable[[Path, Path], Any], source: Path, dest: Path) -> None:
    """Run ``convert(source, tmp)`` into a fresh sibling of ``dest``, then swap it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.converting-", dir=dest.parent))
    tmp = work / dest.name
    try:
        convert(source, tmp)
        if not tmp.exists():
            raise ValueError(f"the converter wrote nothing for {source}")
        if dest.exists():
            old = work / "previous"
            os.replace(dest, old)
            os.replace(tmp, dest)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def fetch(
    name: str,
    dest: str | os.PathLike | None = None,
    *,
    registry: str | os.PathLike | Mapping | None = None,
    force: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
) -> Path:
    """Download, verify and convert registry entry ``name``; returns the converted directory.

    Files already in the download cache that match the registry's size/sha256 are reused (unless
    ``force``). When the registry lists no sha256 the observed one is reported through ``log``
    and recorded in ``fetch-record.json`` beside the download.

    Raises:
      KeyError-like FileNotFoundError for unknown names, DownloadError, ChecksumError.
    """
    entries = load_registry(registry)
    if name not in entries:
        raise FileNotFoundError(f"no registry entry {name!r}; known: {', '.join(sorted(entries))}")
    entry = entries[name]
    download_dir = cache_dir() / "downloads" / name
    download_dir.mkdir(parents=True, exist_ok=True)
    record_path = download_dir / RECORD_FILE
    record = {}
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            record = {}
    for spec in entry["files"]:
        target = download_dir / spec["name"]
        size, sha = spec.get("size"), spec.get("sha256")
        observed = None
        if target.is_file() and not force:
            observed = _sha256_of(target)
            try:
                _verify(target, size, sha, observed, str(target))
            except ChecksumError:
                observed = None  # stale or corrupt copy: download again
        if observed is None:
            observed = download(spec["url"], target, size=size, sha256=sha, timeout=timeout,
                                progress=progress)
        record[spec["name"]] = {
            "url": spec["url"],
            "bytes": target.stat().st_size,
            "sha256": observed,
            "verified_sha256": sha is not None,
            "verified_size": size is not None,
            "checked_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if log is not None and sha is None:
            log(f"{spec['name']}: sha256 {observed} ({target.stat().st_size} bytes; "
                "not verified: the registry lists no checksum)")
    _write_json_atomic(record_path, record)
    dest = Path(dest).expanduser() if dest is not None else fetched_path(name)
    if entry.get("convert"):
        _atomic_convert(_load_converter(entry["convert"]), download_dir, dest)
    else:
        _atomic_convert(lambda src, tmp: shutil.copytree(src, tmp), download_dir, dest)
    if log is not None:
        log(f"{name}: ready at {dest}")
    return dest
