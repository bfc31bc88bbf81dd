"""Verified downloads: a URL into a file through a partial file, checked by size and sha256 or by reading it whole.

:func:`download` streams ``http(s)://`` or ``file://`` URLs into a uniquely named partial file
that replaces the target only when complete and verified (against the size and sha256 given,
or, without them, by :func:`check_structure`: ``read_pth`` for ``.pth``, CRCs for zip archives,
a parse for JSON). :func:`verify_cached` checks a cached copy again before each use, against the
registry or against what ``fetch-record.json`` observed at download time. The registry and
``fetch`` that use them: :mod:`gandissect_jax.weights`.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import json
import lzma
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

from . import untrusted_json

__all__ = ["DownloadError", "ChecksumError", "CorruptFileError", "check_structure", "download", "verify_cached",
           "read_record", "write_json_atomic", "sha256_of", "RECORD_FILE"]

RECORD_FILE = "fetch-record.json"


class DownloadError(OSError):
    """A file of a registry entry could not be downloaded (no network, host down, 404, ...)."""


class ChecksumError(ValueError):
    """Downloaded data does not match the size or sha256 listed in the registry."""


class CorruptFileError(ChecksumError):
    """A downloaded or cached file does not parse as its type (truncated or corrupt)."""


def sha256_of(path: Path) -> str:
    """sha256 (hex) of a file's bytes (``hashlib.file_digest``, streamed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verify(path: Path, size: int | None, sha256: str | None, observed_sha: str, url: str) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != int(size):
        raise ChecksumError(f"{url}: size is {actual_size} bytes, the registry says {size}")
    if sha256 is not None and observed_sha.lower() != sha256.lower():
        raise ChecksumError(f"{url}: sha256 is {observed_sha}, the registry says {sha256}")


# file name ending -> what the structural check reads the whole file as
_PARSERS = {
    ".pth": "PyTorch checkpoint (read_pth)",
    ".pt": "PyTorch checkpoint (read_pth)",
    ".zip": "zip archive (every member's CRC)",
    ".npz": "zip archive (every member's CRC)",
    ".tar": "tar archive (every member)",
    ".tar.gz": "compressed tar archive (whole stream, every member)",
    ".tgz": "compressed tar archive (whole stream, every member)",
    ".tar.bz2": "compressed tar archive (whole stream, every member)",
    ".tar.xz": "compressed tar archive (whole stream, every member)",
    ".json": "JSON document",
    ".npy": "numpy array",
}


def _parser_for(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for ending in sorted(_PARSERS, key=len, reverse=True):
        if lower.endswith(ending):
            return ending, _PARSERS[ending]
    return None


def check_structure(path: str | os.PathLike, name: str | None = None) -> str:
    """Read the whole file ``path`` as the type its ``name`` ends with; returns how it was verified.

    ``.pth``/``.pt`` are read with :func:`gandissect_jax.pth.read_pth` (every tensor, safely),
    ``.zip``/``.npz`` have every member's CRC checked, tar archives every member read, ``.json``
    and ``.npy`` parsed. This is the verification of a download when the registry has no sha256.

    Returns:
      ``'parse'`` when the file was read completely, ``'none'`` when there is no parser for its type.

    Raises:
      CorruptFileError naming the file: it does not parse (truncated or corrupt).
    """
    path = Path(path)
    name = name or path.name
    parser = _parser_for(name)
    if parser is None:
        return "none"
    ending, kind = parser
    try:
        if ending in (".pth", ".pt"):
            from gandissect_jax.pth import read_pth

            read_pth(path)
        elif ending in (".zip", ".npz"):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"member {bad!r} fails its CRC check")
        elif ending.startswith(".t"):
            decompress = {".tar.gz": gzip.open, ".tgz": gzip.open, ".tar.bz2": bz2.open,
                          ".tar.xz": lzma.open}.get(ending)
            if decompress is not None:  # to the end: checks the compressed stream's trailer/CRC
                with decompress(path, "rb") as stream:
                    while stream.read(1 << 20):
                        pass
            with tarfile.open(path) as archive:
                for member in archive:
                    if member.isfile():
                        stream = archive.extractfile(member)
                        while stream is not None and stream.read(1 << 20):
                            pass
        elif ending == ".json":
            untrusted_json.loads(path.read_bytes().decode("utf-8"))
        else:
            import numpy as np

            np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - whatever the parser raises, the file is unusable
        raise CorruptFileError(f"{name} is not a complete {kind}: truncated or corrupt "
                               f"({type(err).__name__}: {err})") from err
    return "parse"


