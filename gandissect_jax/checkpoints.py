"""Orbax checkpoints of a model, written so that nothing of the user's is ever deleted or overwritten.

Layout of a checkpoint directory::

    DIR/config.json   architecture and metadata, plus the marker "format": "gandissect-jax-checkpoint"
    DIR/params/       the params pytree, written by orbax

Writing rules (issue 11, section 2), shared by every save and conversion in the package:

- A destination that exists is refused unless it is a checkpoint this library wrote (the marker in
  ``config.json`` and exactly the two entries above) **and** ``force=True`` (CLI: ``--force``).
  Anything else that exists -- a file, a symbolic link, a directory with other files, a foreign
  orbax checkpoint, a checkpoint from before the marker existed (like the shipped ones under
  ``weights/``, which still load) -- is left untouched and the save fails with a message naming
  the destination and ``--force``. An empty directory is used as is (there is nothing in it to
  lose). The current directory (or a folder holding it) is never replaced.
- Source and destination must be distinct: equal paths, or one inside the other, are an error
  (:func:`check_distinct`).
- Everything is first written into a uniquely named temporary sibling (``.NAME.tmp-XXXX``) that is
  renamed into place only when complete; on any failure, ``KeyboardInterrupt`` included, the
  temporary directory is removed and a replaced checkpoint is put back.
- Writers of one destination are serialised by a ``filelock`` lock kept in the user cache
  (``<cache>/locks``), so a second process waits for the first (then obeys the rules above)
  instead of crashing half-way.

Loading needs neither PyTorch nor the original file and accepts checkpoints with or without the
marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from . import untrusted_json

__all__ = [
    "CheckpointError",
    "DestinationError",
    "DestinationBusyError",
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "is_checkpoint",
    "is_own_checkpoint",
    "check_distinct",
    "check_destination",
    "destination_lock",
    "install_directory",
    "config_sizes",
    "config_flag",
    "check_param_shapes",
]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT_KEY = "format"
FORMAT = "gandissect-jax-checkpoint"
LOCK_TIMEOUT_S = 600.0

_log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """Raised when a directory is not a readable gandissect-jax checkpoint."""


class DestinationError(CheckpointError):
    """A destination that would have to be deleted or overwritten, or that overlaps the source."""


class DestinationBusyError(CheckpointError):
    """Another process kept writing the same destination for longer than the lock timeout."""


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """True if ``directory`` has the layout of a loadable checkpoint (``config.json`` + ``params/``).

    Checkpoints written before the ownership marker existed (the shipped ones) qualify; see
    :func:`is_own_checkpoint` for the stricter test used before replacing a directory.
    """
    directory = os.fspath(directory)
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isdir(
        os.path.join(directory, PARAMS_DIR)
    )


def is_own_checkpoint(directory: str | os.PathLike) -> bool:
    """True if ``directory`` is a checkpoint written by this library and holds nothing else.

    That is: a real directory (not a symbolic link) whose entries are exactly ``config.json`` (a
    JSON object with ``"format": "gandissect-jax-checkpoint"``) and ``params/`` (a real
    directory). Only such a directory may be replaced, and only with ``force=True``.
    """
    directory = os.fspath(directory)
    if os.path.islink(directory) or not os.path.isdir(directory):
        return False
    try:
        if sorted(os.listdir(directory)) != [CONFIG_FILE, PARAMS_DIR]:
            return False
    except OSError:
        return False
    config_path = os.path.join(directory, CONFIG_FILE)
    params_path = os.path.join(directory, PARAMS_DIR)
    if os.path.islink(config_path) or not os.path.isfile(config_path):
        return False
    if os.path.islink(params_path) or not os.path.isdir(params_path):
        return False
    try:
        with open(config_path) as f:
            config = untrusted_json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get(FORMAT_KEY) == FORMAT


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _inside(path: str, folder: str) -> bool:
    """True if real path ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_distinct(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Refuse a conversion whose source and destination overlap (symbolic links resolved).

    Raises:
      DestinationError: ``src`` and ``dest`` are the same path, or one lies inside the other.
    """
    s, d = _real(src), _real(dest)
    if s == d:
        raise DestinationError(f"source and destination are the same path ({s}); choose another DEST")
    if _inside(d, s):
        raise DestinationError(f"destination {d} lies inside the source {s}; choose a DEST outside it")
    if _inside(s, d):
        raise DestinationError(f"source {s} lies inside the destination {d}; choose a DEST that does "
                               "not contain the source")


def _describe(directory: str, limit: int = 5) -> str:
    try:
        names = sorted(os.listdir(directory))
    except OSError as err:
        return f"unreadable: {err.strerror}"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"


def check_destination(
    dest: str | os.PathLike,
    force: bool = False,
    replaceable: Callable[[str], bool] = is_own_checkpoint,
    what: str = "a gandissect-jax checkpoint",
) -> str:
    """Decide whether ``dest`` may be written, before any work starts; returns the mode.

    Args:
      dest: destination directory.
      force: allow replacing ``dest`` when ``replaceable(dest)`` holds.
      replaceable: recognises directories this library wrote (default :func:`is_own_checkpoint`).
      what: how error messages name such a directory.

    Returns:
      ``'new'`` (nothing there), ``'empty'`` (an empty directory) or ``'replace'``.

    Raises:
      DestinationError: ``dest`` is (or holds) the current directory, a symbolic link, a file, a
        non-empty directory that is not ``what``, or ``what`` without ``force``. The message names
        ``dest`` and ``--force``.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(dest)))
    if not os.path.lexists(path):
        return "new"
    if _inside(_real(os.getcwd()), _real(path)):
        raise DestinationError(f"{path} is the current directory or holds it; it is never replaced "
                               "(--force does not change that). Choose another DEST.")
    if os.path.islink(path):
        raise DestinationError(f"{path} exists and is a symbolic link; nothing was written. Choose "
                               "another DEST (--force only replaces " + what + ").")
    if not os.path.isdir(path):
        raise DestinationError(f"{path} exists and is a file, not {what}; nothing was written. "
                               "Choose another DEST (--force only replaces " + what + ").")
    try:
        empty = not os.listdir(path)
    except OSError as err:
        raise DestinationError(f"{path} exists and cannot be read ({err.strerror}); nothing was "
                               "written") from err
    if empty:
        return "empty"
    if replaceable(path):
        if force:
            return "replace"
        raise DestinationError(f"{path} already holds {what}; nothing was written. Pass --force "
                               "(API: force=True) to replace it, or choose another DEST.")
    raise DestinationError(
        f"{path} exists and is not {what} ({_describe(path)}); nothing was written and nothing "
        f"there was touched. Choose a new DEST: --force (API: force=True) only replaces {what} and "
        "never deletes other files."
    )


