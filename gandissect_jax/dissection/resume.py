"""Resumable runs: atomic checkpoints, the run's identity and manifest, and the output-directory lock.

- :func:`save_checkpoint` / :func:`load_checkpoint`: a pytree of host arrays plus a JSON ``meta``
  record in one ``.npz`` (no pickle), written to a temporary name and renamed.
- :func:`content_digest` / :func:`pytree_digest`: sha256 of every byte of an array (streamed, so
  memory-mapped arrays of any size work) and of a parameter pytree (paths, dtypes, shapes,
  bytes): what a run's identity records about its data and models.
- :class:`RunDirectory`: ``<outdir>/.progress``, the identity a run was started with
  (``settings.json``; a rerun with another identity is refused before any work, saying what
  changed), the manifest of the outputs it wrote (``outputs.json``, so ``restart`` removes
  exactly those), and markers of finished steps.
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
import zipfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from .. import untrusted_json

LOCK_NAME = ".dissect.lock"
SETTINGS_VERSION = 3


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


class ProgressFileError(ValueError):
    """A progress file (a pass checkpoint, the quantile plan) that this run cannot use: damaged or
    written by another kind of run. Not bad input: a caller must not discard the run's other progress."""


# what reading a damaged or foreign .npz progress file raises (truncated zip, pickled or missing entries, bad JSON)
UNREADABLE = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)


def checkpoint_meta(path: str) -> dict:
    """The ``meta`` record of a :func:`save_checkpoint` file. ValueError naming the file when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return untrusted_json.loads(str(data["meta"]))
    except UNREADABLE as err:
        raise ProgressFileError(f"checkpoint {path} cannot be read ({err}); remove it to start afresh") from err


def load_checkpoint(path: str, template: Any) -> tuple[Any, dict]:
    """Read a :func:`save_checkpoint` file into the structure of ``template``; returns (tree, meta).

    ValueError naming the file when it is unreadable or holds another number of arrays.
    """
    leaves, treedef = jax.tree_util.tree_flatten(template)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = untrusted_json.loads(str(data["meta"]))
            count = sum(1 for name in data.files if name.startswith("leaf"))
            if count != len(leaves):
                raise ValueError(f"checkpoint {path} holds {count} arrays; this run has {len(leaves)}")
            loaded = [data[f"leaf{i}"].copy() for i in range(count)]
    except UNREADABLE as err:  # (json.JSONDecodeError is a ValueError)
        raise ProgressFileError(f"checkpoint {path} cannot be read ({err}); remove it to start afresh") from err
    return jax.tree_util.tree_unflatten(treedef, loaded), meta


def json_normalize(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, sorted keys)."""
    return json.loads(json.dumps(value, sort_keys=True))


def digest(array: np.ndarray) -> str:
    """Short sha256 of an array's float32 bytes (for run identities of small arrays such as levels)."""
    return hashlib.sha256(np.ascontiguousarray(array, np.float32).tobytes()).hexdigest()[:16]


# ============================================================================ content identities

CHUNK_BYTES = 64 << 20  # bytes read at a time when hashing an array


