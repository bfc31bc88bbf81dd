"""Fetch and pin registry weights: download, verify, convert into the cache; record verified checksums.

The registry itself (entries, shipped weights, the cache directory, :func:`resolve`) is
:mod:`gandissect_jax.weight_registry`; everything there is exported here too.

:func:`fetch` downloads every file of an entry into ``<cache>/downloads/<name>/``, each through a
uniquely named partial file that enters the cache only when complete and verified: against the
registry's size and sha256 when it lists them, else by reading the whole file as its type
(:func:`~gandissect_jax.downloads.check_structure`: ``read_pth`` for ``.pth``, CRCs for zip archives, a parse for JSON). A
cached file is verified again before each use and downloaded again if corrupt. What was observed
goes into ``fetch-record.json``; :func:`pin` (``gandissect-jax weights pin NAME --into FILE``)
writes the sizes and sha256 sums into a registry file of the user's. Then the files are converted
into ``<cache>/weights/<name>/`` (or ``dest``) under the rules of :mod:`gandissect_jax.checkpoints`
(nothing of the user's is replaced); concurrent fetches of one entry wait for each other. The cache is
``$GANDISSECT_JAX_CACHE``, else ``$XDG_CACHE_HOME/gandissect-jax``, else ``~/.cache/gandissect-jax``.
URLs may be ``http(s)://`` or ``file://``.
"""

from __future__ import annotations

import datetime
import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from . import downloads
from .downloads import RECORD_FILE, ChecksumError, CorruptFileError, DownloadError, check_structure, download
from .weight_registry import (  # the registry; gandissect_jax.weights exports it too
    CACHE_APP_NAME,
    KINDS,
    SHIPPED_WEIGHTS_PACKAGE,
    cache_dir,
    fetched_path,
    load_registry,
    registry_path,
    resolve,
    shipped_weights_dir,
)
from . import untrusted_json

