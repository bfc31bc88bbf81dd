"""Where the scripts write: under results/ by default; into the shipped weights/ only with --update-shipped.

The repository's ``weights/`` holds the shipped, version-controlled demo models and the figures
the tests check them against. A script run as the README suggests must not overwrite them, so
every script's output goes under ``results/`` (or ``--out``), and ``--update-shipped`` is the one
way to refresh the shipped files on purpose. An ``--out`` inside ``weights/`` without that flag is
refused before any work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
SHIPPED = REPOSITORY / "weights"


def add_output_arguments(parser: argparse.ArgumentParser, default: str, shipped: str,
                         flag: str = "--out") -> None:
    """Add ``flag`` (default ``default``, relative to the current directory) and ``--update-shipped``
    (write into ``weights/<shipped>`` instead)."""
    parser.add_argument(flag, default=None, help=f"output directory (default {default}); a directory inside the "
                        "shipped weights/ needs --update-shipped")
    parser.add_argument("--update-shipped", action="store_true",
                        help=f"write into the shipped, version-controlled weights/{shipped} (to refresh the "
                             "shipped figures on purpose)")
    parser.set_defaults(_output_flag=flag, _output_default=default, _output_shipped=shipped)


def is_shipped(path: Path) -> bool:
    """True when ``path`` lies inside the repository's weights/ directory."""
    resolved, shipped = Path(path).resolve(), SHIPPED.resolve()
    return resolved == shipped or shipped in resolved.parents


def output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The output directory the arguments ask for; a parser error (exit 2) for an ``--out`` inside
    weights/ without ``--update-shipped``, or for both given."""
    flag = args._output_flag
    given = getattr(args, flag.lstrip("-").replace("-", "_"))
    if args.update_shipped:
        if given is not None:
            parser.error(f"give {flag} or --update-shipped, not both")
        return SHIPPED / args._output_shipped
    out = Path(given if given is not None else args._output_default)
    if is_shipped(out):
        parser.error(f"{flag} {out} is inside the shipped weights/ directory; pass --update-shipped to "
                     "refresh the shipped files on purpose, or choose another directory")
    return out
