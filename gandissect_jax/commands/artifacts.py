"""``gandissect-jax artifacts``: find the units that cause artifacts, and remove them (the paper's Sec. 4.3, Fig. 8).

    gandissect-jax artifacts --outdir D --layer layer4 --discriminator scenes64-discriminator [--top 10]
    gandissect-jax artifacts --outdir D --layer layer4 --discriminator SRC --units 3,17   # picked by eye

Scores every unit of the layer with the GAN's discriminator as a realism score (Tousi et al.,
CVPR 2021): for each unit, the mean rise of the discriminator's logit when the unit alone is
zeroed, on the ``--top-samples`` images (of ``--search-samples`` z) where the unit is most
active (:func:`gandissect_jax.artifacts.artifact_ranking`, one jitted call for all units). Then
ablates the ``--top`` highest-scoring units (or ``--units``) together on ``--samples`` other
images and reports the realism scores before and after (distribution, mean change with a
bootstrap interval) and the images whose score rose most.

Writes ``D/intervention/artifacts/<layer>/<name>/``: ``artifacts.json``, ``ranking.png``,
``realism.png``, ``grid.png`` and ``page.html``.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import arguments
from .intervention_common import (plain_help, add_source_arguments, batches, check_units, positive_int, source_of,
                                  to_uint8, unit_list)


# the measured z use seed + 1, which must be a seed too
search_seed = arguments.int_in_range(0, arguments.MAX_SEED - 1)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``artifacts`` sub-command."""
    parser = subparsers.add_parser("artifacts", help="rank artifact-causing units with the discriminator and ablate them",
                                   description=plain_help(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    run = parser.add_argument_group("artifacts")
    run.add_argument("--discriminator", required=True, type=arguments.text("a discriminator source"),
                     help="discriminator checkpoint or registry name, e.g. scenes64-discriminator")
    run.add_argument("--units", type=unit_list,
                     help=f"ablate these units (picked by eye), each in {unit_list.interval} and below the layer's "
                          "number of units (default: the --top ranked)")
    run.add_argument("--top", type=positive_int, default=10,
                     help=f"top-ranked units ablated together, in {positive_int.interval} and at most the layer's "
                          "number of units (default %(default)s)")
    run.add_argument("--search-samples", type=positive_int, default=500,
                     help=f"z searched for each unit's top samples, in {positive_int.interval} (default %(default)s)")
    run.add_argument("--top-samples", type=positive_int, default=8,
                     help=f"samples per unit, in {positive_int.interval} and at most --search-samples "
                          "(default %(default)s)")
    run.add_argument("--samples", type=positive_int, default=200,
                     help=f"images measured before/after, in {positive_int.interval} (default %(default)s)")
    run.add_argument("--seed", type=search_seed, default=5,
                     help=f"seed of the search z (the measured z use seed + 1), in {search_seed.interval} "
                          "(default %(default)s)")
    run.add_argument("--show", type=positive_int, default=8,
                     help=f"images shown, in {positive_int.interval}; --samples at most are shown "
                          "(default %(default)s)")
    run.add_argument("--resamples", type=positive_int, default=1000,
                     help=f"bootstrap resamples, in {positive_int.interval} (default %(default)s)")
    arguments.add_check(parser, check)
    parser.set_defaults(func=run_command)
    return parser


def check(args) -> None:
    """Usage check: each unit's top samples come from the searched ones."""
    if args.top_samples > args.search_samples:
        raise arguments.UsageError(f"--top-samples {args.top_samples} exceeds --search-samples {args.search_samples}; "
                                   f"allowed [1, {args.search_samples}]")


def run_command(args) -> int:
    import jax.numpy as jnp

    from gandissect_jax import ace, artifacts, effects, pages
    from gandissect_jax.experiment import Experiment, register
    from gandissect_jax.sampling import sample_z
    from gandissect_jax.scenes.discriminator import load_discriminator

    source = source_of(args)
    G = source.generator
    channels = ace.layer_shape(G, args.layer)[-1]  # the flags' ranges first, before the discriminator loads
    if args.units is None and args.top > channels:
        raise arguments.FlagError("--top", f"{args.top} exceeds the layer's {channels} units; allowed [1, {channels}]")
    picked = None if args.units is None else check_units(args.units, channels)
    with arguments.naming("--discriminator"):
        D = load_discriminator(args.discriminator)
    settings = {"layer": args.layer, "discriminator": str(args.discriminator),
                "units": None if picked is None else [int(u) for u in picked], "top": args.top,
                "search_samples": args.search_samples, "top_samples": args.top_samples, "samples": args.samples,
                "seed": args.seed, "resamples": args.resamples, "source": source.identity()}
    name = args.name or (f"top{args.top}" if picked is None else "units-" + "_".join(map(str, picked[:12])))
    result = source.result(args.layer, required=False)
    with Experiment(args.outdir, "artifacts", args.layer, name, settings) as experiment:
        def rank():
            z = sample_z(args.search_samples, G.z_dim, args.seed)
            scores = artifacts.artifact_ranking(G, D, G.params, D.params, z, args.layer, top_samples=args.top_samples)
            return {"gain": np.asarray(scores.gain), "top_samples": np.asarray(scores.top_samples),
                    "realism": np.asarray(scores.realism)}

        scores = experiment.step("ranking", rank)
        order = np.lexsort((np.arange(channels), -scores["gain"]))
        units = order[:args.top] if picked is None else picked
        z = sample_z(args.samples, G.z_dim, args.seed + 1)

        def measure():
            before, after = [], []
            for _, batch, count in batches(z, args.batch_size, args.quiet, "realism"):
                batch = jnp.asarray(batch)
                before.append(np.asarray(D.score(D.params, G(batch)))[:count])
                after.append(np.asarray(D.score(D.params, effects.ablate(G, G.params, batch, args.layer,
                                                                          jnp.asarray(units))))[:count])
            return {"before": np.concatenate(before), "after": np.concatenate(after)}

        realism = experiment.step("realism", measure)
        change = effects.bootstrap_mean(realism["after"] - realism["before"], resamples=args.resamples)
        rose = np.argsort(-(realism["after"] - realism["before"]), kind="stable")[:args.show]
        shown = jnp.asarray(z[rose])
        x0, x1 = G(shown), effects.ablate(G, G.params, shown, args.layer, jnp.asarray(units))
        grid = [(f"generated\n(realism {realism['before'][rose].mean():+.2f})", to_uint8(x0)),
                (f"{len(units)} units ablated\n(realism {realism['after'][rose].mean():+.2f})", to_uint8(x1))]
        experiment.write_bytes("grid.png", pages.image_grid(grid))
        experiment.write_bytes("realism.png", pages.plot_histogram(
            {"generated": realism["before"], f"{len(units)} units ablated": realism["after"]},
            title=f"discriminator realism, {args.samples} samples", xlabel="discriminator logit (higher = more real)"))
        top_k = min(32, channels)
        experiment.write_bytes("ranking.png", pages.plot_bars(
            [str(u) for u in order[:top_k]], scores["gain"][order[:top_k]],
            title="realism gain when the unit alone is ablated", ylabel="mean logit change"))
        labels = [n for n, _ in source.segmenter.labels] if result is not None else None

        def label_of(u):
            return labels[int(result.unit_label[u])] if labels is not None else "-"

        table_rows = [{"unit": int(u), "gain": float(scores["gain"][u]), "label": label_of(u)} for u in order[:top_k]]
        summary = {"kind": "artifacts", "layer": args.layer, "discriminator": str(args.discriminator),
                   "ranking": [int(u) for u in order], "gain": [round(float(g), 6) for g in scores["gain"]],
                   "ablated": [int(u) for u in units], "picked_by_user": picked is not None,
                   "realism_before_mean": float(realism["before"].mean()),
                   "realism_after_mean": float(realism["after"].mean()),
                   "realism_change": float(change.mean), "ci_low": float(change.low), "ci_high": float(change.high),
                   "improved_fraction": float((realism["after"] > realism["before"]).mean()),
                   "samples": args.samples, "top_units": table_rows, "settings": settings}
        experiment.write_json("artifacts.json", summary)
        body = (f"<p>Discriminator {args.discriminator}; every unit of {args.layer} scored on its top "
                f"{args.top_samples} of {args.search_samples} samples. Ablated together: "
                f"{', '.join(map(str, units))}{' (picked by the user)' if picked is not None else ''}.</p>"
                f"<p>Realism over {args.samples} other samples: {realism['before'].mean():+.4f} before, "
                f"{realism['after'].mean():+.4f} after; change {change.mean:+.4f} (95% CI {change.low:+.4f} to "
                f"{change.high:+.4f}); {(realism['after'] > realism['before']).mean():.0%} of the images improve.</p>"
                f"{pages.img('realism.png', 'realism')}<h2>Images improved most</h2>{pages.img('grid.png', 'grid')}"
                f"<h2>Ranking</h2>{pages.img('ranking.png', 'ranking')}"
                + pages.table(["unit", "realism gain", "dissection label"],
                              [[r["unit"], r["gain"], r["label"]] for r in table_rows])
                + '<p class="note">Data: <a href="artifacts.json">artifacts.json</a>. '
                '<a href="../../../index.html">All experiments</a></p>')
        experiment.write_bytes("page.html", pages.page(f"Artifact units of {args.layer}", body, summary).encode())
        register(experiment, f"artifact units, {args.layer} ({name})", {"ablated": [int(u) for u in units]})
    print(f"{args.layer}: artifact units {', '.join(map(str, units))}; realism {realism['before'].mean():+.4f} -> "
          f"{realism['after'].mean():+.4f} ({change.mean:+.4f}, 95% CI {change.low:+.4f} to {change.high:+.4f})")
    print(f"page: {experiment.path('page.html')}")
    return 0