def _lock_dir() -> Path:
    from gandissect_jax.weights import cache_dir

    for base in (cache_dir(), Path(tempfile.gettempdir()) / f"gandissect-jax-{getattr(os, 'getuid', lambda: 'user')()}"):
        folder = Path(base) / "locks"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise DestinationError(f"no writable directory for lock files (tried {cache_dir()}/locks); "
                           "set $GANDISSECT_JAX_CACHE to a writable directory")


@contextlib.contextmanager
def destination_lock(dest: str | os.PathLike, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the inter-process lock of ``dest`` (keyed by its real path) for the ``with`` block.

    The lock file lives in ``<cache>/locks`` (not beside ``dest``, so no stray files appear in the
    user's folders); the operating system releases it when a process dies, so it never goes stale.

    Raises:
      DestinationBusyError: still held by another process after ``timeout`` seconds.
    """
    from filelock import FileLock, Timeout

    real = _real(dest)
    key = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    lock_path = _lock_dir() / f"{key}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _log.warning("another process is writing %s; waiting for it (up to %.0f s)", real, timeout)
        try:
            lock.acquire(timeout=timeout)
        except Timeout as err:
            raise DestinationBusyError(
                f"another process has been writing {real} for over {timeout:.0f} s (lock "
                f"{lock_path}); wait for it to finish or choose another DEST") from err
    try:
        yield
    finally:
        lock.release()


def _remove_own_checkpoint(directory: str) -> None:
    """Delete a directory that :func:`is_own_checkpoint` accepted: its two entries, then itself."""
    os.unlink(os.path.join(directory, CONFIG_FILE))
    shutil.rmtree(os.path.join(directory, PARAMS_DIR))
    os.rmdir(directory)


def install_directory(
    tmp: str | os.PathLike,
    dest: str | os.PathLike,
    mode: str,
    replaceable: Callable[[str], bool] = is_own_checkpoint,
    remove: Callable[[str], None] = _remove_own_checkpoint,
) -> None:
    """Rename the complete directory ``tmp`` to ``dest`` (same filesystem); caller holds the lock.

    ``mode`` is what :func:`check_destination` returned (call it again under the lock). For
    ``'replace'`` the old directory is first renamed aside, checked again with ``replaceable``, and
    removed with ``remove`` only once the new one is in place; if anything fails (or the process is
    interrupted) the old one is put back.

    Raises:
      DestinationError: ``dest`` changed under us (for example files appeared in it).
    """
    tmp, dest = os.fspath(tmp), os.path.abspath(os.fspath(dest))
    if mode in ("new", "empty"):
        try:
            os.rename(tmp, dest)  # atomic; fails if dest gained files meanwhile
        except OSError as err:
            raise DestinationError(f"{dest} appeared or changed while writing ({err.strerror}); "
                                   "nothing there was touched. Choose another DEST.") from err
        return
    if mode != "replace":
        raise ValueError(f"unknown install mode {mode!r}")
    parent, name = os.path.split(dest)
    aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(dest, aside)  # replaces the empty directory ``aside`` atomically
    installed = False
    try:
        if not replaceable(aside):
            raise DestinationError(f"{dest} changed while writing; it was left as it was")
        os.rename(tmp, dest)
        installed = True
    finally:
        if not installed and not os.path.lexists(dest):
            os.rename(aside, dest)
    try:
        remove(aside)
    except OSError as err:  # something unexpected appeared: keep it, say where
        _log.warning("the replaced checkpoint was kept at %s (%s)", aside, err)


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    return ocp.PyTreeCheckpointer()


def save_checkpoint(
    directory: str | os.PathLike,
    params: Any,
    config: Mapping[str, Any],
    *,
    force: bool = False,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> str:
    """Write ``params`` and ``config`` to ``directory`` atomically (see the module docstring).

    Args:
      directory: destination directory. It must not exist, or be an empty directory, or -- with
        ``force=True`` -- be a checkpoint written by this library (:func:`is_own_checkpoint`).
      params: pytree (nested dicts) of arrays, any dtype.
      config: JSON-serialisable mapping describing the architecture; the key ``"format"`` is
        reserved for the ownership marker.
      force: replace an existing checkpoint written by this library (never anything else).
      lock_timeout: seconds to wait for another process writing the same directory.

    Returns:
      The absolute path of the checkpoint directory.

    Raises:
      DestinationError: the destination may not be written (message names it and ``--force``).
      DestinationBusyError: another process kept the destination locked past ``lock_timeout``.
      TypeError / ValueError: ``config`` is not JSON-serialisable or uses the reserved key.
    """
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    config = dict(config)
    if FORMAT_KEY in config and config[FORMAT_KEY] != FORMAT:
        raise ValueError(f"config key {FORMAT_KEY!r} is reserved for the checkpoint marker")
    config[FORMAT_KEY] = FORMAT
    config_text = json.dumps(config, indent=1, sort_keys=True)  # fail before writing anything
    check_destination(directory, force)  # fail before any work
    host_params = jax.tree_util.tree_map(np.asarray, params)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    with destination_lock(directory, lock_timeout):
        mode = check_destination(directory, force)  # again: another process may have written it
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
        try:
            _checkpointer().save(os.path.join(tmp, PARAMS_DIR), host_params)
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                f.write(config_text + "\n")
            install_directory(tmp, directory, mode)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_checkpoint(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` (with or without the marker).

    Returns:
      ``(params, config)``: params as a pytree of ``numpy.ndarray`` (nested dicts), config as the
      dict that was saved (the marker removed).

    Raises:
      FileNotFoundError: ``directory`` does not exist.
      CheckpointError: the directory is not a complete or readable checkpoint.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    if not is_checkpoint(directory):
        raise CheckpointError(
            f"{directory} is not a gandissect-jax checkpoint: expected {CONFIG_FILE} and {PARAMS_DIR}/"
        )
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            config = untrusted_json.load(f)
    except ValueError as err:  # not JSON (too deep included), or not UTF-8
        raise CheckpointError(f"{directory}/{CONFIG_FILE} is corrupt: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory}/{CONFIG_FILE} is corrupt: not a JSON object")
    if config.get(FORMAT_KEY) == FORMAT:
        del config[FORMAT_KEY]
    try:
        params = _checkpointer().restore(os.path.join(directory, PARAMS_DIR))
    except Exception as err:  # noqa: BLE001 - orbax raises many types; all mean "unreadable"
        raise CheckpointError(f"{directory}/{PARAMS_DIR} could not be restored: {err}") from err
    params = jax.tree_util.tree_map(np.asarray, params)
    return params, config


# ============================================================================ config.json values


def config_sizes(config: Mapping[str, Any], key: str, where: str, default: Any = None) -> tuple[int, ...]:
    """``config[key]`` (``default`` when absent) as a tuple of positive ints: the value must be a
    non-empty JSON list of integers -- not floats (128.5 is not truncated to 128), not booleans,
    not strings. CheckpointError naming ``where`` (the checkpoint directory), the key, the allowed
    values and the value found otherwise. Used for the architecture widths of every checkpoint
    kind, which choose the shapes the parameters are checked against."""
    value = config.get(key, default)
    if (isinstance(value, (list, tuple)) and value
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return tuple(int(v) for v in value)
    text = repr(value)
    raise CheckpointError(f"{where}/{CONFIG_FILE}: {key!r} must be a non-empty list of positive integers, "
                          f"got {text if len(text) <= 80 else text[:80] + '...'}")


def config_flag(config: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    """``config[key]`` (``default`` when absent), which must be a JSON boolean (the string "false"
    is not taken as true); CheckpointError naming ``where``, the key and the value otherwise."""
    value = config.get(key, default)
    if isinstance(value, bool):
        return value
    raise CheckpointError(f"{where}/{CONFIG_FILE}: {key!r} must be true or false, got {value!r:.80}")


def check_param_shapes(params: Any, expected: Any, where: str, what: str) -> None:
    """Every leaf of ``params`` present, with the shape of ``expected`` (a pytree of arrays or
    ``jax.ShapeDtypeStruct``), and nothing else; CheckpointError naming ``where``, ``what`` (e.g.
    'segmenter parameter'), the parameter path and both shapes otherwise -- at load, before a
    network first runs on them."""
    want = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for key in sorted(set(want) | set(have)):
        if key not in have:
            raise CheckpointError(f"{where}: {what} {key} is missing")
        if key not in want:
            raise CheckpointError(f"{where}: unexpected {what} {key}")
        if have[key] != want[key]:
            raise CheckpointError(f"{where}: {what} {key} has shape {have[key]}, expected {want[key]}")
