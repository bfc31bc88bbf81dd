"""``gandissect-jax weights list|fetch``: the registry of downloadable weights."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    """Register the ``weights`` sub-command with ``list`` and ``fetch``."""
    parser = subparsers.add_parser(
        "weights",
        help="list or fetch registered weights",
        description="List the weight registry, or download, verify and convert an entry.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    list_parser = actions.add_parser("list", help="list registry entries and where they are")
    list_parser.set_defaults(func=run_list)
    fetch_parser = actions.add_parser("fetch", help="download, verify and convert an entry")
    for sub in (list_parser, fetch_parser):
        sub.add_argument("--registry", default=None,
                         help="registry JSON (default: the shipped weights/registry.json)")
    fetch_parser.add_argument("name", help="registry name (see `weights list`)")
    fetch_parser.add_argument("--dest", default=None, help="converted directory (default: cache)")
    fetch_parser.add_argument("--force", action="store_true", help="download again even if cached")
    fetch_parser.add_argument("--timeout", type=float, default=60.0, help="network timeout, seconds")
    fetch_parser.set_defaults(func=run_fetch)


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
