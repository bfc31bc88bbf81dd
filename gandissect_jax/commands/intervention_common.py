"""Arguments and helpers shared by the intervention commands (ace, ablate, insert, artifacts,
segment-units): where the model comes from, which units, batches with progress bars."""

from __future__ import annotations

import argparse
import re
from typing import Any, Callable, Iterator

import numpy as np

from . import arguments


def add_source_arguments(parser: argparse.ArgumentParser, *, layer_required: bool = True) -> None:
    """--outdir, --model, --segmenter, --layer, --name, --batch-size, --quiet."""
    group = parser.add_argument_group("source and output")
    group.add_argument("--outdir", required=True, type=arguments.text("a directory"),
                       help="a dissection output directory (its dissect.json names the model and segmenter); "
                            "results go to OUTDIR/intervention/")
    group.add_argument("--model", type=arguments.text("a generator source"),
                       help="generator (registry name, checkpoint or .pth) instead of the dissection's")
    group.add_argument("--segmenter", type=arguments.text("a segmenter source"),
                       help="segmenter (registry name or checkpoint) instead of the dissection's")
    group.add_argument("--layer", required=layer_required, type=arguments.text("a layer name"),
                       help="layer to intervene on, e.g. layer4")
    group.add_argument("--name", type=arguments.text("an experiment name"),
                       help="experiment name, not empty (default: from the arguments); a rerun with the same "
                            "name and settings resumes")
    group.add_argument("--batch-size", type=batch_size, default=16,
                       help=f"samples per step, in {batch_size.interval} (default %(default)s)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def plain_help(doc: str) -> str:
    """A command module's docstring as plain ``--help`` text (reST markup removed)."""
    text = re.sub(r":(?:func|class|mod|meth|attr|data|exc):`~?([^`]*)`", r"\1", doc)
    return text.replace("``", "").replace("`", "")


# Argument types (all range-checked at parse time, gandissect_jax.commands.arguments)
positive_int = arguments.positive_int()              # counts: samples, epochs, resamples, units shown
batch_size = arguments.batch_size()                  # samples per step
seed = arguments.seed()                              # numpy RandomState seeds
fraction = arguments.open_unit_interval()            # quantiles, confidence levels
weight = arguments.float_in_range(0.0, 1e6, what="a weight")      # l2, specificity, binarize
positive_float = arguments.positive_finite_float(1e6)             # budgets, step sizes
activation = arguments.float_in_range(0.0, 1e6, what="an activation value")  # inserted value k
unit_list = arguments.unit_list()                    # --units 3,17,42 or 4-7


def source_of(args):
    """The :class:`~gandissect_jax.experiment.DissectionSource` of the parsed arguments, --outdir
    checked first (a file is refused), the generator loaded (errors name --model when it was
    given) and the layer checked against it."""
    from gandissect_jax.dissection import distributed
    from gandissect_jax.experiment import DissectionSource

    # multi-host: a check that fails on one process stops every process (not a wait in the next collective)
    with distributed.fail_together("checking --outdir"):
        arguments.check_directory(args.outdir)
    source = DissectionSource(args.outdir, model=args.model, segmenter=args.segmenter)  # process 0 reads it
    with distributed.fail_together("while loading the models"):
        with arguments.naming("--model" if args.model else "the generator named in --outdir's dissect.json"):
            source.generator
        if getattr(args, "layer", None):
            source.check_layer(args.layer)
    return source


def check_units(units: list[int], num_units: int, flag: str = "--units") -> np.ndarray:
    """int64 (K,) units; :class:`~.arguments.FlagError` (a usage error) naming ``flag``, the units
    and the allowed range when some are not units of the layer (``num_units`` of them)."""
    bad = [u for u in units if u >= num_units]
    if bad:
        raise arguments.FlagError(flag, f"units {bad} out of range; the layer has {num_units} units, "
                                        f"allowed [0, {num_units - 1}]")
    return np.asarray(units, np.int64)


def batches(z: np.ndarray, batch_size: int, quiet: bool, desc: str) -> Iterator[tuple[int, np.ndarray, int]]:
    """``(start, padded batch, real rows)`` over ``z``: every batch has ``batch_size`` rows (the last
    padded with copies of row 0), so one compiled program serves all."""
    starts = range(0, len(z), batch_size)
    if not quiet:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        part = z[start:start + batch_size]
        count = len(part)
        if count < batch_size:
            part = np.concatenate([part, np.repeat(z[:1], batch_size - count, 0)])
        yield start, part, count


def collect(z: np.ndarray, batch_size: int, quiet: bool, desc: str, fn: Callable[[np.ndarray], Any],
            axis: int = 0) -> Any:
    """``fn`` over padded batches of ``z``, outputs (a pytree of arrays whose ``axis`` is the
    sample axis) concatenated on the host with the padding dropped."""
    import jax

    parts = []
    for _, batch, count in batches(z, batch_size, quiet, desc):
        out = jax.device_get(fn(batch))
        parts.append(jax.tree_util.tree_map(lambda a, n=count: np.take(np.asarray(a), np.arange(n), axis=axis), out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=axis), *parts)


def to_uint8(images) -> np.ndarray:
    from gandissect_jax.images import to_uint8 as convert

    return convert(np.clip(np.asarray(images), -1.0, 1.0))


def label_names(segmenter) -> list[str]:
    return [name for name, _ in segmenter.labels]


def add_unit_arguments(parser: argparse.ArgumentParser, *, concept_required: bool = False) -> None:
    """--units, or --concept with --top and --rank."""
    group = parser.add_argument_group("units")
    group.add_argument("--units", type=unit_list,
                       help=f"unit numbers, e.g. 3,17,42 or 4-7, each in {unit_list.interval} and below the layer's "
                            "number of units (default: chosen by --concept)")
    group.add_argument("--concept", required=concept_required, type=arguments.text("a label name"),
                       help="label name (or names joined by commas: their union)")
    group.add_argument("--top", type=positive_int, default=20,
                       help=f"with --concept: how many top units, in {positive_int.interval} and at most the "
                            "layer's number of units (default %(default)s)")
    group.add_argument("--rank", choices=("iou", "ace"), default="iou",
                       help="with --concept: rank units by the dissection's IoU (default) or by a fitted ACE "
                            "ranking (gandissect-jax ace)")


def check_units_or_concept(args) -> None:
    """Usage check: units are given by --units or chosen by --concept."""
    if args.units is None and args.concept is None:
        raise arguments.UsageError("give --units (e.g. --units 3,17,42), or --concept (with --top and --rank)")


def choose_units(args, source, channels: int, *, need_concept: bool = False):
    """``(units int64 (K,), how they were chosen, concept label numbers or None, concept name or None)``
    from --units or --concept/--top/--rank. ValueError naming the flag when they cannot be had."""
    from gandissect_jax.dissection import rankings

    if args.units is not None:  # the flags' ranges first, before the dissection is read
        check_units(args.units, channels)
    elif args.top > channels:
        raise arguments.FlagError("--top", f"{args.top} exceeds the layer's {channels} units; allowed [1, {channels}]")
    labels = source.concept(args.concept) if args.concept else None
    name = "+".join(source.segmenter.labels[c][0] for c in labels) if labels else None
    if need_concept and labels is None:
        raise ValueError("give --concept")
    if args.units is not None:
        return check_units(args.units, channels), f"units {','.join(map(str, args.units))}", labels, name
    if labels is None:
        raise ValueError("give --units, or --concept (with --top and --rank)")
    if args.rank == "ace":
        record = source.ace_ranking(args.layer, labels)
        if record is None:
            raise ValueError(f"no ACE ranking of {name} at {args.layer} in {args.outdir}: run gandissect-jax ace "
                             f"--outdir {args.outdir} --layer {args.layer} --concept {args.concept} first, or use --rank iou")
        order = np.asarray(record["units"], np.int64)
        if args.top > len(order):
            raise arguments.FlagError("--top", f"{args.top} exceeds the {len(order)} units the ACE ranking lists; "
                                               f"allowed [1, {len(order)}]")
    else:
        result = source.result(args.layer)
        order = rankings.iou_ranking(result, labels)
    return order[:args.top], f"top {args.top} {name} units by {args.rank.upper()}", labels, name
