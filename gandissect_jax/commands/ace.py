"""``gandissect-jax ace``: find the units that cause a concept (ACE optimization, the paper's Sec. 3.2).

    gandissect-jax ace --outdir D --layer layer4 --concept tree [--objective ace|removal|specific_removal]
                       [--budget K] [--l2 0.005] [--epochs 10] [--search-size 10000]

Reads the dissection in D (model, segmenter, the layer's IoU scores, which start the fit and break
its ties, as the reference's ``aceoptimize``), collects the corpus of present and candidate samples,
fits a weight alpha in [0, 1] per unit (:mod:`gandissect_jax.ace`), ranks the units by alpha and
merges the ranking into D's ``dissect.json`` (``<concept>-ace``; also kept in
``D/intervention/rankings.json``). Then it measures the ablation and insertion curves: the concept's
share as the top 1, 2, 4, ..., 64 units are ablated (set to 0 everywhere) or inserted (set to each
unit's 0.99 quantile everywhere), for the ACE ranking and the IoU ranking side by side (the paper's
Figs. 4 and 10; the reference's ``fullablate`` and ``aceplotablate``).

Writes ``D/intervention/ace/<layer>/<name>/``: ``ace.json`` (ranking, alpha, losses, curves),
``alpha.png``, ``loss.png``, ``curves.png``, ``ablation.png`` (images with the top units of each
ranking ablated) and ``page.html``. A rerun with the same arguments resumes after the last finished
step (corpus, fit, curves).

Multi-host: the same command on N processes (--coordinator/--num-processes/--process-id, or
--multi-host) spreads the batches over every device of every process, with the results of one
device. Only process 0 reads D (and sends the others the dissection) and writes there; the other
processes need the models, not D.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import arguments, multihost
from .intervention_common import (plain_help, add_source_arguments, positive_float, positive_int, seed,
                                  source_of, to_uint8, weight)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``ace`` sub-command."""
    parser = subparsers.add_parser(
        "ace", help="rank the units that cause a concept by ACE optimization (with ablation/insertion curves)",
        description=plain_help(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    fit = parser.add_argument_group("ACE fit")
    fit.add_argument("--concept", required=True, type=arguments.text("a label name"),
                     help="label name, or names joined by commas (their union)")
    fit.add_argument("--objective", choices=("ace", "removal", "specific_removal"), default="ace",
                     help="ace: ablate where present and insert where absent (default); removal: ablate everywhere "
                          "(the reference's _fia variant); specific_removal: remove the concept and nothing else")
    fit.add_argument("--budget", type=positive_float,
                     help=f"keep sum(alpha) <= BUDGET (the relaxation of ablating that many units), in "
                          f"{positive_float.interval} (default: no budget)")
    fit.add_argument("--l2", type=weight, default=0.005,
                     help=f"L2 weight on alpha, in {weight.interval} (default %(default)s, the reference's)")
    fit.add_argument("--specificity", type=weight, default=1.0,
                     help=f"side-effect weight of specific_removal, in {weight.interval} (default %(default)s)")
    fit.add_argument("--binarize", type=weight, default=0.0,
                     help=f"final weight of the push of alpha to 0 or 1, in {weight.interval} (default %(default)s)")
    fit.add_argument("--learning-rate", type=positive_float, default=0.01,
                     help=f"Adam step size, in {positive_float.interval} (default %(default)s)")
    fit.add_argument("--epochs", type=positive_int, default=10,
                     help=f"passes over the training samples, in {positive_int.interval} (default %(default)s)")
    fit.add_argument("--train-batch", type=positive_int, default=20,
                     help=f"present + candidate samples per step, in {positive_int.interval} and at most "
                          "--train-size (default %(default)s)")
    fit.add_argument("--train-micro-batch", type=positive_int, default=None,
                     help=f"samples of each kind per micro-batch, in {positive_int.interval} and at most "
                          "--train-batch: the unit of work of one device, and what bounds a step's memory; the "
                          "fit's result depends on it, not on the number of devices or processes (from 2 devices up; "
                          "on 1 device to float32 rounding) "
                          "(default: 4, or --train-batch when smaller)")
    fit.add_argument("--search-size", type=positive_int, default=10000,
                     help=f"z searched for the corpus, in {positive_int.interval} and at least --train-size + "
                          "--eval-size (default %(default)s)")
    fit.add_argument("--train-size", type=positive_int, default=1000,
                     help=f"training samples of each kind, in {positive_int.interval} (default %(default)s)")
    fit.add_argument("--eval-size", type=positive_int, default=200,
                     help=f"held-out samples of each kind, in {positive_int.interval} (default %(default)s)")
    fit.add_argument("--seed", type=seed, default=10,
                     help=f"corpus seed, in {seed.interval} (default %(default)s, as the reference)")
    curves = parser.add_argument_group("curves")
    curves.add_argument("--curve-samples", type=positive_int, default=200,
                        help=f"z measured for the curves, in {positive_int.interval} (default %(default)s)")
    curves.add_argument("--curve-seed", type=seed, default=3,
                        help=f"their seed, in {seed.interval} (default %(default)s, as the reference's fullablate)")
    curves.add_argument("--curve-max", type=positive_int, default=64,
                        help=f"largest number of units, in {positive_int.interval}; the layer's units at most are "
                             "used (default %(default)s)")
    curves.add_argument("--show-units", type=positive_int, default=20,
                        help=f"units ablated in ablation.png, in {positive_int.interval}; the layer's units at most "
                             "are shown (default %(default)s)")
    multihost.add_arguments(parser)
    arguments.add_check(parser, check)
    parser.set_defaults(func=run_command)
    return parser


def default_name(args) -> str:
    """``<concept>-<objective>[-budgetK][-l2_X][-binB]`` (the reference's variant naming)."""
    name = f"{args.concept.replace(',', '+')}-{args.objective}"
    if args.budget is not None:
        name += f"-budget{args.budget:g}"
    if args.l2 != 0.005:
        name += f"-l2_{args.l2:g}"
    if args.binarize:
        name += f"-bin{args.binarize:g}"
    return name


def check(args) -> None:
    """Usage checks: the corpus sizes fit together; the multi-host flags are complete
    (:func:`gandissect_jax.commands.multihost.check`)."""
    if args.train_size + args.eval_size > args.search_size:
        raise arguments.UsageError(
            f"--train-size {args.train_size} + --eval-size {args.eval_size} = {args.train_size + args.eval_size} "
            f"exceeds --search-size {args.search_size}; give --search-size >= {args.train_size + args.eval_size}")
    if args.train_micro_batch is None:  # gandissect_jax.ace.fit.DEFAULT_FIT_MICRO_BATCH (jax not imported here)
        args.train_micro_batch = min(4, args.train_batch)
    if args.train_micro_batch > args.train_batch:
        raise arguments.UsageError(f"--train-micro-batch {args.train_micro_batch} exceeds --train-batch "
                                   f"{args.train_batch}; allowed [1, {args.train_batch}]")
    if args.train_batch > args.train_size:
        raise arguments.UsageError(f"--train-batch {args.train_batch} exceeds --train-size {args.train_size}; "
                                   f"allowed [1, {args.train_size}]")
    multihost.check(args)


def run_command(args) -> int:
    """Fit, rank, measure the curves, write the page; as one of the processes the multi-host flags
    name (:func:`gandissect_jax.commands.multihost.run`: only process 0 writes --outdir)."""
    return multihost.run("ace", args, _run)


def _run(args) -> int:
    import jax.numpy as jnp

    from gandissect_jax import ace, effects, pages
    from gandissect_jax.ace.sharded import map_batches, progress_bar, stacked
    from gandissect_jax.dissection import distributed
    from gandissect_jax.dissection import rankings
    from gandissect_jax.dissection.resume import pytree_digest
    from gandissect_jax.experiment import Experiment, intervention_lock, register
    from gandissect_jax.sampling import sample_z

    source = source_of(args)
    # multi-host: a process that fails here (segmenter, concept) stops every process, not a hang
    with distributed.fail_together("while loading the segmenter"):
        G, S = source.generator, source.segmenter
        labels = source.concept(args.concept)
        channels = ace.layer_shape(G, args.layer)[-1]
    result = source.result(args.layer, required=False)
    iou = rankings.iou_scores(result, labels) if result is not None else None
    concept_name = "+".join(S.labels[c][0] for c in labels)
    settings = {k: getattr(args, k) for k in (
        "layer", "concept", "objective", "budget", "l2", "specificity", "binarize", "learning_rate", "epochs",
        "train_batch", "train_micro_batch", "search_size", "train_size", "eval_size", "seed", "curve_samples", "curve_seed",
        "curve_max")}
    settings["source"] = source.identity()
    # multi-host: the same command, models and dissection on every process (their paths may differ)
    distributed.check_same_inputs(
        dict(settings, generator_params=pytree_digest(G.params), segmenter_params=pytree_digest(S.params)),
        may_differ=[("source", "model"), ("source", "segmenter")])
    name = args.name or default_name(args)
    downsample = source.seg_downsample
    with Experiment(args.outdir, "ace", args.layer, name, settings) as experiment:
        def corpus_step():
            corpus = ace.build_ace_corpus(G, S, args.layer, labels, search_size=args.search_size,
                                          train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
                                          batch_size=args.batch_size, seg_downsample=downsample,
                                          progress=not args.quiet)
            return {k: np.asarray(v) for k, v in corpus._asdict().items() if k not in ("layer", "labels")}

        arrays = experiment.step("corpus", corpus_step)
        corpus = ace.AceCorpus(layer=args.layer, labels=labels, **arrays)

        def fit_step():
            init = None if iou is None else iou / max(float(iou.max()), 1e-12)
            fit = ace.optimize_ace(G, S, corpus, init=init, l2=args.l2, learning_rate=args.learning_rate,
                                   epochs=args.epochs, batch_size=args.train_batch, micro_batch=args.train_micro_batch,
                                   seg_downsample=downsample,
                                   objective=args.objective, specificity=args.specificity,
                                   max_units=args.budget, binarize=args.binarize, progress=not args.quiet)
            return {"alpha": fit.alpha, "eval_loss": fit.eval_loss}

        fit = experiment.step("fit", fit_step)
        alpha = fit["alpha"]
        ace_order = ace.ace_ranking(alpha, iou)
        orders = {"ACE": ace_order}
        if iou is not None:
            orders["IoU"] = rankings.units_by(iou)
        counts = effects.unit_counts(channels, args.curve_max)
        value = source.insertion_value(args.layer)
        z = sample_z(args.curve_samples, G.z_dim, args.curve_seed)

        def curves_step():
            z_batches = stacked(z, args.batch_size)
            out = {}
            for mode in ("ablate", "insert"):
                for rank_name, order in orders.items():
                    consts, static = effects.ace_curve_program(
                        G, S, G.params, S.params, args.layer, order, counts, labels, mode=mode,
                        value=value if mode == "insert" else None, downsample=downsample)
                    bar = progress_bar(len(z_batches), not args.quiet, f"{mode} curve ({rank_name})")
                    shares = map_batches(effects.curve_batch, (z_batches,), consts, static=static, progress=bar)
                    if bar is not None:
                        bar.close()
                    # (batches, K, B) -> (K, samples)
                    shares = np.moveaxis(np.asarray(shares), 0, 1).reshape(len(counts), -1)
                    out[f"{mode}_{rank_name}"] = shares[:, :len(z)]
            return out

        curves = experiment.step("curves", curves_step)
        prefix = args.concept.replace(",", "+") + "-"
        variant = default_name(args)[len(prefix):] if args.name is None else f"ace-{args.name}"
        record = rankings.ranking_record(f"{concept_name}-{variant}", concept_name, labels, "ace", ace_order, alpha,
                                         objective=args.objective, experiment=experiment.relative,
                                         dissection=rankings.dissection_digest(
                                             (source.document or {}).get("settings")))
        if not distributed.is_leader():
            return 0  # process 0 alone writes the ranking, the pictures and the page
        with intervention_lock(args.outdir):
            rankings.add_ranking(args.outdir, args.layer, record)

        # pictures
        shown = sample_z(8, G.z_dim, args.curve_seed)
        k = min(args.show_units, channels)
        rows = [("generated", to_uint8(G(jnp.asarray(shown))))]
        rows.append(("segmentation", pages.colorize(np.asarray(S.segment(S.params, jnp.clip(G(jnp.asarray(shown)), -1, 1))), S.labels)))
        for rank_name, order in orders.items():
            x = effects.ablate(G, G.params, jnp.asarray(shown), args.layer, jnp.asarray(np.asarray(order[:k], np.int32)))
            rows.append((f"{k} {rank_name} units\nablated", to_uint8(x)))
            rows.append(("segmentation", pages.colorize(np.asarray(S.segment(S.params, jnp.clip(x, -1, 1))), S.labels)))
        experiment.write_bytes("ablation.png", pages.image_grid(rows))
        means = {key: curves[key].mean(1) for key in curves}
        base = float(means["ablate_ACE"][0])
        removed = {rank: (1 - means[f"ablate_{rank}"] / base) if base > 0 else np.zeros(len(counts))
                   for rank in orders}
        experiment.write_bytes("curves.png", pages.plot_curves(
            counts, {f"units by {r}": removed[r] for r in orders}, title=f"Ablating {concept_name} units, {args.layer}",
            ylabel=f"portion of {concept_name} pixels removed", ylim=(min(0.0, min(v.min() for v in removed.values())), 1.0)))
        experiment.write_bytes("insertion.png", pages.plot_curves(
            counts, {f"units by {r}": means[f"insert_{r}"] for r in orders},
            title=f"Inserting {concept_name} units everywhere, {args.layer}", ylabel=f"{concept_name} share"))
        experiment.write_bytes("alpha.png", pages.plot_alpha(alpha, iou if iou is not None else np.zeros_like(alpha),
                                                             title=f"ACE weights for {concept_name}, {args.layer}"))
        experiment.write_bytes("loss.png", pages.plot_loss(fit["eval_loss"], title="held-out objective"))
        summary = {
            "kind": "ace", "layer": args.layer, "concept": concept_name, "labels": list(labels),
            "objective": args.objective, "settings": settings, "ranking": [int(u) for u in ace_order],
            "alpha": [round(float(a), 6) for a in alpha], "eval_loss": [float(v) for v in fit["eval_loss"]],
            "iou": None if iou is None else [round(float(v), 6) for v in iou],
            "counts": list(counts), "curves": {
                key: {"mean_share": [float(v) for v in means[key]]} for key in sorted(means)},
            "removed_fraction": {rank: [float(v) for v in removed[rank]] for rank in orders},
            "baseline_share": base, "insertion_value": "each unit's 0.99 quantile",
        }
        experiment.write_json("ace.json", summary)
        table_rows = [[c] + [f"{removed[r][i]:.3f}" for r in orders] + [f"{means['insert_' + r][i]:.4f}" for r in orders]
                      for i, c in enumerate(counts)]
        body = (
            f"<p>Concept <b>{concept_name}</b> (labels {list(labels)}), layer {args.layer}, objective "
            f"{args.objective}. Concept share of {args.curve_samples} samples: {base:.4f}.</p>"
            f"<h2>Ablation and insertion curves</h2>{pages.img('curves.png', 'ablation curves')}"
            f"{pages.img('insertion.png', 'insertion curves')}"
            + pages.table(["units"] + [f"removed ({r} ranking)" for r in orders] + [f"share inserted ({r})" for r in orders],
                          table_rows)
            + f"<h2>Top units ablated</h2>{pages.img('ablation.png', 'ablation')}"
            + f"<h2>ACE weights</h2>{pages.img('alpha.png', 'alpha')}{pages.img('loss.png', 'loss')}"
            + pages.table(["rank", "unit", "alpha", "IoU"],
                          [[i + 1, int(u), float(alpha[u]), float(iou[u]) if iou is not None else "-"]
                           for i, u in enumerate(ace_order[:20])])
            + '<p class="note">Data: <a href="ace.json">ace.json</a>. <a href="../../../index.html">All experiments</a></p>')
        experiment.write_bytes("page.html", pages.page(f"ACE: {concept_name} in {args.layer}", body, summary).encode())
        top = ", ".join(str(int(u)) for u in ace_order[:10])
        register(experiment, f"ACE {concept_name} ({args.objective}), {args.layer}",
                 {"concept": concept_name, "top_units": [int(u) for u in ace_order[:10]]})
    print(f"{args.layer} {concept_name}: top units by ACE {top}; removed by the top {counts[-1]}: "
          + ", ".join(f"{r} {removed[r][-1]:.1%}" for r in orders))
    print(f"page: {experiment.path('page.html')}")
    return 0

