"""``gandissect-jax segment-units``: segment images with the units of one layer (Network Dissection's unit segmentation).

    gandissect-jax segment-units --outdir D --layer layer4 [--samples 100] [--iou-threshold 0.05]

Each pixel gets the concept of the interpretable unit (dissection label, IoU >= the threshold)
whose upsampled activation exceeds its threshold (level) by the most, relative to the level; 0
where none does (:func:`gandissect_jax.unitseg.unit_segmentation`). Reports how it agrees with
the segmenter on ``--samples`` images (z of ``--seed``): coverage, pixel accuracy and IoU per
label.

Writes ``D/intervention/segment-units/<layer>/<name>/``: ``segment-units.json``, ``grid.png``
(image, segmenter, units) and ``page.html``.
"""

from __future__ import annotations

import argparse

import numpy as np

from .dissect import iou_threshold  # one range for --iou-threshold in every command
from .intervention_common import (plain_help, add_source_arguments, batches, positive_int, seed, source_of,
                                  to_uint8)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``segment-units`` sub-command."""
    parser = subparsers.add_parser("segment-units", help="segment images with a layer's interpretable units",
                                   description=plain_help(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    run = parser.add_argument_group("unit segmentation")
    run.add_argument("--samples", type=positive_int, default=100,
                     help=f"images measured, in {positive_int.interval} (default %(default)s)")
    run.add_argument("--seed", type=seed, default=6, help=f"their z seed, in {seed.interval} (default %(default)s)")
    run.add_argument("--iou-threshold", type=iou_threshold,
                     help=f"units interpretable from this IoU, in {iou_threshold.interval} (default: the dissection's)")
    run.add_argument("--show", type=positive_int, default=8,
                     help=f"images shown, in {positive_int.interval}; --samples at most are shown "
                          "(default %(default)s)")
    parser.set_defaults(func=run_command)
    return parser


def run_command(args) -> int:
    import jax
    import jax.numpy as jnp

    from gandissect_jax import pages, unitseg
    from gandissect_jax.experiment import Experiment, register
    from gandissect_jax.generator import split_of
    from gandissect_jax.sampling import sample_z

    source = source_of(args)
    G, S = source.generator, source.segmenter
    result = source.result(args.layer)
    threshold = args.iou_threshold if args.iou_threshold is not None else float(source.document.get("iou_threshold", 0.05))
    interpretable = result.interpretable(threshold)
    if not interpretable.any():
        raise ValueError(f"no unit of {args.layer} is interpretable at IoU >= {threshold}; lower --iou-threshold")
    settings = {"layer": args.layer, "samples": args.samples, "seed": args.seed, "iou_threshold": threshold,
                "source": source.identity()}
    name = args.name or f"iou{threshold:g}"
    names = [n for n, _ in S.labels]
    ds = source.seg_downsample
    h, f = split_of(G, args.layer)
    with Experiment(args.outdir, "segment-units", args.layer, name, settings) as experiment:
        z = sample_z(args.samples, G.z_dim, args.seed)

        def measure():
            predicted, truth = [], []
            for _, batch, count in batches(z, args.batch_size, args.quiet, "segment units"):
                r, side = h(G.params, jnp.asarray(batch))
                seg = S.segment(S.params, jnp.clip(f(G.params, r, side), -1, 1), ds)
                labels = unitseg.unit_segmentation(r, result.levels, result.unit_label, interpretable, seg.shape[1:3])
                predicted.append(np.asarray(labels)[:count])
                truth.append(np.asarray(seg)[:count])
            return {"predicted": np.concatenate(predicted), "segmentation": np.concatenate(truth)}

        out = experiment.step("segmentation", measure)
        agreement = unitseg.agreement(out["predicted"], out["segmentation"])
        k = min(args.show, args.samples)
        images = to_uint8(G(jnp.asarray(z[:k])))
        grid = [("generated", images), ("segmenter", pages.colorize(out["segmentation"][:k], S.labels)),
                (f"units of {args.layer}", pages.colorize(out["predicted"][:k], S.labels))]
        experiment.write_bytes("grid.png", pages.image_grid(grid))
        per_label = [{"label": names[c], "labelnum": c, "iou": v[0], "predicted_pixels": v[1], "segmenter_pixels": v[2],
                      "units": int(((result.unit_label == c) & interpretable).sum())}
                     for c, v in sorted(agreement.per_label.items(), key=lambda kv: -kv[1][0])]
        summary = {"kind": "segment-units", "layer": args.layer, "samples": args.samples, "seed": args.seed,
                   "iou_threshold": threshold, "interpretable_units": int(interpretable.sum()),
                   "coverage": agreement.coverage, "accuracy": agreement.accuracy, "per_label": per_label,
                   "settings": settings}
        experiment.write_json("segment-units.json", summary)
        body = (f"<p>{int(interpretable.sum())} interpretable units of {args.layer} (IoU >= {threshold:g}) segment "
                f"{args.samples} images: they label {agreement.coverage:.1%} of the pixels, and "
                f"{agreement.accuracy:.1%} of those agree with the segmenter.</p>{pages.img('grid.png', 'grid')}"
                + pages.table(["label", "units", "IoU with the segmenter", "pixels (units)", "pixels (segmenter)"],
                              [[r["label"], r["units"], r["iou"], r["predicted_pixels"], r["segmenter_pixels"]]
                               for r in per_label])
                + '<p class="note">Data: <a href="segment-units.json">segment-units.json</a>. '
                '<a href="../../../index.html">All experiments</a></p>')
        experiment.write_bytes("page.html", pages.page(f"Unit segmentation of {args.layer}", body, summary).encode())
        register(experiment, f"unit segmentation, {args.layer}", {"coverage": agreement.coverage,
                                                                   "accuracy": agreement.accuracy})
    del jax
    print(f"{args.layer}: units label {agreement.coverage:.1%} of pixels; {agreement.accuracy:.1%} agree with the segmenter")
    print(f"page: {experiment.path('page.html')}")
    return 0
