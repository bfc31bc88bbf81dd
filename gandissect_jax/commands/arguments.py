"""Argument types of the command line: every numeric flag is range-checked when it is parsed.

Each function here returns an ``argparse`` ``type=`` callable. A value outside its range is
refused by argparse with one line naming the flag and the allowed range, e.g.::

    gandissect-jax dissect: error: argument --batch-size: must be an integer in [1, 65536], got '0'

never a traceback from JAX or numpy later, and never a silent clamp. Every command uses these
types for every numeric flag (``tests/test_arguments.py`` holds that for each command); the API
checks the same ranges (:class:`gandissect_jax.dissection.DissectConfig` and the ``dissect_*``
arguments) with ValueErrors naming the argument. ``inf``, ``nan`` and values that do not fit
the range (``1e300``) are refused like any other.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

# The limits below are the API's too (gandissect_jax.dissection.config; a test holds them equal).
# Largest batch any command accepts: far above what fits a device, small enough that a typo
# cannot ask numpy for a terabyte of indices.
MAX_BATCH = 65536
# Largest number of samples (sample numbers are int32 on device).
MAX_SAMPLES = 2**31 - 1
# numpy's RandomState takes seeds in [0, 2**32).
MAX_SEED = 2**32 - 1
# Top samples kept per unit.
MAX_TOPK = 10000

MIN_THUMBSIZE, MAX_THUMBSIZE = 16, 1024  # pixels per side of a strip thumbnail (as DissectConfig)
# Checkpoint intervals are at most a day.
MAX_CHECKPOINT_SECONDS = 86400.0
# How units get their concept (--label-rule; DissectConfig.label_rule).
LABEL_RULES = ("significant", "reference", "maxiou")


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high] (decimal digits only: no '1e3', '2.5', 'nan')."""
    allowed = f"must be an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def float_in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                   what: str = "a number") -> Callable[[str], float]:
    """A finite number in the interval from low to high (open or closed at either end)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    allowed = f"must be {what} in {interval}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}") from None
        inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
        return value

    parse.__name__ = f"{what} in {interval}"
    return parse


def positive_int(high: int = MAX_SAMPLES) -> Callable[[str], int]:
    """An integer in [1, high]."""
    return int_in_range(1, high)


def non_negative_int(high: int = MAX_SAMPLES) -> Callable[[str], int]:
    """An integer in [0, high]."""
    return int_in_range(0, high)


def batch_size() -> Callable[[str], int]:
    """Samples per step: an integer in [1, MAX_BATCH]."""
    return int_in_range(1, MAX_BATCH)


def seed() -> Callable[[str], int]:
    """A numpy RandomState seed: an integer in [0, 2**32 - 1]."""
    return int_in_range(0, MAX_SEED)


def open_unit_interval() -> Callable[[str], float]:
    """A number in (0, 1)."""
    return float_in_range(0.0, 1.0, low_open=True, high_open=True)


def unit_interval() -> Callable[[str], float]:
    """A number in [0, 1]."""
    return float_in_range(0.0, 1.0)


def positive_finite_float(high: float = 1e9, what: str = "a number") -> Callable[[str], float]:
    """A finite number in (0, high]."""
    return float_in_range(0.0, high, low_open=True, what=what)


def seconds(low: float = 0.0, high: float = MAX_CHECKPOINT_SECONDS) -> Callable[[str], float]:
    """A finite number of seconds in [low, high]."""
    return float_in_range(low, high, what="a number of seconds")


# Largest unit number and feature-map coordinate accepted on the command line (layers are checked
# against the generator afterwards, with their real sizes).
MAX_UNIT = 65535


def unit_list(high: int = MAX_UNIT) -> Callable[[str], list[int]]:
    """Unit numbers written as ``3,17,42`` or ranges ``4-7`` (inclusive), each an integer in
    [0, high]; returns them sorted, without repeats. Empty lists are refused."""
    allowed = f"must be unit numbers like 3,17,42 or 4-7, each an integer in [0, {high}]"

    def parse(text: str) -> list[int]:
        units: set[int] = set()
        for part in str(text).split(","):
            low, dash, top = part.strip().partition("-")
            if not low.isdecimal() or not low.isascii() or (dash and not (top.isdecimal() and top.isascii())):
                raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
            first, last = int(low), int(top) if dash else int(low)
            if last < first or last > high:
                raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
            units.update(range(first, last + 1))
        return sorted(units)

    parse.__name__ = f"unit numbers in [0, {high}]"
    return parse


def feature_position(high: int = MAX_UNIT) -> Callable[[str], tuple[int, int]]:
    """A feature-map position ``ROW,COLUMN`` (e.g. ``5,3``), each an integer in [0, high]."""
    allowed = f"must be a feature-map position ROW,COLUMN like 5,3, each an integer in [0, {high}]"

    def parse(text: str) -> tuple[int, int]:
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 2 or not all(p.isdecimal() and p.isascii() and int(p) <= high for p in parts):
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
        return int(parts[0]), int(parts[1])

    parse.__name__ = f"position in [0, {high}]"
    return parse


MAX_MEMORY = 1 << 50  # bytes (1 PiB): larger budgets are typing errors


def memory_size() -> Callable[[str], int]:
    """A memory budget in bytes, written as 4G, 800M, 1.5GiB or 1073741824, in [1 MiB, 1 PiB]
    (gandissect_jax.dissection.memory.parse_memory)."""

    def parse(text: str) -> int:
        from gandissect_jax.dissection.memory import parse_memory

        try:
            value = parse_memory(text, "the memory budget")
        except ValueError:
            value = None
        if value is None or value > MAX_MEMORY:
            raise argparse.ArgumentTypeError(
                f"must be a size such as 4G, 800M, 1.5GiB or a number of bytes in [{1 << 20}, {MAX_MEMORY}], got {text!r}")
        return value

    return parse


def is_range_checked(type_function) -> bool:
    """True when ``type_function`` was made by this module (``int`` or ``float`` are not)."""
    return getattr(type_function, "__module__", None) == __name__ and type_function.__qualname__.endswith("parse")


__all__ = ["int_in_range", "float_in_range", "positive_int", "non_negative_int", "batch_size", "seed",
           "open_unit_interval", "unit_interval", "positive_finite_float", "seconds", "memory_size", "unit_list",
           "feature_position", "is_range_checked", "MAX_UNIT",
           "MAX_BATCH", "MAX_TOPK", "MAX_SAMPLES", "MAX_SEED", "MAX_CHECKPOINT_SECONDS", "MAX_MEMORY",
           "LABEL_RULES"]
