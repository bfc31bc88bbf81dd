"""Dissection end to end: check the inputs, run the passes, score every layer, write scores, strips and the report.

:func:`dissect` takes any dissection source (:mod:`.sources`) and a :class:`~.config.DissectConfig`;
:func:`dissect_features` and :func:`dissect_generator` build the source from arrays or from a
generator and a segmenter. Data flows source -> :mod:`.passes` (``tally`` over the data: exact
quantiles, then counts) -> :func:`~.analysis.score_layer` -> ``scores.npz``, :mod:`.strips`,
:mod:`.report`. Every input is checked before the passes (labels, shapes, layout, every label
value of precomputed data). With ``outdir``, one run at a time may write there (a lock), every
file is written atomically, a rerun with the same identity (data content, model parameters,
settings that change numbers; :mod:`.resume`) resumes where the last one stopped, one with
another identity is refused before any work, and ``restart=True`` removes what an earlier run
wrote (and nothing else) first. The report of a rerun with fewer layers still lists the layers
earlier runs of the same identity finished there (never those of other inputs: another identity
is refused, and ``restart`` removes them). Several processes (:mod:`.distributed`) all return once
process 0 has written the outputs; its failure there fails every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import numbers
import os
import re
import sys
from typing import Any, Mapping, Sequence

from . import distributed, passes
from .analysis import score_layer
from .checks import (IGNORE_VALUES, LAYOUTS, arrange_features, aspect_agrees, check_label_values,  # noqa: F401
                     check_labels, check_levels, check_source)
from .config import MAX_SAMPLES, MAX_SEED, DissectConfig
from .engine import make_mesh
from .gallery import MAX_GALLERY_BYTES, Gallery, StripsRequest, gallery_bytes
from .groups import measure_units
from .interruption import ResumeTracker
from .labels import label_category_indices
from .memory import plan_dissection
from .progress import COUNT_PASS_COST, RunProgress
from .report import OUTPUT_FILES, safe_dir_name, write_report
from .results import LayerDissection
from .resume import ProgressFileError, RunDirectory, digest, file_sha256, outdir_lock, read_manifest
from .datasets import ModelSource
from .sources import ArraySource, GeneratorSource, Unlabelled
from .strips import thumbnail_side, write_strips


def _config(config: DissectConfig | None, overrides: Mapping[str, Any]) -> DissectConfig:
    config = config if config is not None else DissectConfig()
    if not isinstance(config, DissectConfig):
        raise TypeError(f"config must be a DissectConfig, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def _dir_names(layers: Sequence[str]) -> dict[str, str]:
    """{layer: directory name}; ValueError when two layers would share a directory (also on
    case-insensitive file systems)."""
    names = {layer: safe_dir_name(layer) for layer in layers}
    seen: dict[str, str] = {}
    for layer, name in names.items():
        other = seen.setdefault(name.lower(), layer)
        if other != layer:
            raise ValueError(f"layers {other!r} and {layer!r} would share the output directory {name!r}")
    return names


_LAYER_FILES = ("scores.npz", "dissect.json", "bargraph.svg")


def _check_outputs_are_ours(outdir: str, dirnames: Mapping[str, str]) -> None:
    """Before a run writes into ``outdir``: ValueError when a layer directory or its ``image``
    folder is a symbolic link (the outputs would land outside ``outdir``), or, where no run of
    this library was before (no ``.progress/settings.json``), when a path it would write is
    already there and no manifest (``.progress/outputs.json``) lists it -- e.g. the reference's
    own output directory, which uses the same file names. Where a run of ours was, the outputs
    are its own, listed or not (a run killed before it saved its manifest), and ``--restart``
    removes only the listed ones."""
    progress = os.path.join(outdir, ".progress")
    if not os.path.isdir(outdir):
        return
    # a run of ours was here: its outputs are ours, listed in its manifest or not (a run killed
    # before it saved the manifest); only manifest files are ever removed (--restart)
    ours_before = os.path.exists(os.path.join(progress, "settings.json"))
    ours = set(read_manifest(progress)["files"])
    links, foreign = [], []
    for name in OUTPUT_FILES:
        if os.path.lexists(os.path.join(outdir, name)) and name not in ours and not ours_before:
            foreign.append(name)
    for dirname in sorted(set(dirnames.values())):
        linked = [relative for relative in (dirname, f"{dirname}/image")
                  if os.path.islink(os.path.join(outdir, relative))]
        if linked:
            links.append(linked[0])
            continue
        layer_dir = os.path.join(outdir, dirname)
        if not os.path.isdir(layer_dir):
            continue
        candidates = [f"{dirname}/{name}" for name in _LAYER_FILES]
        image_dir = os.path.join(layer_dir, "image")
        if os.path.isdir(image_dir):
            candidates += [f"{dirname}/image/{name}" for name in sorted(os.listdir(image_dir))
                           if name.endswith("-top.jpg")]
        foreign += [c for c in candidates if os.path.lexists(os.path.join(outdir, c)) and c not in ours
                    and not ours_before]
    if links:
        raise ValueError(f"{outdir}: {', '.join(links)} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'}"
                         f"; a dissection writes its outputs inside the output directory only: remove the "
                         f"link{'s' if len(links) > 1 else ''} or choose another output directory")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{outdir} already holds {shown}, which no gandissect-jax run wrote there (another "
                         f"program's results?) and this run would overwrite; move "
                         f"{'it' if len(foreign) == 1 else 'them'} away or choose another output directory "
                         f"(nothing was written)")


def dissect(source, labels, categories: Sequence[str] | None, config: DissectConfig, *, default_threshold: str,
            levels: Mapping[str, Any] | None = None, devices=None, outdir: str | None = None, restart: bool = False
            ) -> dict[str, LayerDissection]:
    """Dissect every layer of ``source`` against its segmentations; returns {layer: LayerDissection}.

    source: a dissection source (:class:`~.sources.ArraySource`, :class:`~.sources.GeneratorSource`
    or one like them); labels, categories: as :func:`~.labels.labels_and_categories`;
    default_threshold: the rule when ``config.threshold`` is None; levels: fixed thresholds
    {layer: (U,)} (rule 'levels'); devices: local devices to shard over (default: all).
    outdir: where outputs and the resumable progress go; a rerun with the same identity (the
    data's content, the models' parameters and every setting that changes numbers) resumes,
    one with another identity raises :class:`~.resume.IdentityMismatch` before any work.
    restart: first remove what an earlier run wrote into outdir (its progress and the outputs
    in its manifest; nothing else), then start afresh.

    Everything about the input is checked before the passes start (labels, categories, sample
    count, topk, level shapes, every segmentation entry of precomputed data and the first
    batch's of a generator): ValueError naming what is wrong. A run stopped by a ValueError
    during the passes (NaN activations, labels out of range) leaves no progress behind, so the
    rerun after a fix starts afresh. Ctrl-C raises :class:`~.interruption.RunInterrupted` (an
    :class:`~.engine.Interrupted`, a KeyboardInterrupt) once the running pass is saved; its
    ``str()`` says in one line what is saved and where a rerun resumes, at any point of the run.
    """
    tracker = ResumeTracker(outdir)
    try:
        return _dissect(source, labels, categories, config, tracker, default_threshold=default_threshold,
                        levels=levels, devices=devices, outdir=outdir, restart=restart)
    except KeyboardInterrupt as stop:
        raise tracker.interrupted(stop) from None


def _dissect(source, labels, categories, config, tracker: ResumeTracker, *, default_threshold, levels, devices,
             outdir, restart) -> dict[str, LayerDissection]:
    # multi-host: a process whose inputs fail these checks stops every process (not a hang)
    with distributed.fail_together():
        labels, categories = check_labels(labels, categories)
        if not config.make_labels:  # no labelling: label 0 alone, segmentations all 0 (never computed nor read)
            if config.threshold == "iqr" or config.search_iqr:
                raise ValueError("make_labels=False (--no-labels) needs the 'quantile' threshold rule or fixed levels: "
                                 "the IQR rule chooses each unit's level by its agreement with the labels")
            default_threshold = "quantile"
            labels, categories = [labels[0]], [labels[0][1]]
            source = Unlabelled(source)
        label_category = label_category_indices(labels, categories)
        threshold, search_iqr = config.resolved_threshold(default_threshold, levels is not None)
        check_source(source, config)
        levels = check_levels(levels, source)
        dirnames = _dir_names(source.layers) if outdir else {}
        mesh = make_mesh(devices)
        # refuse what cannot fit before reading any data (the identity below streams it)
        _plan(source, source.layers, labels, categories, threshold, search_iqr, config, mesh)
        fingerprint = {
            "source": source.identity(), "labels": [list(l) for l in labels], "categories": categories,
            "threshold": threshold, "quantile": float(config.quantile) if threshold == "quantile" else None,
            "levels": None if levels is None else {k: digest(v) for k, v in sorted(levels.items())},
            "search_iqr": bool(search_iqr), "topk": config.resolved_topk(source.num_samples),
            "label_rule": config.label_rule,
        }
        if not getattr(source, "batch_invariant", False):  # results depend on how samples are grouped
            fingerprint["batch"] = {"batch_size": int(config.batch_size), "devices": int(mesh.devices.size)}
    # multi-host: the same command on every process (model names or paths may differ; digests may not)
    # and the settings that decide the passes' steps and shapes (process 0's memory plan is used everywhere)
    execution = {"batch_size": int(config.batch_size), "devices": int(mesh.devices.size),
                 "unit_chunk": config.unit_chunk, "make_images": bool(config.make_images),
                 "thumbsize": config.thumbsize, "max_memory": None if config.max_memory is None else str(config.max_memory)}
    distributed.check_same_inputs(dict(fingerprint, execution=execution),
                                  may_differ=[("source", "model"), ("source", "segmenter")])
    check_label_values(source, len(labels), mesh, config.batch_size)
    # Several processes (multi-host): only process 0 touches the outdir; it decides what is finished
    # and tells the others (distributed.py). With one process, writes == outdir.
    multi = distributed.multiprocess()
    writes = outdir if distributed.is_leader() else None
    if not distributed.is_leader():
        config = config.replace(progress=False)

    def score_file(layer):
        return os.path.join(outdir, dirnames[layer], "scores.npz")

    with contextlib.ExitStack() as stack:
        def open_run() -> RunDirectory:
            if writes:
                stack.enter_context(outdir_lock(writes))
                _check_outputs_are_ours(writes, dirnames)
            return RunDirectory(writes, fingerprint, restart=restart)

        def finished(run: RunDirectory, say: bool = True) -> list[str]:
            """The layers this run finished whose scores.npz is still the one it wrote (a file
            changed or replaced since is measured again, with a line saying so)."""
            done = []
            for layer in source.layers:
                marker = run.marker(f"layer-{dirnames[layer]}") if writes else None
                if marker is None or not os.path.exists(score_file(layer)):
                    continue
                if isinstance(marker, dict) and "sha256" in marker and file_sha256(score_file(layer)) != marker["sha256"]:
                    if say:
                        print(f"{score_file(layer)} was changed since this run wrote it: measuring layer {layer} "
                              "again", file=sys.stderr)
                    continue
                done.append(layer)
            return done

        results: dict[str, LayerDissection] = {}
        if multi:
            opened: list[RunDirectory] = []

            def decide() -> list[str]:  # on process 0; its errors (a busy outdir, another run) reach every process
                opened.append(open_run())
                return finished(opened[0])

            done = distributed.leader_json(decide)
            run = opened[0] if opened else RunDirectory(None, fingerprint)
            for layer in done:
                results[layer] = LayerDissection.load_npz(io.BytesIO(distributed.leader_file(score_file(layer))))
        else:
            run = open_run()
            done = finished(run)
            for layer in done:
                results[layer] = LayerDissection.load_npz(score_file(layer))
        pending = [layer for layer in source.layers if layer not in done]
        key = hashlib.sha256("\n".join(pending).encode()).hexdigest()[:12]
        tracker.opened(run, pending, dirnames, lambda: finished(run, say=False),
                       images=bool(writes and config.make_images), report=bool(writes and config.make_report))
        if pending:
            settings = passes.PassSettings(mesh, config.batch_size, config.checkpoint_every, config.progress,
                                           run.subdirectory(f"passes-{key}"), config.unit_chunk)
            plan = _plan(source, pending, labels, categories, threshold, search_iqr, config, mesh)
            if multi:  # hosts may differ in free memory: every process measures process 0's unit groups
                groups = distributed.leader_json(lambda: [[list(part) for part in group] for group in plan.groups])
                plan = dataclasses.replace(plan, groups=tuple(tuple((str(layer), int(start), int(stop))
                                                                    for layer, start, stop in group) for group in groups))
            if config.progress and len(plan.groups) > 1:
                print(plan.describe(), file=sys.stderr)
            # the count pass keeps what the strips draw when it runs the generator anyway (.gallery)
            strips = StripsRequest(config.thumbsize, {}) if (
                config.make_images and (outdir or multi) and getattr(source, "fetches_images", False)
                and _gallery_fits_memory(source, pending, config)) else None
            try:
                measured, galleries = _measure(source, plan.groups, labels, categories, label_category, threshold,
                                               search_iqr, levels, config, settings, tracker, strips)
                results.update(measured)
            except ProgressFileError:
                raise  # a damaged or foreign progress file: keep the run's other progress
            except ValueError:
                run.discard()  # bad input found by the passes: nothing of this run is worth resuming
                raise
        else:
            galleries = {}

        def gallery_file(layer):  # what the strips draw, kept until they are written (resume)
            return os.path.join(run.subdirectory("strips"), f"{dirnames[layer]}.npz")

        ordered = {layer: results[layer] for layer in source.layers}

        def write_outputs() -> None:  # process 0 writes; the others have nothing to write (writes is None)
            with run.recording(list(dirnames.values())):
                for layer in pending:
                    if writes:
                        layer_dir = os.path.join(outdir, dirnames[layer])
                        os.makedirs(layer_dir, exist_ok=True)
                        if layer in galleries:
                            galleries[layer].for_layer(results[layer].topk_indices).save(gallery_file(layer))
                        results[layer].save_npz(score_file(layer))
                        run.mark(f"layer-{dirnames[layer]}", {"layer": layer, "sha256": file_sha256(score_file(layer))})
                if pending and not config.keep_progress:
                    run.remove(f"passes-{key}")
                if writes:
                    for layer, result in ordered.items():
                        if config.make_images and not run.is_marked(f"images-{dirnames[layer]}"):
                            # no gallery (a source that does not fetch images, a run begun by an older
                            # version): the top-k samples are rendered again
                            kept = galleries.get(layer) or Gallery.load(gallery_file(layer))
                            image_size = getattr(source, "image_size", None)
                            if kept is not None and (image_size is None or not kept.fits(
                                    result.topk_indices, thumbnail_side(image_size[0], config.thumbsize))):
                                kept = None  # a kept file of another run or thumbnail size: render instead
                            write_strips(os.path.join(outdir, dirnames[layer]), result, source,
                                         batch_size=config.batch_size, thumbnail=config.thumbsize,
                                         show_progress=config.progress, gallery=kept)
                            run.mark(f"images-{dirnames[layer]}", {"layer": layer})
                            run.remove(os.path.join("strips", f"{dirnames[layer]}.npz"))
                    if all(run.is_marked(f"images-{name}") for name in dirnames.values()):
                        run.remove("strips")
                    if config.make_report:
                        # the layers earlier runs of these inputs finished here stay listed
                        kept = _kept_layers(run, outdir, exclude=set(dirnames.values()))
                        listed = _forward_order({**ordered, **kept}, source) if kept else ordered
                        has_images = {layer: config.make_images and run.is_marked(f"images-{safe_dir_name(layer)}")
                                      for layer in listed}
                        write_report(outdir, listed, iou_threshold=config.iou_threshold, title=config.title,
                                     settings={k: v for k, v in run.fingerprint.items() if k != "labels"},
                                     has_images=has_images)

        if multi:  # every process returns once process 0 wrote the outputs; its failure there fails them all
            distributed.leader_json(lambda: (write_outputs(), None)[1])
        else:
            write_outputs()
    return ordered


def _kept_layers(run: RunDirectory, outdir: str, exclude: set[str]) -> dict[str, LayerDissection]:
    """{layer: LayerDissection} of the layers that earlier runs of this run directory finished in
    ``outdir`` (a ``layer-<dir>`` marker in ``.progress``) besides this run's (``exclude``: their
    directory names), in the order of their names, so the report of a rerun with fewer layers
    still lists them (then all in the generator's layer order, :func:`_forward_order`). They were computed from this run's inputs: ``.progress/settings.json`` is
    this run's identity (:class:`~.resume.RunDirectory` refuses another), and ``restart`` removes
    the markers with the outputs. A layer whose ``scores.npz`` was changed or removed since is
    left out, with a line saying so."""
    kept = {}
    for name, marker in sorted(run.markers("layer-").items()):
        if name in exclude or not isinstance(marker, dict) or not isinstance(marker.get("layer"), str):
            continue
        layer = marker["layer"]
        path = os.path.join(outdir, name, "scores.npz")
        if safe_dir_name(layer) != name or not os.path.isfile(path) or file_sha256(path) != marker.get("sha256"):
            print(f"{path} was changed or removed since a run wrote it: layer {layer} is left out of the report",
                  file=sys.stderr)
            continue
        kept[layer] = LayerDissection.load_npz(path)
    return dict(sorted(kept.items()))


def _forward_order(results: dict[str, LayerDissection], source) -> dict[str, LayerDissection]:
    """``results`` in the generator's layer order (``source.generator.layer_names``), layers it does
    not name after them in natural order of their names (layer2 before layer10)."""
    names = list(getattr(getattr(source, "generator", None), "layer_names", None) or ())

    def key(layer: str):
        natural = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", layer))
        return (names.index(layer) if layer in names else len(names), natural)

    return {layer: results[layer] for layer in sorted(results, key=key)}


def _gallery_fits_memory(source, layers, config) -> bool:
    """Whether the count pass may keep the strips' gallery (:mod:`.gallery`) of ``layers`` within
    :data:`~.gallery.MAX_GALLERY_BYTES`; else the strips render the top-k samples again."""
    k = config.resolved_topk(source.num_samples)
    shapes = {layer: (source.feature_shapes[layer][2], k) + tuple(source.feature_shapes[layer][:2]) for layer in layers}
    side = thumbnail_side(source.image_size[0], config.thumbsize)
    return gallery_bytes(source.num_samples, shapes, side) <= MAX_GALLERY_BYTES


def _plan(source, layers, labels, categories, threshold, search_iqr, config, mesh):
    """The memory plan of measuring ``layers`` (:func:`~.memory.plan_dissection`); MemoryBudgetError
    when one unit does not fit the budget."""
    return plan_dissection(source, list(layers), num_labels=len(labels), num_categories=len(categories),
                           threshold=threshold, search_iqr=search_iqr, topk=config.resolved_topk(source.num_samples),
                           batch_size=config.batch_size, mesh=mesh, unit_chunk=config.unit_chunk,
                           max_memory=config.max_memory)


def _measure(source, groups, labels, categories, label_category, threshold, search_iqr, levels, config,
             settings: passes.PassSettings, tracker: ResumeTracker, strips: StripsRequest | None = None
             ) -> tuple[dict[str, LayerDissection], dict[str, Gallery]]:
    """Quantile passes and count pass for each unit group of the pending layers, then scores per
    layer; returns ({layer: LayerDissection}, {layer: Gallery} (with ``strips``))."""
    units = {layer: stop - start for layer, start, stop in groups[0]}
    plans = passes.quantile_plans(units, threshold, config.quantile, search_iqr)
    stages = max((len(planner.bits) for plan in plans.values() for _, planner in plan.planners()
                  if planner is not None), default=1)
    names = [f"quantiles-{i}" for i in range(stages)] + ["counts"]  # the passes of every unit group
    progress = None
    if len(groups) == 1:  # one overall bar over the passes (with several groups each pass shows its own bar)
        count_cost = COUNT_PASS_COST.get(source.identity().get("kind"), 4.0)  # a prior; measured as the pass runs
        progress = RunProgress(source.num_samples, names, costs={"counts": count_cost},
                               enabled=bool(settings.progress))
    watched = tracker.passes(progress or settings.progress, names, len(groups), settings.directory)
    settings = dataclasses.replace(settings, progress=watched)
    try:
        label_state, measured = measure_units(
            source, groups, threshold=threshold, quantile=config.quantile, search_iqr=search_iqr, fixed_levels=levels,
            topk=config.resolved_topk(source.num_samples), label_category=label_category,
            num_categories=len(categories), settings=settings, strips=strips, keep_progress=config.keep_progress)
    finally:
        if progress is not None:
            progress.close()
    results, galleries = {}, {}
    for layer in list(measured):
        m = measured.pop(layer)  # score one layer at a time, releasing its counts before the next
        results[layer] = score_layer(layer, m.counts, m.levels, label_state, m.topk, label_names=labels,
                                     categories=categories, label_category=label_category, threshold=threshold,
                                     quantile=config.quantile, num_samples=source.num_samples,
                                     seg_size=source.seg_size, raw_quantile_q=passes.RAW_REPORT_Q,
                                     label_rule=config.label_rule)
        if m.gallery is not None:
            galleries[layer] = m.gallery
        del m
    return results, galleries


def dissect_features(features, segmentations, labels, config: DissectConfig | None = None, *,
                     categories: Sequence[str] | None = None, levels=None, images=None, layer: str = "features",
                     layout: str = "nhwc", devices=None, outdir: str | None = None, restart: bool = False,
                     **overrides) -> dict[str, LayerDissection]:
    """Dissect precomputed activations against precomputed segmentations.

    features: float (N, h, w, U) NHWC array (numpy, memmap or jax), or a dict layer -> such array;
    with ``layout='nchw'`` they are (N, U, h, w), channels first as PyTorch saves them. A layer
    whose feature map's aspect ratio differs from the segmentations' is refused (a sign of the
    wrong layout). segmentations: int (N, H, W, D) multilabel segmentations (0 = no label) or
    (N, H, W), every entry in [0, L) (checked before the passes);
    labels: list of (name, category) per label number (label 0 = none), or a dict
    ``{"labels": [...], "categories": [...]}`` as in labels.json; categories: category names
    (default: from labels.json, else in order of first appearance).
    config / overrides: :class:`DissectConfig` settings (``threshold`` defaults to 'quantile': the
    exact 1 - ``quantile`` quantile of each unit's raw activations, the reference's default;
    'iqr' is the paper's information-quality-ratio search); levels: fixed thresholds (U,) (or dict
    layer -> (U,)), which override both. images: optional (N, H', W', 3) uint8 or [-1, 1] float
    images for the top-k strips (floats a little beyond saturate; other dtypes, NaN/inf and floats
    beyond [-2, 2], such as 0-255 floats, are refused by the content scan, before any pass). Returns {layer: LayerDissection}; with outdir, also writes
    scores.npz, strips and the report there (atomically; a rerun with the same data -- compared
    by a sha256 of every byte -- and settings resumes; ``restart=True`` starts afresh).
    ValueError naming the argument for anything out of range (see :func:`dissect`).
    """
    # multi-host: a process whose arguments fail these checks stops every process (not a hang)
    with distributed.fail_together():
        config = _config(config, overrides)
        if not isinstance(features, Mapping):
            features = {layer: features}
            if levels is not None and not isinstance(levels, Mapping):
                levels = {layer: levels}
        elif levels is not None and not isinstance(levels, Mapping):
            raise ValueError("with several layers, levels must be a dict layer -> (U,) array")
        features = arrange_features(features, segmentations, layout)
        source = ArraySource(features, segmentations, images, identity={"layout": layout})
    return dissect(source, labels, categories, config, default_threshold="quantile", levels=levels, devices=devices,
                   outdir=outdir, restart=restart)


def _check_generator_arguments(layers, size, seed, seg_downsample) -> list[str]:
    def integer(value, low, high):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high

    if isinstance(layers, str) or not all(isinstance(layer, str) for layer in layers):
        raise ValueError(f"layers must be a list of layer names, e.g. ['layer4'], got {layers!r}")
    if not integer(size, 1, MAX_SAMPLES):
        raise ValueError(f"size must be an integer in [1, {MAX_SAMPLES}], got {size!r}")
    if not integer(seed, 0, MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if not integer(seg_downsample, 1, 4096):
        raise ValueError(f"seg_downsample must be an integer in [1, 4096], got {seg_downsample!r}")
    return list(layers)


def dissect_generator(generator, segmenter, layers: Sequence[str], config: DissectConfig | None = None, *,
                      size: int = 10000, seed: int = 1, seg_downsample: int = 2, levels=None, devices=None,
                      outdir: str | None = None, restart: bool = False, identity: dict | None = None,
                      micro_batch: int | None = None, compute_dtype: str = "float32",
                      **overrides) -> dict[str, LayerDissection]:
    """Dissect layers of a generator: for samples z_i (i < size) of RandomState(seed) normal noise,
    run h (to each layer), f (to the image) and the segmenter, and score every unit.

    generator: the Generator protocol (``params``, ``layer_names``, ``z_dim``, ``apply``,
    ``split(layer)``); every layer's split is checked first (``f(h(z)) == G(z)`` on a probe
    batch, :func:`~gandissect_jax.generator.verify_split`), so a split that ignores side inputs
    is refused before any pass;
    segmenter: the Segmenter protocol (``labels``, ``categories``, ``segment``). The segmentation
    is taken at 1/seg_downsample of the image size (2, as the reference), and features are
    upsampled to it. size: samples, in [1, 2**31 - 1]; seed: in [0, 2**32 - 1]; seg_downsample:
    in [1, 4096] and at most the image size. config / overrides: :class:`DissectConfig` settings
    (``threshold`` defaults to 'iqr', the paper's GAN setting); levels: fixed thresholds dict
    layer -> (U,); identity: extra JSON-able facts naming the models, recorded in the run's
    settings (the run's identity already holds a sha256 of both models' parameters, its seed,
    size, batch size and device count). restart: see :func:`dissect`. micro_batch: samples per
    generator and segmenter call on each device (None: the segmenter's ``dissection_micro_batch``,
    4 for the unified-parsing UPerNet, else 32: :func:`~.sources.default_micro_batch`; results
    are bit-identical for any batch size and device count at a given micro_batch;
    :class:`~.sources.GeneratorSource`). compute_dtype:
    'float32' (default) or 'bfloat16', the dtype the generator and the segmenter compute in
    (features are statistics in float32 either way; part of the run's identity).
    Returns {layer: LayerDissection}. ValueError naming the argument for anything out of range.
    """
    # multi-host: a process whose arguments fail these checks stops every process (not a hang)
    with distributed.fail_together():
        config = _config(config, overrides)
        layers = _check_generator_arguments(layers, size, seed, seg_downsample)
        source = GeneratorSource(generator, segmenter, layers, size, seed, seg_downsample, identity, micro_batch,
                                 compute_dtype)
        if levels is not None and not isinstance(levels, Mapping):
            if len(source.layers) != 1:
                raise ValueError("with several layers, levels must be a dict layer -> (U,) array")
            levels = {source.layers[0]: levels}
    return dissect(source, list(segmenter.labels), list(segmenter.categories), config, default_threshold="iqr",
                   levels=levels, devices=devices, outdir=outdir, restart=restart)


def dissect_model(model, data, layers: Sequence[str], labels, config: DissectConfig | None = None, *,
                  categories: Sequence[str] | None = None, levels=None, devices=None, outdir: str | None = None,
                  restart: bool = False, identity: dict | None = None, **overrides) -> dict[str, LayerDissection]:
    """Dissect layers of a model of images (e.g. a classifier) against a labelled dataset's label maps.

    model: a Generator-protocol object whose input is an image batch, such as
    ``split_module(module, params, at=..., input_shape=(H, W, 3))``; data: a source of
    ``{"image", "label"}`` by example number such as :class:`~.datasets.TfdsSource`; labels /
    categories: the names of the data's label numbers (label 0 = none), as
    :func:`dissect_features`. config / overrides: :class:`DissectConfig` settings (``threshold``
    defaults to 'quantile', the Network Dissection rule). The run's identity holds a sha256 of the
    model's parameters, the data's identity and the batch size; restart: see :func:`dissect`.
    Returns {layer: LayerDissection}.
    """
    # multi-host: a process whose arguments fail these checks stops every process (not a hang)
    with distributed.fail_together():
        config = _config(config, overrides)
        source = ModelSource(model, data, layers, identity)
        if levels is not None and not isinstance(levels, Mapping):
            if len(source.layers) != 1:
                raise ValueError("with several layers, levels must be a dict layer -> (U,) array")
            levels = {source.layers[0]: levels}
    return dissect(source, labels, categories, config, default_threshold="quantile", levels=levels, devices=devices,
                   outdir=outdir, restart=restart)


__all__ = ["dissect", "dissect_features", "dissect_generator", "dissect_model"]
