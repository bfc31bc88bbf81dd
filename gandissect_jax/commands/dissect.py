"""``gandissect-jax dissect``: measure which concepts the units of a layer detect (the CLI of :mod:`gandissect_jax.dissection`)."""

from __future__ import annotations

import argparse
import json
import os

from . import arguments, multihost
from .. import untrusted_json

# With no source given, dissect the shipped demo pair (weights/scenes64): works offline, on CPU.
DEMO_MODEL = "scenes64"
DEMO_SEGMENTER = "scenes64-segmenter"
DEMO_LAYERS = ("layer4", "layer6")

DESCRIPTION = f"""\
Score every unit of a layer against segmentation concepts (IoU / IQR). Two sources, same outputs
(dissect.json, <layer>/scores.npz, image strips, dissect.html):

  gandissect-jax dissect --model SRC --segmenter SEG --layers layer4 layer7 --size 10000 --outdir D
  gandissect-jax dissect --features F.npy --segmentations S.npy --labels labels.json --outdir D

With neither, the shipped demo generator {DEMO_MODEL!r} is dissected with {DEMO_SEGMENTER!r} at
layers {' '.join(DEMO_LAYERS)}. To list a model's layers and their shapes:

  gandissect-jax layers MODEL

Thresholds: --threshold iqr (the paper's information-quality-ratio search; default with --model)
or --threshold quantile with --quantile 0.005 (the top 0.5% of each unit's activations; the
reference's default for precomputed data and the default with --features). --levels fixes the
per-unit thresholds instead.

Runs: a rerun with the same inputs and settings resumes where the last one stopped (Ctrl-C stops
cleanly and says where). A rerun with other inputs or settings into the same --outdir is refused
before any work; --restart removes the earlier run's progress and outputs (nothing else) and
starts afresh. Outputs follow schema 2 (gandissect_jax/dissection/README.md)."""