__all__ = [
    "DownloadError",
    "ChecksumError",
    "CorruptFileError",
    "check_structure",
    "pin",
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


def _load_converter(spec: str) -> Callable[[Path, Path], Any]:
    module_name, function_name = spec.split(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, function_name)
    except AttributeError as err:
        raise ValueError(f"converter {spec!r}: {module_name} has no {function_name}") from err


def _is_fetched_copy(directory: str, entry: Mapping) -> bool:
    """True for a directory that :func:`fetch` filled by copying (entries without a converter)."""
    if os.path.islink(directory) or not os.path.isdir(directory):
        return False
    allowed = {f["name"] for f in entry.get("files", [])} | {RECORD_FILE}
    names = set(os.listdir(directory))
    return (RECORD_FILE in names and names <= allowed
            and all(os.path.isfile(os.path.join(directory, n)) and not os.path.islink(
                os.path.join(directory, n)) for n in names))


def _remove_fetched_copy(directory: str) -> None:
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


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

    Every file is downloaded into ``<cache>/downloads/<name>/`` through a partial file and enters
    the cache only once verified: against the registry's size and sha256 when it lists them,
    otherwise by reading the whole file (:func:`check_structure`). Files already in the cache are
    verified again before use (size/sha256 when known, else the sha256 recorded at download time,
    else a parse) and downloaded again when corrupt; ``force`` downloads every file again. The
    observed size and sha256 are recorded in ``fetch-record.json`` beside the downloads (and
    logged when the registry lists none: :func:`pin` writes them into a registry file).

    The converted weights go to ``dest`` (default ``<cache>/weights/<name>``). A user-given
    ``dest`` must not exist (or be empty); with ``force`` it may be a checkpoint gandissect-jax
    wrote, which is replaced; anything else there is refused before any download. Concurrent
    fetches of one entry are serialised by a lock.

    Raises:
      FileNotFoundError: unknown name. DownloadError: unreachable URL or truncated transfer.
      ChecksumError (CorruptFileError): mismatching or unparsable data, nothing cached.
      gandissect_jax.checkpoints.DestinationError: ``dest`` may not be written.
    """
    from gandissect_jax.checkpoints import (
        check_destination,
        check_distinct,
        destination_lock,
        install_directory,
        is_own_checkpoint,
    )

    entries = load_registry(registry)
    if name not in entries:
        raise FileNotFoundError(f"no registry entry {name!r}; known: {', '.join(sorted(entries))}")
    entry = entries[name]
    download_dir = cache_dir() / "downloads" / name
    to_cache = dest is None
    dest = Path(dest).expanduser().absolute() if dest is not None else fetched_path(name).absolute()
    if entry.get("convert"):
        replaceable, remove, what = is_own_checkpoint, None, "a gandissect-jax checkpoint"
    else:
        replaceable = lambda path: _is_fetched_copy(path, entry)  # noqa: E731
        remove, what = _remove_fetched_copy, f"a copy of {name!r} made by `weights fetch`"
    replace_ok = force or to_cache  # the cache's own converted copy is always refreshed
    check_distinct(download_dir, dest)
    check_destination(dest, replace_ok, replaceable, what)  # before any download
    again = (f"`gandissect-jax weights fetch {name}` tries again (--force downloads every file "
             "again, also the ones already cached)")
    with destination_lock(download_dir):
        download_dir.mkdir(parents=True, exist_ok=True)
        for stale in download_dir.glob(".*.part-*"):  # left by a killed run (we hold the lock)
            stale.unlink()
        record_path = download_dir / RECORD_FILE
        record = downloads.read_record(record_path)
        for spec in entry["files"]:
            target = download_dir / spec["name"]
            size, sha = spec.get("size"), spec.get("sha256")
            got = None
            if not force:
                got = downloads.verify_cached(target, spec, record.get(spec["name"]), name, log)
            if got is None:
                how: dict[str, str] = {"how": "sha256" if sha is not None else "none"}
                if sha is None:
                    def check(partial, spec_name=spec["name"], how=how):
                        how["how"] = downloads.check_structure(partial, spec_name)
                else:
                    check = None
                try:
                    observed = downloads.download(spec["url"], target, size=size, sha256=sha,
                                        timeout=timeout, progress=progress, check=check)
                except ChecksumError as err:
                    raise type(err)(f"{name}: {err}; the download was discarded, nothing was "
                                    f"cached. {again}.") from err
                got = (how["how"], observed)
            method, observed = got
            nbytes = target.stat().st_size
            record[spec["name"]] = {
                "url": spec["url"],
                "bytes": nbytes,
                "sha256": observed,
                "verified": method,
                "verified_sha256": method == "sha256",
                "verified_size": size is not None,
                "checked_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            if log is not None and sha is None:
                how_text = ("the whole file was read and is complete" if method == "parse" else
                            "nor could its structure be checked (no parser for this file type)")
                log(f"{spec['name']}: sha256 {observed} ({nbytes} bytes); checksum not verified: "
                    f"the registry lists none; {how_text}. Pin it with `gandissect-jax weights pin "
                    f"{name} --into FILE`")
        downloads.write_json_atomic(record_path, record)
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.converting-", dir=dest.parent))
        try:
            tmp = work / dest.name
            if entry.get("convert"):
                _load_converter(entry["convert"])(download_dir, tmp)
            else:
                tmp.mkdir()
                for file_name in [f["name"] for f in entry["files"]] + [RECORD_FILE]:
                    shutil.copy2(download_dir / file_name, tmp / file_name)
            if not tmp.exists():
                raise ValueError(f"the converter {entry.get('convert')} wrote nothing for {download_dir}")
            with destination_lock(dest):
                mode = check_destination(dest, replace_ok, replaceable, what)
                if remove is None:
                    install_directory(tmp, dest, mode, replaceable)
                else:
                    install_directory(tmp, dest, mode, replaceable, remove)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if log is not None:
        log(f"{name}: ready at {dest}")
    return dest


def _protected_dirs() -> list[Path]:
    return [Path(__file__).resolve().parent, shipped_weights_dir().resolve(), registry_path().resolve()]


def pin(
    name: str,
    into: str | os.PathLike,
    *,
    registry: str | os.PathLike | Mapping | None = None,
    force: bool = False,
    log: Callable[[str], Any] | None = print,
) -> dict:
    """Write the size and sha256 of entry ``name``'s verified cached downloads into registry ``into``.

    After a first ``fetch`` (which verified every file by a full parse), this records the observed
    bytes so that later fetches verify against them (``fetch --registry INTO``). ``into`` is a
    registry file of the user's: created if missing (holding just this entry, copied from
    ``registry``, default the shipped one), else updated in place (its other entries and
    ``_comment`` keys kept), written atomically under a lock. It is never the shipped registry
    nor anything inside the installed package.

    Returns:
      The pinned entry.

    Raises:
      ValueError: ``into`` is inside the package or the shipped weights directory, or already pins
        other values for a file (unless ``force``); FileNotFoundError: unknown entry or file not
        fetched yet; ChecksumError: a cached file is corrupt (it is removed; fetch it again) or
        could not be verified at all.
    """
    from gandissect_jax.checkpoints import destination_lock

    into = Path(os.path.realpath(Path(into).expanduser()))
    for protected in _protected_dirs():
        if into == protected or protected in into.parents:
            raise ValueError(
                f"{into} is inside {protected}: `weights pin` never writes into the installed "
                "package or the shipped weights; name a registry file of your own (for example "
                "~/gandissect-registry.json) and give it to `weights fetch --registry`")
    with destination_lock(into):
        raw: dict = {}
        if into.exists():
            load_registry(into)  # validates it
            raw = untrusted_json.loads(into.read_text())
        if isinstance(raw.get(name), Mapping):
            entry = load_registry({name: raw[name]})[name]
        else:
            entries = load_registry(registry)
            if name not in entries:
                raise FileNotFoundError(f"no registry entry {name!r} in {into} nor in the source "
                                        f"registry; known: {', '.join(sorted(entries))}")
            entry = entries[name]
        if not entry.get("files"):
            raise ValueError(f"registry entry {name!r} has no files to pin")
        download_dir = cache_dir() / "downloads" / name
        files = []
        with destination_lock(download_dir):
            record = downloads.read_record(download_dir / RECORD_FILE)
            for spec in entry["files"]:
                target = download_dir / spec["name"]
                if not target.is_file():
                    raise FileNotFoundError(f"{spec['name']} of {name!r} is not in the download cache "
                                            f"({target}): run `gandissect-jax weights fetch {name}` "
                                            "first")
                got = downloads.verify_cached(target, {"name": spec["name"]}, record.get(spec["name"]),
                                     name, None)
                if got is None:
                    raise ChecksumError(f"{name}: the cached {target} is corrupt and was removed; run "
                                        f"`gandissect-jax weights fetch {name} --force`, then pin again")
                method, observed = got
                if method == "none":
                    raise ChecksumError(
                        f"{name}: {spec['name']} cannot be pinned: it was never verified (no "
                        "checksum in the registry and no parser for its type). Check it yourself "
                        f"and write its sha256 into {into} by hand")
                nbytes = target.stat().st_size
                old_sha, old_size = spec.get("sha256"), spec.get("size")
                if not force and ((old_sha is not None and str(old_sha).lower() != observed)
                                  or (old_size is not None and int(old_size) != nbytes)):
                    raise ValueError(
                        f"{name}: {spec['name']} is pinned as sha256 {old_sha}, {old_size} bytes, "
                        f"but the cached file has sha256 {observed}, {nbytes} bytes; nothing was "
                        f"written to {into} (--force overwrites the pin)")
                files.append({**spec, "sha256": observed, "size": nbytes})
        pinned = {**entry, "files": files}
        load_registry({name: pinned})
        raw[name] = pinned
        downloads.write_json_atomic(into, raw)
    if log is not None:
        for spec in files:
            log(f"{name}: pinned {spec['name']} sha256 {spec['sha256']} ({spec['size']} bytes) in {into}")
    return pinned