def download(
    url: str,
    path: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    check: Callable[[Path], Any] | None = None,
) -> str:
    """Download ``url`` to ``path`` through a uniquely named partial file; returns the sha256.

    The partial file (``.NAME.part-XXXX`` beside ``path``) is renamed to ``path`` only when the
    transfer is complete (as many bytes as the server's ``Content-Length``), matches ``size`` and
    ``sha256`` when given, and passes ``check(partial_path)`` when given (e.g.
    :func:`check_structure`). Otherwise, and on any interruption (``KeyboardInterrupt``
    included), it is deleted and nothing is left behind.

    Raises:
      DownloadError: the URL could not be read, or the transfer was cut short (message names the
        URL and the reason).
      ChecksumError: size or sha256 mismatch; CorruptFileError (a ChecksumError) from ``check``.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.part-", dir=path.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        received, announced = 0, None
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                headers = getattr(resp, "headers", None)
                total = headers.get("Content-Length") if headers is not None else None
                announced = int(total) if total and str(total).isdigit() else None
                with tqdm(
                    total=announced or size,
                    unit="B",
                    unit_scale=True,
                    desc=path.name,
                    disable=not progress,
                ) as bar:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        bar.update(len(block))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(
                f"could not download {url}: {reason}. If this machine has no network, fetch the "
                f"file on another machine, copy it here and run `gandissect-jax convert FILE DEST`, then "
                f"pass DEST as --model (a generator) or --segmenter (a segmenter)."
            ) from err
        if announced is not None and received != announced:
            raise DownloadError(f"download of {url} was cut short: {received} of {announced} bytes "
                                "arrived; nothing was kept")
        observed = digest.hexdigest()
        _verify(tmp, size, sha256, observed, f"{path.name} from {url}")
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
        return observed
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a unique temporary sibling renamed into place (removed on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_record(path: Path) -> dict:
    try:
        record = untrusted_json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def verify_cached(
    target: Path, spec: Mapping, recorded: Any, entry_name: str, log: Callable[[str], Any] | None
) -> tuple[str, str] | None:
    """Re-verify a cached download: ``(how, sha256)`` if it is good, else delete it and ``None``.

    Size and sha256 are checked when the registry has them; otherwise the sha256 that
    ``fetch-record.json`` recorded for a copy verified at download time vouches for the bytes;
    failing that the whole file is parsed (:func:`check_structure`).
    """
    if not target.is_file():
        return None
    size, sha = spec.get("size"), spec.get("sha256")
    actual = target.stat().st_size
    problem = None
    if size is not None and actual != int(size):
        problem = f"{actual} bytes, the registry says {size}"
    else:
        observed = sha256_of(target)
        if sha is not None:
            if observed.lower() == str(sha).lower():
                return "sha256", observed
            problem = f"sha256 {observed}, the registry says {sha}"
        elif (isinstance(recorded, Mapping) and recorded.get("verified") in ("sha256", "parse")
              and recorded.get("sha256") == observed and recorded.get("bytes") == actual):
            return str(recorded["verified"]), observed
        else:
            try:
                return check_structure(target, spec["name"]), observed
            except CorruptFileError as err:
                problem = str(err)
    if log is not None:
        log(f"{entry_name}: the cached {target} is corrupt ({problem}); downloading it again")
    target.unlink()
    return None
