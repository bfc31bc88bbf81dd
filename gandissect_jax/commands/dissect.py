"""``gandissect-jax dissect``: measure which concepts the units of a layer detect.

Two sources, same outputs (dissect.json, <layer>/scores.npz, image strips, dissect.html):

    gandissect-jax dissect --model SRC --segmenter SEG --layers layer4 layer7 --size 10000 --outdir D
    gandissect-jax dissect --features F.npy --segmentations S.npy --labels labels.json [--levels L.npy] --outdir D

Thresholds: ``--threshold iqr`` (the paper's information-quality-ratio search; default with
``--model``) or ``--threshold quantile`` with ``--quantile 0.005`` (the top 0.5% of each unit's
activations; the reference's default for precomputed data, default with ``--features``).
``--levels`` fixes the per-unit thresholds (levels) instead. A rerun with the same arguments resumes;
a second run into the same ``--outdir`` while one is running is refused. Outputs follow schema 2
(gandissect_jax/dissection/README.md).
"""

from __future__ import annotations

import argparse
import json
import os


# With no source given, dissect the shipped demo pair (weights/scenes64): works offline, on CPU.
DEMO_MODEL = "scenes64"
DEMO_SEGMENTER = "scenes64-segmenter"
DEMO_LAYERS = ("layer4", "layer6")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``dissect`` sub-command."""
    parser = subparsers.add_parser(
        "dissect", help="score every unit of a layer against segmentation concepts (IoU / IQR)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("generator source")
    source.add_argument("--model", help="generator: registry name, .pth file or checkpoint directory "
                        f"(default: the shipped demo {DEMO_MODEL!r} with {DEMO_SEGMENTER!r}, layers "
                        f"{' '.join(DEMO_LAYERS)})")
    source.add_argument("--segmenter", help="segmenter: registry name or checkpoint directory")
    source.add_argument("--layers", nargs="+", help="layers to dissect, e.g. layer4 layer7")
    source.add_argument("--size", type=int, default=10000, help="number of samples (default 10000)")
    source.add_argument("--seed", type=int, default=1, help="z seed (default 1, as the reference)")
    source.add_argument("--seg-downsample", type=int, default=2,
                        help="segment at 1/N of the image size (default 2, as the reference)")
    arrays = parser.add_argument_group("precomputed source")
    arrays.add_argument("--features", help="float .npy of activations, shape (N, h, w, U)")
    arrays.add_argument("--segmentations", help="int .npy of segmentations, shape (N, H, W, D) or (N, H, W)")
    arrays.add_argument("--labels", help='labels.json: {"labels": [[name, category], ...], "categories": [...]}')
    arrays.add_argument("--images", help="optional .npy of images (N, H, W, 3) for the image strips")
    arrays.add_argument("--layer-name", default="features", help="name of the layer in the outputs")
    scoring = parser.add_argument_group("thresholds and labels")
    scoring.add_argument("--threshold", choices=("iqr", "quantile"),
                         help="per-unit threshold rule (default: iqr with --model, quantile with --features)")
    scoring.add_argument("--quantile", type=float, default=0.005,
                         help="top fraction of activations that is active with --threshold quantile (default 0.005)")
    scoring.add_argument("--levels", help="float .npy (U,) of fixed per-unit thresholds (--features only)")
    scoring.add_argument("--iou-threshold", type=float, default=0.05,
                         help="a unit is interpretable when its concept's IoU is >= this (default 0.05)")
    run = parser.add_argument_group("run")
    run.add_argument("--outdir", required=True, help="output directory (reruns resume here)")
    run.add_argument("--topk", type=int, default=10,
                     help="top samples kept per unit and shown in its image strip (default 10)")
    run.add_argument("--batch-size", type=int, default=32, help="samples per step over all devices (default 32)")
    run.add_argument("--checkpoint-every", type=float, default=600.0,
                     help="seconds between checkpoints of long passes (default 600)")
    run.add_argument("--max-memory", type=_memory_size, help="memory budget, e.g. 4G or 800M (default: half of the available RAM, 70%% "
                     "of an accelerator's free memory); units are measured in groups that fit, with identical results")
    run.add_argument("--no-images", action="store_true", help="skip the top-k image strips")
    run.add_argument("--title", help="title of the HTML report")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_command)
    return parser


def _memory_size(value: str) -> int:
    from gandissect_jax.dissection.memory import parse_memory

    try:
        return parse_memory(value, "the memory budget")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _load_array(path: str, what: str):
    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err


def _load_labels(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file not found: {path}")
    with open(path) as handle:
        try:
            document = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"labels file {path} is not JSON: {err}") from err
    if not isinstance(document, dict) or "labels" not in document:
        raise ValueError(f'labels file {path} must hold {{"labels": [[name, category], ...], "categories": [...]}}')
    for entry in document["labels"]:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ValueError(f"labels file {path}: each label must be [name, category], got {entry!r}")
    return document


def _summary(results, outdir: str, iou_threshold: float) -> None:
    for layer, result in results.items():
        count = int(result.interpretable(iou_threshold).sum())
        print(f"{layer}: {count} of {result.num_units} units interpretable (IoU >= {iou_threshold})")
    print(f"report: {os.path.join(outdir, 'dissect.html')}")


def run_command(args) -> int:
    """Run the dissection described by the parsed arguments."""
    from gandissect_jax.dissection import DissectConfig, dissect_features, dissect_generator

    if args.model and args.features:
        raise ValueError("give either --model (with --segmenter and --layers) or --features "
                         "(with --segmentations and --labels), not both")
    if not args.features:  # generator source; the shipped demo pair fills what is not given
        if args.model in (None, DEMO_MODEL):
            args.model = DEMO_MODEL
            args.segmenter = args.segmenter or DEMO_SEGMENTER
            args.layers = args.layers or list(DEMO_LAYERS)
    config = DissectConfig(threshold=args.threshold, quantile=args.quantile, topk=args.topk, batch_size=args.batch_size,
                           iou_threshold=args.iou_threshold, checkpoint_every=args.checkpoint_every,
                           progress=not args.quiet, make_images=not args.no_images, title=args.title,
                           max_memory=args.max_memory)
    if args.features:
        if not args.segmentations or not args.labels:
            raise ValueError("--features needs --segmentations and --labels")
        features = _load_array(args.features, "features")
        segmentations = _load_array(args.segmentations, "segmentations")
        labels = _load_labels(args.labels)
        images = _load_array(args.images, "images") if args.images else None
        levels = _load_array(args.levels, "levels") if args.levels else None
        results = dissect_features(features, segmentations, labels, config, levels=levels, images=images,
                                   layer=args.layer_name, outdir=args.outdir)
    else:
        if not args.segmenter or not args.layers:
            raise ValueError("--model needs --segmenter and --layers")
        if args.levels:
            raise ValueError("--levels works with --features only")
        import gandissect_jax

        generator = gandissect_jax.load_generator(args.model)
        segmenter = gandissect_jax.load_segmenter(args.segmenter)
        results = dissect_generator(generator, segmenter, args.layers, config, size=args.size, seed=args.seed,
                                    seg_downsample=args.seg_downsample, outdir=args.outdir,
                                    identity={"model": args.model, "segmenter": args.segmenter})
    _summary(results, args.outdir, args.iou_threshold)
    return 0
