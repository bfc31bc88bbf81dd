"""Ablate the demo generator's top units for a concept and measure what disappears.

    python scripts/demo_ablation.py [--generator scenes64] [--layers layer4 layer5 ...]
                                    [--concepts tree building] [--units 20] [--out DIR]

For each layer: dissect it with the engine (``--dissect-samples`` z of seed 1, the paper's IQR
threshold), take the ``--units`` units of highest IoU for each concept (or, with ``--rank ace``,
the most causal units by ACE optimization), set them to zero at every position, and measure
every label's pixel share over ``--eval-samples`` other z (seed 7) with the demo segmenter,
before and after. A concept passes when its share falls by >= 50% while every
other class's share moves (relatively) by less than a third as much. This is judged three ways:
per label; per whole object with parts merged into their owner as in the unified-parsing
vocabulary (sun and cloud into sky; window, door and roof into building); and the object with
its own parts against every other label (a building's windows go with it; sun and cloud count).

Writes ``<out>/ablation.json`` (all figures, per layer and concept) and ``<out>/ablation.png``
(rows: generated images, their segmentation, then for each concept the ablated images and their
segmentation, at the concept's best layer, recorded as ``best_layer``). ``<out>`` is
results/demo_ablation unless --out is given; --update-shipped writes the shipped figures in
weights/scenes64 instead (the tests check the shipped generator against them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from _outputs import add_output_arguments, output_dir

READINGS = ("labels", "objects", "object_vs_labels")


def relative_changes(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(after - before) / before per class, float64; classes absent before get 0."""
    before = np.asarray(before, np.float64)
    after = np.asarray(after, np.float64)
    return np.where(before > 0, (after - before) / np.where(before > 0, before, 1.0), 0.0)


def verdict(before: np.ndarray, after: np.ndarray, concept: str, names) -> dict:
    """JSON-ready judgement of one ablation over classes ``names`` (shares aligned with them):
    the concept must lose >= 50% of its share while every other class moves by less than a third
    of that (relative changes)."""
    change = relative_changes(before, after)
    c = list(names).index(concept)
    others = [i for i in range(len(names)) if i != c]
    worst = max(others, key=lambda i: abs(change[i]))
    removed = -change[c]
    return {
        "share_before": round(float(before[c]), 6),
        "share_after": round(float(after[c]), 6),
        "removed_fraction": round(float(removed), 4),
        "relative_change": {names[i]: round(float(change[i]), 4) for i in range(len(names))},
        "largest_other": names[worst],
        "largest_other_change": round(float(change[worst]), 4),
        # None when the concept did not shrink at all
        "other_to_concept_ratio": round(float(abs(change[worst]) / removed), 4) if removed > 0 else None,
        "passes": bool(removed >= 0.5 and abs(change[worst]) < removed / 3),
    }


def judge(before: np.ndarray, after: np.ndarray, concept: str) -> dict:
    """Three readings: per label (parts are classes of their own); per whole object (parts merged
    into their owner: sun, cloud into sky; window, door, roof into building); and the object
    with its own parts against every other label on its own (``object_vs_labels``: a building
    takes its windows with it, but sun, cloud, sky ... are each judged)."""
    from gandissect_jax.scenes import world

    if concept not in world.OBJECT_NAMES:
        raise ValueError(f"{concept!r} is a part; ablate one of the whole objects {world.OBJECT_NAMES}")
    own = [world.LABELS[concept], *(world.LABELS[p] for p, o in world.PART_OWNERS.items() if o == concept)]
    rest = [i for i in range(1, world.NUM_LABELS) if i not in own]

    def object_and_labels(shares):
        shares = np.asarray(shares, np.float64)
        return np.array([shares[own].sum(), *shares[rest]])

    return {
        "labels": verdict(before[1:], after[1:], concept, world.LABEL_NAMES[1:]),
        "objects": verdict(world.object_shares(before), world.object_shares(after), concept,
                           world.OBJECT_NAMES),
        "object_vs_labels": verdict(object_and_labels(before), object_and_labels(after), concept,
                                    [concept, *(world.LABEL_NAMES[i] for i in rest)]),
    }