# Argument types (range-checked when parsed; the ranges are DissectConfig's and dissect_generator's)
segment_size = arguments.int_in_range(32, 4096)
samples = arguments.positive_int()
z_seed = arguments.seed()
downsample = arguments.int_in_range(1, 4096)
quantile = arguments.open_unit_interval()
iou_threshold = arguments.unit_interval()
topk = arguments.int_in_range(1, arguments.MAX_TOPK)
batch = arguments.batch_size()
checkpoint_seconds = arguments.seconds()
memory = arguments.memory_size()
thumbsize = arguments.int_in_range(arguments.MIN_THUMBSIZE, arguments.MAX_THUMBSIZE)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``dissect`` sub-command."""
    parser = subparsers.add_parser(
        "dissect", help="score every unit of a layer against segmentation concepts (IoU / IQR)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("generator source")
    source.add_argument("--model", type=arguments.text("a generator source"),
                        help="generator: registry name, .pth file or checkpoint directory "
                        f"(default: the shipped demo {DEMO_MODEL!r} with {DEMO_SEGMENTER!r}, layers "
                        f"{' '.join(DEMO_LAYERS)}); needs --segmenter and --layers unless it is the demo")
    source.add_argument("--segmenter", type=arguments.text("a segmenter source"),
                        help="segmenter: registry name (the paper's: upp-resnet50-upernet), the "
                        "reference's weight directory or a checkpoint directory")
    source.add_argument("--segdiv", choices=("undivided", "quad"), default=None,
                        help="unified-parsing segmenter's label division: undivided (default) or quad (objects also "
                        "split into top/bottom and left/right quarters: the paper's GAN setting)")
    source.add_argument("--segsizes", nargs="+", type=segment_size, default=None, metavar="SIZE",
                        help=f"unified-parsing segmenter's input sizes whose predictions vote, each in "
                        f"{segment_size.interval} (default 256, as the reference)")
    source.add_argument("--layers", nargs="+", type=arguments.text("a layer name"),
                        help="layers to dissect, e.g. layer4 layer7 (list them with: gandissect-jax layers MODEL)")
    source.add_argument("--size", type=samples, default=10000,
                        help=f"number of samples, in {samples.interval} (default %(default)s)")
    source.add_argument("--seed", type=z_seed, default=1,
                        help=f"z seed, in {z_seed.interval} (default %(default)s, as the reference)")
    source.add_argument("--seg-downsample", type=downsample, default=2,
                        help=f"segment at 1/N of the image size, N in {downsample.interval}, dividing the image "
                        "size (default %(default)s, as the reference)")
    source.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the generator and the segmenter (default float32; bfloat16 is "
                        "faster where the hardware has it, labels may differ slightly: benchmarks/README.md)")
    arrays = parser.add_argument_group("precomputed source")
    arrays.add_argument("--features", type=arguments.text("a .npy file"),
                        help="float .npy of activations, shape (N, h, w, U) (see --layout); needs --segmentations "
                        "and --labels")
    arrays.add_argument("--segmentations", type=arguments.text("a .npy file"),
                        help="int .npy of segmentations, shape (N, H, W, D) or (N, H, W); "
                        "every entry a label number of --labels (0 = no label)")
    arrays.add_argument("--labels", type=arguments.text("a labels.json file"),
                        help='labels.json: {"labels": [[name, category], ...], "categories": [...]}')
    arrays.add_argument("--images", type=arguments.text("a .npy file"),
                        help="optional .npy of images (N, H, W, 3) for the image strips: uint8 (0 to 255) or "
                        "float in [-1, 1] (a generator's output; values a little beyond saturate)")
    arrays.add_argument("--layer-name", default="features", type=arguments.text("a layer name"),
                        help="name of the layer in the outputs (default %(default)s)")
    arrays.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc",
                        help="axis order of --features: nhwc (N, h, w, U; default) or nchw (N, U, h, w, "
                        "channels first as PyTorch and Caffe save features). A wrong layout is detected from "
                        "the feature map's aspect ratio against the segmentations'; square maps with as many "
                        "units as rows (U == h == w) look the same both ways: set it explicitly")
    scoring = parser.add_argument_group("thresholds and labels")
    scoring.add_argument("--threshold", choices=("iqr", "quantile"),
                         help="per-unit threshold rule (default: iqr with --model, quantile with --features)")
    scoring.add_argument("--quantile", type=quantile, default=0.005,
                         help=f"top fraction of activations that is active with --threshold quantile, "
                         f"in {quantile.interval} (default %(default)s)")
    scoring.add_argument("--levels", type=arguments.text("a .npy file"),
                         help="float .npy (U,) of fixed per-unit thresholds (--features only; replaces --threshold)")
    scoring.add_argument("--iou-threshold", type=iou_threshold, default=0.05,
                         help=f"a unit is interpretable when its concept's IoU is >= this (> under --label-rule "
                         f"reference, as the reference), in {iou_threshold.interval} (default %(default)s)")
    scoring.add_argument("--label-rule", choices=arguments.LABEL_RULES, default="significant",
                         help="how units get their concept: significant (default: the concept's IoU must beat "
                              "chance at false-discovery rate 0.05; large concepts are never hidden) or reference "
                              "(the reference's rule, to reproduce the paper's numbers)")
    scoring.add_argument("--no-labels", action="store_true",
                         help="do not label the units (the segmenter never runs): each unit's levels, quantiles, "
                         "top-k samples and strips only; needs --threshold quantile (the default then) or --levels")
    run = parser.add_argument_group("run")
    run.add_argument("--outdir", required=True, type=arguments.text("a directory"),
                     help="output directory (reruns resume here)")
    run.add_argument("--restart", action="store_true",
                     help="remove what an earlier run wrote into --outdir (its progress and outputs, "
                     "nothing else) and start afresh")
    run.add_argument("--topk", type=topk, default=None,
                     help=f"top samples kept per unit and shown in its image strip, in {topk.interval} and at most "
                     "the number of samples (default: 10, or every sample when there are fewer)")
    run.add_argument("--examples", type=topk, dest="topk", metavar="N", default=argparse.SUPPRESS,
                     help=f"the reference's name for --topk, in {topk.interval}")
    run.add_argument("--batch-size", type=batch, default=32,
                     help=f"samples per step over all devices, in {batch.interval} (default %(default)s)")
    run.add_argument("--checkpoint-every", type=checkpoint_seconds, default=60.0, metavar="SECONDS",
                     help=f"seconds between checkpoints of a running pass, in {checkpoint_seconds.interval} "
                     "(default %(default)s; Ctrl-C also saves the running pass)")
    run.add_argument("--keep-progress", action="store_true",
                     help="keep the pass checkpoints in OUTDIR/.progress after the run completes")
    run.add_argument("--max-memory", type=memory, metavar="SIZE",
                     help=f"memory budget of the passes, e.g. 4G, 800M, 1.5GiB or a number of bytes (units K, M, G, "
                     f"T: powers of 1024), in {memory.interval} (default: half of the available RAM, 70%% of an "
                     "accelerator's free memory); units are measured in groups that fit, with identical results")
    run.add_argument("--no-images", action="store_true", help="skip the top-k image strips")
    run.add_argument("--thumbsize", type=thumbsize, default=None, metavar="PIXELS",
                     help=f"side of each thumbnail in the image strips, in {thumbsize.interval} (default: the image "
                     "size clamped to [96, 160])")
    run.add_argument("--no-report", action="store_true",
                     help="skip dissect.json, the bar graphs and the HTML report (scores.npz and strips are written)")
    run.add_argument("--title", type=arguments.text("a title"),
                     help="title of the HTML report (default: from the model or the data)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    multihost.add_arguments(parser)
    arguments.add_check(parser, check)
    parser.set_defaults(func=run_command)
    return parser


def _load_array(path: str, what: str):
    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}" if not os.path.exists(path) else
                                f"{what} {path} is not a file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"{what} {path} must be a .npy file holding one array, not an .npz archive")
    return array


def _load_labels(path: str) -> dict:
    """labels.json as ``{"labels": [[name, category], ...], "categories": [...]}`` (categories
    optional), every name and category a non-empty string; ValueError naming the file and the
    entry otherwise (nothing is converted to a string silently)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--labels file not found: {path}" if not os.path.exists(path) else
                                f"--labels {path} is not a file")
    form = '{"labels": [[name, category], ...], "categories": [...]}'
    try:
        with open(path, encoding="utf-8") as handle:
            document = untrusted_json.load(handle)
    except UnicodeDecodeError as err:
        raise ValueError(f"labels file {path} is not UTF-8 text ({err}); it must hold {form}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"labels file {path} is not JSON: {err}") from err
    if not isinstance(document, dict) or "labels" not in document:
        raise ValueError(f"labels file {path} must hold {form}")
    if not isinstance(document["labels"], list) or not document["labels"]:
        raise ValueError(f'labels file {path}: "labels" must be a non-empty list of [name, category], '
                         f"got {_short(document['labels'])}")
    for number, entry in enumerate(document["labels"]):
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ValueError(f"labels file {path}: each label must be [name, category], got {_short(entry)}")
        if not all(isinstance(part, str) and part.strip() for part in entry):
            raise ValueError(f"labels file {path}: label {number} must be [name, category] with both non-empty "
                             f"strings, got {_short(entry)}")
    categories = document.get("categories")
    if categories is not None and not (isinstance(categories, list) and categories and all(
            isinstance(category, str) and category.strip() for category in categories)):
        raise ValueError(f'labels file {path}: "categories" must be a non-empty list of non-empty strings '
                         f"(or left out: then taken from the labels), got {_short(categories)}")
    return document


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _summary(results, outdir: str, iou_threshold: float, report: bool = True) -> None:
    for layer, result in results.items():
        count = int(result.interpretable(iou_threshold).sum())
        chance = f", beating chance at FDR {result.fdr:g}" if result.label_rule == "significant" else ""
        print(f"{layer}: {count} of {result.num_units} units interpretable (IoU >= {iou_threshold}{chance})")
    print(f"report: {os.path.join(outdir, 'dissect.html')}" if report else f"scores: {outdir}/<layer>/scores.npz")


def check(args) -> None:
    """Usage checks of ``dissect``: the flags of one source, not the other's; the labels and the
    thresholds go together; the multi-host flags are complete. From the command line alone (and,
    for the multi-host flags, the GANDISSECT_* variables), before anything is loaded."""
    fail = arguments.UsageError
    if args.model and args.features:
        raise fail("give either --model (with --segmenter and --layers) or --features "
                   "(with --segmentations and --labels), not both")
    if args.features:
        if args.segdiv or args.segsizes:
            raise fail("--segdiv and --segsizes choose how --segmenter segments; they need --model, not --features")
        generator_flags = [flag for flag, value in (("--segmenter", args.segmenter), ("--layers", args.layers))
                           if value]
        if generator_flags:
            raise fail(f"{' and '.join(generator_flags)} belong to the generator source (--model); with --features "
                       f"the segmentations are given (--segmentations) and the layer is --layer-name")
        missing = [flag for flag, value in (("--segmentations", args.segmentations), ("--labels", args.labels))
                   if not value]
        if missing:
            raise fail(f"--features needs --segmentations and --labels (missing: {' and '.join(missing)})")
    else:
        array_flags = [flag for flag, value in (("--segmentations", args.segmentations), ("--labels", args.labels),
                                                 ("--images", args.images)) if value]
        if args.levels:
            raise fail("--levels works with --features only (the generator source searches the levels: "
                       "--threshold iqr or quantile)")
        if array_flags:
            raise fail(f"{' and '.join(array_flags)} belong to the precomputed source: give --features too")
        if args.model not in (None, DEMO_MODEL) and not (args.segmenter and args.layers):
            missing = [flag for flag, value in (("--segmenter", args.segmenter), ("--layers", args.layers))
                       if not value]
            raise fail(f"--model needs --segmenter and --layers (missing: {' and '.join(missing)}; list the layers "
                       f"with: gandissect-jax layers {args.model})")
        if args.topk is not None and args.topk > args.size:
            raise fail(f"--topk {args.topk} exceeds --size {args.size}, the number of samples; "
                       f"allowed [1, {args.size}]")
    if args.levels and args.threshold:
        raise fail(f"--levels fixes each unit's threshold; --threshold {args.threshold} would be ignored: give one")
    if args.no_labels and args.threshold == "iqr":
        raise fail("--no-labels needs --threshold quantile (its default) or --levels, not --threshold iqr: the IQR "
                   "rule chooses each unit's level by its agreement with the labels")
    multihost.check(args)


def run_command(args) -> int:
    """Run the dissection described by the parsed arguments (checked by :func:`check` when parsed),
    as one of the processes the multi-host flags name (:func:`gandissect_jax.commands.multihost.run`)."""
    return multihost.run("dissect", args, _run)


def _run(args) -> int:
    from gandissect_jax.dissection import DissectConfig, dissect_features, dissect_generator, distributed

    # multi-host: a process whose inputs fail to load stops every process (not a wait in a collective)
    with distributed.fail_together("while reading its inputs"):
        if distributed.is_leader():  # only process 0 writes --outdir
            arguments.check_directory(args.outdir)
        if not args.features:  # generator source; the shipped demo pair fills what is not given
            if args.model in (None, DEMO_MODEL):
                args.model = DEMO_MODEL
                args.segmenter = args.segmenter or DEMO_SEGMENTER
                args.layers = args.layers or list(DEMO_LAYERS)
        config = DissectConfig(threshold=args.threshold, quantile=args.quantile, topk=args.topk,
                               batch_size=args.batch_size, iou_threshold=args.iou_threshold, label_rule=args.label_rule,
                               checkpoint_every=args.checkpoint_every,
                               progress=not args.quiet, make_images=not args.no_images, make_report=not args.no_report,
                               make_labels=not args.no_labels,
                               thumbsize=args.thumbsize, title=args.title,
                               keep_progress=args.keep_progress, max_memory=args.max_memory)
        if args.features:
            features = _load_array(args.features, "--features")
            segmentations = _load_array(args.segmentations, "--segmentations")
            labels = _load_labels(args.labels)
            images = _load_array(args.images, "--images") if args.images else None
            levels = _load_array(args.levels, "--levels") if args.levels else None
            _check_arrays(args, features, levels)
        else:
            import gandissect_jax

            segmenter_options = {}
            if args.segdiv:
                segmenter_options["segdiv"] = args.segdiv
            if args.segsizes:
                segmenter_options["segsizes"] = tuple(args.segsizes)
            with arguments.naming("--model"):
                generator = gandissect_jax.load_generator(args.model)
            _check_layers(args, generator)
            with arguments.naming("--segmenter"):
                segmenter = gandissect_jax.load_segmenter(args.segmenter, **segmenter_options)
            if segmenter_options and not hasattr(segmenter, "segdiv"):
                raise ValueError(f"--segdiv and --segsizes apply to the unified-parsing segmenter; "
                                 f"{args.segmenter!r} is a {type(segmenter).__name__}")
    if args.features:
        results = dissect_features(features, segmentations, labels, config, levels=levels, images=images,
                                   layer=args.layer_name, layout=args.layout, outdir=args.outdir,
                                   restart=args.restart)
    else:
        results = dissect_generator(generator, segmenter, args.layers, config, size=args.size, seed=args.seed,
                                    seg_downsample=args.seg_downsample, outdir=args.outdir, restart=args.restart,
                                    compute_dtype=args.dtype,
                                    identity={"model": args.model, "segmenter": args.segmenter, **segmenter_options})
    if distributed.is_leader():
        _summary(results, args.outdir, args.iou_threshold, report=not args.no_report)
    return 0


def _check_arrays(args, features, levels) -> None:
    """Input checks of the precomputed source that name the flag (the API checks the rest: shapes,
    label numbers, --topk against the number of samples)."""
    from gandissect_jax.dissection.sources import real_dtype

    for flag, array in (("--features", features), ("--levels", levels)):
        if array is not None and not real_dtype(array.dtype):
            raise ValueError(f"{flag} {getattr(args, flag[2:])} must hold real numbers (a float, integer or bool "
                             f"dtype), got dtype {array.dtype}")
    if features.ndim != 4:
        return  # dissect_features says what the shape must be
    units = int(features.shape[-1] if args.layout == "nhwc" else features.shape[1])
    if levels is not None and levels.size != units:
        raise ValueError(f"--levels {args.levels} holds {levels.size} levels (shape {tuple(levels.shape)}); "
                         f"--features {args.features} has {units} units ({args.layout}): give one level per unit")


def _check_layers(args, generator) -> None:
    """--layers are layers of the generator (a ValueError naming the flag and the layers it has)."""
    names = list(getattr(generator, "layer_names", ()) or ())
    unknown = [layer for layer in args.layers if names and layer not in names]
    if unknown:
        raise ValueError(f"--layers: unknown layer(s) {', '.join(unknown)}; {args.model} has {', '.join(names)} "
                         f"(with their shapes: gandissect-jax layers {args.model})")
