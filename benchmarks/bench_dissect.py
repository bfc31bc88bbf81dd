"""Dissection benchmarks (issue 4): paper-scale streaming memory, and IoU / threshold-search
throughput beside the PyTorch reference's ``collect_bincounts`` / ``collect_iqr``.

Run the suites with ``pytest benchmarks/bench_dissect.py`` (add ``GANDISSECT_REFERENCE=/path``
and torch for the reference comparison). The paper-scale memory runs are subprocesses so that
each reports its own peak RSS:

    python benchmarks/bench_dissect.py scale --samples 1000
    python benchmarks/bench_dissect.py scale --samples 4000

``GANDISSECT_BENCH_SCALE_SAMPLES=1000,4000`` makes the pytest suite use those sample counts
(default ``64,256``, which takes a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# --------------------------------------------------------------------------- synthetic data

PAPER = dict(units=512, feature=8, seg=128, labels=1800, channels=5)


def label_layout(num_labels: int):
    """Labels and categories shaped like the unified-parsing vocabulary with quad division:
    0, objects and their four quadrant copies, then materials, then parts."""
    objects = (num_labels - 1) * 3 // 16  # e.g. 337 objects, x5 with quads
    materials = max(1, (num_labels - 1 - 5 * objects) // 5)
    parts = num_labels - 1 - 5 * objects - materials
    labels = [("-", "object")]
    labels += [(f"object{i}", "object") for i in range(objects)]
    for quad in ("t", "r", "b", "l"):
        labels += [(f"object{i}-{quad}", "object") for i in range(objects)]
    labels += [(f"material{i}", "material") for i in range(materials)]
    labels += [(f"part{i}", "part") for i in range(parts)]
    assert len(labels) == num_labels
    return labels, ["object", "part", "material"], objects, materials, parts


class SyntheticSource:
    """Deterministic per-index stand-in for a generator + segmenter, computed on device.

    Features: (8, 8, U) smooth-ish noise, with some units tied to the object layout.
    Segmentations: (S, S, 5): objects on a random 4x4 block layout (Zipf-distributed classes),
    their top/bottom and left/right quadrant labels, material blobs and parts inside objects.
    """

    def __init__(self, num_samples, units, feature, seg, num_labels, channels=5, seed=0):
        import jax

        self.num_samples, self.units, self.feature, self.seg = num_samples, units, feature, seg
        self.layers = ("layer",)
        self.seg_size = (seg, seg)
        self.labels, self.categories, self.objects, self.materials, self.parts = label_layout(num_labels)
        self.channels = channels
        self.seed = seed
        self._make = jax.jit(self._make_batch)

    def _make_batch(self, indices):
        import jax
        import jax.numpy as jnp

        def one(index):
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), index)
            k1, k2, k3, k4, k5 = jax.random.split(key, 5)
            # objects on a 4x4 block layout, Zipf-like class frequencies
            ranks = jax.random.randint(k1, (4, 4), 0, 1 << 20)
            classes = 1 + jnp.floor(self.objects * (ranks / (1 << 20)) ** 3).astype(jnp.int32)
            block = self.seg // 4
            obj = jnp.repeat(jnp.repeat(classes, block, 0), block, 1)
            y = jnp.arange(self.seg)[:, None] % block
            x = jnp.arange(self.seg)[None, :] % block
            top = jnp.where(y < block // 2, 1, 3)
            right = jnp.where(x >= block // 2, 2, 4)
            quad_v = obj + top * self.objects
            quad_h = obj + right * self.objects
            first_material = 1 + 5 * self.objects
            first_part = first_material + self.materials
            mat_blocks = jax.random.randint(k2, (4, 4), -self.materials, self.materials)
            material = jnp.where(mat_blocks > 0, first_material + mat_blocks - 1, 0)
            material = jnp.repeat(jnp.repeat(material, block, 0), block, 1)
            part_blocks = jax.random.randint(k3, (8, 8), -2 * self.parts, self.parts)
            part = jnp.where(part_blocks > 0, first_part + part_blocks - 1, 0)
            part = jnp.repeat(jnp.repeat(part, block // 2, 0), block // 2, 1)
            channels = [obj, material, part, quad_v, quad_h][: self.channels]
            labels = jnp.stack(channels, -1).astype(jnp.int32)
            noise = jax.random.normal(k4, (self.feature, self.feature, self.units))
            coarse = jax.image.resize(classes.astype(jnp.float32), (self.feature, self.feature), "nearest")
            tied = jnp.sin(coarse[..., None] * (1 + jnp.arange(self.units) % 7))
            features = noise + 2.0 * tied * (jnp.arange(self.units) % 2)
            return features, labels

        return jax.vmap(one)(indices)

    @property
    def feature_shapes(self):
        return {"layer": (self.feature, self.feature, self.units)}

    def fetch(self, indices, sharding, labels=True):
        import jax

        features, segmentation = self._make(np.clip(indices, 0, self.num_samples - 1).astype(np.int32))
        batch = {"layer": jax.device_put(features, sharding)}
        if labels:
            batch["labels"] = jax.device_put(segmentation, sharding)
        return batch

    def features_only(self):
        from gandissect_jax.dissection.sources import FeaturesOnly

        return FeaturesOnly(self)

    def visual_batch(self, indices, layer):
        raise NotImplementedError

    def identity(self):
        return {"kind": "synthetic", "n": self.num_samples, "units": self.units, "seed": self.seed}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_scale(samples: int, threshold: str = "iqr", batch_size: int = 8, **scale) -> dict:
    """Dissect ``samples`` synthetic samples at paper scale; return timings and peak RSS (MB)."""
    import jax

    from gandissect_jax.dissection import DissectConfig, dissect, engine

    params = dict(PAPER, **scale)
    source = SyntheticSource(samples, params["units"], params["feature"], params["seg"], params["labels"],
                             params["channels"])
    timings = {}
    original = engine.tally

    def timed(*args, desc="tally", **kwargs):
        start = time.perf_counter()
        result = original(*args, desc=desc, **kwargs)
        timings[desc] = time.perf_counter() - start
        return result

    engine.tally = timed  # the passes call engine.tally, one call per pass
    try:
        start = time.perf_counter()
        config = DissectConfig(threshold=threshold, batch_size=batch_size, checkpoint_every=86400, progress=False,
                               make_images=False, make_report=False)
        results = dissect(source, source.labels, source.categories, config, default_threshold=threshold)
        total = time.perf_counter() - start
    finally:
        engine.tally = original
    result = results["layer"]
    passes = sum(timings.values())
    return {
        "samples": samples, "threshold": threshold, "batch_size": batch_size, **params,
        "device": str(jax.devices()[0]), "total_s": round(total, 2),
        "passes_s": {k: round(v, 2) for k, v in timings.items()},
        "analysis_s": round(total - passes, 2),
        "samples_per_s": round(samples / total, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "interpretable": int(result.interpretable().sum()),
    }


def run_scale_subprocess(samples: int, **options) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "scale", "--samples", str(samples)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- pytest suites


def test_paper_scale_memory_is_bounded(benchmark):
    """Peak RSS at two sample counts (subprocesses): it must not grow with the sample count."""
    counts = [int(x) for x in os.environ.get("GANDISSECT_BENCH_SCALE_SAMPLES", "64,256").split(",")]
    runs = benchmark.pedantic(lambda: [run_scale_subprocess(n) for n in counts], rounds=1, iterations=1)
    benchmark.extra_info["runs"] = runs
    for run in runs:
        print(json.dumps(run))
    small, large = runs[0], runs[-1]
    assert large["peak_rss_mb"] < small["peak_rss_mb"] * 1.15 + 200, runs


REFERENCE_SCALES = {
    "small": (dict(units=64, feature=8, seg=64, labels=120, channels=3), 24),
    "medium": (dict(units=256, feature=8, seg=128, labels=600, channels=5), 16),
    # the paper's scale (as PAPER above): 512 units, 1,800 labels, labels at 128x128
    "paper": (dict(PAPER),
              int(os.environ.get("GANDISSECT_BENCH_PAPER_SAMPLES", "32"))),
}


def _reference_inputs(scale, samples):
    """Identical inputs for both implementations: NHWC (ours) / NCHW (reference)."""
    import jax

    source = SyntheticSource(samples, scale["units"], scale["feature"], scale["seg"], scale["labels"],
                             scale["channels"], seed=4)
    features, labels = jax.device_get(source._make(np.arange(samples, dtype=np.int32)))
    return np.asarray(features, np.float32), np.asarray(labels, np.int32), source.labels, source.categories


def _reference_runner(torch, features_nchw, segs_nchw, labels, categories):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))
            self.current = None

        def forward(self, index):
            self.current = torch.from_numpy(features_nchw[index.numpy()])
            return self.current

        def retained_features(self):
            return {"layer": self.current}

    class SegRunner:
        def get_label_and_category_names(self):
            return labels, categories

        def run_and_segment_batch(self, batch, model, want_bincount=False, want_rgb=False):
            index = batch[0]
            model(index)
            seg = torch.from_numpy(segs_nchw[index.numpy()]).long()
            bc = None
            if want_bincount:
                n = seg.shape[0]
                offsets = torch.arange(n)[:, None, None, None] * len(labels)
                bc = (seg + offsets).view(-1).bincount(minlength=n * len(labels)).view(n, len(labels))
            return seg, bc, torch.zeros(1), (seg.shape[2] * 2, seg.shape[3] * 2)

    return Model().eval(), SegRunner()


def rounding_tie_units(features, levels, seg_size, rtol=1e-6, batch=8):
    """Units with an upsampled pixel within ``rtol`` (relative) of the unit's level, anywhere in
    the data: there our bilinear upsampling and the reference's ``grid_sample`` (equal to float32
    rounding, not bit for bit) may put the pixel on opposite sides of the level."""
    import jax
    import jax.numpy as jnp

    from gandissect_jax.dissection.upsample import upsample_bilinear

    levels = np.asarray(levels, np.float32)
    tolerance = (np.abs(levels) * rtol + np.float32(1e-30)).astype(np.float32)

    @jax.jit
    def near(chunk, levels, tolerance):
        up = upsample_bilinear(chunk, tuple(seg_size))  # (n, H, W, U)
        return jnp.any(jnp.abs(up - levels) <= tolerance, axis=(0, 1, 2))

    found = np.zeros(features.shape[-1], bool)
    for start in range(0, features.shape[0], batch):
        found |= np.asarray(near(jnp.asarray(features[start:start + batch]), levels, tolerance))
    return found


def _assert_iou_parity(ours, reference, features, levels, seg_size) -> dict:
    """Our IoU equals the reference's to 1e-6, except in units with a rounding tie at the level
    (:func:`rounding_tie_units`), which must be few (at most 1% of the units). Returns how many
    units had a pixel within rounding of their level and which units differ."""
    ties = rounding_tie_units(features, levels, seg_size)
    differs = np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64)) > 1e-6  # (L, U)
    unexplained = differs & ~ties[None, :]
    assert not unexplained.any(), (
        f"{int(unexplained.sum())} IoU values differ from the reference's by more than 1e-6 in units "
        f"{np.unique(np.nonzero(unexplained)[1]).tolist()} with no pixel within rounding of the level")
    differing_units = np.unique(np.nonzero(differs)[1])
    assert len(differing_units) <= max(2, features.shape[-1] // 100), f"units {differing_units.tolist()} differ"
    return {"units_with_a_pixel_within_rounding": int(ties.sum()), "units_differing": differing_units.tolist()}


@pytest.mark.parametrize("scale_name", sorted(REFERENCE_SCALES))
def test_iou_and_threshold_search_vs_reference(benchmark, tmp_path, scale_name):
    """Samples/s of the IoU pass and of the IQR threshold search, ours and the reference's, on
    identical inputs in the same process."""
    from reference_harness import import_reference

    dissection = import_reference("netdissect.dissection")
    import torch

    from gandissect_jax.dissection import dissect_features

    scale, samples = REFERENCE_SCALES[scale_name]
    features, segs, labels, categories = _reference_inputs(scale, samples)
    features_nchw = np.ascontiguousarray(features.transpose(0, 3, 1, 2))
    segs_nchw = np.ascontiguousarray(segs.transpose(0, 3, 1, 2))
    model, segrunner = _reference_runner(torch, features_nchw, segs_nchw, labels, categories)
    dataset = torch.utils.data.TensorDataset(torch.arange(samples))
    levels = np.quantile(features.reshape(-1, features.shape[-1]), 0.995, axis=0, method="hazen").astype(np.float32)
    figures = {}

    def reference_bincounts(data=dataset, record=True):
        loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=0)
        outdir = tmp_path / f"ref-bc-{time.monotonic_ns()}"
        os.makedirs(outdir / "layer")
        start = time.perf_counter()
        with torch.no_grad():
            out = dissection.collect_bincounts(str(outdir), model, loader, {"layer": torch.from_numpy(levels)},
                                               segrunner)
        if record:
            figures["reference collect_bincounts"] = time.perf_counter() - start
        return out

    def reference_iqr(data=dataset, record=True):
        loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=0)
        outdir = tmp_path / f"ref-iqr-{time.monotonic_ns()}"
        os.makedirs(outdir / "layer")
        dissection.save_state_dict = lambda obj, path: None  # its numpy 2 cache writer fails; caches unused
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            out = dissection.collect_iqr(str(outdir), model, loader, segrunner)
        if record:
            figures["reference collect_iqr"] = time.perf_counter() - start
        return out

    def ours(name, **kwargs):
        dissect_features(features, segs, labels, categories=categories, batch_size=8, progress=False, **kwargs)  # warm
        start = time.perf_counter()
        result = dissect_features(features, segs, labels, categories=categories, batch_size=8, progress=False,
                                  **kwargs)
        figures[name] = time.perf_counter() - start
        return result["features"]

    def run_all():
        warm = torch.utils.data.TensorDataset(torch.arange(2))  # first calls pay torch's lazy set-up
        reference_bincounts(warm, record=False)
        reference_iqr(warm, record=False)
        reference_counts = reference_bincounts()
        ours_iou = ours("ours IoU at fixed levels", levels=levels)
        reference_iqr()
        ours("ours IQR search (quantiles + counts + search)", threshold="iqr")
        return reference_counts, ours_iou

    (reference_counts, ours_iou) = benchmark.pedantic(run_all, rounds=1, iterations=1)
    iou_reference = reference_counts[0]["layer"].numpy()
    per_second = {name: round(samples / seconds, 2) for name, seconds in figures.items()}
    benchmark.extra_info.update({"samples_per_s": per_second, "scale": scale, "samples": samples})
    print(json.dumps({"samples_per_s": per_second, "scale": scale, "samples": samples}), flush=True)
    parity = _assert_iou_parity(ours_iou.iou, iou_reference, features, levels, segs.shape[1:3])
    benchmark.extra_info["iou_parity"] = parity
    print(json.dumps({"iou_parity": parity}))


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    scale = sub.add_parser("scale", help="one paper-scale run; prints a JSON line")
    scale.add_argument("--samples", type=int, required=True)
    scale.add_argument("--threshold", default="iqr", choices=("iqr", "quantile"))
    scale.add_argument("--batch-size", type=int, default=8)
    scale.add_argument("--units", type=int, default=PAPER["units"])
    scale.add_argument("--labels", type=int, default=PAPER["labels"])
    scale.add_argument("--seg", type=int, default=PAPER["seg"])
    args = parser.parse_args(argv)
    if args.command == "scale":
        out = run_scale(args.samples, args.threshold, args.batch_size, units=args.units, labels=args.labels,
                        seg=args.seg)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
