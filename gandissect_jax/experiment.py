"""Intervention experiments on a dissection output directory: their inputs and their output folders.

:class:`DissectionSource` reads what a dissection directory knows -- the model and segmenter it
was run with (``dissect.json`` ``settings.source``), the segmentation stride, every layer's scores
(``<layer>/scores.npz``: levels, IoU, raw quantiles) and unit rankings -- or takes the model and
segmenter given directly (``--model/--segmenter``). :class:`Experiment` is one experiment's output
folder, ``<outdir>/intervention/<kind>/<layer>/<name>/``:

- its settings are recorded on the first run (``.progress/settings.json``); a rerun with the same
  settings resumes (finished steps, marked in ``.progress``, are not redone); one with other
  settings is refused with the first difference, before any work, and a new ``--name`` keeps both;
- one process at a time writes it (a ``filelock`` lock, refused at once when taken);
- files are written atomically; nothing outside ``<outdir>/intervention`` is written except the
  rankings and links merged into ``dissect.json`` / ``dissect.html`` (:mod:`gandissect_jax.dissection.rankings`).

``<outdir>/intervention/index.json`` lists the experiments (kind, layer, name, title, page) and
``index.html`` links their pages.

In a multi-process run (:mod:`gandissect_jax.dissection.distributed`) **only process 0 touches the
directory**: it reads ``dissect.json`` and the scores and sends them to the others; it alone takes
the lock, checks and records the settings, decides which steps are finished and writes every file
(the other processes' writes are no-ops). What it decides and loads it broadcasts, so every
process skips the same steps with the same arrays, or computes them together; an error it raises
there (a busy folder, other settings) is raised on every process. The other processes need no
output directory.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import untrusted_json

__all__ = ["DissectionSource", "Experiment", "intervention_lock", "register", "write_index"]

INTERVENTION = "intervention"
SETTINGS_VERSION = 1


def _leader_bytes(read) -> Any:
    """``read()`` on process 0, its result (bytes or None) on every process; its errors raised on
    every process (:func:`gandissect_jax.dissection.distributed.leader_bytes`)."""
    from gandissect_jax.dissection import distributed

    return distributed.leader_bytes(read)


def _leader() -> bool:
    """True on process 0 (the one that writes), and with one process."""
    from gandissect_jax.dissection import distributed

    return distributed.is_leader()


def _safe(name: str) -> str:
    from gandissect_jax.dissection.report import safe_dir_name

    return safe_dir_name(name)


class DissectionSource:
    """The generator, segmenter and per-layer dissection results an experiment works on.

    Args:
      outdir: the output directory (a dissection's, with ``dissect.json``, or a new one).
      model, segmenter: override / supply the generator and segmenter (registry name, checkpoint
        directory or .pth); without a dissection both are required.
      segmenter_options: keyword arguments of ``load_segmenter`` (``segdiv``, ``segsizes``); by
        default what ``dissect.json`` records under ``settings.source.segmenter_options``.

    Raises:
      ValueError / FileNotFoundError naming the file or flag: an unreadable ``dissect.json``, no
      model or segmenter known.
    """

    def __init__(self, outdir: str, model: str | None = None, segmenter: str | None = None,
                 segmenter_options: Mapping[str, Any] | None = None):
        self.outdir = os.path.abspath(outdir)
        self.document: dict | None = None
        path = os.path.join(self.outdir, "dissect.json")
        source: dict = {}

        def read() -> bytes | None:  # on process 0; the others get its document
            from gandissect_jax.dissection.schema import read_dissect_json

            return json.dumps(read_dissect_json(path)).encode() if os.path.exists(path) else None

        data = _leader_bytes(read)
        if data is not None:
            self.document = untrusted_json.loads(data)
            source = dict(self.document.get("settings", {}).get("source", {}) or {})
        self.model_name = model or source.get("model")
        self.segmenter_name = segmenter or source.get("segmenter")
        if not self.model_name or not self.segmenter_name:
            where = f"{path} does not name them (settings.source)" if self.document else f"{self.outdir} holds no dissect.json"
            raise ValueError(f"give --model and --segmenter: {where}")
        self.segmenter_options = dict(segmenter_options if segmenter_options is not None
                                      else source.get("segmenter_options", {}) or {})
        self.seg_downsample = int(source.get("seg_downsample", 1))
        self._generator = None
        self._segmenter = None
        self._results: dict[str, Any] = {}

    @property
    def has_dissection(self) -> bool:
        return self.document is not None

    @property
    def generator(self):
        """The generator (loaded once)."""
        if self._generator is None:
            from gandissect_jax.proggan import load_generator

            self._generator = load_generator(self.model_name)
        return self._generator

    @property
    def segmenter(self):
        """The segmenter (loaded once)."""
        if self._segmenter is None:
            from gandissect_jax.segmenter import load_segmenter

            self._segmenter = load_segmenter(self.segmenter_name, **self.segmenter_options)
        return self._segmenter

    def identity(self) -> dict:
        """What the experiment's results depend on besides its own settings (recorded with them)."""
        return {"model": str(self.model_name), "segmenter": str(self.segmenter_name),
                "segmenter_options": self.segmenter_options,
                "dissection": None if self.document is None else self.document.get("settings", {})}

    def layers(self) -> list[str]:
        """The dissected layers ([] without a dissection)."""
        return [] if self.document is None else [l["layer"] for l in self.document.get("layers", [])]

    def check_layer(self, layer: str) -> None:
        """ValueError naming the valid layers when ``layer`` is not one of the generator's."""
        names = list(getattr(self.generator, "layer_names", ()))
        if names and layer not in names:
            raise ValueError(f"unknown layer {layer!r} (--layer); the generator has {', '.join(names)}")

    def result(self, layer: str, required: bool = True):
        """The layer's :class:`~gandissect_jax.dissection.LayerDissection`, or None (``required=False``)
        when it was not dissected. ValueError naming the dissected layers otherwise."""
        if layer in self._results:
            return self._results[layer]
        record = None
        if self.document is not None:
            record = next((l for l in self.document.get("layers", []) if l["layer"] == layer), None)
        if record is None:
            if not required:
                return None
            known = ", ".join(self.layers()) or "none"
            raise ValueError(f"layer {layer!r} was not dissected in {self.outdir} (dissected: {known}); "
                             f"run gandissect-jax dissect --layers {layer} first, or give --units")
        from gandissect_jax.dissection import LayerDissection

        path = os.path.join(self.outdir, record.get("dirname", _safe(layer)), "scores.npz")

        def read() -> bytes:  # on process 0 (the file checked there); the others get its bytes
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: the dissection of {layer!r} is incomplete")
            LayerDissection.load_npz(path)
            with open(path, "rb") as handle:
                return handle.read()

        result = LayerDissection.load_npz(io.BytesIO(_leader_bytes(read)))
        if list(result.label_names) != [name for name, _ in self.segmenter.labels]:
            raise ValueError(f"{path} was dissected with another label set than segmenter "
                             f"{self.segmenter_name!r} has")
        self._results[layer] = result
        return result

    def concept(self, concept: str) -> tuple[int, ...]:
        """Label numbers of ``--concept`` (a name, or names joined by commas: their union)."""
        from gandissect_jax.ace import concept_labels

        names = [c.strip() for c in str(concept).split(",") if c.strip()]
        if not names:
            raise ValueError("--concept is empty; give a label name, e.g. --concept tree")
        return concept_labels(self.segmenter, names)

    def ace_ranking(self, layer: str, labels: Sequence[int]) -> dict | None:
        """The latest ACE ranking record of these labels at ``layer`` (rankings.json), or None."""
        from gandissect_jax.dissection.rankings import read_rankings

        found = [r for r in read_rankings(self.outdir)["layers"].get(layer, [])
                 if r.get("metric") == "ace" and sorted(r.get("labels", [])) == sorted(labels)]
        return found[-1] if found else None

    def insertion_value(self, layer: str, quantile: float = 0.99, samples: int = 200, seed: int = 1) -> np.ndarray:
        """float32 (C,): each unit's ``quantile`` of its activations (the reference GANPaint's
        insertion value is the 0.99 quantile): from the dissection's exact raw quantiles when it
        recorded that quantile, else measured on ``samples`` z of ``seed``."""
        result = self.result(layer, required=False)
        if result is not None and result.raw_quantile_q is not None:
            q = np.asarray(result.raw_quantile_q, np.float64)
            hit = np.flatnonzero(np.isclose(q, quantile))
            if hit.size:
                return np.asarray(result.raw_quantiles[:, hit[0]], np.float32)
        from gandissect_jax.ace import representations
        from gandissect_jax.sampling import sample_z

        r, _ = representations(self.generator, layer, sample_z(samples, self.generator.z_dim, seed), 32)
        flat = np.asarray(r).reshape(-1, np.shape(r)[-1])
        return np.quantile(flat, quantile, axis=0).astype(np.float32)


# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: str, what: str, timeout: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise ValueError(f"{what} is in use by another run (it holds {path}); wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def intervention_lock(outdir: str, timeout: float = 120.0):
    """The lock of ``<outdir>/intervention``'s shared files (index, rankings); waits up to
    ``timeout`` seconds."""
    return _lock(os.path.join(outdir, INTERVENTION, ".index.lock"), f"{outdir}/{INTERVENTION}", timeout)


# How messages and pages name each kind of experiment ("an ACE experiment", not "a ace experiment").
KIND_NAMES = {"ace": "ACE", "ablate": "ablation", "insert": "insertion", "artifacts": "artifact-unit",
              "segment-units": "unit-segmentation"}


def experiment_phrase(kind: str) -> str:
    """``'an ACE experiment'``, ``'an ablation experiment'``, ``'a unit-segmentation experiment'``:
    the kind's name with its article (a/an by the sound of the name's first letter)."""
    name = KIND_NAMES.get(kind, kind)
    return f"{'an' if name[:1].lower() in 'aeio' else 'a'} {name} experiment"


class Experiment:
    """One experiment's output folder (see the module docstring).

    Args:
      outdir: the dissection / output directory.
      kind: the command (``"ace"``, ``"ablate"``, ...).
      layer: the layer (its directory name is made safe).
      name: the experiment's name within the layer (made safe).
      settings: everything the results depend on (JSON-able); recorded, compared on reruns.

    Use as a context manager: the folder is locked while open. In a multi-process run every
    process opens it and runs the same steps; only process 0 reads and writes the folder (see the
    module docstring).
    """

    def __init__(self, outdir: str, kind: str, layer: str, name: str, settings: Mapping[str, Any]):
        from gandissect_jax.dissection.resume import json_normalize

        self.outdir = os.path.abspath(outdir)
        self.kind, self.layer, self.name = kind, layer, name
        self.relative = "/".join([INTERVENTION, kind, _safe(layer), _safe(name)])
        self.directory = os.path.join(self.outdir, *self.relative.split("/"))
        self.settings = json_normalize(dict(settings, version=SETTINGS_VERSION))
        self._lock = None

    def __enter__(self) -> "Experiment":
        _leader_bytes(self._open)  # process 0 locks and checks; its errors reach every process
        return self

    def _open(self) -> None:
        from gandissect_jax.dissection.resume import first_difference

        os.makedirs(os.path.join(self.directory, ".progress"), exist_ok=True)
        self._lock = _lock(os.path.join(self.directory, ".progress", "lock"), self.directory, 0)
        self._lock.__enter__()
        try:
            path = os.path.join(self.directory, ".progress", "settings.json")
            if os.path.exists(path):
                try:
                    with open(path) as handle:
                        previous = untrusted_json.load(handle)
                except (OSError, ValueError) as err:
                    raise ValueError(f"{path} is unreadable ({err}); give another --name") from err
                if previous != self.settings:
                    raise ValueError(
                        f"{self.directory} holds {experiment_phrase(self.kind)} with other settings "
                        f"({first_difference(previous, self.settings)}); give another --name to keep both")
            else:
                self.write_json(os.path.join(".progress", "settings.json"), self.settings)
        except BaseException:
            self._lock.__exit__(None, None, None)
            self._lock = None
            raise

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.__exit__(*exc)
            self._lock = None

    def path(self, name: str) -> str:
        """``<experiment>/<name>``."""
        return os.path.join(self.directory, name)

    def done(self, step: str) -> bool:
        return os.path.exists(self.path(os.path.join(".progress", step + ".done")))

    def mark(self, step: str) -> None:
        self.write_json(os.path.join(".progress", step + ".done"), {"step": step})

    def write_json(self, name: str, payload: Any) -> None:
        """``<experiment>/<name>`` as JSON, atomically (process 0 only; a no-op on the others)."""
        from gandissect_jax.dissection.resume import atomic_file

        if not _leader():
            return
        with atomic_file(self.path(name), "w") as handle:
            json.dump(payload, handle, indent=1, allow_nan=False)

    def write_bytes(self, name: str, payload: bytes) -> None:
        """``<experiment>/<name>``, atomically (process 0 only; a no-op on the others)."""
        from gandissect_jax.dissection.resume import atomic_file

        if not _leader():
            return
        with atomic_file(self.path(name)) as handle:
            handle.write(payload)

    def save_arrays(self, name: str, **arrays: Any) -> None:
        """``<experiment>/<name>`` an .npz of ``arrays``, atomically (process 0 only)."""
        from gandissect_jax.dissection.resume import atomic_file

        if not _leader():
            return
        with atomic_file(self.path(name)) as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})

    def step(self, name: str, compute) -> dict[str, np.ndarray]:
        """Arrays of step ``name``: loaded when a previous run finished it, else ``compute()``d
        (a dict of arrays), saved as ``<name>.npz`` and marked done.

        In a multi-process run process 0 decides and loads, and every process returns its arrays;
        or every process calls ``compute()`` (which may run collectives) and process 0 saves."""
        path = self.path(name + ".npz")

        def read() -> bytes | None:  # on process 0: the finished step's file, checked
            if not self.done(name) or not os.path.exists(path):
                return None
            with open(path, "rb") as handle:
                data = handle.read()
            _npz_arrays(data, path)
            return data

        data = _leader_bytes(read)
        if data is not None:
            return _npz_arrays(data, path)
        arrays = compute()
        self.save_arrays(name + ".npz", **arrays)
        self.mark(name)
        return {k: np.asarray(v) for k, v in arrays.items()}


