"""``gandissect-jax insert``: switch units on at one place, and map where that works (the paper's Sec. 4.4).

    gandissect-jax insert --outdir D --layer layer4 --concept door --top 20 --at 5,3 [--value K | --quantile 0.99]
    gandissect-jax insert --outdir D --layer layer7 --concept window --top 20 --at 10:13,20:23

Forces the units to a value k (default: each unit's 0.99 quantile, the reference GANPaint's
choice, from the dissection's exact quantiles) at feature-map position ``--at`` (ROW,COLUMN), or
in the block of positions ``--at ROW0:ROW1,COL0:COL1`` (ends excluded), of ``--samples`` images and
reports the concept's share before and after (the ACE of the insertion, with a bootstrap
interval). Then the **context map** (the paper's Fig. 11): for every position of every one of
``--context-samples`` images, the change of the concept's share when the units are inserted there
alone (in a block of the same size centred there, for a block) -- all positions in one jitted call
(``vmap``) -- drawn as a heat map over the image, and averaged per *context*: the label that
covers the position's cell in the unedited image (doors appear on buildings, not in the sky), with
a bootstrap interval over the images of each context's per-image mean.

Writes ``D/intervention/insert/<layer>/<name>/``: ``insert.json``, ``grid.png``, ``context.png``,
``context_by_label.png`` and ``page.html``.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import arguments
from .intervention_common import (plain_help, activation, add_source_arguments, add_unit_arguments, batches, choose_units,
                                  fraction, positive_int, source_of, to_uint8)


# the context map's z use seed + 1, which must be a seed too
measure_seed = arguments.int_in_range(0, arguments.MAX_SEED - 1)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``insert`` sub-command."""
    parser = subparsers.add_parser("insert", help="insert units at a position; context map of where insertion works",
                                   description=plain_help(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    add_unit_arguments(parser, concept_required=True)
    run = parser.add_argument_group("insertion")
    run.add_argument("--at", type=arguments.feature_region(), required=True,
                     help=f"feature-map position ROW,COLUMN, e.g. 5,3, or block ROW0:ROW1,COL0:COL1 (ends excluded), "
                          f"e.g. 4:7,2:5, each in {arguments.feature_region().interval} and inside the layer's feature "
                          "map (required; the shapes: gandissect-jax layers MODEL)")
    run.add_argument("--value", type=activation,
                     help=f"the value k set for every unit, in {activation.interval} (default: each unit's "
                          "--quantile)")
    run.add_argument("--quantile", type=fraction, default=0.99,
                     help=f"k = each unit's QUANTILE of its activations, in {fraction.interval} (default "
                          "%(default)s, the reference's; unused with --value)")
    run.add_argument("--samples", type=positive_int, default=100,
                     help=f"images measured at --at, in {positive_int.interval} (default %(default)s)")
    run.add_argument("--seed", type=measure_seed, default=4,
                     help=f"their z seed (the context map's z use seed + 1), in {measure_seed.interval} "
                          "(default %(default)s)")
    run.add_argument("--context-samples", type=positive_int, default=16,
                     help=f"images of the context map, in {positive_int.interval} (default %(default)s)")
    run.add_argument("--positions-per-step", type=positive_int, default=64,
                     help=f"context-map positions computed at once (vmap-ed) per batch, in {positive_int.interval}; "
                          "fewer use less memory on fine layers (default %(default)s)")
    run.add_argument("--show", type=positive_int, default=8,
                     help=f"images shown, in {positive_int.interval}; --samples at most are shown "
                          "(default %(default)s)")
    run.add_argument("--resamples", type=positive_int, default=1000,
                     help=f"bootstrap resamples, in {positive_int.interval} (default %(default)s)")
    parser.set_defaults(func=run_command)
    return parser


def mark_cell(images: np.ndarray, at: tuple[int, int, int, int], grid: tuple[int, int]) -> np.ndarray:
    """uint8 images with the feature cells ``at`` = (row0, row1, col0, col1) (ends excluded)
    outlined in yellow."""
    images = images.copy()
    height, width = images.shape[1:3]
    top, bottom = at[0] * height // grid[0], at[1] * height // grid[0] - 1
    left, right = at[2] * width // grid[1], at[3] * width // grid[1] - 1
    yellow = np.array([255, 230, 0], np.uint8)
    images[:, top, left:right + 1] = yellow
    images[:, bottom, left:right + 1] = yellow
    images[:, top:bottom + 1, left] = yellow
    images[:, top:bottom + 1, right] = yellow
    return images


def run_command(args) -> int:
    import jax.numpy as jnp

    from gandissect_jax import ace, effects, pages
    from gandissect_jax.experiment import Experiment, register
    from gandissect_jax.sampling import sample_z

    source = source_of(args)
    G = source.generator
    rows_, cols_, channels = ace.layer_shape(G, args.layer)
    row0, row1, col0, col1 = args.at
    block = (row1 - row0, col1 - col0)
    at_text = f"{row0},{col0}" if block == (1, 1) else f"{row0}:{row1},{col0}:{col1}"
    if not (row1 <= rows_ and col1 <= cols_):  # a usage error, before the segmenter loads
        raise arguments.FlagError("--at", f"{at_text} is outside the {rows_}x{cols_} feature map of {args.layer}; "
                                          f"allowed ROW in [0, {rows_ - 1}], COLUMN in [0, {cols_ - 1}] (block ends "
                                          f"up to {rows_},{cols_})")
    units, how, labels, concept = choose_units(args, source, channels, need_concept=True)
    S = source.segmenter
    if args.value is not None:
        value = np.full(channels, args.value, np.float32)
        value_how = f"k = {args.value:g} for every unit"
    else:
        value = source.insertion_value(args.layer, args.quantile)
        value_how = f"k = each unit's {args.quantile:g} quantile"
    at = [row0, col0]
    settings = {"layer": args.layer, "units": [int(u) for u in units], "labels": list(labels), "at": at,
                "value": [round(float(v), 6) for v in value[units]], "samples": args.samples, "seed": args.seed,
                "context_samples": args.context_samples, "resamples": args.resamples, "source": source.identity()}
    if block != (1, 1):  # (a one-cell run keeps the settings, and so the name and resumption, it always had)
        settings["block"] = list(block)
    where_name = f"{row0}_{col0}" if block == (1, 1) else f"{row0}-{row1}_{col0}-{col1}"
    name = args.name or f"{concept}-top{len(units)}-{args.rank if args.units is None else 'units'}-at{where_name}"
    where = np.zeros((rows_, cols_), np.float32)
    where[row0:row1, col0:col1] = 1.0
    names = [n for n, _ in S.labels]
    ds = source.seg_downsample
    with Experiment(args.outdir, "insert", args.layer, name, settings) as experiment:
        z = sample_z(args.samples, G.z_dim, args.seed)

        # the concept's share without (count 0) and with the units (count K) inserted at --at
        order = np.concatenate([units, np.setdiff1d(np.arange(channels), units)])

        def measure():
            shares = []
            for _, batch, count in batches(z, args.batch_size, args.quiet, "insert"):
                got = effects.ace_curve(G, S, G.params, S.params, batch, args.layer, order, (0, len(units)), labels,
                                        mode="insert", value=value, where=where, downsample=ds)
                shares.append(np.asarray(got)[:, :count])
            return {"concept_share": np.concatenate(shares, 1)}

        concept_before, concept_after = experiment.step("shares", measure)["concept_share"]
        inserted = effects.bootstrap_mean(concept_after - concept_before, resamples=args.resamples)
        zc = sample_z(args.context_samples, G.z_dim, args.seed + 1)

        def context():
            maps, cells = [], []
            for _, batch, count in batches(zc, args.batch_size, args.quiet, "context map"):
                maps.append(np.asarray(effects.context_map(G, S, G.params, S.params, batch, args.layer, units, value,
                                                           labels, downsample=ds, block=block,
                                                           positions_per_step=args.positions_per_step))[:count])
                seg = S.segment(S.params, jnp.clip(G(jnp.asarray(batch)), -1, 1), ds)
                cells.append(np.asarray(effects.cell_labels(seg, (rows_, cols_), len(names)))[:count])
            return {"effect": np.concatenate(maps), "context": np.concatenate(cells)}

        ctx = experiment.step("context", context)
        effect, cell = ctx["effect"], ctx["context"]
        by_label = []
        for c in np.unique(cell):
            values = effect[cell == c]
            # per image, the mean effect over its cells of this context; a bootstrap over those images
            has = (cell == c).any((1, 2))
            per_image = np.asarray([effect[n][cell[n] == c].mean() for n in np.flatnonzero(has)])
            interval = (effects.bootstrap_mean(per_image, resamples=args.resamples) if len(per_image) > 1 else None)
            by_label.append({"label": names[c], "labelnum": int(c), "cells": int(values.size),
                             "mean_effect": float(values.mean()), "fraction_positive": float((values > 0).mean()),
                             "images": int(has.sum()),
                             "image_mean_effect": float(per_image.mean()),
                             "image_ci_low": None if interval is None else float(interval.low),
                             "image_ci_high": None if interval is None else float(interval.high)})
        by_label.sort(key=lambda r: -r["mean_effect"])
        shown = jnp.asarray(z[:args.show])
        x0 = G(shown)
        x1 = effects.insert(G, G.params, shown, args.layer, jnp.asarray(units), value, where=where)
        grid = [("generated", mark_cell(to_uint8(x0), args.at, (rows_, cols_))),
                ("segmentation", pages.colorize(np.asarray(S.segment(S.params, jnp.clip(x0, -1, 1))), S.labels)),
                (f"{len(units)} units inserted\nat {at_text}", mark_cell(to_uint8(x1), args.at, (rows_, cols_))),
                ("segmentation", pages.colorize(np.asarray(S.segment(S.params, jnp.clip(x1, -1, 1))), S.labels))]
        experiment.write_bytes("grid.png", pages.image_grid(grid))
        k = min(args.show, len(zc))
        experiment.write_bytes("context.png", pages.plot_context(
            to_uint8(G(jnp.asarray(zc[:k]))), effect[:k],
            title=f"context map: inserting {concept} units at each position"
                  + ("" if block == (1, 1) else f" ({block[0]}x{block[1]} block)")))
        experiment.write_bytes("context_by_label.png", pages.plot_bars(
            [r["label"] for r in by_label], [r["mean_effect"] for r in by_label],
            title=f"mean effect of inserting {concept}, by what is there", ylabel=f"change of {concept} share"))
        summary = {"kind": "insert", "layer": args.layer, "units": [int(u) for u in units], "chosen": how,
                   "concept": concept, "labels": list(labels), "at": at, "block": list(block), "value": value_how,
                   "samples": args.samples, "seed": args.seed,
                   "concept_share_before": float(concept_before.mean()), "concept_share_after": float(concept_after.mean()),
                   "ace": float(inserted.mean), "ci_low": float(inserted.low), "ci_high": float(inserted.high),
                   "context_samples": args.context_samples, "context_effect_by_label": by_label,
                   "context_effect_mean": float(effect.mean()), "settings": settings}
        experiment.write_json("insert.json", summary)
        where_text = (f"position {at_text}" if block == (1, 1) else
                      f"the {block[0]}x{block[1]} block of positions {at_text} (ends excluded)")
        body = (f"<p>{how} ({', '.join(map(str, units))}) of {args.layer}, {value_how}, inserted at "
                f"{where_text} of the {rows_}x{cols_} feature map.</p>"
                f"<p>{concept} share over {args.samples} samples: {concept_before.mean():.4f} before, "
                f"{concept_after.mean():.4f} after; ACE {inserted.mean:+.4f} "
                f"(95% CI {inserted.low:+.4f} to {inserted.high:+.4f}).</p>{pages.img('grid.png', 'insertion')}"
                f"<h2>Context map</h2><p>Change of the {concept} share when the units are inserted at each position "
                f"alone{'' if block == (1, 1) else f' (in a {block[0]}x{block[1]} block centred there)'} "
                f"({args.context_samples} samples), and its mean by the label covering the position's cell.</p>"
                f"{pages.img('context.png', 'context map')}{pages.img('context_by_label.png', 'by label')}"
                + pages.table(["context label", "cells", "mean effect", "fraction of cells gaining", "images",
                               "mean of the images' means", "95% CI over images"],
                              [[r["label"], r["cells"], r["mean_effect"], r["fraction_positive"], r["images"],
                                r["image_mean_effect"],
                                "-" if r["image_ci_low"] is None else f"{r['image_ci_low']:+.5f} to {r['image_ci_high']:+.5f}"]
                               for r in by_label])
                + '<p class="note">Data: <a href="insert.json">insert.json</a>. '
                '<a href="../../../index.html">All experiments</a></p>')
        experiment.write_bytes("page.html", pages.page(f"Insertion: {how}, {args.layer}", body, summary).encode())
        register(experiment, f"insert {how} at {at_text}, {args.layer}", {"concept": concept})
    print(f"{concept} at {at_text}: share {concept_before.mean():.4f} -> {concept_after.mean():.4f}; context: "
          + ", ".join(f"{r['label']} {r['mean_effect']:+.4f}" for r in by_label[:6]))
    print(f"page: {experiment.path('page.html')}")
    return 0
