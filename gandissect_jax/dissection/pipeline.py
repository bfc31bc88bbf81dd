"""Dissection passes: stream samples through the statistics, sharded over local devices.

Passes over the data (each sample is produced again from its index; nothing per-sample is kept):

1. *Quantile passes* (features only; a generator runs just ``h``). Stage 0 collects the top-k
   samples per unit, checks for non-finite activations and histograms the top 16 bits of the
   order-preserving key of (a) the raw activations (for ``threshold='quantile'``) and (b) the
   upsampled activations (for the IQR search's candidate levels). Stages 1 and 2 refine only
   the bins holding the wanted order statistics, 8 bits at a time, so the quantiles are exact.
2. *Count pass* (features + segmentation). For every unit it histograms the upsampled
   activations over the intervals between its sorted levels (the 100 IQR candidates and the
   fixed level, if any), per category and per label, with the label pixel counts and category
   presence. Every count at every level follows exactly by suffix sums.
3. The IQR threshold search and the scores run on those counts (no further pass), then the
   top-k image strips are rendered from the few samples they need, and the report is written.

Each device accumulates its own int32 statistics over its shard of every batch
(``jax.shard_map`` over a 1-D mesh of local devices); states are drained into int64 host
accumulators before any counter could overflow, merged exactly, and checkpointed atomically,
so results are identical for any device count, and a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import statistics as st
from .results import LayerDissection, label_category_indices
from .scoring import best_label_by_iou, score_counts
from .threshold_search import IQR_FRACTIONS, best_label_by_iqr, search_iqr_thresholds
from .upsample import upsample_bilinear_unit_major

RAW_REPORT_Q = (0.5, 0.9, 0.99, 0.995, 0.999)
_AXIS = "devices"


# ============================================================================ sources


class _Source:
    """A deterministic source of samples by index (features per layer, segmentation, images)."""

    num_samples: int
    layers: tuple[str, ...]
    seg_size: tuple[int, int]

    def features(self, indices: np.ndarray, sharding) -> dict[str, jax.Array]:
        raise NotImplementedError

    def features_and_labels(self, indices: np.ndarray, sharding) -> tuple[dict[str, jax.Array], jax.Array]:
        raise NotImplementedError

    def images(self, indices: np.ndarray) -> np.ndarray | None:
        """uint8 (n, H, W, 3) images, or None when the source has none."""
        return None

    def visual_batch(self, indices: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Host arrays for image strips: uint8 (n, H, W, 3) backgrounds and float32 (n, h, w, U) features."""
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError


def _as_nhwc_features(array, name: str) -> Any:
    if array.ndim != 4:
        raise ValueError(f"features {name!r} must have shape (N, h, w, U), got {tuple(array.shape)}")
    return array


