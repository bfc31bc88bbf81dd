"""Every usage fault of every command is a clear error before any work.

A fault the command line alone decides (flags that do not go together, an empty name, a value
out of range) is a usage error: the command's usage line and one line naming the flag(s), exit
status 2; so is a flag outside the range the loaded model allows (``--units`` beyond the layer's
units, ``--at`` outside its feature map), and an abbreviated flag (``--out`` for ``--outdir``).
A fault of a file or a model itself (``--outdir`` naming a file, an unknown layer) is one line
``gandissect-jax COMMAND: error: ...`` naming the flag, exit status 1, no traceback. Every numeric flag's --help states
its range and default; every argument is documented.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

import pytest

from gandissect_jax.cli import build_parser, main
from gandissect_jax.commands import arguments


def _commands(parser=None, prefix=()):
    """(command words, parser) of every command and sub-command."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _commands(sub, prefix + (name,))


COMMANDS = list(_commands())
LEAVES = [(words, parser) for words, parser in COMMANDS if not parser._subparsers]


def _usage_error(argv, capsys) -> str:
    """The error line of a usage error (asserting exit status 2 and the usage line before it)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2, stop.value.code
    err = capsys.readouterr().err
    words = [w for w in argv[:2] if not w.startswith("-")]
    command = " ".join(words[:2] if words[:1] == ["weights"] else words[:1])
    assert err.startswith(f"usage: gandissect-jax {command}"), err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"gandissect-jax {command}: error: "), line
    return line


# ------------------------------------------------------------------------ usage faults: status 2

# (argv without --outdir, flags the error line must name); OUT is replaced by a fresh directory
# the multi-host flags of the commands that run as N processes (dissect, ace), each after the command's own
MULTI_HOST_FAULTS = [
    (["--coordinator", "h:1234"], ["--num-processes", "--process-id"]),
    (["--num-processes", "2", "--process-id", "0"], ["--coordinator"]),
    (["--coordinator", "h", "--num-processes", "2", "--process-id", "0"], ["--coordinator"]),
    (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"], ["--process-id"]),
    (["--multi-host", "--coordinator", "h:1234", "--num-processes", "2", "--process-id", "0"],
     ["--multi-host", "--coordinator"]),
]
USAGE_FAULTS = [
    *[(["dissect", *argv], flags) for argv, flags in MULTI_HOST_FAULTS],
    *[(["ace", "--layer", "layer4", "--concept", "tree", *argv], flags) for argv, flags in MULTI_HOST_FAULTS],
    (["dissect", "--features", "f.npy"], ["--features", "--segmentations", "--labels"]),
    (["dissect", "--features", "f.npy", "--segmentations", "s.npy"], ["--features", "--labels"]),
    (["dissect", "--features", "f.npy", "--model", "scenes64"], ["--features", "--model"]),
    (["dissect", "--features", "f.npy", "--segmentations", "s", "--labels", "l", "--segdiv", "quad"], ["--segdiv"]),
    (["dissect", "--features", "f.npy", "--segmentations", "s", "--labels", "l", "--layers", "layer4"], ["--layers"]),
    (["dissect", "--features", "f.npy", "--segmentations", "s", "--labels", "l", "--segmenter", "x"], ["--segmenter"]),
    (["dissect", "--segmentations", "s.npy"], ["--segmentations", "--features"]),
    (["dissect", "--images", "i.npy"], ["--images", "--features"]),
    (["dissect", "--levels", "l.npy"], ["--levels", "--features"]),
    (["dissect", "--model", "my.pth"], ["--model", "--segmenter", "--layers"]),
    (["dissect", "--model", "my.pth", "--segmenter", "s"], ["--model", "--layers"]),
    (["dissect", "--size", "10", "--topk", "20"], ["--topk", "--size"]),
    (["dissect", "--features", "f", "--segmentations", "s", "--labels", "l", "--levels", "v", "--threshold", "iqr"],
     ["--levels", "--threshold"]),
    (["dissect", "--no-labels", "--threshold", "iqr"], ["--no-labels", "--threshold"]),
    (["dissect", "--label-rule", "maxiou"], ["--label-rule", "invalid choice", "'significant'", "'reference'"]),
    (["dissect", "--max-memory", "-5G"], ["--max-memory", "4G", "1M to 1024T"]),
    (["dissect", "--max-memory=-5G"], ["--max-memory", "4G", "1M to 1024T"]),
    (["dissect", "--max-memory", "lots"], ["--max-memory", "4G", "1M to 1024T"]),
    (["dissect", "--max-memory", "1P"], ["--max-memory", "4G", "1M to 1024T"]),
    (["dissect", "--title", ""], ["--title"]),
    (["ace", "--layer", "layer4", "--concept", "tree", "--search-size", "100", "--train-size", "80",
      "--eval-size", "40"], ["--search-size", "--train-size", "--eval-size"]),
    (["ace", "--layer", "layer4", "--concept", "tree", "--train-size", "10", "--train-batch", "20"],
     ["--train-batch", "--train-size"]),
    (["ace", "--layer", "layer4", "--concept", "tree", "--train-batch", "4", "--train-micro-batch", "5"],
     ["--train-micro-batch", "--train-batch", "[1, 4]"]),
    (["ace", "--layer", "layer4", "--concept", "tree", "--train-micro-batch", "0"], ["--train-micro-batch"]),
    (["ace", "--layer", "layer4", "--concept", "tree", "--name", ""], ["--name"]),
    (["ace", "--layer", "layer4", "--concept", " "], ["--concept"]),
    (["ablate", "--layer", "layer4"], ["--units", "--concept"]),
    (["ablate", "--layer", "layer4", "--units", "1", "--name", "  "], ["--name"]),
    (["ablate", "--layer", "layer4", "--units", "-3"], ["--units"]),
    (["insert", "--layer", "layer4", "--concept", "tree", "--at", "-1,2"], ["--at", "ROW,COLUMN"]),
    (["insert", "--layer", "layer4", "--concept", "tree", "--at", "1,2", "--name", "\t"], ["--name"]),
    (["insert", "--layer", "layer4", "--concept", "tree", "--at", "1,2", "--seed", str(2**32 - 1)], ["--seed"]),
    (["artifacts", "--layer", "layer4", "--discriminator", "d", "--search-samples", "10", "--top-samples", "20"],
     ["--top-samples", "--search-samples"]),
    (["artifacts", "--layer", "layer4", "--discriminator", "d", "--name", ""], ["--name"]),
    (["segment-units", "--layer", "layer4", "--name", ""], ["--name"]),
    (["segment-units", "--layer", ""], ["--layer"]),
    (["paint", "--outdir", "OUT/a", "OUT/b", "--model", "scenes64"], ["--model", "--outdir"]),
    (["paint", "--outdir", "OUT/a", "OUT/b/a"], ["--outdir"]),
    (["generate", "--n", "2", "--out", ""], ["--out"]),
    (["layers", ""], ["MODEL"]),
    (["convert", "", "dest"], ["SRC"]),
    (["weights", "fetch", " "], ["NAME"]),
    (["weights", "pin", "scenes64", "--into", ""], ["--into"]),
]
NEEDS_OUTDIR = {"dissect", "ace", "ablate", "insert", "artifacts", "segment-units"}


@pytest.mark.parametrize("argv, flags", USAGE_FAULTS, ids=[" ".join(a)[:70] for a, _ in USAGE_FAULTS])
def test_usage_faults_are_usage_errors_naming_the_flags(argv, flags, tmp_path, capsys, monkeypatch):
    for name in ("GANDISSECT_COORDINATOR", "GANDISSECT_NUM_PROCESSES", "GANDISSECT_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    if argv[0] in NEEDS_OUTDIR:
        argv = [argv[0], "--outdir", str(out), *argv[1:]]
    line = _usage_error(argv, capsys)
    for flag in flags:
        assert flag in line, (flag, line)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing was made


def test_usage_checks_run_before_jax_is_imported():
    """Flag combinations are refused when parsed: the command's work (and JAX) never starts."""
    code = ("import sys; from gandissect_jax.cli import main\n"
            "for argv in (['dissect', '--outdir', 'x', '--features', 'f.npy', '--model', 'm'],\n"
            "             ['ablate', '--outdir', 'x', '--layer', 'layer4'],\n"
            "             ['ace', '--outdir', 'x', '--layer', 'l', '--concept', 'c', '--train-batch', '5000']):\n"
            "    try:\n        main(argv)\n"
            "    except SystemExit as e:\n        print(e.code, 'jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"] * 3, done.stdout + done.stderr


