"""``gandissect-jax dissect``: measure which concepts the units of a layer detect (the CLI of :mod:`gandissect_jax.dissection`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import arguments

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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``dissect`` sub-command."""
    parser = subparsers.add_parser(
        "dissect", help="score every unit of a layer against segmentation concepts (IoU / IQR)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("generator source")
    source.add_argument("--model", help="generator: registry name, .pth file or checkpoint directory "
                        f"(default: the shipped demo {DEMO_MODEL!r} with {DEMO_SEGMENTER!r}, layers "
                        f"{' '.join(DEMO_LAYERS)})")
    source.add_argument("--segmenter", help="segmenter: registry name (the paper's: upp-resnet50-upernet), the "
                        "reference's weight directory or a checkpoint directory")
    source.add_argument("--segdiv", choices=("undivided", "quad"), default=None,
                        help="unified-parsing segmenter's label division: undivided (default) or quad (objects also "
                        "split into top/bottom and left/right quarters: the paper's GAN setting)")
    source.add_argument("--segsizes", nargs="+", type=arguments.int_in_range(32, 4096), default=None, metavar="SIZE",
                        help="unified-parsing segmenter's input sizes whose predictions vote, each in [32, 4096] "
                        "(default 256, as the reference)")
    source.add_argument("--layers", nargs="+",
                        help="layers to dissect, e.g. layer4 layer7 (list them with: gandissect-jax layers MODEL)")
    source.add_argument("--size", type=arguments.positive_int(), default=10000,
                        help="number of samples (default 10000)")
    source.add_argument("--seed", type=arguments.seed(), default=1,
                        help="z seed, in [0, 2**32 - 1] (default 1, as the reference)")
    source.add_argument("--seg-downsample", type=arguments.int_in_range(1, 4096), default=2,
                        help="segment at 1/N of the image size (default 2, as the reference)")
    source.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the generator and the segmenter (default float32; bfloat16 is "
                        "faster where the hardware has it, labels may differ slightly: benchmarks/README.md)")
    arrays = parser.add_argument_group("precomputed source")
    arrays.add_argument("--features", help="float .npy of activations, shape (N, h, w, U) (see --layout)")
    arrays.add_argument("--segmentations", help="int .npy of segmentations, shape (N, H, W, D) or (N, H, W); "
                        "every entry a label number of --labels (0 = no label)")
    arrays.add_argument("--labels", help='labels.json: {"labels": [[name, category], ...], "categories": [...]}')
    arrays.add_argument("--images", help="optional .npy of images (N, H, W, 3) for the image strips")
    arrays.add_argument("--layer-name", default="features", help="name of the layer in the outputs")
    arrays.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc",
                        help="axis order of --features: nhwc (N, h, w, U; default) or nchw (N, U, h, w, "
                        "channels first as PyTorch and Caffe save features)")
    scoring = parser.add_argument_group("thresholds and labels")
    scoring.add_argument("--threshold", choices=("iqr", "quantile"),
                         help="per-unit threshold rule (default: iqr with --model, quantile with --features)")
    scoring.add_argument("--quantile", type=arguments.open_unit_interval(), default=0.005,
                         help="top fraction of activations that is active with --threshold quantile, "
                         "in (0, 1) (default 0.005)")
    scoring.add_argument("--levels", help="float .npy (U,) of fixed per-unit thresholds (--features only)")
    scoring.add_argument("--iou-threshold", type=arguments.unit_interval(), default=0.05,
                         help="a unit is interpretable when its concept's IoU is >= this, in [0, 1] (default 0.05)")
    scoring.add_argument("--label-rule", choices=arguments.LABEL_RULES, default="significant",
                         help="how units get their concept: significant (default: the concept's IoU must beat "
                              "chance at false-discovery rate 0.05; large concepts are never hidden), reference "
                              "(the reference's rule, to reproduce the paper's numbers) or maxiou (the reference's "
                              "--maxiou: the concept with the largest IoU over the IQR search's candidate levels; "
                              "needs --threshold iqr)")
    scoring.add_argument("--no-labels", action="store_true",
                         help="do not label the units (the segmenter never runs): each unit's levels, quantiles, "
                         "top-k samples and strips only; needs --threshold quantile (the default then) or --levels")
    run = parser.add_argument_group("run")
    run.add_argument("--outdir", required=True, help="output directory (reruns resume here)")
    run.add_argument("--restart", action="store_true",
                     help="remove what an earlier run wrote into --outdir (its progress and outputs, "
                     "nothing else) and start afresh")
    run.add_argument("--topk", type=arguments.int_in_range(1, arguments.MAX_TOPK), default=None,
                     help="top samples kept per unit and shown in its image strip, at most the number "
                     "of samples (default 10)")
    run.add_argument("--examples", type=arguments.int_in_range(1, arguments.MAX_TOPK), dest="topk", metavar="N",
                     default=argparse.SUPPRESS, help="the reference's name for --topk")
    run.add_argument("--batch-size", type=arguments.batch_size(), default=32,
                     help=f"samples per step over all devices, in [1, {arguments.MAX_BATCH}] (default 32)")
    run.add_argument("--checkpoint-every", type=arguments.seconds(), default=60.0, metavar="SECONDS",
                     help="seconds between checkpoints of a running pass, in [0, 86400] (default 60; "
                     "Ctrl-C also saves the running pass)")
    run.add_argument("--keep-progress", action="store_true",
                     help="keep the pass checkpoints in OUTDIR/.progress after the run completes")
    run.add_argument("--max-memory", type=arguments.memory_size(),
                     help="memory budget of the passes, e.g. 4G or 800M, in [1M, 1P] (default: half of the "
                     "available RAM, 70%% of an accelerator's free memory); units are measured in groups that fit, "
                     "with identical results")
    run.add_argument("--no-images", action="store_true", help="skip the top-k image strips")
    run.add_argument("--thumbsize", type=arguments.int_in_range(arguments.MIN_THUMBSIZE, arguments.MAX_THUMBSIZE),
                     default=None, metavar="PIXELS",
                     help="side of each thumbnail in the image strips, in [16, 1024] (default: the image size "
                     "clamped to [96, 160])")
    run.add_argument("--no-report", action="store_true",
                     help="skip dissect.json, the bar graphs and the HTML report (scores.npz and strips are written)")
    run.add_argument("--title", help="title of the HTML report")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    hosts = parser.add_argument_group(
        "multi-host", "run as one of N cooperating processes (TPU pod slice, GPU cluster; the same command on\n"
        "every process); only process 0 reads and writes --outdir. Give the three flags below (or\n"
        "GANDISSECT_COORDINATOR, GANDISSECT_NUM_PROCESSES, GANDISSECT_PROCESS_ID), or --multi-host to let\n"
        "JAX detect the cluster (TPU pods, SLURM, Open MPI)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    hosts.add_argument("--num-processes", type=arguments.int_in_range(1, 65536), default=None,
                       help="number of processes, in [1, 65536]")
    hosts.add_argument("--process-id", type=arguments.int_in_range(0, 65535), default=None,
                       help="this process's number, in [0, num-processes - 1]")
    hosts.add_argument("--multi-host", action="store_true",
                       help="jax.distributed.initialize() with no arguments: the cluster is detected (TPU pods, "
                       "SLURM, Open MPI)")
    parser.set_defaults(func=run_command)
    return parser