def file_sha256(path: str) -> str:
    """sha256 (hex) of a file's bytes (``hashlib.file_digest``, streamed)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_digest(array: Any, *, chunk_bytes: int = CHUNK_BYTES,
                   visit: Callable[[np.ndarray], None] | None = None) -> str:
    """sha256 (hex) of an array's dtype, shape and every byte, streamed along the first axis.

    array: anything with ``shape``, ``dtype`` and slicing along axis 0 (numpy, a ``np.load(...,
    mmap_mode='r')`` memmap of any size, a jax array). Reads ``chunk_bytes`` at a time, so memory
    stays bounded. visit: called with every chunk (a C-contiguous numpy array) as it is read, e.g.
    to take a minimum and maximum in the same read. Two arrays have the same digest exactly when
    they have the same dtype (byte order included), shape and bytes.
    """
    dtype = np.dtype(array.dtype)
    if dtype.hasobject:
        raise ValueError("object arrays have no content digest")
    shape = tuple(int(s) for s in array.shape)
    hasher = hashlib.sha256(json.dumps({"dtype": dtype.str, "shape": shape}).encode())
    if not shape:
        chunks: Iterator[np.ndarray] = iter([np.asarray(array).reshape(1)])
    else:
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        rows = max(1, int(chunk_bytes) // max(1, row_bytes))
        chunks = (np.asarray(array[start:start + rows]) for start in range(0, shape[0], rows))
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk)
        if visit is not None:
            visit(chunk)
        hasher.update(chunk.reshape(-1).view(np.uint8))
    return hasher.hexdigest()


def pytree_digest(tree: Any) -> str:
    """sha256 (hex) of a pytree of arrays (e.g. a model's params): every leaf's path, dtype, shape and bytes.

    The paths are ``jax.tree_util.keystr`` strings (``['layer1']['conv']['kernel']``), so the digest
    is the same in every process; two parameter sets have the same digest exactly when they
    have the same structure and the same values. Device arrays are copied to the host leaf by
    leaf. Leaves that are not arrays (Python numbers) are hashed as numpy scalars.
    """
    hasher = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        value = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        header = {"path": jax.tree_util.keystr(path), "dtype": value.dtype.str, "shape": list(value.shape)}
        hasher.update(json.dumps(header, sort_keys=True).encode())
        hasher.update(value.reshape(-1).view(np.uint8))
    return hasher.hexdigest()


# ============================================================================ comparing identities


def differences(previous: Any, current: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, previous value, current value) of every leaf where two JSON documents differ."""
    if isinstance(previous, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(previous) | set(current)):
            found += differences(previous.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        return found
    return [] if previous == current else [(path or "(settings)", previous, current)]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}..."  # a content digest
    return text if len(text) <= 60 else text[:57] + "..."


def first_difference(a: Mapping, b: Mapping) -> str:
    """'key: a != b' for the first (sorted) key whose JSON values differ (nested keys dotted)."""
    found = differences(json_normalize(a), json_normalize(b))
    if not found:
        return "?"
    key, old, new = found[0]
    return f"{key}: {_short(old)} != {_short(new)}"


def describe_change(previous: Mapping, current: Mapping, limit: int = 3) -> str:
    """What changed between two run identities, in one line: 'key was X, now Y; ...'."""
    found = differences(json_normalize(previous), json_normalize(current))
    parts = [f"{key} was {_short(old)}, now {_short(new)}" if old is not None and new is not None
             else f"{key} {'is new' if old is None else 'is gone'}" for key, old, new in found[:limit]]
    more = len(found) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def read_manifest(progress_dir: str | None) -> dict[str, list[str]]:
    """The manifest of what runs wrote (``<progress_dir>/outputs.json``): ``{"files": [...],
    "directories": [...]}`` paths relative to the outdir; empty lists when it is missing or unreadable."""
    empty = {"files": [], "directories": []}
    if not progress_dir:
        return empty
    try:
        with open(os.path.join(progress_dir, RunDirectory.MANIFEST)) as handle:
            manifest = untrusted_json.load(handle)
    except (OSError, TypeError, ValueError):
        return empty
    if not isinstance(manifest, dict):
        return empty
    return {key: [p for p in manifest.get(key, []) if isinstance(p, str)] if isinstance(manifest.get(key), list)
            else [] for key in ("files", "directories")}


class IdentityMismatch(ValueError):
    """The output directory holds a dissection of other inputs or settings (raised before any work)."""


RESTART_HINT = ("rerun with --restart (API: restart=True) to discard that run's progress and outputs and start "
                "afresh, or use another --outdir")


# ============================================================================ the run directory


def _is_inside(root: str, relative: str) -> bool:
    """True when ``relative`` is a plain relative path that stays inside ``root`` (symlinks resolved)."""
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        return False
    parts = relative.replace("\\", "/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return False
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.dirname(os.path.join(root, relative)))
    return parent == real_root or parent.startswith(real_root + os.sep)


class RunDirectory:
    """Where a run keeps its resumable state: ``<outdir>/.progress`` (nothing when outdir is None).

    The run's identity (``fingerprint``, a JSON-able dict of everything that determines its
    results) is written on the first run; a later run with another identity raises
    :class:`IdentityMismatch` (a ValueError) saying what changed and how to start afresh, before
    any work. ``restart=True`` first removes what an earlier run wrote here: ``.progress`` and
    the outputs listed in its manifest (``.progress/outputs.json``, kept by :meth:`recording`),
    and nothing else.
    """

    MANIFEST = "outputs.json"

    def __init__(self, outdir: str | None, fingerprint: Mapping[str, Any], *, restart: bool = False):
        self.outdir = outdir
        self.directory = os.path.join(outdir, ".progress") if outdir else None
        self.fingerprint = dict(fingerprint, version=SETTINGS_VERSION)
        self.fresh = True
        if not self.directory:
            return
        if restart:
            self.restart()
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "settings.json")
        if not os.path.exists(path):
            atomic_write_json(path, self.fingerprint)
            return
        self.fresh = False
        try:
            with open(path) as handle:
                previous = untrusted_json.load(handle)
        except (OSError, ValueError) as err:
            raise IdentityMismatch(f"{path} is unreadable ({err}); {RESTART_HINT}") from err
        if not isinstance(previous, dict) or previous.get("version") != SETTINGS_VERSION:
            version = previous.get("version") if isinstance(previous, dict) else None
            raise IdentityMismatch(f"{outdir} holds a dissection started by another version of gandissect-jax "
                                   f"(settings version {version}, this is {SETTINGS_VERSION}); {RESTART_HINT}")
        if previous != json_normalize(self.fingerprint):
            raise IdentityMismatch(f"{outdir} holds a dissection of other inputs or settings "
                                   f"({describe_change(previous, self.fingerprint)}), whose results are not "
                                   f"this run's; {RESTART_HINT}")

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

    def marker(self, name: str) -> Any:
        """The payload :meth:`mark` wrote for ``name`` (None when unmarked or unreadable)."""
        path = self.path(name + ".done")
        try:
            with open(path) as handle:
                return untrusted_json.load(handle)
        except (TypeError, OSError, ValueError):
            return None

    def markers(self, prefix: str = "") -> dict[str, Any]:
        """{name without ``prefix``: payload} of every step marked with a name beginning with
        ``prefix`` (payload None when unreadable); empty without an outdir."""
        if not self.directory or not os.path.isdir(self.directory):
            return {}
        names = [entry[:-len(".done")] for entry in os.listdir(self.directory)
                 if entry.startswith(prefix) and entry.endswith(".done")]
        return {name[len(prefix):]: self.marker(name) for name in sorted(names)}

    def any_marked(self) -> bool:
        """True when some step of this run directory has finished."""
        return bool(self.directory) and os.path.isdir(self.directory) and any(
            name.endswith(".done") for name in os.listdir(self.directory))

    def remove(self, name: str) -> None:
        """Remove ``.progress/<name>`` (file or directory) if present."""
        path = self.path(name)
        if path and os.path.isdir(path):
            shutil.rmtree(path)
        elif path and os.path.exists(path):
            os.remove(path)

    # ------------------------------------------------------------------ what this library wrote

    def outputs(self) -> dict[str, list[str]]:
        """The manifest: ``{"files": [...], "directories": [...]}`` paths relative to the outdir."""
        return read_manifest(self.directory)

    def _state(self, subdirectories: Sequence[str]) -> dict[str, tuple]:
        """{relative path: (is directory, inode, mtime, size)} of the outdir's own entries and
        everything under ``subdirectories`` (layer directories), ``.progress`` and the lock excluded."""
        state: dict[str, tuple] = {}

        def note(relative: str, stat: os.stat_result, is_dir: bool) -> None:
            state[relative] = (is_dir, stat.st_ino, stat.st_mtime_ns, stat.st_size)

        with os.scandir(self.outdir) as entries:
            for entry in entries:
                if entry.name not in (".progress", LOCK_NAME):
                    note(entry.name, entry.stat(follow_symlinks=False), entry.is_dir(follow_symlinks=False))
        for sub in subdirectories:
            top = os.path.join(self.outdir, sub)
            if os.path.islink(top) or not os.path.isdir(top):
                continue
            for root, dirs, files in os.walk(top):
                for name in dirs + files:
                    full = os.path.join(root, name)
                    note(os.path.relpath(full, self.outdir), os.lstat(full), name in dirs)
        return state

    @contextlib.contextmanager
    def recording(self, subdirectories: Sequence[str] = ()) -> Iterator[None]:
        """Add to the manifest every file written (new or changed) and every directory created in
        the outdir (its own entries and everything under ``subdirectories``) while the block runs."""
        if not self.directory:
            yield
            return
        before = self._state(subdirectories)
        try:
            yield
        finally:
            after = self._state(subdirectories)
            manifest = self.outputs()
            files, directories = set(manifest["files"]), set(manifest["directories"])
            for relative, entry in after.items():
                if entry[0]:
                    if relative not in before:
                        directories.add(relative)
                elif before.get(relative) != entry:
                    files.add(relative)
            atomic_write_json(self.path(self.MANIFEST),
                              {"files": sorted(files), "directories": sorted(directories)})

    def restart(self) -> list[str]:
        """Remove what earlier runs wrote here: the files and (then empty) directories of the
        manifest, and ``.progress``. Nothing else in the outdir is touched; manifest entries that
        would lead outside it are ignored. Returns the removed paths (relative)."""
        if not self.directory or not os.path.isdir(self.directory):
            return []
        if os.path.islink(self.directory):
            raise ValueError(f"{self.directory} is a symbolic link; gandissect-jax does not remove it")
        manifest = self.outputs()
        removed = []
        for relative in manifest["files"]:
            full = os.path.join(self.outdir, relative)
            if _is_inside(self.outdir, relative) and (os.path.islink(full) or os.path.isfile(full)):
                os.remove(full)
                removed.append(relative)
        for relative in sorted(manifest["directories"], key=lambda p: p.count("/"), reverse=True):
            full = os.path.join(self.outdir, relative)
            if _is_inside(self.outdir, relative) and not os.path.islink(full) and os.path.isdir(full):
                try:
                    os.rmdir(full)  # only when empty: a user's file inside keeps it
                    removed.append(relative)
                except OSError:
                    pass
        shutil.rmtree(self.directory)
        return removed

    def discard(self) -> None:
        """Forget this run's progress (``.progress``) when nothing of it finished: used when the
        run stopped on bad input, so that a rerun with the corrected input starts afresh instead
        of being refused as a different run."""
        if self.directory and os.path.isdir(self.directory) and not self.any_marked():
            shutil.rmtree(self.directory)


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


__all__ = ["atomic_file", "atomic_write_json", "save_checkpoint", "load_checkpoint", "checkpoint_meta", "digest",
           "content_digest", "file_sha256", "pytree_digest", "differences", "first_difference", "describe_change",
           "IdentityMismatch", "json_normalize", "RunDirectory", "outdir_lock", "LOCK_NAME", "SETTINGS_VERSION"]