def test_values_beginning_with_a_dash_reach_the_flag_but_options_are_not_taken_as_values(capsys):
    """``--max-memory -5G`` is read as ``--max-memory=-5G`` (refused with the accepted forms, not
    "expected one argument"); a value-taking option followed by another option still lacks its value."""
    line = _usage_error(["dissect", "--outdir", "o", "--max-memory", "-5G"], capsys)
    assert line.endswith("got '-5G'")
    line = _usage_error(["dissect", "--outdir", "--quiet"], capsys)
    assert line == "gandissect-jax dissect: error: argument --outdir: expected one argument"
    args = build_parser().parse_args(["dissect", "--outdir", "o", "--title", "-x-", "--seed", "-0"])
    assert args.title == "-x-" and args.seed == 0


def _takes_a_name(action) -> bool:
    """A value-taking argument that is neither a number nor a choice: a name, a path, a title."""
    return not (action.nargs == 0 or action.choices is not None or isinstance(action, argparse._SubParsersAction)
                or (action.type is not None and arguments.is_range_checked(action.type)))


NAMES = [(words, action) for words, parser in LEAVES for action in parser._actions if _takes_a_name(action)]
POSITIONALS = {words: [a for a in parser._actions if not a.option_strings] for words, parser in LEAVES}


def test_every_name_or_path_argument_has_the_non_empty_type():
    assert len(NAMES) > 40
    for words, action in NAMES:
        assert action.type is not None and arguments.is_text(action.type), (words, action.dest)