def _npz_arrays(data: bytes, path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file's bytes; ValueError naming ``path`` when they are not one."""
    import zipfile

    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with arrays:
            return {k: arrays[k].copy() for k in arrays.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is unreadable ({err}); remove it to compute it again") from err


def register(experiment: Experiment, title: str, summary: Mapping[str, Any] | None = None) -> None:
    """Add (or update) the experiment in ``<outdir>/intervention/index.json`` and ``index.html``,
    then refresh the dissection report's rankings and links (:func:`gandissect_jax.dissection.rankings.
    refresh_report`). Process 0 only (a no-op on the others)."""
    from gandissect_jax.dissection.resume import atomic_write_json
    from gandissect_jax.dissection.rankings import refresh_report

    if not _leader():
        return  # process 0 alone writes the index
    outdir = experiment.outdir
    with intervention_lock(outdir):
        path = os.path.join(outdir, INTERVENTION, "index.json")
        index = {"experiments": []}
        if os.path.exists(path):
            try:
                with open(path) as handle:
                    index = untrusted_json.load(handle)
            except (OSError, ValueError):
                index = {"experiments": []}
        entry = {"kind": experiment.kind, "layer": experiment.layer, "name": experiment.name,
                 "title": title, "page": experiment.relative + "/page.html",
                 "json": experiment.relative + f"/{experiment.kind}.json", **(dict(summary) if summary else {})}
        kept = [e for e in index.get("experiments", []) if isinstance(e, dict) and e.get("page") != entry["page"]]
        index = {"experiments": sorted(kept + [entry], key=lambda e: (e["kind"], e["layer"], e["name"]))}
        atomic_write_json(path, index)
        write_index(outdir, index)
        refresh_report(outdir)


def write_index(outdir: str, index: Mapping[str, Any]) -> None:
    """``<outdir>/intervention/index.html``: a table of the experiments linking their pages."""
    from gandissect_jax.dissection.resume import atomic_file
    from gandissect_jax.pages import page

    rows = "".join(
        f"<tr><td>{html.escape(e['kind'])}</td><td>{html.escape(e['layer'])}</td>"
        f"<td><a href=\"{html.escape(e['page'][len(INTERVENTION) + 1:], quote=True)}\">{html.escape(e['title'])}</a></td></tr>"
        for e in index["experiments"])
    report = ('<p><a href="../dissect.html">dissection report</a></p>'
              if os.path.exists(os.path.join(outdir, "dissect.html")) else "")
    body = f"{report}<table><tr><th>experiment</th><th>layer</th><th>page</th></tr>{rows}</table>"
    with atomic_file(os.path.join(outdir, INTERVENTION, "index.html"), "w") as handle:
        handle.write(page("Intervention experiments", body))