def picture(G, S, edits: dict, z: np.ndarray, path: Path, scale: int = 2) -> None:
    """Save a before/after grid: images and segmentations, unedited then for each concept's
    ``(layer, edit)`` in ``edits``."""
    import jax.numpy as jnp
    from PIL import Image, ImageDraw

    from gandissect_jax.intervention import edited_generator
    from gandissect_jax.scenes import world

    palette = world.label_palette()
    rows, captions = [], []
    for name, layer, edit in [("generated", None, None), *((f"{c} units = 0", l, e) for c, (l, e) in edits.items())]:
        images = np.asarray(G(jnp.asarray(z)) if edit is None else
                            edited_generator(G, layer)(G.params, jnp.asarray(z), edit))
        images = np.clip(images, -1, 1)
        labels = np.asarray(S.segment(S.params, images))[..., 0]
        rows += [world.image_grid(images, columns=len(z)), world.image_grid(palette[labels], columns=len(z))]
        captions += [name if edit is None else f"{layer}: {name}", "segmentation"]
    grid = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    margin = 170
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = grid.shape[0] // len(rows)
    for i, caption in enumerate(captions):
        draw.text((6, i * row_height + row_height // 2 - 6), caption, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    canvas.save(tmp, optimize=True)
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="scenes64")
    parser.add_argument("--segmenter", default="scenes64-segmenter")
    parser.add_argument("--layers", nargs="+", default=["layer3", "layer4", "layer5", "layer6"])
    parser.add_argument("--concepts", nargs="+", default=["tree", "building"])
    parser.add_argument("--units", type=int, default=20)
    parser.add_argument("--rank", default="max_iqr_iou", choices=["max_iqr_iou", "iou", "ace"],
                        help="unit ranking: IoU at the concept's IQR-optimal threshold (the paper's "
                             "IoU_u,c), IoU at the unit's own threshold, or ACE optimization "
                             "(gandissect_jax.ace, started from the max_iqr_iou scores and "
                             "tie-broken by them, as the reference's fullablate does)")
    parser.add_argument("--ace-objective", default="ace", choices=["ace", "removal", "specific_removal"],
                        help="objective of --rank ace (see gandissect_jax.ace.optimize_ace)")
    parser.add_argument("--ace-specificity", type=float, default=1.0,
                        help="side-effect weight of --ace-objective specific_removal")
    parser.add_argument("--ace-budget", action="store_true",
                        help="fit alpha with sum(alpha) <= --units (the relaxation of ablating that many units)")
    parser.add_argument("--ace-epochs", type=int, default=10)
    parser.add_argument("--ace-binarize", type=float, default=0.0,
                        help="final weight of the push of alpha to 0 or 1 (optimize_ace's binarize)")
    parser.add_argument("--ace-l2", type=float, default=0.005,
                        help="L2 weight of --rank ace (the reference's 0.005)")
    parser.add_argument("--ace-search", type=int, default=4000,
                        help="z searched for ACE present / candidate samples (1000 train, 200 eval)")
    parser.add_argument("--dissect-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--eval-seed", type=int, default=7)
    parser.add_argument("--picture-layer", default=None, help="layer shown in ablation.png for every concept (default: each concept's best)")
    parser.add_argument("--step", type=int, default=None, help="training step recorded in the JSON")
    add_output_arguments(parser, default="results/demo_ablation", shipped="scenes64")
    parser.add_argument("--progress", action="store_true", help="show the dissection's progress bars")
    args = parser.parse_args(argv)
    out = output_dir(parser, args)

    from gandissect_jax.ace import ace_ranking, build_ace_corpus, optimize_ace
    from gandissect_jax.dissection import dissect_generator
    from gandissect_jax.intervention import ablation_edit, label_shares
    from gandissect_jax.proggan import load_generator
    from gandissect_jax.sampling import sample_z
    from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter
    from gandissect_jax.scenes.world import PART_OWNERS
    from gandissect_jax.segmenter import label_index

    G = load_generator(args.generator)
    S = load_demo_segmenter(args.segmenter)
    names = [name for name, _ in S.labels]
    concepts = {c: label_index(S, c) for c in args.concepts}
    with tempfile.TemporaryDirectory() as workdir:
        dissections = dissect_generator(G, S, args.layers, size=args.dissect_samples, seed=1,
                                        outdir=workdir, make_images=False, make_report=False,
                                        progress=args.progress)
    z = sample_z(args.eval_samples, G.z_dim, args.eval_seed)
    before = label_shares(G, S, z)
    result = {
        "generator": str(args.generator), "generator_step": args.step, "units": args.units,
        "dissection": {"samples": args.dissect_samples, "z_seed": 1, "threshold": "iqr",
                       "unit_ranking": args.rank,
                       **({"ace": {"objective": args.ace_objective, "l2": args.ace_l2, "search_size": args.ace_search,
                                   "specificity": args.ace_specificity, "epochs": args.ace_epochs,
                                   "max_units": args.units if args.ace_budget else None,
                                   "binarize": args.ace_binarize,
                                   "train_size": 1000, "eval_size": 200, "concept": "object with its parts"}}
                          if args.rank == "ace" else {})},
        "evaluation": {"samples": args.eval_samples, "z_seed": args.eval_seed,
                       "segmenter": str(args.segmenter)},
        "shares_before": {names[i]: round(float(before[i]), 6) for i in range(1, len(names))},
        "layers": {},
    }
    edits_by_layer = {}
    for layer in args.layers:
        d = dissections[layer]
        channels = G.layer_shape(layer)[-1]
        # per concept: the best IoU of a unit labelled with it (IQR mode: at its IQR-optimal threshold)
        best = {names[c]: round(float(d.unit_iou[d.unit_label == c].max(initial=0.0)), 4)
                for c in range(1, len(names))}
        entry = {"best_labelled_unit_iou": best,
                 "concepts_with_unit_iou_0.2": [n for n, v in best.items() if v >= 0.2], "concepts": {}}
        edits_by_layer[layer] = {}
        for concept, c in concepts.items():
            if args.rank == "ace":
                iou = np.asarray(d.max_iqr_iou[c], np.float64)
                # the concept as the unified-parsing segmenter sees it: the object with its parts
                parts = [concept, *(p for p, owner in PART_OWNERS.items() if owner == concept)]
                corpus = build_ace_corpus(G, S, layer, parts, search_size=args.ace_search,
                                          progress=args.progress)
                fit = optimize_ace(G, S, corpus, init=iou / max(iou.max(), 1e-12),
                                   objective=args.ace_objective, l2=args.ace_l2,
                                   specificity=args.ace_specificity, epochs=args.ace_epochs,
                                   max_units=args.units if args.ace_budget else None,
                                   binarize=args.ace_binarize, progress=args.progress)
                units = ace_ranking(fit.alpha, iou)[: args.units]
                unit_scores = fit.alpha[units]
            else:
                units = d.top_units(concept, args.units, score=args.rank)
                unit_scores = getattr(d, args.rank)[c, units]
            edit = ablation_edit(units, channels)
            after = label_shares(G, S, z, layer=layer, edit=edit)
            record = {"units": units.tolist(), "unit_score": [round(float(v), 4) for v in unit_scores],
                      **judge(before, after, concept)}
            entry["concepts"][concept] = record
            edits_by_layer[layer][concept] = edit
            for level in READINGS:
                v = record[level]
                print(f"{layer} {concept:9s} {level:7s} {v['share_before']:.4f} -> {v['share_after']:.4f} "
                      f"removed {v['removed_fraction']:+.3f}; largest other {v['largest_other']} "
                      f"{v['largest_other_change']:+.3f} (ratio {v['other_to_concept_ratio']}) "
                      f"{'PASS' if v['passes'] else 'fail'}", file=sys.stderr)
        entry["all_pass"] = {level: all(v[level]["passes"] for v in entry["concepts"].values())
                             for level in READINGS}
        result["layers"][layer] = entry
    def badness(concept, layer):
        record = result["layers"][layer]["concepts"][concept]
        ratio = record["object_vs_labels"]["other_to_concept_ratio"]
        return (-sum(record[level]["passes"] for level in READINGS), np.inf if ratio is None else ratio)

    # per concept, the layer where its ablation is cleanest (most readings passed, then the
    # smallest side effect); --picture-layer forces one layer for all
    shown = {concept: args.picture_layer or min(args.layers, key=lambda layer: badness(concept, layer))
             for concept in args.concepts}
    result["best_layer"] = shown
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".ablation.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / "ablation.json")
    picture(G, S, {concept: (layer, edits_by_layer[layer][concept]) for concept, layer in shown.items()},
            np.asarray(z[:8]), out / "ablation.png")
    print(json.dumps({l: result["layers"][l]["all_pass"] for l in args.layers}))


if __name__ == "__main__":
    main()
