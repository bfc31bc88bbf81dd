"""``gandissect-jax ablate``: switch units off and measure what changes (the paper's Sec. 3.2, 4.2).

    gandissect-jax ablate --outdir D --layer layer4 --units 3,17,42
    gandissect-jax ablate --outdir D --layer layer4 --concept tree --top 20 [--rank iou|ace]

Sets the units to 0 at every position of ``--samples`` generated images (z of ``--seed``),
segments the images before and after, and reports every label's share before and after and the
average causal effect (ACE) of the ablation on it, ``mean over samples of share_after -
share_before``, with a percentile bootstrap confidence interval over samples (``--resamples``).
The concept (with ``--concept``) comes first.

Writes ``D/intervention/ablate/<layer>/<name>/``: ``ablate.json``, ``grid.png`` (generated images,
their segmentation, the ablated images, their segmentation) and ``page.html``.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import arguments
from .intervention_common import (plain_help, add_source_arguments, add_unit_arguments, batches, check_units_or_concept,
                                  choose_units, fraction, label_names, positive_int, seed, source_of, to_uint8)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``ablate`` sub-command."""
    parser = subparsers.add_parser("ablate", help="ablate units and measure every label's change (ACE with a bootstrap CI)",
                                   description=plain_help(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    add_unit_arguments(parser)
    run = parser.add_argument_group("measurement")
    run.add_argument("--samples", type=positive_int, default=200,
                     help=f"images measured, in {positive_int.interval} (default %(default)s)")
    run.add_argument("--seed", type=seed, default=2,
                     help=f"their z seed, in {seed.interval} (default %(default)s, as the reference's evalablate)")
    run.add_argument("--show", type=positive_int, default=8,
                     help=f"images shown in grid.png, in {positive_int.interval}; --samples at most are shown "
                          "(default %(default)s)")
    run.add_argument("--resamples", type=positive_int, default=1000,
                     help=f"bootstrap resamples, in {positive_int.interval} (default %(default)s)")
    run.add_argument("--level", type=fraction, default=0.95,
                     help=f"confidence level, in {fraction.interval} (default %(default)s)")
    arguments.add_check(parser, check_units_or_concept)
    parser.set_defaults(func=run_command)
    return parser


def effect_table(before: np.ndarray, after: np.ndarray, names, first, resamples: int, level: float, seed: int = 0):
    """Per label: mean share before / after and the ACE (mean of after - before) with its bootstrap
    interval, labels that occur in either, the concept's labels first, then by |ACE|."""
    from gandissect_jax.effects import bootstrap_mean

    effect = bootstrap_mean(after - before, resamples=resamples, level=level, seed=seed)
    b, a = before.mean(0), after.mean(0)
    present = [c for c in range(1, len(names)) if b[c] > 0 or a[c] > 0 or c in (first or ())]
    present.sort(key=lambda c: (c not in (first or ()), -abs(effect.mean[c]), c))
    return [{"label": names[c], "labelnum": int(c), "share_before": float(b[c]), "share_after": float(a[c]),
             "ace": float(effect.mean[c]), "ci_low": float(effect.low[c]), "ci_high": float(effect.high[c])}
            for c in present]


def run_command(args) -> int:
    import jax.numpy as jnp

    from gandissect_jax import ace, effects, pages
    from gandissect_jax.experiment import Experiment, register
    from gandissect_jax.sampling import sample_z

    source = source_of(args)
    G, S = source.generator, source.segmenter
    channels = ace.layer_shape(G, args.layer)[-1]
    units, how, labels, concept = choose_units(args, source, channels)
    settings = {"layer": args.layer, "units": [int(u) for u in units], "samples": args.samples, "seed": args.seed,
                "resamples": args.resamples, "level": args.level, "source": source.identity()}
    name = args.name or (f"{concept}-top{args.top}-{args.rank}" if args.units is None else
                         "units-" + "_".join(map(str, units[:12])) + ("..." if len(units) > 12 else ""))
    names = label_names(S)
    with Experiment(args.outdir, "ablate", args.layer, name, settings) as experiment:
        z = sample_z(args.samples, G.z_dim, args.seed)

        def measure():
            before, after = [], []
            for _, batch, count in batches(z, args.batch_size, args.quiet, "ablate"):
                b, a = effects.paired_label_shares(G, S, G.params, S.params, batch, args.layer, units,
                                                   downsample=source.seg_downsample)
                before.append(np.asarray(b)[:count])
                after.append(np.asarray(a)[:count])
            return {"before": np.concatenate(before), "after": np.concatenate(after)}

        shares = experiment.step("shares", measure)
        rows = effect_table(shares["before"], shares["after"], names, labels, args.resamples, args.level)
        shown = jnp.asarray(z[:args.show])
        x0, x1 = G(shown), effects.ablate(G, G.params, shown, args.layer, jnp.asarray(units))
        grid = [("generated", to_uint8(x0)),
                ("segmentation", pages.colorize(np.asarray(S.segment(S.params, jnp.clip(x0, -1, 1))), S.labels)),
                (f"{len(units)} units\nablated", to_uint8(x1)),
                ("segmentation", pages.colorize(np.asarray(S.segment(S.params, jnp.clip(x1, -1, 1))), S.labels))]
        experiment.write_bytes("grid.png", pages.image_grid(grid))
        summary = {"kind": "ablate", "layer": args.layer, "units": [int(u) for u in units], "chosen": how,
                   "concept": concept, "labels": None if labels is None else list(labels), "samples": args.samples,
                   "seed": args.seed, "level": args.level, "resamples": args.resamples, "effects": rows,
                   "settings": settings}
        experiment.write_json("ablate.json", summary)
        table = pages.table(["label", "share before", "share after", "ACE (after - before)",
                             f"{args.level:.0%} CI low", "CI high"],
                            [[r["label"], r["share_before"], r["share_after"], r["ace"], r["ci_low"], r["ci_high"]]
                             for r in rows])
        body = (f"<p>{how}: {', '.join(map(str, units))} of {args.layer}, set to 0 everywhere; {args.samples} "
                f"samples (z seed {args.seed}). Shares are fractions of segmentation pixels; the ACE is the mean "
                f"change over samples with a percentile bootstrap interval ({args.resamples} resamples).</p>"
                f"{pages.img('grid.png', 'before and after')}<h2>Every label</h2>{table}"
                '<p class="note">Data: <a href="ablate.json">ablate.json</a>. '
                '<a href="../../../index.html">All experiments</a></p>')
        experiment.write_bytes("page.html", pages.page(f"Ablation: {how}, {args.layer}", body, summary).encode())
        register(experiment, f"ablate {how}, {args.layer}", {"units": [int(u) for u in units]})
    if rows:
        first = rows[0]
        print(f"{first['label']}: {first['share_before']:.4f} -> {first['share_after']:.4f}, ACE {first['ace']:+.4f} "
              f"[{first['ci_low']:+.4f}, {first['ci_high']:+.4f}]")
    print(f"page: {experiment.path('page.html')}")
    return 0
