"""The dissection's passes over the data, each one ``tally``: exact quantile passes, then one count pass.

1. *Quantile passes* (features only; a generator runs just ``h``). Stage 0 collects the top-k
   samples per unit, checks for non-finite activations and histograms the top 16 bits of the
   order-preserving key of (a) the raw activations (for ``threshold='quantile'``) and (b) the
   upsampled activations (for the IQR search's candidate levels). Stages 1 and 2 refine only
   the bins holding the wanted order statistics, 8 bits at a time, so the quantiles are exact.
   The plan is saved after every stage, so a rerun skips finished stages.
2. :func:`count_levels` sorts, per unit, the levels to count at (the IQR candidates and the
   fixed level, if any).
3. *Count pass* (features + segmentation). For every unit it histograms the upsampled
   activations over the intervals between its sorted levels, per category and per label, with
   the label pixel counts and category presence. Every count at every level follows exactly by
   suffix sums (:mod:`.analysis`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import shutil
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import distributed, engine, gallery
from . import statistics as st
from .quantiles import RadixQuantiles, RadixStage, radix_histogram
from .resume import UNREADABLE, ProgressFileError, atomic_file
from .threshold_search import IQR_FRACTIONS
from .upsample import upsample_bilinear_unit_major

RAW_REPORT_Q = (0.5, 0.9, 0.99, 0.995, 0.999)
STREAMS = ("raw", "up")


@dataclasses.dataclass
class QuantilePlan:
    """The exact-quantile refinement of one layer: raw activations and upsampled activations."""

    num_units: int
    raw: RadixQuantiles | None
    up: RadixQuantiles | None

    def planners(self):
        return (("raw", self.raw), ("up", self.up))


@dataclasses.dataclass
class LayerLevels:
    """The J levels each unit of a layer is counted at.

    sorted: float32 (U, J) ascending per unit; position: int (U, J) sorted position of each
    column (the F IQR candidates first, then the fixed level); candidates: float32 (U, F) or None;
    fixed: float32 (U,) or None; raw_quantiles: float32 (U, Q) at RAW_REPORT_Q (+ the rule's q) or None.
    """

    sorted: np.ndarray
    position: np.ndarray
    candidates: np.ndarray | None
    fixed: np.ndarray | None
    raw_quantiles: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class PassSettings:
    """What every pass needs besides the data: mesh, batch size, checkpoints and progress display."""

    mesh: Any
    batch_size: int
    checkpoint_every: float
    progress: bool
    directory: str | None  # where pass checkpoints and the quantile plan live (None: no resume)
    unit_chunk: int | None

    def checkpoint_dir(self, name: str) -> str | None:
        return os.path.join(self.directory, name) if self.directory else None


# ----------------------------------------------------------------------------- quantile passes


def _unit_slice(slices: Mapping[str, tuple[int, int]] | None, layer: str, num_units: int) -> tuple[int, int]:
    start, stop = slices[layer] if slices is not None and layer in slices else (0, num_units)
    if stop - start != num_units:
        raise ValueError(f"layer {layer!r}: unit slice {start}:{stop} does not hold {num_units} units")
    return int(start), int(stop)


def _units(features, params, layer: str, size: int):
    """The ``size`` units of ``features`` (n, ..., U) from ``params[layer + "/start"]`` on (the whole
    array when size == U). The start is a traced value, so groups of equal size share one program."""
    if size == features.shape[-1]:
        return features
    return lax.dynamic_slice_in_dim(features, params[f"{layer}/start"], size, axis=features.ndim - 1)


def _starts(slices: Mapping[str, tuple[int, int]] | None) -> dict[str, np.ndarray]:
    return {f"{layer}/start": np.int32(start) for layer, (start, _) in (slices or {}).items()}


def _stage_spec(plans: Mapping[str, QuantilePlan], seg_size, stage_index: int, topk: int, unit_chunk,
                slices: Mapping[str, tuple[int, int]] | None = None) -> tuple:
    """Hashable description of a quantile stage (shapes only), the key of its compiled step."""
    layers = []
    for layer, plan in plans.items():
        streams = []
        for stream, planner in plan.planners():
            if planner is not None and not planner.done:
                stage = planner.stage()
                streams.append((stream, stage.bits, stage.num_slots, tuple((t.shape, t.dtype.str) for t in stage.tables)))
        _unit_slice(slices, layer, plan.num_units)
        layers.append((layer, plan.num_units, tuple(streams)))
    return tuple(layers), tuple(seg_size), stage_index, int(topk), unit_chunk


@functools.lru_cache(maxsize=32)
def _quantile_stage(spec: tuple):
    """(compute, statistics) of one quantile stage for every layer (cached by shapes, so jit is reused)."""
    layers, seg_size, stage_index, topk, unit_chunk = spec
    stats: dict[str, st.StreamingStatistic] = {}
    for layer, num_units, streams in layers:
        if stage_index == 0:
            stats[f"{layer}/topk"] = st.top_k(num_units, topk)
            stats[f"{layer}/nonfinite"] = st.nonfinite_counts(num_units)
        for stream, bits, num_slots, table_shapes in streams:
            stage = RadixStage(bits, tuple(np.zeros(shape, dtype) for shape, dtype in table_shapes), num_slots)
            stats[f"{layer}/{stream}"] = radix_histogram(num_units, stage, unit_chunk)

    def compute(tables, batch):
        outputs = {}
        for layer, num_units, _ in layers:
            features = _units(batch[layer], tables, layer, num_units)
            n = features.shape[0]
            raw = features.reshape(n, -1, num_units)
            if f"{layer}/topk" in stats:
                outputs[f"{layer}/topk"] = (raw.max(axis=1), batch["index"])
                outputs[f"{layer}/nonfinite"] = raw
            if f"{layer}/raw" in stats:
                outputs[f"{layer}/raw"] = (tables[f"{layer}/raw"], jnp.transpose(raw, (2, 0, 1)))
            if f"{layer}/up" in stats:
                up = upsample_bilinear_unit_major(features, seg_size).reshape(num_units, n, -1)
                outputs[f"{layer}/up"] = (tables[f"{layer}/up"], up)
        return outputs

    return compute, stats


def quantile_plans(units: Mapping[str, int], threshold: str, quantile: float, search_iqr: bool) -> dict:
    """Fresh :class:`QuantilePlan` per layer: raw quantiles at RAW_REPORT_Q (+ 1 - quantile for the
    quantile rule), upsampled quantiles at 1 - IQR_FRACTIONS for the IQR search."""
    raw_q = np.array(RAW_REPORT_Q + ((1.0 - float(quantile),) if threshold == "quantile" else ()), np.float64)
    fracs = IQR_FRACTIONS.astype(np.float64)
    want_raw = threshold == "quantile" or search_iqr
    return {layer: QuantilePlan(count, RadixQuantiles(count, raw_q) if want_raw else None,
                                RadixQuantiles(count, 1.0 - fracs) if search_iqr else None)
            for layer, count in units.items()}


def _save_plan(path: str, plans, topk, stage_index: int, progress=None) -> None:
    """Write the quantile plan after stage ``stage_index - 1``; tell ``progress`` (an
    :class:`~.interruption.ResumeTracker` follows what is on disk) that this pass is saved."""
    arrays: dict[str, Any] = {"layers": np.asarray(list(plans), dtype=str), "stage_index": np.int64(stage_index)}
    for layer, plan in plans.items():
        for stream, planner in plan.planners():
            if planner is not None:
                for key, value in planner.state_dict().items():
                    arrays[f"{layer}/{stream}/{key}"] = value
        arrays[f"{layer}/topk_values"], arrays[f"{layer}/topk_indices"] = topk[layer]
    with atomic_file(path) as handle:
        np.savez(handle, **arrays)
    saved = getattr(progress, "result_saved", None)
    if saved is not None:
        saved(f"quantiles-{stage_index - 1}")


def _load_plan(path, plans, name: str | None = None) -> tuple[int, dict]:
    """(stage index, {layer: top-k}) of the quantile plan at ``path`` (a file, or its bytes); (0, {})
    for a plan of other layers. ValueError naming the file (``name``) when it is damaged or foreign."""
    try:
        return _read_plan(path, plans)
    except UNREADABLE as err:
        raise ProgressFileError(f"quantile plan {name or path} cannot be read ({err}); remove it to start afresh "
                         f"(or rerun with --restart)") from err


def _read_plan(path, plans) -> tuple[int, dict]:
    topk = {}
    with np.load(path, allow_pickle=False) as data:
        if [str(x) for x in data["layers"]] != list(plans):
            return 0, {}
        for layer, plan in plans.items():
            for stream, planner in plan.planners():
                if planner is not None:
                    prefix = f"{layer}/{stream}/"
                    planner.load_state_dict({key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)})
            topk[layer] = (data[f"{layer}/topk_values"], data[f"{layer}/topk_indices"])
        return int(data["stage_index"]), topk


def quantile_passes(source, plans: dict[str, QuantilePlan], seg_size, topk: int, settings: PassSettings,
                    slices: Mapping[str, tuple[int, int]] | None = None) -> dict:
    """Run the quantile stages until every plan is resolved; returns {layer: (topk values, indices)}.

    source: a features-only source (``{layer: (n, h, w, U)}``); slices: {layer: (start, stop)},
    the units of each layer the plans cover (default: all). ValueError naming the layer and
    units when an activation is NaN or inf.
    """
    plan_path = settings.checkpoint_dir("plan.npz")
    stage_index, best = (0, {})
    if distributed.multiprocess():  # process 0 reads the plan; every process continues from it
        data = distributed.leader_file(plan_path)
        if data is not None:
            stage_index, best = _load_plan(io.BytesIO(data), plans, plan_path)
    elif plan_path and os.path.exists(plan_path):
        stage_index, best = _load_plan(plan_path, plans)
    while stage_index == 0 or any(p is not None and not p.done for plan in plans.values() for _, p in plan.planners()):
        spec = _stage_spec(plans, seg_size, stage_index, topk, settings.unit_chunk, slices)
        compute, stats = _quantile_stage(spec)
        # host tables, placed on the devices by tally (no extra device copy)
        tables = {f"{layer}/{stream}": tuple(planner.stage().tables)
                  for layer, plan in plans.items() for stream, planner in plan.planners()
                  if planner is not None and not planner.done}
        tables.update(_starts(slices))
        name = f"quantiles-{stage_index}"
        results = engine.tally(compute, source, stats, params=tables, mesh=settings.mesh,
                               batch_size=settings.batch_size, checkpoint_dir=settings.checkpoint_dir(name),
                               checkpoint_every=settings.checkpoint_every, progress=settings.progress, desc=name,
                               final_checkpoint=False)  # its results go into the plan, saved below
        for layer, plan in plans.items():
            if stage_index == 0:
                bad = results[f"{layer}/nonfinite"]
                if bad.any():
                    units = np.flatnonzero(bad) + _unit_slice(slices, layer, plan.num_units)[0]
                    raise ValueError(f"layer {layer!r}: {int(bad.sum())} NaN/inf activations in units "
                                     f"{units[:10].tolist()}{'...' if units.size > 10 else ''}")
                best[layer] = results[f"{layer}/topk"]
            for stream, planner in plan.planners():
                if f"{layer}/{stream}" in results:
                    planner.observe(results.pop(f"{layer}/{stream}"))
        del results  # the stage's histograms are consumed; do not hold them through the next stage
        stage_index += 1
        if plan_path:
            _save_plan(plan_path, plans, best, stage_index, settings.progress)
            engine_dir = settings.checkpoint_dir(name)
            if os.path.isdir(engine_dir):  # superseded by the plan
                shutil.rmtree(engine_dir)
    return best


# ----------------------------------------------------------------------------- levels


def count_levels(plan: QuantilePlan, threshold: str, fixed_levels: np.ndarray | None, search_iqr: bool) -> LayerLevels:
    """Sort, per unit, the levels the count pass histograms at (IQR candidates, then the fixed level)."""
    raw_quantiles = plan.raw.quantiles() if plan.raw is not None else None
    fixed = raw_quantiles[:, -1] if threshold == "quantile" else fixed_levels if threshold == "levels" else None
    candidates = plan.up.quantiles() if search_iqr else None  # (U, F), in fraction order
    columns = [c for c in (candidates, None if fixed is None else fixed[:, None]) if c is not None]
    all_levels = np.concatenate(columns, axis=1).astype(np.float32)  # (U, J)
    order = np.argsort(all_levels, axis=1, kind="stable")
    sorted_levels = np.take_along_axis(all_levels, order, 1)
    position = np.argsort(order, axis=1)  # column -> sorted position
    return LayerLevels(sorted_levels, position, candidates, fixed, raw_quantiles)


# ----------------------------------------------------------------------------- count pass


@functools.lru_cache(maxsize=32)
def _count_stage(spec: tuple):
    """(compute, statistics) of the count pass; spec = (((layer, U, J), ...), L, C, seg_size, unit_chunk,
    gallery, check_images), gallery = None or (D wanted samples, image size, thumbnail, slots, ((layer,
    k, h, w), ...)); check_images: the batches hold the generated images, counted when not finite."""
    layers, num_labels, num_categories, seg_size, unit_chunk, strips, check_images = spec
    stats: dict[str, st.StreamingStatistic] = {"labels": st.label_statistics(num_labels, num_categories)}
    if check_images:
        stats["images/nonfinite"] = st.nonfinite_samples()
    for layer, num_units, num_levels in layers:
        stats[f"{layer}/counts"] = st.level_counts(num_units, num_labels, num_levels, num_categories, unit_chunk)
    if strips is not None:
        stats.update(gallery.statistics(strips, {layer: units for layer, units, _ in layers}))

    def compute(params, batch):
        valid = batch["valid"]
        labels = batch["labels"]
        if tuple(labels.shape[1:3]) != tuple(seg_size):
            raise ValueError(f"segmentation size {tuple(labels.shape[1:3])} differs from the expected {seg_size}")
        n = labels.shape[0]
        labels = labels.reshape(n, -1, labels.shape[-1])
        presence = st.image_label_presence(labels, valid, num_labels)
        categories = st.image_category_presence(presence, params["label_category"], num_categories, valid)
        dedup = st.dedup_channels(labels)
        outputs = {"labels": (labels, dedup, categories)}
        for layer, num_units, _ in layers:
            features = _units(batch[layer], params, layer, num_units)
            up = upsample_bilinear_unit_major(features, seg_size).reshape(num_units, n, -1)
            outputs[f"{layer}/counts"] = (up, params[f"{layer}/levels"], dedup, categories)
            if strips is not None:
                outputs[f"{layer}/maps"] = (features, params[f"{layer}/topk"], batch["index"])
        if strips is not None:
            outputs["thumbnails"] = (batch["images"], params["wanted"], batch["index"])
        if check_images:
            outputs["images/nonfinite"] = (~jnp.isfinite(batch["images"]).all(axis=(1, 2, 3)), batch["index"])
        return outputs

    return compute, stats


def _counts_dir(strips_spec: tuple | None, check_images: bool = False) -> str:
    """The count pass's checkpoint directory: its statistics (and so its checkpoint) change with what
    it keeps for the strips (thumbnail side, image slots per device), which a rerun may change
    with the batch size, the devices or ``thumbsize``, and with the check of generated images;
    each kind resumes only from its own."""
    if strips_spec is None:
        return "counts-images-checked" if check_images else "counts"
    return "counts-strips-" + hashlib.sha256(repr((strips_spec, check_images)).encode()).hexdigest()[:12]


def count_pass(source, levels: Mapping[str, LayerLevels], label_category: np.ndarray, num_categories: int,
               seg_size, settings: PassSettings, slices: Mapping[str, tuple[int, int]] | None = None,
               strips: gallery.StripsRequest | None = None, final_checkpoint: bool = True
               ) -> tuple[st.LabelState, dict[str, st.LevelCountState], dict[str, gallery.Gallery]]:
    """Histogram every unit's upsampled activations between its sorted levels, per category and label.

    slices: {layer: (start, stop)}, the units of each layer that ``levels`` cover (default: all).
    strips: also keep what the image strips of these units draw (:mod:`.gallery`; the source
    must fetch images). final_checkpoint: see :func:`~.engine.tally`. A source that generates its
    images (``fetches_images``: :class:`~.sources.GeneratorSource`) also has every image checked:
    a NaN / inf image would still be segmented (e.g. all "sky") and bias every IoU.
    Returns (label statistics, {layer: level counts}, {layer: Gallery} (empty without strips)).
    ValueError when a segmentation entry lies outside [0, L), or naming how many generated images
    are not finite and the first sample number.
    """
    num_labels = len(label_category)
    for layer, info in levels.items():
        _unit_slice(slices, layer, info.sorted.shape[0])
    params = {"label_category": np.asarray(label_category, np.int32)}
    params.update({f"{layer}/levels": np.asarray(info.sorted, np.float32) for layer, info in levels.items()})
    params.update(_starts(slices))
    strips_spec = None
    check_images = bool(getattr(source, "fetches_images", False))
    if strips is not None:
        devices = settings.mesh.devices.size
        per_device = engine.per_device_batch(settings.batch_size, devices, getattr(source, "micro_batch", None))
        strips_spec, strips_params = strips.spec(per_device, source.image_size, source.feature_shapes)
        params.update(strips_params)
    if strips is not None or check_images:
        source = gallery.WithImages(source)
    spec = (tuple((layer, info.sorted.shape[0], info.sorted.shape[1]) for layer, info in levels.items()),
            num_labels, num_categories, tuple(seg_size), settings.unit_chunk, strips_spec, check_images)
    compute, stats = _count_stage(spec)
    results = engine.tally(compute, source, stats, params=params, mesh=settings.mesh, batch_size=settings.batch_size,
                           checkpoint_dir=settings.checkpoint_dir(_counts_dir(strips_spec, check_images)),
                           checkpoint_every=settings.checkpoint_every,
                           progress=settings.progress, desc="counts", final_checkpoint=final_checkpoint)
    label_state = results["labels"]
    if check_images and int(results["images/nonfinite"][0]):
        count, first = (int(v) for v in results["images/nonfinite"])
        raise ValueError(f"{count} of the {source.num_samples} generated images are not finite (NaN/inf); the first "
                         f"is sample {first}: the segmenter labels them all the same and every IoU would be "
                         "biased; the generator's output must be finite for every z")
    if int(label_state.bad_labels):
        raise ValueError(f"{int(label_state.bad_labels)} segmentation entries lie outside [0, {num_labels}) "
                         f"(there are {num_labels} labels)")
    galleries = strips.galleries(results) if strips is not None else {}
    return label_state, {layer: results[f"{layer}/counts"] for layer in levels}, galleries


__all__ = ["RAW_REPORT_Q", "QuantilePlan", "LayerLevels", "PassSettings", "quantile_plans", "quantile_passes",
           "count_levels", "count_pass"]
