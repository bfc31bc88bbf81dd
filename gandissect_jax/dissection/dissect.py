"""Dissection end to end: check the inputs, run the passes, score every layer, write scores, strips and the report.

:func:`dissect` takes any dissection source (:mod:`.sources`) and a :class:`~.config.DissectConfig`;
:func:`dissect_features` and :func:`dissect_generator` build the source from arrays or from a
generator and a segmenter. Data flows source -> :mod:`.passes` (``tally`` over the data: exact
quantiles, then counts) -> :func:`~.analysis.score_layer` -> ``scores.npz``, :mod:`.strips`,
:mod:`.report`. With ``outdir``, one run at a time may write there (a lock), every file is
written atomically, and a rerun with the same settings resumes where the last one stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from . import passes
from .analysis import score_layer
from .config import DissectConfig
from .engine import make_mesh
from .labels import label_category_indices, labels_and_categories
from .memory import plan_dissection
from .report import safe_dir_name, write_report
from .results import LayerDissection
from .resume import RunDirectory, digest, outdir_lock
from .sources import DEFAULT_MICRO_BATCH, ArraySource, GeneratorSource
from .strips import write_strips


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


def _check_levels(levels: Mapping[str, Any] | None, source) -> dict[str, np.ndarray] | None:
    if levels is None:
        return None
    checked = {}
    for layer in source.layers:
        if layer not in levels:
            raise ValueError(f"no levels given for layer {layer!r}")
        value = np.asarray(levels[layer], np.float32).reshape(-1)
        units = source.feature_shapes[layer][2]
        if value.shape != (units,):
            raise ValueError(f"levels for layer {layer!r} have {value.size} entries; the layer has {units} units")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"levels for layer {layer!r} contain NaN or inf")
        checked[layer] = value
    return checked


def dissect(source, labels, categories: Sequence[str] | None, config: DissectConfig, *, default_threshold: str,
            levels: Mapping[str, Any] | None = None, devices=None, outdir: str | None = None
            ) -> dict[str, LayerDissection]:
    """Dissect every layer of ``source`` against its segmentations; returns {layer: LayerDissection}.

    source: a dissection source (:class:`~.sources.ArraySource`, :class:`~.sources.GeneratorSource`
    or one like them); labels, categories: as :func:`~.labels.labels_and_categories`;
    default_threshold: the rule when ``config.threshold`` is None; levels: fixed thresholds
    {layer: (U,)} (rule 'levels'); devices: local devices to shard over (default: all).
    """
    labels, categories = labels_and_categories(labels, categories)
    label_category = label_category_indices(labels, categories)
    threshold, search_iqr = config.resolved_threshold(default_threshold, levels is not None)
    levels = _check_levels(levels, source)
    dirnames = _dir_names(source.layers) if outdir else {}
    fingerprint = {
        "source": source.identity(), "labels": [list(l) for l in labels], "categories": categories,
        "threshold": threshold, "quantile": float(config.quantile) if threshold == "quantile" else None,
        "levels": None if levels is None else {k: digest(v) for k, v in sorted(levels.items())},
        "search_iqr": bool(search_iqr), "topk": int(config.topk),
    }
    lock = outdir_lock(outdir) if outdir else contextlib.nullcontext()
    with lock:
        run = RunDirectory(outdir, fingerprint)
        results: dict[str, LayerDissection] = {}
        pending = []
        for layer in source.layers:
            done = os.path.join(outdir, dirnames[layer], "scores.npz") if outdir else None
            if done and os.path.exists(done) and run.is_marked(f"layer-{dirnames[layer]}"):
                results[layer] = LayerDissection.load_npz(done)
            else:
                pending.append(layer)
        if pending:
            key = hashlib.sha256("\n".join(pending).encode()).hexdigest()[:12]
            settings = passes.PassSettings(make_mesh(devices), config.batch_size, config.checkpoint_every,
                                           config.progress, run.subdirectory(f"passes-{key}"), config.unit_chunk)
            plan = plan_dissection(source, pending, num_labels=len(labels), num_categories=len(categories),
                                   threshold=threshold, search_iqr=search_iqr, topk=config.topk,
                                   batch_size=config.batch_size, mesh=settings.mesh, unit_chunk=config.unit_chunk,
                                   max_memory=config.max_memory)
            if config.progress and len(plan.groups) > 1:
                print(plan.describe(), file=sys.stderr)
            results.update(_measure(source, plan.groups, labels, categories, label_category, threshold, search_iqr,
                                    levels, config, settings))
            for layer in pending:
                if outdir:
                    layer_dir = os.path.join(outdir, dirnames[layer])
                    os.makedirs(layer_dir, exist_ok=True)
                    results[layer].save_npz(os.path.join(layer_dir, "scores.npz"))
                    run.mark(f"layer-{dirnames[layer]}", {"layer": layer})
            run.remove(f"passes-{key}")
        ordered = {layer: results[layer] for layer in source.layers}
        if outdir:
            for layer, result in ordered.items():
                if config.make_images and not run.is_marked(f"images-{dirnames[layer]}"):
                    write_strips(os.path.join(outdir, dirnames[layer]), result, source, batch_size=config.batch_size,
                                 show_progress=config.progress)
                    run.mark(f"images-{dirnames[layer]}", {"layer": layer})
            if config.make_report:
                write_report(outdir, ordered, iou_threshold=config.iou_threshold, title=config.title,
                             settings={k: v for k, v in run.fingerprint.items() if k != "labels"},
                             has_images=config.make_images)
    return ordered


def _measure(source, groups, labels, categories, label_category, threshold, search_iqr, levels, config,
             settings: passes.PassSettings) -> dict[str, LayerDissection]:
    """Quantile passes and count pass for each unit group of the pending layers, then scores per layer."""
    label_state, measured = passes.measure_units(
        source, groups, threshold=threshold, quantile=config.quantile, search_iqr=search_iqr, fixed_levels=levels,
        topk=config.topk, label_category=label_category, num_categories=len(categories), settings=settings)
    results = {}
    for layer in list(measured):
        m = measured.pop(layer)  # score one layer at a time, releasing its counts before the next
        results[layer] = score_layer(layer, m.counts, m.levels, label_state, m.topk, label_names=labels,
                                     categories=categories, label_category=label_category, threshold=threshold,
                                     quantile=config.quantile, num_samples=source.num_samples,
                                     seg_size=source.seg_size, raw_quantile_q=passes.RAW_REPORT_Q)
        del m
    return results


def dissect_features(features, segmentations, labels, config: DissectConfig | None = None, *,
                     categories: Sequence[str] | None = None, levels=None, images=None, layer: str = "features",
                     devices=None, outdir: str | None = None, **overrides) -> dict[str, LayerDissection]:
    """Dissect precomputed activations against precomputed segmentations.

    features: float (N, h, w, U) NHWC array (numpy, memmap or jax), or a dict layer -> such array;
    segmentations: int (N, H, W, D) multilabel segmentations (0 = no label) or (N, H, W);
    labels: list of (name, category) per label number (label 0 = none), or a dict
    ``{"labels": [...], "categories": [...]}`` as in labels.json; categories: category names
    (default: from labels.json, else in order of first appearance).
    config / overrides: :class:`DissectConfig` settings (``threshold`` defaults to 'quantile': the
    exact 1 - ``quantile`` quantile of each unit's raw activations, the reference's default;
    'iqr' is the paper's information-quality-ratio search); levels: fixed thresholds (U,) (or dict
    layer -> (U,)), which override both. images: optional (N, H', W', 3) uint8 or [-1, 1] float
    images for the top-k strips. Returns {layer: LayerDissection}; with outdir, also writes
    scores.npz, strips and the report there (atomically; a rerun resumes).
    """
    config = _config(config, overrides)
    if not isinstance(features, Mapping):
        features = {layer: features}
        if levels is not None and not isinstance(levels, Mapping):
            levels = {layer: levels}
    elif levels is not None and not isinstance(levels, Mapping):
        raise ValueError("with several layers, levels must be a dict layer -> (U,) array")
    source = ArraySource(features, segmentations, images)
    return dissect(source, labels, categories, config, default_threshold="quantile", levels=levels, devices=devices,
                   outdir=outdir)


def dissect_generator(generator, segmenter, layers: Sequence[str], config: DissectConfig | None = None, *,
                      size: int = 10000, seed: int = 1, seg_downsample: int = 2, levels=None, devices=None,
                      outdir: str | None = None, identity: dict | None = None, micro_batch: int = DEFAULT_MICRO_BATCH,
                      **overrides) -> dict[str, LayerDissection]:
    """Dissect layers of a generator: for samples z_i (i < size) of RandomState(seed) normal noise,
    run h (to each layer), f (to the image) and the segmenter, and score every unit.

    generator: the generator contract (``params``, ``layer_names``, ``z_dim``, ``split(layer)``);
    segmenter: the Segmenter protocol (``labels``, ``categories``, ``segment``). The segmentation
    is taken at 1/seg_downsample of the image size (2, as the reference), and features are
    upsampled to it. config / overrides: :class:`DissectConfig` settings (``threshold`` defaults
    to 'iqr', the paper's GAN setting); levels: fixed thresholds dict layer -> (U,); identity:
    extra JSON-able facts naming the models, recorded in the run's settings; micro_batch: samples
    per generator and segmenter call on each device (results are bit-identical for any batch
    size and device count at a given micro_batch; :class:`~.sources.GeneratorSource`).
    Returns {layer: LayerDissection}.
    """
    config = _config(config, overrides)
    source = GeneratorSource(generator, segmenter, layers, size, seed, seg_downsample, identity, micro_batch)
    if levels is not None and not isinstance(levels, Mapping):
        if len(source.layers) != 1:
            raise ValueError("with several layers, levels must be a dict layer -> (U,) array")
        levels = {source.layers[0]: levels}
    return dissect(source, list(segmenter.labels), list(segmenter.categories), config, default_threshold="iqr",
                   levels=levels, devices=devices, outdir=outdir)


__all__ = ["dissect", "dissect_features", "dissect_generator"]
