"""``gandissect-jax weights list|fetch|pin``: the registry of downloadable weights."""

from __future__ import annotations

import argparse

from . import arguments


def add_parser(subparsers) -> None:
    """Register the ``weights`` sub-command with ``list``, ``fetch`` and ``pin``."""
    parser = subparsers.add_parser(
        "weights",
        help="list, fetch or pin registered weights",
        description="List the weight registry, download, verify and convert an entry, or pin the "
        "sizes and sha256 sums of its verified downloads into a registry file of your own.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    list_parser = actions.add_parser("list", help="list registry entries and where they are")
    list_parser.set_defaults(func=run_list)
    fetch_parser = actions.add_parser("fetch", help="download, verify and convert an entry")
    pin_parser = actions.add_parser(
        "pin", help="write size + sha256 of an entry's verified downloads into a registry file",
        description="After a first 'gandissect-jax weights fetch NAME' (which verified every file by "
        "reading it completely), write the size and sha256 of each cached file into the registry "
        "file given by --into (created if missing; never the shipped registry). Later fetches with "
        "--registry FILE then verify the downloads against these sums.")
    for sub in (list_parser, fetch_parser, pin_parser):
        sub.add_argument("--registry", default=None, type=arguments.text("a registry file"),
                         help="registry JSON to read (default: the shipped registry)")
    fetch_parser.add_argument("name", metavar="NAME", type=arguments.text("a registry name"),
                              help="registry name (see: gandissect-jax weights list)")
    fetch_parser.add_argument("--dest", default=None, type=arguments.text("a directory"),
                              help="converted directory (default: the cache); must not exist, "
                                   "or be empty")
    fetch_parser.add_argument("--force", action="store_true",
                              help="download every file again, and replace --dest if it is a "
                                   "checkpoint written by gandissect-jax (nothing else is replaced)")
    timeout = arguments.positive_finite_float(3600.0, "a number of seconds")
    fetch_parser.add_argument("--timeout", type=timeout, default=60.0,
                              help=f"network timeout in seconds, in {timeout.interval} (default %(default)s)")
    fetch_parser.set_defaults(func=run_fetch)
    pin_parser.add_argument("name", metavar="NAME", type=arguments.text("a registry name"),
                            help="registry name (see: gandissect-jax weights list)")
    pin_parser.add_argument("--into", required=True, metavar="FILE", type=arguments.text("a file"),
                            help="registry file of your own to write the pinned entry into")
    pin_parser.add_argument("--force", action="store_true",
                            help="overwrite sums already pinned in FILE that differ from the cache")
    pin_parser.set_defaults(func=run_pin)


def run_list(args: argparse.Namespace) -> int:
    """Print one line per registry entry: name, kind, status, description."""
    from gandissect_jax import weights

    entries = weights.load_registry(args.registry)
    for name, entry in sorted(entries.items()):
        try:
            where = f"at {weights.resolve(name, registry=args.registry)}"
        except FileNotFoundError:
            where = "not fetched"
        print(f"{name:24s} {entry['kind']:10s} {where}\n    {entry.get('description', '')}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch ``args.name``; prints where the converted weights are."""
    from gandissect_jax import weights

    weights.fetch(args.name, args.dest, registry=args.registry, force=args.force,
                  timeout=args.timeout)
    return 0


def run_pin(args: argparse.Namespace) -> int:
    """Pin ``args.name``'s cached downloads into ``args.into``."""
    from gandissect_jax import weights

    weights.pin(args.name, args.into, registry=args.registry, force=args.force)
    return 0
