"""The ``gandissect-jax`` command line.

Each sub-command lives in its own module under ``gandissect_jax.commands`` and exposes
``add_parser(subparsers)``, which registers an ``argparse`` parser whose ``func`` default is
called with the parsed arguments. Sub-command modules are imported lazily so that
``gandissect-jax --help`` stays fast and a broken optional feature cannot break the others.

Faults (gandissect_jax.commands.arguments): a usage fault, decided by the command line alone
(a value out of range, flags that do not go together) or by the range the loaded model allows
(``--units`` beyond the layer's units, ``--at`` outside its feature map), prints the command's
usage line and one error line naming the flag, exit status 2; an input fault of a file or a
model itself (a model that does not load), prints one line ``gandissect-jax COMMAND: error: ...``,
exit status 1. Ctrl-C: one line, exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gandissect_jax.commands.arguments import CommandParser, UsageError

# (command name, module under gandissect_jax.commands)
_COMMANDS = (
    ("generate", "generate"),
    ("convert", "convert"),
    ("weights", "weights"),
    ("layers", "layers"),
    ("dissect", "dissect"),
    ("ace", "ace"),
    ("ablate", "ablate"),
    ("insert", "insert"),
    ("artifacts", "artifacts"),
    ("segment-units", "segment_units"),
    ("paint", "paint"),
)
# Exit status after Ctrl-C, as shells report a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available sub-command registered."""
    parser = CommandParser(
        prog="gandissect-jax",
        description="GAN Dissection in JAX: generate, convert weights, list layers, dissect; "
                    "intervene: ace, ablate, insert, artifacts, segment-units; paint (GANPaint).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, module_name in _COMMANDS:
        try:
            module = importlib.import_module(f"gandissect_jax.commands.{module_name}")
        except ModuleNotFoundError as err:  # sub-command not built yet
            if err.name == f"gandissect_jax.commands.{module_name}":
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = " ".join(word for word in (args.command, getattr(args, "action", None)) if word)
    try:
        result = args.func(args)
    except KeyboardInterrupt as err:  # Ctrl-C: one line, no traceback (a dissection says where it resumes)
        message = str(err) if str(err).startswith("interrupted") else "interrupted" + (
            "; rerun the same command to resume from the last saved progress" if args.command == "dissect" else "")
        start = "\r" if sys.stderr.isatty() else ""  # over the terminal's "^C"
        print(f"{start}gandissect-jax {command}: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as err:  # a flag out of the range the loaded model allows: as argparse reports one
        sub = parser.command_parser([word for word in (args.command, getattr(args, "action", None)) if word])
        sub.print_usage(sys.stderr)
        print(f"gandissect-jax {command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gandissect-jax {command}: error: {message}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