def _load_array(path: str, what: str):
    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"{what} {path} must be a .npy file holding one array, not an .npz archive")
    return array


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


def _summary(results, outdir: str, iou_threshold: float, report: bool = True) -> None:
    for layer, result in results.items():
        count = int(result.interpretable(iou_threshold).sum())
        chance = f", beating chance at FDR {result.fdr:g}" if result.label_rule == "significant" else ""
        measure = "max IoU" if result.label_rule == "maxiou" else "IoU"
        print(f"{layer}: {count} of {result.num_units} units interpretable ({measure} >= {iou_threshold}{chance})")
    print(f"report: {os.path.join(outdir, 'dissect.html')}" if report else f"scores: {outdir}/<layer>/scores.npz")


def _check_label_rule(args) -> None:
    """Refuse --label-rule maxiou without the IQR search, before anything is loaded."""
    if args.label_rule != "maxiou":
        return
    if args.no_labels:
        got = "--no-labels"
    elif args.levels:
        got = "--levels"
    else:
        threshold = args.threshold or ("quantile" if args.features else "iqr")
        if threshold == "iqr":
            return
        got = f"--threshold {threshold}" + ("" if args.threshold else " (the default with --features)")
    raise ValueError(f"--label-rule maxiou needs the IQR search's candidate levels, --threshold iqr (the default with "
                     f"--model), not {got}; with {got}, --label-rule must be significant or reference")


