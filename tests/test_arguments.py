"""Every numeric flag of every command is range-checked when it is parsed (one line naming the flag
and the range, exit 2, before anything runs), the API checks the same ranges, and --help texts
are plain text."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from gandissect_jax.cli import build_parser, main
from gandissect_jax.commands import arguments

BAD_VALUES = ["0", "-1", "nan", "inf", "-inf", "1e300", "99999999999999999999", "1.5e", "", "0x10", " "]


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _commands(parser=None, prefix=()):
    """(command words, parser) of every command and sub-command."""
    parser = parser or build_parser()
    for name, sub in _subparsers(parser):
        words = prefix + (name,)
        yield words, sub
        yield from _commands(sub, words)


def _typed_flags():
    """(command words, flag, type function) of every option with a numeric type= of every command
    (names and paths have the non-empty text type, tests/test_cli_usage.py)."""
    for words, parser in _commands():
        for action in parser._actions:
            if action.option_strings and action.type is not None and not arguments.is_text(action.type):
                yield words, action.option_strings[-1], action.type


TYPED = list(_typed_flags())
REQUIRED = {  # what each command needs besides the flag under test, so only the flag can fail
    ("dissect",): ["--outdir", "out"],
    ("generate",): ["--n", "1", "--out", "out"],
    ("weights", "fetch"): ["name"],
}


def test_every_command_with_numbers_is_covered():
    flags = {(" ".join(words), flag) for words, flag, _ in TYPED}
    for expected in [("dissect", "--batch-size"), ("dissect", "--topk"), ("dissect", "--checkpoint-every"),
                     ("dissect", "--quantile"), ("dissect", "--iou-threshold"), ("dissect", "--size"),
                     ("dissect", "--seed"), ("dissect", "--seg-downsample"), ("generate", "--n"),
                     ("generate", "--seed"), ("generate", "--batch-size"), ("weights fetch", "--timeout"),
                     ("paint", "--port"), ("paint", "--top"), ("paint", "--max-strokes"), ("paint", "--size")]:
        assert expected in flags


# Flags whose range differs between commands on purpose: the seed of insert / artifacts measures
# on seed + 1 as well; paint's --top is bounded like its HTTP API.
RANGES_DIFFER_ON_PURPOSE = {("insert", "--seed"), ("artifacts", "--seed"), ("paint", "--top")}


def test_a_flag_has_one_range_in_every_command():
    """One name per thing: a numeric flag accepts the same interval in every command that has it."""
    ranges: dict[str, dict[str, str]] = {}
    for words, flag, parse in TYPED:
        if (" ".join(words), flag) not in RANGES_DIFFER_ON_PURPOSE:
            ranges.setdefault(flag, {})[" ".join(words)] = parse.interval
    differ = {flag: by for flag, by in ranges.items() if len(set(by.values())) > 1}
    assert not differ, differ
    assert ranges["--iou-threshold"] == {"dissect": "[0, 1]", "segment-units": "[0, 1]"}


@pytest.mark.parametrize("words, flag, parse", TYPED, ids=[f"{' '.join(w)} {f}" for w, f, _ in TYPED])
def test_no_numeric_flag_takes_a_bare_int_or_float(words, flag, parse):
    """A bare type=int or type=float accepts 0, -1, nan, inf and 1e300: every numeric flag must use
    a range-checked type of gandissect_jax.commands.arguments."""
    assert arguments.is_range_checked(parse), f"{' '.join(words)} {flag} uses type={parse!r}"


@pytest.mark.parametrize("words, flag, parse", TYPED, ids=[f"{' '.join(w)} {f}" for w, f, _ in TYPED])
def test_every_numeric_flag_is_range_checked(words, flag, parse, capsys):
    refused = [value for value in BAD_VALUES if _refuses(parse, value)]
    assert set(BAD_VALUES) - set(refused) <= {"0", "1e300"}  # only these may lie in a flag's range
    for value in refused + [str(2**64)]:
        argv = [*words, *REQUIRED.get(words, []), f"{flag}={value}"]
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last == f"gandissect-jax {' '.join(words)}: error: argument {flag}: {_message(parse, value)}"
        assert re.search(r"must be .* in [\[(]-?[0-9.e+]+, [0-9.e+]+[\])], got ", last), last  # the allowed range
        assert "Traceback" not in err


def _refuses(parse, value) -> bool:
    try:
        parse(value)
    except argparse.ArgumentTypeError:
        return True
    return False


def _message(parse, value) -> str:
    try:
        parse(value)
    except argparse.ArgumentTypeError as err:
        return str(err)
    raise AssertionError(f"{value!r} was accepted")


def test_ranges_reject_non_finite_and_huge_values_and_accept_the_edges():
    assert arguments.batch_size()("1") == 1 and arguments.batch_size()(str(arguments.MAX_BATCH)) == arguments.MAX_BATCH
    assert arguments.seconds()("0") == 0.0 and arguments.seconds()("86400") == 86400.0
    assert arguments.open_unit_interval()("1e-9") == 1e-9
    assert arguments.unit_interval()("0") == 0.0 and arguments.unit_interval()("1") == 1.0
    assert arguments.seed()("0") == 0 and arguments.seed()(str(2**32 - 1)) == 2**32 - 1
    for parse, value in [(arguments.batch_size(), "65537"), (arguments.seconds(), "inf"), (arguments.seconds(), "1e300"),
                         (arguments.seconds(), "nan"), (arguments.seconds(), "-5"), (arguments.open_unit_interval(), "0"),
                         (arguments.open_unit_interval(), "1"), (arguments.unit_interval(), "-0.1"),
                         (arguments.seed(), str(2**32)), (arguments.positive_int(), "2.5"), (arguments.positive_int(), "1e3")]:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(value)


def test_api_ranges_equal_the_command_line_ranges():
    from gandissect_jax.dissection import analysis, config

    assert config.MAX_BATCH == arguments.MAX_BATCH
    assert config.MAX_TOPK == arguments.MAX_TOPK
    assert config.MAX_CHECKPOINT_SECONDS == arguments.MAX_CHECKPOINT_SECONDS
    assert config.MAX_SAMPLES == arguments.MAX_SAMPLES
    assert config.MAX_SEED == arguments.MAX_SEED
    assert config.LABEL_RULES == arguments.LABEL_RULES == analysis.LABEL_RULES


@pytest.mark.parametrize("argument, value, message", [
    ("size", 0, r"size must be an integer in \[1, 2147483647\]"),
    ("size", 2.5, "size must be an integer"),
    ("seed", -1, r"seed must be an integer in \[0, 4294967295\]"),
    ("seed", 2**32, "seed must be an integer"),
    ("seg_downsample", 0, r"seg_downsample must be an integer in \[1, 4096\]"),
    ("seg_downsample", 64, "seg_downsample 64 is larger than the generated images"),
    ("layers", "layer1", "layers must be a list of layer names"),
])
def test_dissect_generator_arguments_are_range_checked(argument, value, message):
    from gandissect_jax.dissection import dissect_generator
    from test_dissect_pipeline import TinyGenerator, TinySegmenter

    kwargs = {"size": 8, "seed": 1, "seg_downsample": 2, "layers": ["layer1"], argument: value}
    layers = kwargs.pop("layers")
    with pytest.raises(ValueError, match=message):
        dissect_generator(TinyGenerator(), TinySegmenter(), layers, progress=False, **kwargs)


RST = re.compile(r"``|:(func|class|mod|meth|attr|data|exc):`|\.\. [a-z]+::")


@pytest.mark.parametrize("words", [words for words, _ in _commands()] + [()], ids=lambda w: " ".join(w) or "top")
def test_help_texts_are_plain_text(words, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*words, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert not RST.search(text), RST.search(text).group(0)
    assert "`" not in text


def test_dissect_help_says_how_to_list_a_models_layers(capsys):
    with pytest.raises(SystemExit):
        main(["dissect", "--help"])
    assert "gandissect-jax layers MODEL" in capsys.readouterr().out


def test_a_bad_flag_stops_before_anything_is_imported():
    """The range check happens at parse time: jax is never imported for a bad flag."""
    code = ("import sys; from gandissect_jax.cli import main\n"
            "try:\n    main(['dissect', '--outdir', 'x', '--batch-size', '0'])\n"
            "except SystemExit as e:\n    print(e.code, 'jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "argument --batch-size: must be an integer in [1, 65536], got '0'" in done.stderr


def test_feature_region_reads_positions_and_blocks_with_excluded_ends():
    parse = arguments.feature_region(15)
    assert parse("5,3") == (5, 6, 3, 4)
    assert parse("4:7,2:5") == (4, 7, 2, 5)
    assert parse(" 0:16 , 15 ") == (0, 16, 15, 16)
    assert parse("2,0:1") == (2, 3, 0, 1)
    for value in ["", "5", "5,3,1", "-1,2", "16,0", "0:17,0", "3:3,1", "4:2,1", "1:2:3,4", "a,b", "1.5,2",
                  ":3,1", "1:,2", "\u0665,1", "1,2:"]:
        with pytest.raises(argparse.ArgumentTypeError, match="ROW,COLUMN.*ROW0:ROW1,COL0:COL1"):
            parse(value)
