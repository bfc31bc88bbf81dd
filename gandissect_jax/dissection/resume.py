"""Resumable runs: atomic checkpoints of host accumulators, the run's identity, and the output-directory lock.

- :func:`save_checkpoint` / :func:`load_checkpoint`: a pytree of host arrays plus a JSON ``meta``
  record in one ``.npz`` (no pickle), written to a temporary name and renamed.
- :class:`RunDirectory`: ``<outdir>/.progress``, the settings a run was started with
  (``settings.json``; a rerun with other settings is refused with the first difference), and
  markers of finished steps.
- :func:`outdir_lock`: one run at a time per output directory (``filelock``); a second run is
  refused at once with a message, instead of two runs interleaving their files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax
import numpy as np

LOCK_NAME = ".dissect.lock"
SETTINGS_VERSION = 2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open a unique temporary file beside ``path``; on success it is renamed to ``path`` (with the
    permissions a plain ``open`` would give), on failure removed. Readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path, "w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)


def save_checkpoint(path: str, tree: Any, meta: Mapping[str, Any]) -> None:
    """Save the leaves of a pytree of host arrays and a JSON-able ``meta`` dict to ``path`` (.npz), atomically."""
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["meta"] = np.asarray(json.dumps(dict(meta), sort_keys=True))
    with atomic_file(path) as handle:
        np.savez(handle, **arrays)


def checkpoint_meta(path: str) -> dict:
    """The ``meta`` record of a :func:`save_checkpoint` file. ValueError naming the file when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError, EOFError) as err:
        raise ValueError(f"checkpoint {path} cannot be read ({err}); remove it to start afresh") from err


def load_checkpoint(path: str, template: Any) -> tuple[Any, dict]:
    """Read a :func:`save_checkpoint` file into the structure of ``template``; returns (tree, meta).

    ValueError naming the file when it is unreadable or holds another number of arrays.
    """
    leaves, treedef = jax.tree_util.tree_flatten(template)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            count = sum(1 for name in data.files if name.startswith("leaf"))
            if count != len(leaves):
                raise ValueError(f"checkpoint {path} holds {count} arrays; this run has {len(leaves)}")
            loaded = [data[f"leaf{i}"].copy() for i in range(count)]
    except (OSError, KeyError, json.JSONDecodeError, EOFError) as err:
        raise ValueError(f"checkpoint {path} cannot be read ({err}); remove it to start afresh") from err
    return jax.tree_util.tree_unflatten(treedef, loaded), meta


def json_normalize(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, sorted keys)."""
    return json.loads(json.dumps(value, sort_keys=True))


def digest(array: np.ndarray) -> str:
    """Short sha256 of an array's float32 bytes (for run identities)."""
    return hashlib.sha256(np.ascontiguousarray(array, np.float32).tobytes()).hexdigest()[:16]


def first_difference(a: Mapping, b: Mapping) -> str:
    """'key: a != b' for the first (sorted) top-level key whose JSON values differ."""
    a, b = json_normalize(a), json_normalize(b)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} != {b.get(key)!r}"
    return "?"


class RunDirectory:
    """Where a run keeps its resumable state: ``<outdir>/.progress`` (nothing when outdir is None).

    The run's identity (``fingerprint``, a JSON-able dict of everything that determines its
    results) is written on the first run; a later run with another identity raises ValueError
    naming the first difference, before any work.
    """

    def __init__(self, outdir: str | None, fingerprint: Mapping[str, Any]):
        self.outdir = outdir
        self.directory = os.path.join(outdir, ".progress") if outdir else None
        self.fingerprint = dict(fingerprint, version=SETTINGS_VERSION)
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "settings.json")
        if not os.path.exists(path):
            atomic_write_json(path, self.fingerprint)
            return
        try:
            with open(path) as handle:
                previous = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is unreadable ({err}); use another --outdir or remove {self.directory}") from err
        if not isinstance(previous, dict) or previous.get("version") != SETTINGS_VERSION:
            version = previous.get("version") if isinstance(previous, dict) else None
            raise ValueError(f"{outdir} holds a dissection started by another version of gandissect-jax "
                             f"(settings version {version}, this is {SETTINGS_VERSION}); use another --outdir "
                             f"or remove {self.directory}")
        if previous != json_normalize(self.fingerprint):
            raise ValueError(f"{outdir} holds a dissection with different settings "
                             f"({first_difference(previous, self.fingerprint)}); use another --outdir or remove it")

    def path(self, name: str) -> str | None:
        """Path of ``name`` inside ``.progress`` (None without an outdir)."""
        return os.path.join(self.directory, name) if self.directory else None

    def subdirectory(self, name: str) -> str | None:
        """``.progress/<name>``, created (None without an outdir)."""
        if not self.directory:
            return None
        path = os.path.join(self.directory, name)
        os.makedirs(path, exist_ok=True)
        return path

    def is_marked(self, name: str) -> bool:
        """True when :meth:`mark` wrote ``name``."""
        return bool(self.directory) and os.path.exists(os.path.join(self.directory, name + ".done"))

    def mark(self, name: str, payload: Any) -> None:
        """Record that step ``name`` finished."""
        if self.directory:
            atomic_write_json(os.path.join(self.directory, name + ".done"), payload)

    def remove(self, name: str) -> None:
        """Remove ``.progress/<name>`` (file or directory) if present."""
        path = self.path(name)
        if path and os.path.isdir(path):
            shutil.rmtree(path)
        elif path and os.path.exists(path):
            os.remove(path)


@contextlib.contextmanager
def outdir_lock(outdir: str | None) -> Iterator[None]:
    """Hold ``<outdir>/.dissect.lock`` for the duration; ValueError at once when another run holds it."""
    if not outdir:
        yield
        return
    from filelock import FileLock, Timeout

    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, LOCK_NAME)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"another dissection is writing into {outdir} (it holds {path}); wait for it to "
                         "finish or use another --outdir") from None
    try:
        yield
    finally:
        lock.release()


__all__ = ["atomic_file", "atomic_write_json", "save_checkpoint", "load_checkpoint", "checkpoint_meta", "digest", "first_difference", "json_normalize", "RunDirectory",
           "outdir_lock", "LOCK_NAME", "SETTINGS_VERSION"]