def run_command(args) -> int:
    """Run the dissection described by the parsed arguments."""
    if args.model and args.features:
        raise ValueError("give either --model (with --segmenter and --layers) or --features "
                         "(with --segmentations and --labels), not both")
    if args.features and (args.segdiv or args.segsizes):
        raise ValueError("--segdiv and --segsizes choose how --segmenter segments; they need --model, not --features")
    _check_label_rule(args)
    from gandissect_jax.dissection import distributed

    # before any JAX computation: join the other processes (a no-op when no multi-host flag is given)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.multi_host)
    if not distributed.multiprocess():
        return _run(args)
    try:
        return _run(args)
    except BaseException as err:  # noqa: BLE001 -- one line, then leave at once (see below)
        _leave_multiprocess_run(err)


def _leave_multiprocess_run(err: BaseException) -> None:
    """One line naming this process and the error, then exit at once (status 130 after Ctrl-C, else 1).

    A process of a multi-host run that stops on an error must not wait in JAX's shutdown barrier for
    the others (which would wait for it in their next collective until a heartbeat timeout): it
    exits, its connections close, and the other processes' collectives fail at once. What process 0
    saved stays, so relaunching every process with the same command resumes.
    """
    import jax

    interrupted = isinstance(err, KeyboardInterrupt)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if interrupted and jax.process_index() != 0:  # its own Interrupted knows no checkpoint: process 0 saved it
        first = "interrupted; process 0 saved the progress: relaunch every process with the same command to resume"
    if not interrupted and not isinstance(err, (ValueError, FileNotFoundError, KeyError, OSError)):
        first = (f"{type(err).__name__}: {first} (another process of this run probably stopped); what process 0 "
                 f"saved stays: relaunch every process with the same command to resume")
    print(f"gandissect-jax dissect: {'' if interrupted else 'error: '}process {jax.process_index()} of "
          f"{jax.process_count()}: {first}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if interrupted else 1)


def _run(args) -> int:
    from gandissect_jax.dissection import DissectConfig, dissect_features, dissect_generator, distributed

    if not args.features:  # generator source; the shipped demo pair fills what is not given
        if args.model in (None, DEMO_MODEL):
            args.model = DEMO_MODEL
            args.segmenter = args.segmenter or DEMO_SEGMENTER
            args.layers = args.layers or list(DEMO_LAYERS)
    config = DissectConfig(threshold=args.threshold, quantile=args.quantile, topk=args.topk, batch_size=args.batch_size,
                           iou_threshold=args.iou_threshold, label_rule=args.label_rule,
                           checkpoint_every=args.checkpoint_every,
                           progress=not args.quiet, make_images=not args.no_images, make_report=not args.no_report,
                           make_labels=not args.no_labels,
                           thumbsize=args.thumbsize, title=args.title,
                           keep_progress=args.keep_progress, max_memory=args.max_memory)
    if args.features:
        if not args.segmentations or not args.labels:
            raise ValueError("--features needs --segmentations and --labels")
        features = _load_array(args.features, "features")
        segmentations = _load_array(args.segmentations, "segmentations")
        labels = _load_labels(args.labels)
        images = _load_array(args.images, "images") if args.images else None
        levels = _load_array(args.levels, "levels") if args.levels else None
        results = dissect_features(features, segmentations, labels, config, levels=levels, images=images,
                                   layer=args.layer_name, layout=args.layout, outdir=args.outdir,
                                   restart=args.restart)
    else:
        if not args.segmenter or not args.layers:
            raise ValueError("--model needs --segmenter and --layers")
        if args.levels:
            raise ValueError("--levels works with --features only")
        import gandissect_jax

        segmenter_options = {}
        if args.segdiv:
            segmenter_options["segdiv"] = args.segdiv
        if args.segsizes:
            segmenter_options["segsizes"] = tuple(args.segsizes)
        generator = gandissect_jax.load_generator(args.model)
        segmenter = gandissect_jax.load_segmenter(args.segmenter, **segmenter_options)
        if segmenter_options and not hasattr(segmenter, "segdiv"):
            raise ValueError(f"--segdiv and --segsizes apply to the unified-parsing segmenter; {args.segmenter!r} "
                             f"is a {type(segmenter).__name__}")
        results = dissect_generator(generator, segmenter, args.layers, config, size=args.size, seed=args.seed,
                                    seg_downsample=args.seg_downsample, outdir=args.outdir, restart=args.restart,
                                    compute_dtype=args.dtype,
                                    identity={"model": args.model, "segmenter": args.segmenter, **segmenter_options})
    if distributed.is_leader():
        _summary(results, args.outdir, args.iou_threshold, report=not args.no_report)
    return 0
