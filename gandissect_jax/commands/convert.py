"""``gandissect-jax convert SRC DEST``: convert reference weights into a gandissect-jax checkpoint.

SRC may be a generator ``.pth`` (legacy or zip format, read without torch), a directory holding
one, or a unified-parsing segmenter directory (``encoder_epoch_*.pth`` + ``decoder_epoch_*.pth``),
which is handed to ``gandissect_jax.segmenter.convert_reference``. ``--kind`` forces the choice.

DEST is written atomically and never replaces anything of the user's: it must not exist (or be an
empty directory); with ``--force`` it may also be a checkpoint that gandissect-jax wrote, which is
replaced. SRC and DEST must not overlap. Both are checked before SRC is read.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from .arguments import text

# kind -> "module:function" called as function(src, dest)
CONVERTERS = {
    "generator": "gandissect_jax.proggan:convert_reference",
    "segmenter": "gandissect_jax.segmenter:convert_reference",
}


def add_parser(subparsers) -> None:
    """Register the ``convert`` sub-command."""
    parser = subparsers.add_parser(
        "convert",
        help="convert reference .pth weights into a gandissect-jax checkpoint directory",
        description="Convert reference PyTorch weights (no torch needed) into an orbax "
        "checkpoint directory that gandissect-jax loads.",
    )
    parser.add_argument("src", metavar="SRC", type=text("a file or directory"),
                        help="generator .pth, or a directory of reference weights")
    parser.add_argument("dest", metavar="DEST", type=text("a directory"),
                        help="checkpoint directory to write (must not exist, or be empty)")
    parser.add_argument("--force", action="store_true",
                        help="replace DEST if it is a checkpoint written by gandissect-jax "
                             "(anything else at DEST is always refused and left untouched)")
    parser.add_argument("--kind", choices=sorted(CONVERTERS), default=None,
                        help="what SRC holds (detected when omitted)")
    parser.set_defaults(func=run)


def detect_kind(src: Path) -> str:
    """``'segmenter'`` for a directory with ``encoder_epoch_*.pth``, else ``'generator'``."""
    if src.is_dir() and any(src.glob("encoder_epoch_*.pth")):
        return "segmenter"
    return "generator"


def converter_for(spec: str):
    """Import ``module:function`` lazily; a clear error when that converter is not available."""
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"converter {spec} is not available in this installation: {err}") from err


def run(args: argparse.Namespace) -> int:
    """Convert ``args.src`` into ``args.dest`` (checked first: see the module docstring)."""
    from gandissect_jax.checkpoints import check_destination, check_distinct

    src = Path(args.src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"no such file or directory: {src}")
    dest = Path(args.dest).expanduser()
    check_distinct(src, dest)
    check_destination(dest, args.force)
    kind = args.kind or detect_kind(src)
    dest = converter_for(CONVERTERS[kind])(src, dest, force=args.force)
    print(f"converted {kind} {src} -> {dest}")
    return 0
