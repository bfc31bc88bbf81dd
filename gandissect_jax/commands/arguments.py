"""Argument types and checks of the command line: every usage fault is refused before any work.

Two kinds of faults, two answers (``tests/test_cli_usage.py`` holds both for every command):

* A fault the command line alone decides -- a value out of range, an empty name, a combination
  of flags that does not go together -- is a **usage error**: the command's usage line, then one
  line naming the flag(s) and the allowed values, exit status 2 (argparse's own convention)::

      gandissect-jax dissect: error: argument --batch-size: must be an integer in [1, 65536], got '0'
      gandissect-jax dissect: error: --features needs --segmentations and --labels (missing: --labels)

  Values are checked by the ``type=`` functions here when parsed; combinations by the checks a
  command registers with :func:`add_check` (they raise :class:`UsageError`), run by
  :class:`CommandParser` right after parsing, before the command's module imports JAX.
* A flag's value outside the range the loaded model allows (``--units`` beyond the layer's
  units, ``--top`` above them, ``--at`` outside its feature map) is a usage error too
  (:class:`FlagError`, exit status 2), raised as soon as the model is loaded, before the long work.
* A fault of a file or a model itself (``--outdir`` naming a file, a model that does not load,
  a layer the model lacks) is an **input error**: one line ``gandissect-jax <command>: error:
  ...`` naming the flag, exit status 1, no traceback, raised (ValueError) before the long work starts.

Every numeric flag of every command uses a range-checked type from here and its ``--help`` states
the range and the default (tests/test_arguments.py and tests/test_cli_usage.py hold that for each
command); the API checks the same ranges (:class:`gandissect_jax.dissection.DissectConfig` and the
``dissect_*`` arguments) with ValueErrors naming the argument. ``inf``, ``nan`` and values that do
not fit the range (``1e300``) are refused like any other, never clamped. Option values that begin
with one dash (``--max-memory -5G``, ``--at -1,2``) reach the type function as with ``=``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from typing import Callable, Iterator

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
LABEL_RULES = ("significant", "reference")


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
    parse.interval = f"[{low}, {high}]"
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
    parse.interval = interval
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
    parse.interval = f"[0, {high}]"
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
    parse.interval = f"[0, {high}]"
    return parse


def feature_region(high: int = MAX_UNIT) -> Callable[[str], tuple[int, int, int, int]]:
    """A feature-map position ``ROW,COLUMN`` (e.g. ``5,3``) or a block of positions
    ``ROW0:ROW1,COL0:COL1`` (ends excluded, as Python slices, e.g. ``4:7,2:5``), each number an
    integer in [0, high] (an end in [1, high + 1]) and each block at least one cell; parsed as
    ``(row0, row1, col0, col1)`` (a position ``r,c`` is ``(r, r + 1, c, c + 1)``)."""
    allowed = (f"must be a feature-map position ROW,COLUMN like 5,3 or a block ROW0:ROW1,COL0:COL1 like 4:7,2:5 "
               f"(ends excluded), each position an integer in [0, {high}]")

    def number(part: str, low: int, top: int) -> int:
        if not (part.isdecimal() and part.isascii() and low <= int(part) <= top):
            raise ValueError(part)
        return int(part)

    def parse(text: str) -> tuple[int, int, int, int]:
        bounds = []
        try:
            parts = [p.strip() for p in str(text).split(",")]
            if len(parts) != 2:
                raise ValueError(text)
            for part in parts:
                ends = [e.strip() for e in part.split(":")]
                if len(ends) == 1:
                    start = number(ends[0], 0, high)
                    bounds += [start, start + 1]
                elif len(ends) == 2:
                    start, stop = number(ends[0], 0, high), number(ends[1], 1, high + 1)
                    if stop <= start:
                        raise ValueError(part)
                    bounds += [start, stop]
                else:
                    raise ValueError(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}") from None
        return tuple(bounds)

    parse.__name__ = f"position or block in [0, {high}]"
    parse.interval = f"[0, {high}]"
    return parse


MAX_MEMORY = 1 << 50  # bytes (1024T): larger budgets are typing errors
MEMORY_FORMS = ("a size with a binary unit K, M, G or T (KB, KiB alike: powers of 1024) or a plain number of "
                "bytes, e.g. 4G, 800M, 1.5GiB or 1073741824")


def memory_size() -> Callable[[str], int]:
    """A memory budget in bytes, written as 4G, 800M, 1.5GiB or 1073741824, in [1M, 1024T]
    (gandissect_jax.dissection.memory.parse_memory)."""

    def parse(text: str) -> int:
        from gandissect_jax.dissection.memory import parse_memory

        try:
            value = parse_memory(text, "the memory budget")
        except ValueError:
            value = None
        if value is None or value > MAX_MEMORY:
            raise argparse.ArgumentTypeError(f"must be {MEMORY_FORMS}, from 1M to 1024T: a number of bytes in "
                                             f"[{1 << 20}, {MAX_MEMORY}], got {text!r}")
        return value

    parse.__name__ = "memory size in [1M, 1024T]"
    parse.interval = "[1M, 1024T]"
    return parse


def text(what: str = "a value") -> Callable[[str], str]:
    """A string that is not empty nor only spaces (names, paths, titles): ``--name ""`` is refused,
    never silently replaced by a default. The string is returned unchanged."""

    def parse(value: str) -> str:
        if not str(value).strip():
            raise argparse.ArgumentTypeError(f"must be {what}, not empty, got {value!r}")
        return value

    parse.__name__ = what
    return parse


def is_range_checked(type_function) -> bool:
    """True when ``type_function`` is a range-checked type of this module (``int`` or ``float`` are
    not); its ``interval`` attribute is the allowed range as written in --help texts."""
    return (getattr(type_function, "__module__", None) == __name__ and type_function.__qualname__.endswith("parse")
            and hasattr(type_function, "interval"))


def is_text(type_function) -> bool:
    """True when ``type_function`` was made by :func:`text`."""
    return getattr(type_function, "__module__", None) == __name__ and type_function.__qualname__.startswith("text.")


# ------------------------------------------------------------------------------- usage checks

class UsageError(ValueError):
    """A fault of the command line itself (flags that do not go together): :class:`CommandParser`
    reports it as argparse reports a bad value, with the usage line and exit status 2."""


class FlagError(UsageError):
    """A flag's value outside the range its model or data allow (``--at`` outside the layer's
    feature map, ``--units`` beyond its units): known only once the model is loaded, but a usage
    error all the same. The command line reports it as argparse reports a bad value: the
    command's usage line, ``gandissect-jax <command>: error: argument <flag>: ...`` naming the
    value and the allowed range, exit status 2 (``gandissect_jax.cli.main``). Raised before any
    long work starts."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"argument {flag}: {message}")
        self.flag = flag


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also runs its command's checks of flag combinations.

    After parsing, every check registered with :func:`add_check` is called with the namespace; a
    :class:`UsageError` it raises becomes ``self.error(message)`` (usage line, exit status 2).
    Sub-command parsers made by ``add_subparsers`` are of the same class. Before parsing, an
    option that takes one value and is followed by a word beginning with one dash (``-5G``,
    ``-1,2``) is given that word as with ``--option=-5G``, so the value reaches its type function
    and is refused there with the allowed values (argparse alone would take the word for an
    unknown option and say only "expected one argument"). A word that is one of the command's
    options (``--outdir --quiet``) is left alone: the missing value is reported as before.
    Options are never abbreviated (``allow_abbrev=False``): ``--out`` is an unknown flag, refused
    with a usage error naming it, not ``--outdir`` (a flag added later starting the same way
    would change what a user's script means).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # '--out' is not '--outdir': a later flag cannot change a script
        super().__init__(*args, **kwargs)
        self.checks: list[Callable[[argparse.Namespace], None]] = []

    def parse_known_args(self, args=None, namespace=None):
        import sys

        args = self._join_dash_values(list(sys.argv[1:] if args is None else args))
        self._refuse_unknown_options(args)
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self.checks:
            try:
                check(namespace)
            except UsageError as err:
                self.error(str(err))
        return namespace, extras

    def _one_value_option(self, word: str) -> bool:
        """True when ``word`` names an option that takes exactly one value (options are never
        abbreviated: ``allow_abbrev`` is off)."""
        action = self._option_string_actions.get(word)
        return isinstance(action, (argparse._StoreAction, argparse._AppendAction)) and action.nargs is None

    def _refuse_unknown_options(self, words: list[str]) -> None:
        """Usage error naming the first word that looks like a long option (``--name`` or
        ``--name=value``) of none of this parser's options, before anything else is reported (a
        required flag missing, say): ``--out`` is refused, with the flags it would abbreviate."""
        for word in words:
            if word == "--" or (self._subparsers is not None and self._is_command(word)):
                return  # positionals follow / the sub-command's parser checks its own words
            if not word.startswith("--") or len(word) <= 2:
                continue
            name = word.split("=", 1)[0]
            if name in self._option_string_actions:
                continue
            close = sorted(option for option in self._option_string_actions if option.startswith(name))
            hint = f" (flags are never abbreviated: did you mean {' or '.join(close)}?)" if close else ""
            self.error(f"unrecognized arguments: {name}{hint}")

    def _join_dash_values(self, words: list[str]) -> list[str]:
        joined, i = [], 0
        while i < len(words):
            word = words[i]
            if word == "--":  # everything after is positional
                joined.extend(words[i:])
                break
            if self._subparsers is not None and self._is_command(word):
                joined.extend(words[i:])  # the sub-command's parser handles its own words
                break
            following = words[i + 1] if i + 1 < len(words) else None
            if (following is not None and following.startswith("-") and not following.startswith("--")
                    and len(following) > 1 and following not in self._option_string_actions
                    and "=" not in word and self._one_value_option(word)):
                joined.append(f"{word}={following}")
                i += 2
                continue
            joined.append(word)
            i += 1
        return joined

    def command_parser(self, words: list[str]) -> argparse.ArgumentParser:
        """The parser of the (sub-)command ``words`` name (``["weights", "fetch"]``), else this one."""
        parser = self
        for word in words:
            found = [action.choices[word] for action in parser._actions
                     if isinstance(action, argparse._SubParsersAction) and word in action.choices]
            if not found:
                break
            parser = found[0]
        return parser

    def _is_command(self, word: str) -> bool:
        return any(isinstance(action, argparse._SubParsersAction) and word in action.choices
                   for action in self._actions)


def add_check(parser: argparse.ArgumentParser, check: Callable[[argparse.Namespace], None]) -> None:
    """Run ``check(namespace)`` after ``parser`` parsed a command line; it raises
    :class:`UsageError` naming the flags for combinations that do not go together. Checks decide
    from the command line alone (and the environment): nothing is loaded, nothing is written."""
    if not isinstance(parser, CommandParser):
        raise TypeError(f"add_check needs a {CommandParser.__name__} (gandissect_jax.cli.build_parser makes one), "
                        f"got {type(parser).__name__}")
    parser.checks.append(check)


# ------------------------------------------------------------------------------- input checks

def check_directory(path: str, flag: str = "--outdir", *, must_exist: bool = False) -> None:
    """ValueError naming ``flag`` when ``path``, or the nearest of its parents that exists, is not a
    directory (a file, say): no output directory can be made there. With ``must_exist``,
    FileNotFoundError naming ``flag`` when ``path`` does not exist. Called before any work starts."""
    full = os.path.abspath(path)
    probe = full
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.lexists(probe) and not os.path.isdir(probe):
        where = path if probe == full else f"{path}: {probe}"
        what = ("a link to nothing (dangling symlink), not a directory" if not os.path.exists(probe)
                else "a file, not a directory" if os.path.isfile(probe) else "not a directory")
        raise ValueError(f"{flag} {where} is {what}")
    name_max = os.pathconf(probe, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255  # probe: an existing directory
    long = [part for part in full.split(os.sep) if len(os.fsencode(part)) > name_max]
    if long:
        raise ValueError(f"{flag} {path}: the name {long[0][:40]}... is longer than the file system's "
                         f"{name_max} bytes")
    if must_exist and not os.path.isdir(full):
        raise FileNotFoundError(f"{flag} {path} is not a directory: nothing exists there")


@contextlib.contextmanager
def naming(flag: str) -> Iterator[None]:
    """Errors loading what ``flag`` names (a model, a file) are re-raised as one ValueError line
    beginning with the flag, unless the message names it already."""
    try:
        yield
    except (ValueError, FileNotFoundError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if str(message).startswith(flag):
            raise
        raise ValueError(f"{flag}: {message}") from err


__all__ = ["int_in_range", "float_in_range", "positive_int", "non_negative_int", "batch_size", "seed",
           "open_unit_interval", "unit_interval", "positive_finite_float", "seconds", "memory_size", "unit_list",
           "feature_position", "feature_region", "text", "is_range_checked", "is_text", "MAX_UNIT", "MEMORY_FORMS",
           "UsageError", "FlagError", "CommandParser", "add_check", "check_directory", "naming",
           "MAX_BATCH", "MAX_TOPK", "MAX_SAMPLES", "MAX_SEED", "MAX_CHECKPOINT_SECONDS", "MAX_MEMORY",
           "LABEL_RULES"]
