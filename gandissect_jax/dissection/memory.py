"""Memory planning: estimate a dissection's peak memory from units x layers x labels x levels, and split the units into groups that fit a budget.

The passes' memory grows with the number of units: every unit has a 2^16-bin radix histogram
per quantile stream (raw and upsampled activations) on each device and as an int64 host
accumulator, then per-rank refinement histograms and lookup tables, then level histograms of
(C + 1 + L) x (J + 1) counters; every step also holds each unit's upsampled activations for
the batch. Nothing of this depends on the other units, so units can be measured in **groups**:
each group runs the quantile passes and the count pass over the data for its units only, and the
results are assembled per layer, bit-identical to measuring all units at once. The memory of a
group is bounded by its size; what remains for all units is what the scoring needs (the level
histograms of every unit, the IQR search and the results).

:func:`plan_memory` estimates, before any pass starts, the peak bytes of each phase from the
shapes alone, chooses the fewest groups whose peak fits the budget, and raises
:class:`MemoryBudgetError` (a ValueError) naming what does not fit when even one unit does not.
The budget (``max_memory``, ``--max-memory``) defaults to half of the host memory available when
the run starts (``psutil``) and, on accelerators, 70% of each device's free memory
(``Device.memory_stats``). Each extra group reads (or generates) the data again: time grows with
the number of groups, memory does not grow with the number of units.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Mapping, Sequence

import jax
import numpy as np

from .statistics import INT32_MAX, signature_capacity

HOST_FRACTION = 0.5  # of the host memory available at the start
DEVICE_FRACTION = 0.7  # of an accelerator's free memory
# The JAX runtime, compiled programs and the Python objects of a run, beside the arrays estimated
# here (measured: 80-120 MiB on CPU; benchmarks/README.md).
RUNTIME_BYTES = 192 << 20
# glibc's malloc keeps freed memory in per-thread arenas: a group's buffers, freed by one of the
# runtime's threads and allocated again by another, can be resident twice. Measured (800 units in
# 20-50 groups, 1 and 8 CPU devices on 2 cores): the peak RSS exceeded the arrays' estimate by up
# to 38% of a group's pass memory (none with MALLOC_ARENA_MAX=1), so that memory is counted 1.5x.
# glibc allows up to 8 arenas per core: on many-core hosts set MALLOC_ARENA_MAX (e.g. 4) for the
# estimate to bound the peak as it does here.
ARENA_FACTOR = 1.5
RADIX_BINS = (1 << 16, 1 << 8, 1 << 8)  # bins per slot of the quantile stages (quantiles.RadixQuantiles)
TABLE_BYTES = 2  # int16 lookup tables (quantiles.TABLE_DTYPE)
LABEL_CHUNK = 64  # labels per step of the IQR search (threshold_search.search_iqr_thresholds)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


class MemoryBudgetError(ValueError):
    """The dissection cannot fit the memory budget, even with one unit per group."""


def parse_memory(value, name: str = "max_memory") -> int:
    """Bytes from an int, a float or a string with a binary unit: ``4096``, ``"800M"``, ``"2.5G"``, ``"1GiB"``.

    ValueError naming the setting for anything else, for values below 1 MiB, or non-finite ones.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size in bytes such as 4G, 800M or 1073741824, got {value!r}")
    if isinstance(value, numbers.Real):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must be a size such as 4G, 800M, 1.5GiB or 1073741824 (bytes), got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ValueError(f"{name} must be a size such as 4G, 800M or 1073741824 (bytes), got {value!r}")
    if not math.isfinite(number) or number * _UNITS[unit] < (1 << 20):
        raise ValueError(f"{name} must be at least 1M, got {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(count: float) -> str:
    """``1.5 GiB``-style text."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def available_host_memory() -> int:
    """Bytes of host memory available to new allocations now (``psutil.virtual_memory().available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def free_device_memory(devices) -> int | None:
    """The smallest free memory (bytes_limit - bytes_in_use) of ``devices``; None when the devices
    share host memory (CPU) or report no statistics."""
    free = []
    for device in devices:
        if getattr(device, "platform", "cpu") == "cpu":
            return None
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None


@dataclasses.dataclass(frozen=True)
class Budget:
    """host: bytes for the whole process's dissection arrays (on CPU, device arrays included);
    device: bytes per accelerator device, or None when devices share host memory (CPU)."""

    host: int
    device: int | None

    @classmethod
    def default(cls, devices, max_memory=None) -> "Budget":
        """``max_memory`` (:func:`parse_memory`) for both pools, else the default fractions of what is free."""
        device_free = free_device_memory(devices)
        if max_memory is not None:
            limit = parse_memory(max_memory)
            return cls(limit, None if device_free is None else limit)
        return cls(int(HOST_FRACTION * available_host_memory()),
                   None if device_free is None else int(DEVICE_FRACTION * device_free))


@dataclasses.dataclass(frozen=True)
class PassShapes:
    """The shapes the estimate needs besides units.

    layers: {layer: (units U, raw pixels h * w)}; seg_pixels: H * W; seg_channels: D;
    num_labels: L; num_categories: C; topk: k; raw_ranks / up_ranks: order statistics wanted per
    unit of the raw / upsampled activations (0 when that quantile stream is not needed);
    num_levels: J levels counted per unit; num_candidates: F IQR candidates (0 without the
    search); per_device: samples per device and step; devices: number of devices;
    unit_chunk: units per scatter step; sample_bytes: bytes of one fetched sample (every
    layer's features and the segmentation); shared: devices share host memory (CPU).
    """

    layers: Mapping[str, tuple[int, int]]
    seg_pixels: int
    seg_channels: int
    num_labels: int
    num_categories: int
    topk: int
    raw_ranks: int
    up_ranks: int
    num_levels: int
    num_candidates: int
    per_device: int
    devices: int
    unit_chunk: int
    sample_bytes: int
    shared: bool


@dataclasses.dataclass(frozen=True)
class UnitCost:
    """Bytes per unit of one layer. device: per device, during the passes (states and step
    temporaries); host: host accumulators, drain copies and planner arrays during the passes;
    kept: what is held for every unit until scoring (level histograms, levels, top-k); scoring:
    the transient arrays of scoring the layer (the IQR search) and its results."""

    device: int
    host: int
    kept: int
    scoring: int


def unit_cost(shapes: PassShapes, raw_pixels: int) -> UnitCost:
    """Bytes per unit of a layer with ``raw_pixels`` (h * w) per feature map (see :class:`UnitCost`).

    Each pass holds, per unit: the statistics' int32 state on every device and the step's
    temporaries (XLA materializes one float32 array per quantile stream, (n, pixels), and in the
    count pass the upsampled values and a per-image bucket histogram: measured with
    ``Compiled.memory_analysis``), and on the host the int64 accumulator of the state plus one
    device's drained copy, and the quantile planners' int16 lookup tables (on the host and on
    every device). The estimate of a phase is the largest over the passes (quantile stages 0-2,
    count pass), summing device and host memory when they are the same memory (CPU).
    """
    n, P, m, D = shapes.per_device, shapes.seg_pixels, raw_pixels, shapes.devices
    k, L, C, J, F = shapes.topk, shapes.num_labels, shapes.num_categories, shapes.num_levels, shapes.num_candidates
    streams = [(ranks, pixels) for ranks, pixels in ((shapes.raw_ranks, m), (shapes.up_ranks, P)) if ranks]
    phases = []  # (device bytes per device, host bytes)
    # quantile stage 0: top-k, NaN counts, a 2^16-bin histogram per stream; after the pass the
    # planner's stage-0 tables join the int64 histograms
    state = 8 * k + 4 + sum(4 * RADIX_BINS[0] for _ in streams)
    temps = n * 4 * m + sum(n * 4 * pixels for _, pixels in streams) + 3 * 8 * (k + n)
    phases.append((state + temps, 3 * state + TABLE_BYTES * RADIX_BINS[0] * len(streams)))
    # quantile stages 1 and 2: a 2^8-bin histogram per wanted rank; lookup tables of the earlier
    # stages on every device and on the host
    state = sum(4 * ranks * RADIX_BINS[1] for ranks, _ in streams)
    tables = sum(TABLE_BYTES * (RADIX_BINS[0] + ranks * RADIX_BINS[1]) for ranks, _ in streams)
    temps = n * 4 * m + sum(n * 4 * pixels for _, pixels in streams)
    phases.append((state + tables + temps, 3 * state + tables))
    # count pass: (C + 1) x (J + 1) and L x (J + 1) int32 counters; upsampled values and the
    # per-image bucket histogram
    state = 4 * (C + 1 + L) * (J + 1)
    temps = n * 4 * (m + P + J + 1)
    phases.append((state + temps, 3 * state))
    # kept for every unit: level histograms, levels and their positions, candidates, raw quantiles,
    # top-k; and the scored results, (L, U) and (C, U) arrays
    kept = 8 * (C + 1 + L) * (J + 1) + 12 * J + 4 * F + 4 * 8 + 12 * k + 17 * 8 * L + 8 * C
    # scoring: suffix sums of the category counts, the IQR search's per-chunk arrays (a chunk of
    # LABEL_CHUNK labels x F candidates: int64 counts, float64 tables, float32 copies and IoUs), a
    # label chunk's suffix sums
    search = (8 * (C + 1) * F + min(L, LABEL_CHUNK) * F * 8 * 6 + LABEL_CHUNK * F * 4 * 4) if F else 0
    scoring = 8 * (C + 1) * J + search + 8 * min(L, LABEL_CHUNK) * (J + 1)
    if shapes.shared:
        return UnitCost(0, max(D * device + host for device, host in phases), kept, scoring)
    return UnitCost(max(device for device, _ in phases), max(host for _, host in phases), kept, scoring)


def group_overhead(shapes: PassShapes) -> tuple[int, int]:
    """(device, host) bytes of a group that do not scale with its units: two batches of fetched
    samples in flight and the count pass's per-chunk temporaries, per device.

    The count pass (:func:`~.statistics.level_counts`) holds, per unit of a chunk, the per-pixel
    path's buckets, keys and scatter indices, up to n x P x (3 + 2D) int32, and (where it runs) the
    signature path's buckets and keys, n x 2P int32, and its (image, signature, bucket) histogram,
    n x K x (J + 1) int32: XLA keeps both loops' buffers apart (measured with
    ``Compiled.memory_analysis``); the signature path also sorts each image's (P, D + 1) label keys.
    """
    n, P, D = shapes.per_device, shapes.seg_pixels, shapes.seg_channels
    buckets = shapes.num_levels + 1
    signatures = signature_capacity(P, buckets)
    per_unit = P * (3 + 2 * D) + (2 * P + signatures * buckets if signatures else 0)
    sort = 2 * n * P * (D + 1) * 4 if signatures else 0
    # fetched batches (the running step's and the next), the label pass's per-pixel label arrays,
    # the count pass's temporaries of one unit chunk
    device = (2 * n * shapes.sample_bytes + n * P * D * 4 * 4 + sort
              + shapes.unit_chunk * n * 4 * per_unit)
    return (0, shapes.devices * device) if shapes.shared else (device, 0)


def max_group_units(shapes: PassShapes) -> int:
    """The most units of one layer a group may count at once: the count pass indexes its
    (units, labels, levels + 1) counters and its per-pixel path's (images per device, units,
    levels + 1) histogram with int32 (:func:`~.statistics.level_counts`); 0 when not even one
    unit fits."""
    return (INT32_MAX - 1) // (max(1, shapes.num_labels, shapes.per_device) * (shapes.num_levels + 1))


def dissection_shapes(source, layers: Sequence[str], *, num_labels: int, num_categories: int, threshold: str,
                      search_iqr: bool, topk: int, per_device: int, devices: int, unit_chunk: int,
                      shared: bool) -> PassShapes:
    """The :class:`PassShapes` of dissecting ``layers`` of a dissection source (``feature_shapes``,
    ``seg_size``, optional ``seg_channels``) with the given settings (as :mod:`.passes` runs them)."""
    from .passes import RAW_REPORT_Q
    from .threshold_search import IQR_FRACTIONS

    quantiles = len(RAW_REPORT_Q) + (1 if threshold == "quantile" else 0)
    raw_ranks = 2 * quantiles if (threshold == "quantile" or search_iqr) else 0
    candidates = len(IQR_FRACTIONS) if search_iqr else 0
    levels = candidates + (0 if threshold == "iqr" else 1)
    seg_pixels = int(source.seg_size[0]) * int(source.seg_size[1])
    channels = int(getattr(source, "seg_channels", 1))
    sample_bytes = sum(4 * int(np.prod(shape)) for shape in source.feature_shapes.values()) + 4 * seg_pixels * channels
    return PassShapes(
        layers={layer: (int(source.feature_shapes[layer][2]),
                        int(source.feature_shapes[layer][0]) * int(source.feature_shapes[layer][1])) for layer in layers},
        seg_pixels=seg_pixels, seg_channels=channels, num_labels=int(num_labels), num_categories=int(num_categories),
        topk=int(topk), raw_ranks=raw_ranks, up_ranks=2 * candidates, num_levels=levels, num_candidates=candidates,
        per_device=int(per_device), devices=int(devices), unit_chunk=int(unit_chunk), sample_bytes=sample_bytes,
        shared=bool(shared))


def plan_dissection(source, layers: Sequence[str], *, num_labels: int, num_categories: int, threshold: str,
                    search_iqr: bool, topk: int, batch_size: int, mesh, unit_chunk: int | None = None,
                    max_memory=None) -> "MemoryPlan":
    """The :class:`MemoryPlan` of dissecting ``layers`` of ``source`` on ``mesh`` (before any pass).

    max_memory: the budget (:func:`parse_memory`; default :meth:`Budget.default`).
    MemoryBudgetError when even one unit at a time does not fit.
    """
    from .engine import per_device_batch
    from .statistics import default_unit_chunk

    devices = list(mesh.devices.flat)
    local = [d for d in devices if d.process_index == jax.process_index()]  # a multi-host mesh: this host's
    shapes = dissection_shapes(
        source, layers, num_labels=num_labels, num_categories=num_categories, threshold=threshold,
        search_iqr=search_iqr, topk=topk, per_device=per_device_batch(batch_size, len(devices),
                                                                      getattr(source, "micro_batch", None)),
        devices=len(devices), unit_chunk=unit_chunk or default_unit_chunk(),
        shared=free_device_memory(local) is None)
    return plan_memory(shapes, Budget.default(local, max_memory))


UnitGroup = tuple[tuple[str, int, int], ...]  # ((layer, first unit, end), ...)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The unit groups of a dissection and the estimate behind them.

    groups: each a tuple of (layer, start, stop) slices measured together; budget: the
    :class:`Budget`; host_peak / device_peak: the estimated peak bytes of the plan (device:
    per device, None on CPU); all_at_once: the estimated host peak of one group of every unit.
    """

    groups: tuple[UnitGroup, ...]
    budget: Budget
    host_peak: int
    device_peak: int | None
    all_at_once: int

    def describe(self) -> str:
        """One line for the user: groups, estimated peak and budget."""
        ends: dict[str, int] = {}
        for group in self.groups:
            for layer, _, stop in group:
                ends[layer] = max(ends.get(layer, 0), stop)
        units = sum(ends.values())
        line = (f"memory plan: {units} units in {len(self.groups)} group(s), estimated peak "
                f"{format_bytes(self.host_peak)} of a {format_bytes(self.budget.host)} budget")
        if self.device_peak is not None:
            line += f", {format_bytes(self.device_peak)} of {format_bytes(self.budget.device)} per device"
        if len(self.groups) > 1:
            line += (f" (all units at once: about {format_bytes(self.all_at_once)}); "
                     f"each group reads the data again")
        return line


def _peaks(shapes: PassShapes, groups: Sequence[UnitGroup], costs: Mapping[str, UnitCost]) -> tuple[int, int]:
    """(host peak, device peak per device) of running ``groups`` one after another."""
    units = {layer: count for layer, (count, _) in shapes.layers.items()}
    kept = sum(units[layer] * costs[layer].kept for layer in units)
    scoring = max((units[layer] * costs[layer].scoring for layer in units), default=0)
    overhead_device, overhead_host = group_overhead(shapes)
    host_peak = device_peak = 0
    for group in groups:
        host = math.ceil(ARENA_FACTOR * (sum((stop - start) * costs[layer].host for layer, start, stop in group)
                                         + overhead_host))
        device = sum((stop - start) * costs[layer].device for layer, start, stop in group) + overhead_device
        host_peak, device_peak = max(host_peak, host), max(device_peak, device)
    # The passes' memory is not all returned to the system before scoring (allocator caches), so
    # the scoring's arrays are counted on top of it rather than in its place.
    return RUNTIME_BYTES + kept + host_peak + scoring, device_peak


def plan_memory(shapes: PassShapes, budget: Budget) -> MemoryPlan:
    """Unit groups whose estimated peak fits ``budget``, as few as the rule below allows.

    Every unit at once when that fits. Otherwise a layer whose units do not fit in one group is
    cut into the fewest slices of equal size that fit (the last slice shifted back to end at the
    layer's last unit, so every slice has the same shape and one compiled program serves them
    all: a few units are measured twice, with identical results); consecutive layers that fit
    whole share groups. A group also holds at most :func:`max_group_units` units of a layer (the
    count pass's int32 indices). MemoryBudgetError (a ValueError) naming the budget, the estimate
    and what to change when even one unit per group does not fit (or when what is kept for every
    unit until scoring does not); ValueError when one unit's labels x (levels + 1) counters
    exceed int32 indices.
    """
    costs = {layer: unit_cost(shapes, pixels) for layer, (_, pixels) in shapes.layers.items()}
    layers = {layer: count for layer, (count, _) in shapes.layers.items() if count}
    everything = (tuple((layer, 0, count) for layer, count in layers.items()),)
    all_host, _ = _peaks(shapes, everything, costs)

    most = max_group_units(shapes)
    if most < 1:
        raise ValueError(
            f"{shapes.num_labels} labels (and {shapes.per_device} samples per device) x {shapes.num_levels + 1} "
            f"level intervals do not fit the count pass's int32 indices even for one unit (at most "
            f"{INT32_MAX - 1} counters per group): use fewer labels, levels or samples per step")

    def fits(groups) -> bool:
        if any(stop - start > most for group in groups for _, start, stop in group):
            return False
        host, device = _peaks(shapes, groups, costs)
        return host <= budget.host and (budget.device is None or device <= budget.device)

    def plan(groups) -> MemoryPlan:
        host, device = _peaks(shapes, groups, costs)
        return MemoryPlan(tuple(groups), budget, host, None if budget.device is None else device, all_host)

    if fits(everything):
        return plan(everything)
    singles = tuple(((layer, 0, 1),) for layer in layers)
    if not fits(singles):
        host, device = _peaks(shapes, singles, costs)
        scoring = _peaks(shapes, (), costs)[0] - RUNTIME_BYTES
        what = (f"{format_bytes(host)} of host memory, {format_bytes(scoring)} of it for what all "
                f"{sum(layers.values())} units of {len(layers)} layer(s) keep until they are scored "
                f"({shapes.num_labels} labels x {shapes.num_levels} levels)" if host > budget.host
                else f"{format_bytes(device)} per device ({shapes.per_device} samples per device and step)")
        raise MemoryBudgetError(
            f"the dissection does not fit the memory budget of {format_bytes(budget.host)}"
            + ("" if budget.device is None else f" ({format_bytes(budget.device)} per device)")
            + f": even one unit at a time needs about {what}; raise --max-memory (max_memory=), lower "
            f"--batch-size, or dissect fewer layers or units at once")
    groups: list[tuple[tuple[str, int, int], ...]] = []
    pending: list[tuple[str, int, int]] = []  # whole layers packed together
    for layer, count in layers.items():
        if fits((((layer, 0, count),),)):
            if pending and not fits((tuple(pending) + ((layer, 0, count),),)):
                groups.append(tuple(pending))
                pending = []
            pending.append((layer, 0, count))
            continue
        # the largest slice of this layer that fits alone (binary search; 1 fits)
        low, high = 1, count - 1
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits((((layer, 0, middle),),)) else (low, middle - 1)
        size = -(-count // -(-count // low))  # equal slices, as few as fit
        groups.extend(((layer, min(start, count - size), min(start, count - size) + size),)
                      for start in range(0, count, size))
    if pending:
        groups.append(tuple(pending))
    return plan(groups)


__all__ = ["MemoryBudgetError", "MemoryPlan", "Budget", "PassShapes", "UnitCost", "plan_memory", "unit_cost",
           "dissection_shapes", "plan_dissection", "group_overhead", "max_group_units",
           "parse_memory", "format_bytes", "available_host_memory", "free_device_memory", "HOST_FRACTION",
           "DEVICE_FRACTION", "RUNTIME_BYTES", "ARENA_FACTOR"]
