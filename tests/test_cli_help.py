"""The command line is consistent: every flag of every command says what it does, every command ends its
--help with examples that parse, and the commands that read a run take it the same way."""

from __future__ import annotations

import argparse
import shlex

import pytest

from medvox.cli import EXAMPLES, _run_and_inputs, build_parser, main
from medvox.errors import UsageError


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = _subcommands()
RUN_COMMANDS = ("report", "export", "predict", "explain")


def test_every_argument_of_every_command_has_help_text():
    missing = [f"medvox {name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in [("", build_parser()), *SUBCOMMANDS.items()] for a in sub._actions
               if not isinstance(a, argparse._SubParsersAction)
               and (a.help is argparse.SUPPRESS or not (a.help or "").strip())]
    assert missing == []


def test_every_command_has_an_epilog_of_examples_that_parse():
    assert set(EXAMPLES) == set(SUBCOMMANDS)
    for name, sub in SUBCOMMANDS.items():
        assert 1 <= len(EXAMPLES[name]) <= 3, name
        for line in EXAMPLES[name]:
            assert line in sub.epilog, (name, line)
            words = shlex.split(line.split(" > ")[0])  # a shell redirection is not an argument
            assert words[:2] == ["medvox", name], line
            args = build_parser().parse_args(words[1:])  # argparse exits on a flag it does not know
            assert args.func is sub.get_default("func"), line


def test_the_readme_table_shows_the_run_as_the_help_does():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name in RUN_COMMANDS:
        assert f"medvox {name} RUN" in readme or f"medvox {name} --run RUN" in readme, name


def _run_of(argv: list[str]) -> tuple[str, list[str]]:
    return _run_and_inputs(build_parser().parse_args(argv))


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_the_run_is_the_first_positional_or_the_run_flag_in_every_command(command):
    takes_inputs = command in ("predict", "explain")
    inputs = ["a.nii.gz", "b.nii.gz"] if takes_inputs else []
    tail = ["--out", "o"] if command in ("export", "explain") else []
    by_position = _run_of([command, "results/r", *inputs, *tail])
    by_flag = _run_of([command, "--run", "results/r", *inputs, *tail])
    assert by_position == by_flag == ("results/r", inputs)
    if takes_inputs:
        with pytest.raises(UsageError, match="no inputs after the run results/r"):
            _run_of([command, "results/r", *tail])
        with pytest.raises(UsageError, match="--run was given 2 times"):
            _run_of([command, "--run", "results/r", "--run", "results/s", *inputs, *tail])
    else:
        with pytest.raises(UsageError, match="the run was given twice"):
            _run_of([command, "--run", "results/r", "results/s", *tail])
        with pytest.raises(UsageError, match="no run given"):
            _run_of([command, *tail])


def test_a_command_line_without_a_run_is_a_one_line_usage_error(capsys):
    assert main(["report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medvox: error: report: no run given")
