"""The ``portopt`` command line: ``show`` and ``list``, exit codes, errors on stderr, extensibility."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from portopt import __version__
from portopt.algorithms import ALGORITHMS
from portopt.cli import USAGE_ERROR, Subcommand, build_parser, load_subcommands, main
from portopt.cli_options import build_spec, option_defaults, parse_option, parse_value
from portopt.spec.definition import OptionValue
from portopt.spec.render import render_latex, render_text
from portopt.spec.serialize import spec_from_json


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_show_prints_the_text_rendering(capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, out, err = run_main(capsys, "show", name)
    assert (code, err) == (0, "")
    assert out == render_text(ALGORITHMS[name]()) + "\n"


def test_show_latex_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    spec = ALGORITHMS["adamw"]()
    code, out, _ = run_main(capsys, "show", "adamw", "--latex")
    assert (code, out) == (0, render_latex(spec) + "\n")
    code, out, _ = run_main(capsys, "show", "adamw", "--json")
    assert code == 0
    assert spec_from_json(out) == spec


def test_show_options_and_maximize(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "show", "adamw", "--option", "amsgrad=true", "-o", "maximize=True")
    assert code == 0
    assert out == render_text(ALGORITHMS["adamw"](amsgrad=True).maximized()) + "\n"
    assert "maximize=True" in out.splitlines()[0]
    assert run_main(capsys, "show", "adamw", "-o", "amsgrad=true", "maximize=True") == (0, out, "")


def test_show_accepts_an_integer_for_a_float_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Any registered algorithm with a float option (RAdam's threshold today) takes `-o key=4`."""
    found = [(n, k) for n in sorted(ALGORITHMS) for k, v in option_defaults(n).items() if type(v) is float]
    if not found:
        pytest.skip("no registered algorithm has a float option")
    name, key = found[0]
    code, out, _ = run_main(capsys, "show", name, "-o", f"{key}=4")
    assert code == 0
    assert out == render_text(ALGORITHMS[name](**{key: 4.0})) + "\n"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("show", "nope"), "unknown algorithm 'nope'; known algorithms: "),
        (("show", "adamw", "-o", "nesterov=true"), "adamw: unknown option 'nesterov'; accepted options: amsgrad=False"),
        (("show", "adamw", "-o", "amsgrad=yes"), "adamw: option 'amsgrad' must be true or false, got 'yes'"),
        (("show", "adamw", "-o", "amsgrad=1"), "adamw: option 'amsgrad' must be true or false, got 1"),
        (("show", "adamw", "-o", "amsgrad"), "option 'amsgrad' is not of the form KEY=VALUE"),
        (("show", "adamw", "-o", "=1"), "option '=1' is not of the form KEY=VALUE"),
    ],
)
def test_bad_input_exits_2_with_a_message_on_stderr(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], expected: str
) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == USAGE_ERROR
    assert out == ""
    assert err.startswith("portopt show: error: ")
    assert expected in err


def test_unknown_algorithm_lists_every_registered_one(capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run_main(capsys, "show", "adamz")
    for name in ALGORITHMS:
        assert name in err


def test_an_option_combination_the_algorithm_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    if "sgd" not in ALGORITHMS:
        pytest.skip("sgd is not registered")
    code, _, err = run_main(capsys, "show", "sgd", "-o", "nesterov=true")
    assert code == USAGE_ERROR
    assert "sgd: Nesterov momentum requires a momentum" in err


@pytest.mark.parametrize(
    "argv",
    [(), ("frobnicate",), ("show",), ("show", "adamw", "--latex", "--json"), ("show", "adamw", "--bogus")],
)
def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    code, _, err = run_main(capsys, *argv)
    assert code == USAGE_ERROR
    assert "usage: portopt" in err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for command in load_subcommands():
        assert command.name in out
    code, out, _ = run_main(capsys, "--version")
    assert (code, out) == (0, f"portopt {__version__}\n")


def test_list_shows_every_algorithm_with_title_and_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps cells to the terminal's width
    code, out, err = run_main(capsys, "list")
    assert (code, err) == (0, "")
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    for name in ALGORITHMS:
        assert name in rows, name
        assert build_spec(name).title in rows[name]
        for key, default in option_defaults(name).items():
            assert f"{key}={default}" in rows[name]


def test_list_backends_agrees_with_the_registry(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from portopt.backends import available

    monkeypatch.setenv("COLUMNS", "240")
    code, out, err = run_main(capsys, "list", "--backends")
    assert (code, err) == (0, "")
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") >= 3}
    expected = {row.name: "yes" if row.usable else "no" for row in available()}
    assert rows == expected
    assert rows["torch"] == "yes"


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("False", False), ("3", 3), ("-2", -2), ("3.5", 3.5), ("1e-3", 1e-3), ("adam", "adam")],
)
def test_option_values_are_typed(text: str, value: OptionValue) -> None:
    parsed = parse_value(text)
    assert parsed == value
    assert type(parsed) is type(value)
    assert parse_option(f" k = {text}") == ("k", value)


def test_a_subcommand_is_one_registration() -> None:
    """Another module adds a subcommand by defining a Subcommand; the parser dispatches to it."""
    seen: list[str] = []

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--who", default="world")

    def run(args: argparse.Namespace) -> int:
        seen.append(args.who)
        return 7

    parser = build_parser([*load_subcommands(), Subcommand("hello", "say hello", add_arguments, run)])
    args = parser.parse_args(["hello", "--who", "npu"])
    assert args._run(args) == 7
    assert seen == ["npu"]


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "240"}


def test_module_entry_point_in_a_subprocess() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "portopt.cli", "show", "adamw"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_environment(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == render_text(ALGORITHMS["adamw"]()) + "\n"


def test_console_script_in_a_subprocess() -> None:
    script = Path(sys.executable).with_name("portopt")
    if not script.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable} (pip install -e . creates it)")
    done = subprocess.run(
        [str(script), "show", "no-such-algorithm"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_environment(),
        timeout=120,
        check=False,
    )
    assert done.returncode == USAGE_ERROR
    assert done.stdout == ""
    assert "unknown algorithm 'no-such-algorithm'" in done.stderr