@pytest.mark.parametrize("words, action", NAMES,
                         ids=[f"{' '.join(w)} {a.option_strings[-1] if a.option_strings else a.metavar}"
                              for w, a in NAMES])
def test_an_empty_name_or_path_is_a_usage_error(words, action, capsys):
    """``--name ""`` or spaces are refused naming the argument, never silently replaced by a default."""
    name = action.option_strings[-1] if action.option_strings else action.metavar
    for value in ("", "   "):
        before = ["x"] * POSITIONALS[words].index(action) if not action.option_strings else []
        argv = [*words, *before, f"{name}={value}"] if action.option_strings else [*words, *before, value]
        line = _usage_error(argv, capsys)
        assert f"argument {name}: must be " in line and f"not empty, got {value!r}" in line, line


# ------------------------------------------------------------------------ input faults: status 1

def _input_error(argv, capsys) -> str:
    """The one error line of an input error (status 1, no usage line, no traceback)."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    [line] = err.strip().splitlines()
    assert line.startswith(f"gandissect-jax {argv[0]}: error: "), line
    return line


@pytest.fixture(scope="module")
def toy_arrays(tmp_path_factory):
    from test_dissect_runs import LABELS, toy

    feats, seg = toy(seed=0)  # 48 samples, 16 units
    work = tmp_path_factory.mktemp("arrays")
    np.save(work / "f.npy", feats)
    np.save(work / "s.npy", seg)
    np.save(work / "levels.npy", np.zeros(15, np.float32))
    (work / "labels.json").write_text(json.dumps(LABELS))
    return ["--features", str(work / "f.npy"), "--segmentations", str(work / "s.npy"),
            "--labels", str(work / "labels.json"), "--quiet", "--no-images"], work


DEMO = ["--model", "scenes64", "--segmenter", "scenes64-segmenter", "--quiet"]
# (argv, what the line must hold: the flag, the value, the allowed range)
# flags outside the range the loaded model allows: usage errors (status 2), before the long work
MODEL_RANGE_FAULTS = [
    (["ablate", "--layer", "layer4", "--units", "1,500", *DEMO], ["argument --units:", "[500]", "[0, 127]"]),
    (["ablate", "--layer", "layer4", "--concept", "tree", "--top", "500", *DEMO], ["argument --top: 500", "[1, 128]"]),
    (["artifacts", "--layer", "layer4", "--discriminator", "d", "--top", "500", *DEMO],
     ["argument --top: 500", "[1, 128]"]),
    (["artifacts", "--layer", "layer4", "--discriminator", "d", "--units", "128", *DEMO],
     ["argument --units:", "[128]", "[0, 127]"]),
    (["insert", "--layer", "layer4", "--concept", "tree", "--at", "9,0", *DEMO], ["argument --at: 9,0", "[0, 7]"]),
    (["insert", "--layer", "layer4", "--concept", "tree", "--at", "2:9,0:1", *DEMO], ["argument --at: 2:9,0:1", "[0, 7]"]),
    (["insert", "--layer", "layer4", "--units", "300", "--concept", "tree", "--at", "1,1", *DEMO],
     ["argument --units:", "[300]"]),
]


@pytest.mark.parametrize("argv, parts", MODEL_RANGE_FAULTS, ids=[" ".join(a)[:60] for a, _ in MODEL_RANGE_FAULTS])
def test_flags_outside_the_models_range_are_usage_errors(argv, parts, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [argv[0], "--outdir", str(out), *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: gandissect-jax {argv[0]}") and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"gandissect-jax {argv[0]}: error: argument --"), line
    for part in parts:
        assert part in line, (part, line)
    assert not (out / "intervention").exists()


INPUT_FAULTS = [
    (["ablate", "--layer", "layer99", "--units", "1", *DEMO], ["--layer", "'layer99'", "layer4"]),
    (["ablate", "--layer", "layer4", "--units", "1", "--model", "no-such-model", "--segmenter", "s"],
     ["--model", "no-such-model"]),
    (["ace", "--layer", "layer99", "--concept", "tree", *DEMO], ["--layer", "'layer99'"]),
    (["dissect", "--model", "scenes64", "--layers", "layer99", "--quiet"], ["--layers", "layer99", "layer4"]),
    (["dissect", "--model", "scenes64", "--layers", "layer4", "--seg-downsample", "4096", "--quiet"],
     ["--seg-downsample", "4096", "[1, 64]"]),
    (["dissect", "--model", "scenes64", "--layers", "layer4", "--seg-downsample", "3", "--quiet"],
     ["--seg-downsample", "1/3", "64x64", "does not divide"]),
    (["generate", "--n", "1", "--layers", "layer99"], ["--layers", "'layer99'", "layer4"]),
    (["layers", "no-such-model"], ["MODEL", "'no-such-model'"]),
]


@pytest.mark.parametrize("argv, parts", INPUT_FAULTS, ids=[" ".join(a)[:60] for a, _ in INPUT_FAULTS])
def test_input_faults_are_one_line_naming_flag_value_and_range(argv, parts, tmp_path, capsys):
    out = tmp_path / "out"
    if argv[0] in NEEDS_OUTDIR:
        argv = [argv[0], "--outdir", str(out), *argv[1:]]
    elif argv[0] == "generate":
        argv = [*argv, "--out", str(out)]
    line = _input_error(argv, capsys)
    for part in parts:
        assert part in line, (part, line)
    assert not (out / "dissect.json").exists() and not (out / "images").exists()


def test_dissect_array_faults_name_the_flag(toy_arrays, tmp_path, capsys):
    argv, work = toy_arrays
    line = _input_error(["dissect", *argv, "--levels", str(work / "levels.npy"), "--outdir", str(tmp_path / "a")],
                        capsys)
    assert "--levels" in line and "15 levels" in line and "16 units" in line
    line = _input_error(["dissect", *argv, "--topk", "49", "--outdir", str(tmp_path / "b")], capsys)
    assert "--topk in [1, 48]" in line and "topk (49)" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


OUTDIR_COMMANDS = [
    (["dissect", "--quiet"], "--outdir"),
    (["ace", "--layer", "layer4", "--concept", "tree"], "--outdir"),
    (["ablate", "--layer", "layer4", "--units", "1"], "--outdir"),
    (["insert", "--layer", "layer4", "--concept", "tree", "--at", "1,1"], "--outdir"),
    (["artifacts", "--layer", "layer4", "--discriminator", "scenes64-discriminator"], "--outdir"),
    (["segment-units", "--layer", "layer4"], "--outdir"),
    (["paint", "--no-warmup"], "--outdir"),
    (["generate", "--n", "1"], "--out"),
]


def test_every_command_with_an_output_directory_is_covered():
    flags = {(words[0], a.option_strings[0]) for words, p in LEAVES for a in p._actions
             if set(a.option_strings) & {"--outdir", "--out"}}
    assert flags == {(argv[0], flag) for argv, flag in OUTDIR_COMMANDS}


@pytest.mark.parametrize("argv, flag", OUTDIR_COMMANDS, ids=[a[0] for a, _ in OUTDIR_COMMANDS])
def test_an_output_directory_that_is_a_file_is_refused_before_any_work(argv, flag, tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("the user's")
    line = _input_error([*argv, flag, str(mine)], capsys)
    assert line.endswith(f"{flag} {mine} is a file, not a directory"), line
    if argv[0] != "paint":  # a directory below a file cannot be made either
        line = _input_error([*argv, flag, str(mine / "sub")], capsys)
        assert line.endswith(f"{flag} {mine / 'sub'}: {mine} is a file, not a directory"), line
    assert mine.read_text() == "the user's" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("argv, flag", OUTDIR_COMMANDS, ids=[a[0] for a, _ in OUTDIR_COMMANDS])
def test_a_dangling_link_or_an_overlong_name_as_output_directory_is_refused_before_any_work(argv, flag, tmp_path,
                                                                                          capsys):
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nowhere")
    line = _input_error([*argv, flag, str(dangling)], capsys)
    assert line.endswith(f"{flag} {dangling} is a link to nothing (dangling symlink), not a directory"), line
    long = tmp_path / "a" / ("b" * 300)
    line = _input_error([*argv, flag, str(long)], capsys)
    assert flag in line and "longer than the file system's" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone"]  # nothing made, the link left alone
    assert os.path.islink(dangling)


def test_a_rerun_with_other_settings_names_the_kind_of_experiment_with_its_article(tmp_path):
    from gandissect_jax.experiment import Experiment, experiment_phrase

    assert experiment_phrase("ace") == "an ACE experiment"
    assert experiment_phrase("ablate") == "an ablation experiment"
    assert experiment_phrase("insert") == "an insertion experiment"
    assert experiment_phrase("artifacts") == "an artifact-unit experiment"
    assert experiment_phrase("segment-units") == "a unit-segmentation experiment"
    with Experiment(str(tmp_path), "ace", "layer4", "x", {"epochs": 1}):
        pass
    with pytest.raises(ValueError, match=r"holds an ACE experiment with other settings \(epochs: 1 != 2\)"):
        with Experiment(str(tmp_path), "ace", "layer4", "x", {"epochs": 2}):
            pass


# ------------------------------------------------------------------------ help texts

def _expanded_help(parser, action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


NUMERIC = [(words, parser, action) for words, parser in LEAVES for action in parser._actions
           if action.type is not None and arguments.is_range_checked(action.type)]


def test_the_numeric_flags_are_found():
    assert len(NUMERIC) > 60
    assert {" ".join(w) for w, _, _ in NUMERIC} >= {"dissect", "ace", "ablate", "insert", "artifacts",
                                                     "segment-units", "paint", "generate", "weights fetch"}


@pytest.mark.parametrize("words, parser, action", NUMERIC,
                         ids=[f"{' '.join(w)} {a.option_strings[-1] if a.option_strings else a.dest}"
                              for w, _, a in NUMERIC])
def test_every_numeric_flag_states_its_range_and_default_in_help(words, parser, action):
    text = " ".join(_expanded_help(parser, action).split())
    assert action.type.interval in text, (text, action.type.interval)  # the range the type enforces
    if action.default is argparse.SUPPRESS:  # an alias (--examples of --topk)
        return
    if action.default is None:
        assert re.search(r"\b(default|required)\b", text), text
    else:
        assert re.search(rf"\bdefault:? {re.escape(str(action.default))}\b", text), (text, action.default)


@pytest.mark.parametrize("words, parser", LEAVES, ids=[" ".join(w) for w, _ in LEAVES])
def test_every_argument_is_documented(words, parser, capsys):
    """Every argument has a help line; a positional shows the upper-case name its help and the
    command's description use (``gandissect-jax layers MODEL``)."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), (words, action.dest)
        if not action.option_strings:
            assert action.metavar and action.metavar.isupper(), (words, action.dest, action.metavar)
    with pytest.raises(SystemExit):
        main([*words, "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    for action in parser._actions:
        if not action.option_strings:
            assert re.search(rf"\b{action.metavar}\b", usage), usage


def test_layers_help_documents_model(capsys):
    with pytest.raises(SystemExit):
        main(["layers", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: gandissect-jax layers [-h] [MODEL]")
    assert re.search(r"\n  MODEL\s+the generator: a registry name", out), out


# ------------------------------------------------------------------------ no abbreviated flags

def test_an_abbreviated_flag_is_refused_naming_it(tmp_path, capsys):
    """``--out`` is not taken for ``--outdir`` (a flag added later could change what a script
    means): a usage error naming the unknown flag and what it would abbreviate, before any
    other fault (here the missing --outdir), nothing made."""
    line = _usage_error(["dissect", "--out", str(tmp_path / "d")], capsys)
    assert line == ("gandissect-jax dissect: error: unrecognized arguments: --out (flags are never abbreviated: "
                    "did you mean --outdir?)")
    line = _usage_error(["dissect", "--outdir", str(tmp_path / "d"), "--batch=8"], capsys)
    assert "unrecognized arguments: --batch (" in line and "--batch-size" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("words, parser", COMMANDS + [((), build_parser())],
                         ids=[" ".join(w) for w, _ in COMMANDS] + ["gandissect-jax"])
def test_no_parser_accepts_an_abbreviation_of_its_flags(words, parser, capsys):
    """Every parser of the CLI, for every long flag of it: the flag less its last letter (when
    that is no flag itself) is refused as unknown, with status 2."""
    assert parser.allow_abbrev is False
    flags = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    for flag in sorted(flags):
        short = flag[:-1]
        if short in flags or len(short) <= 2:
            continue
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([short])
        assert stop.value.code == 2
        assert f"unrecognized arguments: {short}" in capsys.readouterr().err
