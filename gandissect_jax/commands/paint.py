"""gandissect-jax paint: the GANPaint web app over dissection output directories.

    gandissect-jax paint                                   # the shipped demo model (dissected first if needed)
    gandissect-jax paint --outdir results/church results/bedroom --port 8000

Each --outdir is a directory written by "gandissect-jax dissect"; its dissect.json names the
generator and segmenter (override with --model / --segmenter when there is one directory).
Concepts are ranked by ACE where a ranking was fitted (gandissect-jax ace), by IoU otherwise. Without
--outdir, the demo model is served from results/scenes64, dissected there first (layers layer4
and layer6, as "gandissect-jax dissect" with no source) when that directory holds no dissection
yet. Open http://HOST:PORT/ in a browser; the JSON API is described at /openapi.json. Needs the
paint extra (pip install "gandissect-jax[paint]").
"""

from __future__ import annotations

import argparse
import os

from . import arguments
from .dissect import DEMO_LAYERS, DEMO_MODEL, DEMO_SEGMENTER

DEMO_OUTDIR = os.path.join("results", "scenes64")
MAX_PORT = 65535
MAX_TOP = 65536  # units per concept stroke (more than any layer has)
MAX_STROKES = 1024  # strokes per edit (the edit program's fixed stroke count)
port = arguments.int_in_range(1, MAX_PORT)
top = arguments.int_in_range(1, MAX_TOP)
strokes = arguments.int_in_range(1, MAX_STROKES)
samples = arguments.positive_int()


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``paint`` sub-command."""
    parser = subparsers.add_parser(
        "paint", help="GANPaint: paint concepts into generated scenes in the browser",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", nargs="+", metavar="D", type=arguments.text("a directory"),
                        help=f"dissection output directories, with distinct names (default: {DEMO_OUTDIR}, the demo "
                        "model)")
    parser.add_argument("--model", type=arguments.text("a generator source"),
                        help="generator source (default: the one recorded in dissect.json; one --outdir only)")
    parser.add_argument("--segmenter", type=arguments.text("a segmenter source"),
                        help="segmenter source (default: the one recorded in dissect.json; one --outdir only)")
    parser.add_argument("--host", default="127.0.0.1", type=arguments.text("an address"),
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=port, default=8000, help=f"port, in {port.interval} (default %(default)s)")
    parser.add_argument("--top", type=top, default=20,
                        help=f"units per concept stroke, in {top.interval} (default %(default)s)")
    parser.add_argument("--max-strokes", type=strokes, default=32,
                        help=f"strokes per edit, in {strokes.interval} (default %(default)s)")
    parser.add_argument("--size", type=samples, default=10000,
                        help=f"samples when dissecting the demo model first, in {samples.interval} "
                        "(default %(default)s)")
    parser.add_argument("--no-warmup", action="store_true", help="do not compile the edit functions at start")
    arguments.add_check(parser, _check)
    parser.set_defaults(func=run_command)
    return parser


def _check(args) -> None:
    """Usage checks: --model / --segmenter override one directory's; the directories' names (the
    models' names in the app) are distinct."""
    if args.outdir and len(args.outdir) > 1 and (args.model or args.segmenter):
        given = " and ".join(flag for flag, value in (("--model", args.model), ("--segmenter", args.segmenter))
                             if value)
        raise arguments.UsageError(f"{given} override one --outdir's models; {len(args.outdir)} --outdir given")
    names = [os.path.basename(os.path.normpath(os.path.abspath(d))) for d in args.outdir or []]
    if len(set(names)) != len(names):
        raise arguments.UsageError(f"--outdir directories must have distinct names (the models' names): {names}")


def ensure_demo_dissection(outdir: str, size: int = 10000, progress: bool = True) -> str:
    """Dissect the demo model into ``outdir`` unless a dissection is there already; returns outdir.

    The same run as ``gandissect-jax dissect --outdir OUTDIR`` (so either resumes the other)."""
    if os.path.isfile(os.path.join(outdir, "dissect.json")):
        return outdir
    import gandissect_jax
    from gandissect_jax.dissection import DissectConfig, dissect_generator

    print(f"no dissection in {outdir}: dissecting the demo model {DEMO_MODEL!r} first "
          f"({size} samples, layers {' '.join(DEMO_LAYERS)}; a few minutes on a laptop CPU)")
    generator = gandissect_jax.load_generator(DEMO_MODEL)
    segmenter = gandissect_jax.load_segmenter(DEMO_SEGMENTER)
    dissect_generator(generator, segmenter, list(DEMO_LAYERS), DissectConfig(progress=progress), size=size,
                      seed=1, seg_downsample=2, outdir=outdir,
                      identity={"model": DEMO_MODEL, "segmenter": DEMO_SEGMENTER})
    return outdir


def build_models(args) -> list:
    """The :class:`~gandissect_jax.paint.model.PaintModel` of every ``--outdir`` (or the demo's)."""
    from gandissect_jax.paint.model import load_paint_model

    outdirs = args.outdir or [ensure_demo_dissection(DEMO_OUTDIR, args.size)]
    for outdir in outdirs:
        arguments.check_directory(outdir, must_exist=True)
    return [load_paint_model(outdir, model=args.model, segmenter=args.segmenter, default_top=args.top,
                             max_strokes=args.max_strokes) for outdir in outdirs]


def warm_up(models) -> None:
    """Compile every model's generate and edit programs (each layer) before serving."""
    import numpy as np

    from gandissect_jax.paint.edits import Stroke

    for model in models:
        z = model.z_for_seed(0)
        model.generate(z[None])
        for layer in model.layers:
            model.edit(layer, [Stroke(np.ones((1, 1), np.float32), units=[0], mode="remove", strength=0.0)], z=z)


def run_command(args) -> int:
    """Start the server (blocks until interrupted)."""
    for outdir in args.outdir or []:  # before anything is imported or loaded
        arguments.check_directory(outdir, must_exist=True)
    if not args.outdir:  # the demo's directory, made (and dissected into) when missing
        arguments.check_directory(DEMO_OUTDIR, "the demo model's --outdir")
    try:
        import uvicorn

        from gandissect_jax.paint.server import create_app
    except ImportError as err:
        raise ValueError(f"the paint app needs the 'paint' extra: pip install \"gandissect-jax[paint]\" ({err})") from None
    models = build_models(args)
    if not args.no_warmup:
        print("compiling the edit functions ...", flush=True)
        warm_up(models)
    app = create_app(models)
    print(f"GANPaint: http://{args.host}:{args.port}/  (models: {', '.join(m.name for m in models)}; "
          f"API schema at /openapi.json; Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