class ArraySource(_Source):
    """Precomputed activations (N, h, w, U) per layer and segmentations (N, H, W, D)."""

    def __init__(self, features: Mapping[str, Any], segmentations, images=None, identity: dict | None = None):
        if not features:
            raise ValueError("no features given")
        self.arrays = {name: _as_nhwc_features(value, name) for name, value in features.items()}
        self.layers = tuple(self.arrays)
        segmentations = segmentations if segmentations.ndim == 4 else segmentations[..., None]
        if segmentations.ndim != 4:
            raise ValueError(f"segmentations must have shape (N, H, W, D), got {tuple(segmentations.shape)}")
        if not np.issubdtype(segmentations.dtype, np.integer):
            raise ValueError(f"segmentations must hold integer labels, got dtype {segmentations.dtype}")
        self.segmentations = segmentations
        counts = {name: a.shape[0] for name, a in self.arrays.items()}
        counts["segmentations"] = segmentations.shape[0]
        if images is not None:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"images must have shape (N, H, W, 3), got {tuple(images.shape)}")
            counts["images"] = images.shape[0]
        if len(set(counts.values())) != 1:
            raise ValueError(f"features, segmentations and images disagree on the number of samples: {counts}")
        self.images_array = images
        self.num_samples = int(segmentations.shape[0])
        self.seg_size = (int(segmentations.shape[1]), int(segmentations.shape[2]))
        self._identity = identity or {}

    def _take(self, array, indices):
        indices = np.clip(indices, 0, self.num_samples - 1)
        lo, hi = int(indices.min()), int(indices.max()) + 1
        if hi - lo == len(indices) and np.all(np.diff(indices) == 1):
            return np.asarray(array[lo:hi])
        return np.asarray(array[indices])

    def features(self, indices, sharding):
        return {name: jax.device_put(self._take(a, indices).astype(np.float32), sharding)
                for name, a in self.arrays.items()}

    def features_and_labels(self, indices, sharding):
        labels = self._take(self.segmentations, indices).astype(np.int32)
        return self.features(indices, sharding), jax.device_put(labels, sharding)

    def images(self, indices):
        if self.images_array is None:
            return None
        images = self._take(self.images_array, indices)
        if images.dtype != np.uint8:
            images = np.clip((np.asarray(images, np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        return images

    def visual_batch(self, indices, layer):
        from .report import colorize_segmentation

        background = self.images(indices)
        if background is None:
            labels = self._take(self.segmentations, indices).astype(np.int64)
            background = colorize_segmentation(labels, int(labels.max()) + 1)
        return background, self._take(self.arrays[layer], indices).astype(np.float32)

    def identity(self):
        shapes = {name: list(a.shape) for name, a in self.arrays.items()}
        digest = hashlib.sha256()
        for array in (*self.arrays.values(), self.segmentations):
            for index in (0, self.num_samples - 1):
                digest.update(np.ascontiguousarray(array[index]).tobytes())
        return {"kind": "arrays", "features": shapes, "segmentations": list(self.segmentations.shape),
                "digest": digest.hexdigest()[:16], **self._identity}


class GeneratorSource(_Source):
    """Samples z_i of ``sample_z``-style normal noise (numpy RandomState(seed)) through a generator
    split at each layer, and segments the generated images."""

    def __init__(self, generator, segmenter, layers: Sequence[str], num_samples: int, seed: int = 1,
                 seg_downsample: int = 2, identity: dict | None = None):
        names = tuple(getattr(generator, "layer_names", ()))
        unknown = [layer for layer in layers if names and layer not in names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; the generator has {list(names)}")
        if not layers:
            raise ValueError("no layers to dissect")
        self.generator = generator
        self.segmenter = segmenter
        self.layers = tuple(layers)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.seg_downsample = int(seg_downsample)
        self.z_dim = int(generator.z_dim)
        self._identity = identity or {}
        splits = {layer: generator.split(layer) for layer in self.layers}
        # The last of the layers in forward order produces the image through its f.
        order = sorted(self.layers, key=lambda l: names.index(l) if l in names else 0)
        last = order[-1]
        heads = {layer: h for layer, (h, _) in splits.items()}
        tail = splits[last][1]

        def features(params, z):
            return {layer: h(params, z)[0] for layer, h in heads.items()}

        def features_and_images(params, z):
            outputs = {layer: h(params, z) for layer, h in heads.items()}
            r, side = outputs[last]
            return {layer: out[0] for layer, out in outputs.items()}, tail(params, r, side)

        self._features = jax.jit(features)
        self._features_and_images = jax.jit(features_and_images)
        self._params = None
        self._stream = None
        probe = jax.eval_shape(features_and_images, generator.params, jax.ShapeDtypeStruct((1, self.z_dim), jnp.float32))
        image_shape = probe[1].shape
        self.image_size = (int(image_shape[1]), int(image_shape[2]))
        self.seg_size = (self.image_size[0] // self.seg_downsample, self.image_size[1] // self.seg_downsample)
        self.feature_shapes = {layer: tuple(int(s) for s in probe[0][layer].shape[1:]) for layer in self.layers}

    def _z(self, indices: np.ndarray) -> np.ndarray:
        """float32 z rows of the given sample numbers: rows of RandomState(seed).standard_normal(N * z_dim)
        (the reference's and ``sample_z``'s stream), drawn in bounded chunks."""
        indices = np.clip(np.asarray(indices), 0, self.num_samples - 1)
        lo, hi = int(indices.min()), int(indices.max()) + 1
        rng, row = self._stream if self._stream is not None else (None, 0)
        if rng is None or row > lo:
            rng, row = np.random.RandomState(self.seed), 0
        # Legacy Gaussians are drawn one by one (the pair cache lives in the state), so drawing
        # the stream in pieces gives the same numbers as one big draw.
        while row < lo:
            take = min(lo - row, max(1, (1 << 20) // self.z_dim))
            rng.standard_normal(take * self.z_dim)
            row += take
        block = rng.standard_normal((hi - lo) * self.z_dim).reshape(hi - lo, self.z_dim)
        self._stream = (rng, hi)
        return block[indices - lo].astype(np.float32)

    def _put_params(self, sharding):
        if self._params is None:
            replicated = NamedSharding(sharding.mesh, P())
            self._params = jax.device_put(self.generator.params, replicated)
        return self._params

    def features(self, indices, sharding):
        z = jax.device_put(self._z(indices), sharding)
        feats = self._features(self._put_params(sharding), z)
        return {name: jax.device_put(value, sharding) for name, value in feats.items()}

    def _segment(self, images, sharding):
        # Generators are unclamped (ProGAN outputs stray slightly outside [-1, 1]); segmenters
        # take images in [-1, 1], so segment what would be displayed.
        labels = self.segmenter.segment(self.segmenter.params, jnp.clip(images, -1.0, 1.0), self.seg_downsample)
        return jax.device_put(jnp.asarray(labels, jnp.int32), sharding)

    def features_and_labels(self, indices, sharding):
        z = jax.device_put(self._z(indices), sharding)
        feats, images = self._features_and_images(self._put_params(sharding), z)
        feats = {name: jax.device_put(value, sharding) for name, value in feats.items()}
        return feats, self._segment(images, sharding)

    def _images_device(self, indices):
        z = jnp.asarray(self._z(indices))
        params = self.generator.params
        feats, images = self._features_and_images(params, z)
        return feats, images

    def images(self, indices):
        _, images = self._images_device(indices)
        return np.asarray(jnp.clip((images + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)

    def visual_batch(self, indices, layer):
        feats, images = self._images_device(indices)
        background = np.asarray(jnp.clip((images + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
        return background, np.asarray(feats[layer], np.float32)

    def identity(self):
        return {"kind": "generator", "num_samples": self.num_samples, "seed": self.seed,
                "seg_downsample": self.seg_downsample, "z_dim": self.z_dim, **self._identity}


# ============================================================================ sharded steps


def _make_mesh(devices) -> Mesh:
    devices = list(devices) if devices is not None else jax.local_devices()
    if not devices:
        raise ValueError("no devices")
    return Mesh(np.array(devices), (_AXIS,))


def _sharded(fn: Callable, mesh: Mesh) -> Callable:
    """jit(shard_map(fn)) for fn(states, consts, batch) -> states on one device's shard.

    States carry a leading device axis (one accumulator per device); consts are replicated;
    batch arrays are split along the sample axis.
    """

    def body(states, consts, batch):
        local = jax.tree_util.tree_map(lambda x: x[0], states)
        local = fn(local, consts, batch)
        return jax.tree_util.tree_map(lambda x: x[None], local)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(_AXIS), P(), P(_AXIS)), out_specs=P(_AXIS),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))


def _init_states(inits: Callable[[], Any], mesh: Mesh) -> Any:
    count = mesh.devices.size

    def make():
        return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (count,) + x.shape), inits())

    return jax.jit(make, out_shardings=NamedSharding(mesh, P(_AXIS)))()


def _add_into(host: np.ndarray, device_array: jax.Array) -> None:
    """host (int64, shape S) += sum over the device axis of device_array (ndev, *S), in slices."""
    for shard in device_array.addressable_shards:
        data = np.asarray(shard.data)
        for row in data:
            flat_host = host.reshape(-1)
            flat = row.reshape(-1)
            step = 1 << 24
            for start in range(0, flat.size, step):
                flat_host[start:start + step] += flat[start:start + step]


def _drain(host: Any, device: Any) -> Any:
    """Merge device states (leading device axis) into host accumulators, exactly."""
    if isinstance(host, st.TopKState):
        values = np.asarray(device.values)
        indices = np.asarray(device.indices)
        for d in range(values.shape[0]):
            host = st._topk_merge_np(host, st.TopKState(values[d], indices[d]), host.values.shape[1])
        return host
    host_leaves, treedef = jax.tree_util.tree_flatten(host)
    device_leaves = jax.tree_util.tree_leaves(device)
    for h, d in zip(host_leaves, device_leaves):
        _add_into(h, d)
    return jax.tree_util.tree_unflatten(treedef, host_leaves)


def _counts_above(histogram: np.ndarray, position: np.ndarray) -> np.ndarray:
    """histogram (U, L, J + 1) bucket counts, position (U,) sorted level index -> (L, U) counts of
    values above that level (buckets position + 1 .. J)."""
    out = np.zeros((histogram.shape[1], histogram.shape[0]), np.int64)
    for unit in range(histogram.shape[0]):
        out[:, unit] = histogram[unit, :, position[unit] + 1:].sum(axis=1)
    return out


def _host_init(stat_inits: dict) -> dict:
    out = {}
    for name, init in stat_inits.items():
        shapes = jax.eval_shape(init)
        if isinstance(shapes, st.TopKState):
            values = np.full(shapes.values.shape, -np.inf, np.float32)
            indices = np.full(shapes.indices.shape, st.INT32_MAX, np.int32)
            out[name] = st.TopKState(values, indices)
        else:
            out[name] = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.int64), shapes)
    return out


# ============================================================================ checkpoints


def _atomic_write_json(path: str, payload: dict) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


def _save_tree(path: str, tree: Any, extra: dict[str, np.ndarray]) -> None:
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays.update({f"extra_{k}": np.asarray(v) for k, v in extra.items()})
    temporary = path + ".tmp.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def _load_tree(path: str, template: Any) -> tuple[Any, dict[str, np.ndarray]]:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    with np.load(path, allow_pickle=False) as data:
        loaded = []
        for i, leaf in enumerate(leaves):
            value = data[f"leaf{i}"]
            if value.shape != np.shape(leaf):
                raise ValueError(f"checkpoint {path} does not match this run (leaf {i} has shape {value.shape})")
            loaded.append(value.copy())
        extra = {k[len("extra_"):]: data[k] for k in data.files if k.startswith("extra_")}
    return jax.tree_util.tree_unflatten(treedef, loaded), extra


class _Progress:
    """Where a run keeps its resumable state: ``<outdir>/.progress``."""

    def __init__(self, outdir: str | None, fingerprint: dict):
        self.outdir = outdir
        self.directory = os.path.join(outdir, ".progress") if outdir else None
        self.fingerprint = fingerprint
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, "settings.json")
            if os.path.exists(path):
                with open(path) as handle:
                    previous = json.load(handle)
                if previous != json.loads(json.dumps(fingerprint, sort_keys=True)):
                    raise ValueError(f"{outdir} holds a dissection with different settings "
                                     f"({_first_difference(previous, fingerprint)}); use another --outdir "
                                     "or remove it")
            else:
                _atomic_write_json(path, fingerprint)

    def path(self, name: str) -> str | None:
        return os.path.join(self.directory, name) if self.directory else None

    def clear(self) -> None:
        if self.directory and os.path.isdir(self.directory):
            shutil.rmtree(self.directory)


def _first_difference(a: dict, b: dict) -> str:
    b = json.loads(json.dumps(b, sort_keys=True))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} != {b.get(key)!r}"
    return "?"


# ============================================================================ one pass


def _run_pass(name: str, source: _Source, mesh: Mesh, batch_size: int, step: Callable,
              consts: Any, stat_inits: dict, fetch: Callable, progress: _Progress,
              checkpoint_every: float, drain_every: Callable[[dict], int], show_progress: bool,
              layers_key: Sequence[str]) -> dict:
    """Stream every sample once through ``step``; return merged int64 / top-k host states.

    ``drain_every(batch)`` gives how many samples a device may add before its int32 counters
    must be drained into the host accumulators.
    """
    from tqdm.auto import tqdm

    devices = mesh.devices.size
    per_device = max(1, -(-batch_size // devices))
    global_batch = per_device * devices
    sharding = NamedSharding(mesh, P(_AXIS))
    host = _host_init(stat_inits)
    start = 0
    checkpoint = progress.path(f"{name}.npz")
    if checkpoint and os.path.exists(checkpoint):
        loaded, extra = _load_tree(checkpoint, host)
        if [str(x) for x in extra.get("layers", [])] == list(layers_key):
            host, start = loaded, int(extra["samples_done"])
    total = source.num_samples

    def init_all():
        return {k: init() for k, init in stat_inits.items()}

    states = _init_states(init_all, mesh)
    since_drain = 0
    limit = None
    last_save = time.monotonic()
    bar = tqdm(total=total, initial=start, desc=name, unit="sample", disable=not show_progress, leave=False)
    try:
        position = start
        while position < total:
            indices = np.arange(position, position + global_batch)
            valid = indices < total
            batch = fetch(indices, sharding)
            batch["valid"] = jax.device_put(valid, sharding)
            batch["index"] = jax.device_put(indices.astype(np.int32), sharding)
            if limit is None:
                limit = max(1, int(drain_every(batch)))
                if per_device > limit:
                    raise ValueError(f"batch of {per_device} samples per device could overflow int32 counts; "
                                     f"use a batch size of at most {limit * devices}")
            states = step(states, consts, batch)
            position = min(total, position + global_batch)
            since_drain += per_device
            bar.update(int(valid.sum()))
            must_drain = since_drain + per_device > limit
            must_save = checkpoint and (time.monotonic() - last_save >= checkpoint_every) and position < total
            if must_drain or must_save:
                host = {k: _drain(host[k], states[k]) for k in host}
                del states
                states = _init_states(init_all, mesh)
                since_drain = 0
                if must_save:
                    _save_tree(checkpoint, host, {"samples_done": np.int64(position),
                                                  "layers": np.asarray(list(layers_key), dtype=str)})
                    last_save = time.monotonic()
        host = {k: _drain(host[k], states[k]) for k in host}
        if checkpoint and start < total:
            _save_tree(checkpoint, host, {"samples_done": np.int64(total),
                                          "layers": np.asarray(list(layers_key), dtype=str)})
    finally:
        bar.close()
    return host


# ============================================================================ the dissection


@dataclasses.dataclass
class _Plan:
    """The quantile refinement of one layer: raw activations and upsampled activations."""

    num_units: int
    raw: st.RadixQuantiles | None
    upsampled: st.RadixQuantiles | None


def _quantile_spec(plans: dict[str, _Plan], seg_size, stage_index: int, k: int, unit_chunk: int | None) -> tuple:
    """Hashable description of a quantile stage (shapes only), the key of the compiled step."""
    layers = []
    for layer, plan in plans.items():
        streams = []
        for stream, planner in (("raw", plan.raw), ("up", plan.upsampled)):
            if planner is not None and not planner.done:
                stage = planner.stage()
                streams.append((stream, stage.bits, stage.num_slots,
                                tuple(t.shape for t in stage.tables)))
        layers.append((layer, plan.num_units, tuple(streams)))
    return (tuple(layers), tuple(seg_size), stage_index, int(k), unit_chunk)


def _quantile_consts(plans: dict[str, _Plan]) -> dict:
    consts = {}
    for layer, plan in plans.items():
        for stream, planner in (("raw", plan.raw), ("up", plan.upsampled)):
            if planner is not None and not planner.done:
                consts[f"{layer}/{stream}"] = tuple(jnp.asarray(t) for t in planner.stage().tables)
    return consts


@functools.lru_cache(maxsize=32)
def _quantile_step(spec: tuple, mesh: Mesh):
    """(sharded step, stat inits, stats) of one quantile stage for every layer (cached by shapes)."""
    layers, seg_size, stage_index, k, unit_chunk = spec
    stats: dict[str, st.StreamingStatistic] = {}
    for layer, num_units, streams in layers:
        if stage_index == 0:
            stats[f"{layer}/topk"] = st.top_k(num_units, k)
            stats[f"{layer}/nonfinite"] = _nonfinite_statistic(num_units)
        for stream, bits, num_slots, table_shapes in streams:
            stage = st.RadixStage(bits, tuple(np.zeros(shape, np.int32) for shape in table_shapes), num_slots)
            stats[f"{layer}/{stream}"] = st.radix_histogram(num_units, stage, unit_chunk)

    def fn(states, consts, batch):
        valid = batch["valid"]
        out = dict(states)
        for layer, num_units, _ in layers:
            features = batch[layer]
            n = features.shape[0]
            raw = features.reshape(n, -1, num_units)
            if f"{layer}/topk" in states:
                out[f"{layer}/topk"] = stats[f"{layer}/topk"].update(states[f"{layer}/topk"], raw.max(axis=1),
                                                                   batch["index"], valid)
                out[f"{layer}/nonfinite"] = stats[f"{layer}/nonfinite"].update(states[f"{layer}/nonfinite"], raw, valid)
            if f"{layer}/raw" in states:
                out[f"{layer}/raw"] = stats[f"{layer}/raw"].update(states[f"{layer}/raw"], consts[f"{layer}/raw"],
                                                                 jnp.transpose(raw, (2, 0, 1)), valid)
            if f"{layer}/up" in states:
                up = upsample_bilinear_unit_major(features, seg_size).reshape(num_units, n, -1)
                out[f"{layer}/up"] = stats[f"{layer}/up"].update(states[f"{layer}/up"], consts[f"{layer}/up"],
                                                               up, valid)
        return out

    return _sharded(fn, mesh), {key: stat.init for key, stat in stats.items()}, stats


def _nonfinite_statistic(num_units: int) -> st.StreamingStatistic:
    def init():
        return jnp.zeros((num_units,), jnp.int32)

    def update(state, values, valid):
        bad = ~jnp.isfinite(values) & valid[:, None, None]
        return state + jnp.sum(bad, axis=(0, 1), dtype=jnp.int32)

    return st.StreamingStatistic(init, update, st._add_counts, np.asarray)


@functools.lru_cache(maxsize=32)
def _count_step(spec: tuple, mesh: Mesh):
    """(sharded step, stat inits, stats) of the count pass; spec = (((layer, U, J), ...), L, C,
    seg_size, unit_chunk)."""
    layers, num_labels, num_categories, seg_size, unit_chunk = spec
    stats: dict[str, st.StreamingStatistic] = {"labels": st.label_statistics(num_labels, num_categories)}
    for layer, num_units, num_levels in layers:
        stats[f"{layer}/counts"] = st.level_counts(num_units, num_labels, num_levels, num_categories, unit_chunk)

    def fn(states, consts, batch):
        valid = batch["valid"]
        labels = batch["labels"]
        n = labels.shape[0]
        labels = labels.reshape(n, -1, labels.shape[-1])
        presence = st.image_label_presence(labels, valid, num_labels)
        categories = st.image_category_presence(presence, consts["label_category"], num_categories, valid)
        dedup = st.dedup_channels(labels)
        out = dict(states)
        out["labels"] = stats["labels"].update(states["labels"], labels, dedup, categories, valid)
        for layer, num_units, _ in layers:
            features = batch[layer]
            up = upsample_bilinear_unit_major(features, seg_size).reshape(num_units, n, -1)
            out[f"{layer}/counts"] = stats[f"{layer}/counts"].update(
                states[f"{layer}/counts"], up, consts[f"{layer}/levels"], dedup, categories, valid)
        return out

    return _sharded(fn, mesh), {key: stat.init for key, stat in stats.items()}, stats


def _fingerprint_levels(levels: Mapping[str, np.ndarray] | None) -> dict | None:
    if levels is None:
        return None
    return {k: hashlib.sha256(np.ascontiguousarray(v, np.float32).tobytes()).hexdigest()[:16]
            for k, v in sorted(levels.items())}


def _dissect(source: _Source, labels: Sequence[Sequence[str]], categories: Sequence[str], *,
             threshold: str, quantile: float, levels: Mapping[str, np.ndarray] | None,
             search_iqr: bool | None, k: int, batch_size: int, devices, outdir: str | None,
             iou_threshold: float, checkpoint_every: float, progress: bool, unit_chunk: int | None,
             make_images: bool, make_report: bool, strip_length: int, title: str | None,
             feature_shapes: Mapping[str, tuple[int, int, int]]) -> dict[str, LayerDissection]:
    from . import report as report_module

    if threshold not in ("iqr", "quantile", "levels"):
        raise ValueError(f"threshold must be 'iqr', 'quantile' or 'levels', got {threshold!r}")
    if levels is not None:
        threshold = "levels"
    if threshold == "levels" and levels is None:
        raise ValueError("threshold='levels' needs levels")
    if threshold == "quantile" and not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if search_iqr is None:
        search_iqr = threshold == "iqr"
    if threshold == "iqr" and not search_iqr:
        raise ValueError("threshold='iqr' needs the IQR search")
    labels = [tuple(map(str, pair)) for pair in labels]
    categories = [str(c) for c in categories]
    if not labels:
        raise ValueError("no labels")
    label_category = label_category_indices(labels, categories)
    num_labels, num_categories = len(labels), len(categories)
    mesh = _make_mesh(devices)
    seg_size = source.seg_size

    levels_np = None
    if levels is not None:
        levels_np = {}
        for layer in source.layers:
            if layer not in levels:
                raise ValueError(f"no levels given for layer {layer!r}")
            value = np.asarray(levels[layer], np.float32).reshape(-1)
            units = feature_shapes[layer][2]
            if value.shape != (units,):
                raise ValueError(f"levels for layer {layer!r} have {value.size} entries; the layer has {units} units")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"levels for layer {layer!r} contain NaN or inf")
            levels_np[layer] = value

    fingerprint = {
        "source": source.identity(), "labels": [list(l) for l in labels], "categories": categories,
        "threshold": threshold, "quantile": float(quantile) if threshold == "quantile" else None,
        "levels": _fingerprint_levels(levels_np), "search_iqr": bool(search_iqr), "k": int(k),
        "version": 1,
    }
    run = _Progress(outdir, fingerprint)
    results: dict[str, LayerDissection] = {}
    pending = []
    for layer in source.layers:
        done = os.path.join(outdir, report_module.safe_dir_name(layer), "scores.npz") if outdir else None
        if done and os.path.exists(done) and os.path.exists(run.path(f"layer-{report_module.safe_dir_name(layer)}.done")):
            results[layer] = LayerDissection.load_npz(done)
        else:
            pending.append(layer)

    if pending:
        results.update(_measure(source, pending, labels, categories, label_category, threshold, quantile,
                                levels_np, search_iqr, k, batch_size, mesh, run, checkpoint_every, progress,
                                unit_chunk, feature_shapes, num_labels, num_categories, seg_size))
        for layer in pending:
            if outdir:
                layer_dir = os.path.join(outdir, report_module.safe_dir_name(layer))
                os.makedirs(layer_dir, exist_ok=True)
                results[layer].save_npz(os.path.join(layer_dir, "scores.npz"))
                _atomic_write_json(run.path(f"layer-{report_module.safe_dir_name(layer)}.done"), {"layer": layer})

    ordered = {layer: results[layer] for layer in source.layers}
    if outdir:
        for layer, result in ordered.items():
            if make_images:
                marker = run.path(f"images-{report_module.safe_dir_name(layer)}.done")
                if not os.path.exists(marker):
                    report_module.write_strips(outdir, result, source, strip_length=strip_length,
                                               batch_size=batch_size, show_progress=progress)
                    _atomic_write_json(marker, {"layer": layer})
        if make_report:
            report_module.write_report(outdir, ordered, iou_threshold=iou_threshold, title=title,
                                       settings={key: value for key, value in fingerprint.items() if key != "labels"},
                                       has_images=make_images)
    return ordered


def _measure(source, pending, labels, categories, label_category, threshold, quantile, levels_np,
             search_iqr, k, batch_size, mesh, run, checkpoint_every, progress, unit_chunk, feature_shapes,
             num_labels, num_categories, seg_size) -> dict[str, LayerDissection]:
    """Run the quantile and count passes for the pending layers and score them."""
    pixels_per_sample = seg_size[0] * seg_size[1]
    quantile_drain = st.samples_before_overflow(max(pixels_per_sample, max(
        s[0] * s[1] for s in feature_shapes.values())), 1)
    # ---------------------------------------------------------------- quantile passes
    raw_q = np.array(RAW_REPORT_Q + ((1.0 - float(quantile),) if threshold == "quantile" else ()), np.float64)
    fracs = IQR_FRACTIONS.astype(np.float64)
    plans = {}
    for layer in pending:
        units = feature_shapes[layer][2]
        want_raw = threshold == "quantile" or search_iqr
        plans[layer] = _Plan(units, st.RadixQuantiles(units, raw_q) if want_raw else None,
                             st.RadixQuantiles(units, 1.0 - fracs) if search_iqr else None)
    plan_path = run.path("quantiles.npz")
    topk_host: dict[str, st.TopKState] = {}
    stage_index = 0
    if plan_path and os.path.exists(plan_path):
        with np.load(plan_path, allow_pickle=False) as data:
            if [str(x) for x in data["layers"]] == list(pending):
                stage_index = int(data["stage_index"])
                for layer, plan in plans.items():
                    for stream in ("raw", "up"):
                        planner = getattr(plan, "raw" if stream == "raw" else "upsampled")
                        if planner is not None:
                            prefix = f"{layer}/{stream}/"
                            planner.load_state_dict({key[len(prefix):]: data[key] for key in data.files
                                                     if key.startswith(prefix)})
                    topk_host[layer] = st.TopKState(data[f"{layer}/topk_values"], data[f"{layer}/topk_indices"])
    while True:
        active = stage_index == 0 or any(
            p is not None and not p.done for plan in plans.values() for p in (plan.raw, plan.upsampled))
        if not active:
            break
        step, inits, stats = _quantile_step(_quantile_spec(plans, seg_size, stage_index, k, unit_chunk), mesh)
        consts = _quantile_consts(plans)

        def fetch(indices, sharding):
            return source.features(indices, sharding)

        host = _run_pass(f"quantiles-{stage_index}", source, mesh, batch_size, step, consts, inits, fetch, run,
                         checkpoint_every, lambda batch: quantile_drain, progress, pending)
        for layer, plan in plans.items():
            if stage_index == 0:
                bad = np.asarray(host[f"{layer}/nonfinite"])
                if bad.any():
                    units = np.flatnonzero(bad)
                    raise ValueError(f"layer {layer!r}: {int(bad.sum())} NaN/inf activations in units "
                                     f"{units[:10].tolist()}{'...' if units.size > 10 else ''}")
                topk_host[layer] = host[f"{layer}/topk"]
            for stream, planner in (("raw", plan.raw), ("up", plan.upsampled)):
                if planner is not None and not planner.done and f"{layer}/{stream}" in stats:
                    planner.observe(stats[f"{layer}/{stream}"].finalize(host[f"{layer}/{stream}"]))
        stage_index += 1
        if plan_path:
            arrays = {"layers": np.asarray(list(pending), dtype=str), "stage_index": np.int64(stage_index)}
            for layer, plan in plans.items():
                for stream, planner in (("raw", plan.raw), ("up", plan.upsampled)):
                    if planner is not None:
                        for key, value in planner.state_dict().items():
                            arrays[f"{layer}/{stream}/{key}"] = value
                arrays[f"{layer}/topk_values"] = np.asarray(topk_host[layer].values)
                arrays[f"{layer}/topk_indices"] = np.asarray(topk_host[layer].indices)
            temporary = plan_path + ".tmp.npz"
            np.savez(temporary, **arrays)
            os.replace(temporary, plan_path)
        # the stage's own checkpoint is superseded by the plan
        path = run.path(f"quantiles-{stage_index - 1}.npz")
        if path and os.path.exists(path):
            os.remove(path)

    # ---------------------------------------------------------------- levels per layer
    count_layers = {}
    layer_levels = {}
    for layer, plan in plans.items():
        columns = []
        candidates = None
        fixed = None
        raw_quantiles = plan.raw.quantiles() if plan.raw is not None else None
        if threshold == "quantile":
            fixed = raw_quantiles[:, -1]
        elif threshold == "levels":
            fixed = levels_np[layer]
        if search_iqr:
            candidates = plan.upsampled.quantiles()  # (U, F), in fraction order
            columns.append(candidates)
        if fixed is not None:
            columns.append(fixed[:, None])
        all_levels = np.concatenate(columns, axis=1).astype(np.float32)  # (U, J)
        order = np.argsort(all_levels, axis=1, kind="stable")
        sorted_levels = np.take_along_axis(all_levels, order, 1)
        position = np.argsort(order, axis=1)  # column -> sorted position
        layer_levels[layer] = dict(sorted=sorted_levels, position=position, candidates=candidates, fixed=fixed,
                                   raw_quantiles=raw_quantiles)
        count_layers[layer] = {"num_units": plan.num_units, "num_levels": sorted_levels.shape[1]}

    # ---------------------------------------------------------------- count pass
    count_spec = (tuple((layer, info["num_units"], info["num_levels"]) for layer, info in count_layers.items()),
                  num_labels, num_categories, tuple(seg_size), unit_chunk)
    step, inits, stats = _count_step(count_spec, mesh)
    consts = {"label_category": jnp.asarray(label_category, jnp.int32)}
    for layer in pending:
        consts[f"{layer}/levels"] = jnp.asarray(layer_levels[layer]["sorted"])

    def fetch(indices, sharding):
        feats, labels_batch = source.features_and_labels(indices, sharding)
        if tuple(labels_batch.shape[1:3]) != tuple(seg_size):
            raise ValueError(f"segmentation size {tuple(labels_batch.shape[1:3])} differs from the expected {seg_size}")
        return {**feats, "labels": labels_batch}

    def count_drain(batch):
        return st.samples_before_overflow(pixels_per_sample, batch["labels"].shape[-1])

    host = _run_pass("counts", source, mesh, batch_size, step, consts, inits, fetch, run, checkpoint_every,
                     count_drain, progress, pending)
    label_state = stats["labels"].finalize(host["labels"])
    if int(label_state.bad_labels):
        raise ValueError(f"{int(label_state.bad_labels)} segmentation entries lie outside [0, {num_labels}) "
                         f"(there are {num_labels} labels)")
    pixels = source.num_samples * seg_size[0] * seg_size[1]
    total_counts = label_state.image_counts * (seg_size[0] * seg_size[1])  # (C + 1,)

    # ---------------------------------------------------------------- scores
    results = {}
    for layer in pending:
        info = layer_levels[layer]
        counts = stats[f"{layer}/counts"].finalize(host[f"{layer}/counts"])
        units = count_layers[layer]["num_units"]
        category_above = st.suffix_counts(counts.category)  # (C + 1, U, J)
        label_hist = counts.label  # (U, L, J + 1)
        position = info["position"]
        rows = np.arange(units)[:, None]
        search = None
        if search_iqr:
            F = info["candidates"].shape[1]
            cand_pos = position[:, :F]  # (U, F)
            cat_at = np.take_along_axis(category_above, np.broadcast_to(cand_pos[None], (num_categories + 1,) + cand_pos.shape), 2)

            def label_above(first, last, label_hist=label_hist, cand_pos=cand_pos):
                above = st.suffix_counts(label_hist[:, first:last])  # (U, Lc, J)
                return np.take_along_axis(above, np.broadcast_to(cand_pos[:, None, :], above.shape[:2] + cand_pos.shape[1:]), 2)

            search = search_iqr_thresholds(label_above, cat_at, label_state.label_counts, label_state.label_pixels,
                                           total_counts, label_category, pixels, info["candidates"])
        if threshold == "iqr":
            unit_label = best_label_by_iqr(search.max_iqr)
            final_levels = search.level[unit_label, np.arange(units)]
            final_pos = position[np.arange(units), search.candidate[unit_label, np.arange(units)]]
        else:
            final_levels = info["fixed"]
            final_pos = position[:, -1]
        cc = category_above[:num_categories, np.arange(units), final_pos]  # (C, U)
        activation_fraction = category_above[-1, np.arange(units), final_pos] / float(pixels)
        label_above_final = _counts_above(label_hist, final_pos)  # (L, U)
        iou, iqr = score_counts(label_category, total_counts[:num_categories], label_state.label_counts, cc,
                                label_above_final)
        if threshold != "iqr":
            unit_label, _ = best_label_by_iou(iou)
        columns = np.arange(units)
        topk = topk_host[layer]
        filled = int((np.asarray(topk.indices)[0] != st.INT32_MAX).sum()) if units else 0
        result = LayerDissection(
            layer=layer, label_names=[l[0] for l in labels], label_categories=[l[1] for l in labels],
            categories=list(categories), label_category=label_category, threshold=threshold,
            quantile=float(quantile) if threshold == "quantile" else None, num_samples=source.num_samples,
            levels=np.asarray(final_levels, np.float32), activation_fraction=activation_fraction,
            label_counts=label_state.label_counts, label_pixels=label_state.label_pixels,
            total_counts=total_counts[:num_categories], category_activation_counts=cc,
            intersection_counts=label_above_final, iou=iou, iqr=iqr, unit_label=np.asarray(unit_label, np.int64),
            unit_iou=iou[unit_label, columns], unit_iqr=iqr[unit_label, columns],
            topk_values=np.asarray(topk.values)[:, :filled], topk_indices=np.asarray(topk.indices, np.int64)[:, :filled],
            raw_quantile_q=None if info["raw_quantiles"] is None else np.asarray(RAW_REPORT_Q),
            raw_quantiles=None if info["raw_quantiles"] is None else info["raw_quantiles"][:, :len(RAW_REPORT_Q)],
        )
        if search is not None:
            result.candidate_fractions = IQR_FRACTIONS.copy()
            result.candidate_levels = info["candidates"]
            result.max_iqr = search.max_iqr
            result.max_iqr_level = search.level
            result.max_iqr_quantile = search.quantile
            result.max_iqr_fraction = search.fraction
            result.max_iqr_iou = search.iou
            result.max_iqr_agreement = search.agreement
        results[layer] = result
    for name in ("counts.npz", "quantiles.npz"):
        path = run.path(name)
        if path and os.path.exists(path):
            os.remove(path)
    return results


# ============================================================================ public API


def _labels_and_categories(labels, categories):
    if isinstance(labels, Mapping):
        categories = labels.get("categories", categories)
        labels = labels["labels"]
    if categories is None:
        seen = []
        for _, cat in labels:
            if cat not in seen:
                seen.append(cat)
        categories = seen
    return [tuple(l) for l in labels], list(categories)


def dissect_features(features, segmentations, labels, *, categories: Sequence[str] | None = None,
                     levels=None, threshold: str = "quantile", quantile: float = 0.005,
                     search_iqr: bool | None = None, images=None, layer: str = "features",
                     k: int = 10, batch_size: int = 32, devices=None, outdir: str | None = None,
                     iou_threshold: float = 0.05, checkpoint_every: float = 600.0, progress: bool = True,
                     unit_chunk: int | None = None, make_images: bool = True, make_report: bool = True,
                     strip_length: int = 10, title: str | None = None) -> dict[str, LayerDissection]:
    """Dissect precomputed activations against precomputed segmentations.

    features: float (N, h, w, U) NHWC array (numpy, memmap or jax), or a dict layer -> such array;
    segmentations: int (N, H, W, D) multilabel segmentations (0 = no label) or (N, H, W);
    labels: list of (name, category) per label number (label 0 = none), or a dict
    ``{"labels": [...], "categories": [...]}`` as in labels.json; categories: category names
    (default: from labels.json, else in order of first appearance).
    threshold: 'quantile' (levels[u] = the exact 1 - quantile quantile of unit u's raw
    activations, the reference's default) or 'iqr' (the paper's information-quality-ratio
    search); levels: fixed thresholds (U,) (or dict layer -> (U,)), which override both.
    images: optional (N, H', W', 3) uint8 or [-1, 1] float images for the top-k strips.
    Returns {layer: LayerDissection}; with outdir, also writes scores.npz, strips and the report
    there (atomically; a rerun resumes).
    """
    labels, categories = _labels_and_categories(labels, categories)
    if not isinstance(features, Mapping):
        features = {layer: features}
        if levels is not None and not isinstance(levels, Mapping):
            levels = {layer: levels}
    elif levels is not None and not isinstance(levels, Mapping):
        raise ValueError("with several layers, levels must be a dict layer -> (U,) array")
    source = ArraySource(features, segmentations, images)
    shapes = {name: tuple(int(s) for s in a.shape[1:]) for name, a in source.arrays.items()}
    return _dissect(source, labels, categories, threshold=threshold, quantile=quantile, levels=levels,
                    search_iqr=search_iqr, k=k, batch_size=batch_size, devices=devices, outdir=outdir,
                    iou_threshold=iou_threshold, checkpoint_every=checkpoint_every, progress=progress,
                    unit_chunk=unit_chunk, make_images=make_images, make_report=make_report,
                    strip_length=strip_length, title=title, feature_shapes=shapes)


def dissect_generator(generator, segmenter, layers: Sequence[str], *, size: int = 10000, seed: int = 1,
                      seg_downsample: int = 2, threshold: str = "iqr", quantile: float = 0.005,
                      levels=None, search_iqr: bool | None = None, k: int = 10, batch_size: int = 32,
                      devices=None, outdir: str | None = None, iou_threshold: float = 0.05,
                      checkpoint_every: float = 600.0, progress: bool = True, unit_chunk: int | None = None,
                      make_images: bool = True, make_report: bool = True, strip_length: int = 10,
                      title: str | None = None, identity: dict | None = None) -> dict[str, LayerDissection]:
    """Dissect layers of a generator: for samples z_i (i < size) of RandomState(seed) normal noise,
    run h (to each layer), f (to the image) and the segmenter, and score every unit.

    generator: the Generator protocol (``params``, ``layer_names``, ``z_dim``, ``apply``, ``split(layer)``
    -> (h, f)); segmenter: the Segmenter protocol (``labels``, ``categories``, ``segment``).
    The segmentation is taken at 1/seg_downsample of the image size (2, as the reference), and
    features are upsampled to it. threshold: 'iqr' (default, the paper's GAN setting) or
    'quantile'; levels: fixed thresholds dict layer -> (U,). Other arguments as
    :func:`dissect_features`. Returns {layer: LayerDissection}.
    """
    source = GeneratorSource(generator, segmenter, layers, size, seed, seg_downsample, identity)
    labels, categories = _labels_and_categories(list(segmenter.labels), list(segmenter.categories))
    if levels is not None and not isinstance(levels, Mapping):
        if len(source.layers) != 1:
            raise ValueError("with several layers, levels must be a dict layer -> (U,) array")
        levels = {source.layers[0]: levels}
    return _dissect(source, labels, categories, threshold=threshold, quantile=quantile, levels=levels,
                    search_iqr=search_iqr, k=k, batch_size=batch_size, devices=devices, outdir=outdir,
                    iou_threshold=iou_threshold, checkpoint_every=checkpoint_every, progress=progress,
                    unit_chunk=unit_chunk, make_images=make_images, make_report=make_report,
                    strip_length=strip_length, title=title, feature_shapes=source.feature_shapes)
