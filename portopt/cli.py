"""The ``portopt`` command line: argparse subcommands, each defined in its own module.

A subcommand module defines ``COMMAND = Subcommand(name, help, add_arguments, run)``;
adding one is one line in :data:`SUBCOMMAND_MODULES`. ``run`` returns the exit code and
raises :class:`UsageError` for bad input, which :func:`main` prints on stderr with exit
code 2 (argparse's own code for usage errors). Modules are imported when the parser is
built, so a subcommand keeps heavy imports (torch, a backend) inside its ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

USAGE_ERROR = 2

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "portopt.cli_show",
    "portopt.cli_list",
    "portopt.cli_memory",
    "portopt.cli_doctor",
    "portopt.conformance.cli",
    "portopt.cli_export",
)
"""Modules that each define a ``COMMAND``, in the order ``portopt --help`` lists them."""


class UsageError(Exception):
    """Bad input to a subcommand: the message says what was wrong and what exists."""


@dataclass(frozen=True)
class Subcommand:
    """One ``portopt NAME ...`` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def load_subcommands(modules: Sequence[str] = SUBCOMMAND_MODULES) -> list[Subcommand]:
    """The ``COMMAND`` of each module, in order."""
    commands: list[Subcommand] = []
    for module in modules:
        command = importlib.import_module(module).COMMAND
        commands.append(command)
    return commands


def build_parser(commands: Sequence[Subcommand] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand."""
    from portopt import __version__

    parser = argparse.ArgumentParser(
        prog="portopt", description="Optimizers written once as equations, run on any device, proven consistent."
    )
    parser.add_argument("--version", action="version", version=f"portopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in load_subcommands() if commands is None else commands:
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``portopt`` with ``argv`` (default: the process arguments); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or an argparse usage error (already printed)
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    try:
        code: int = args._run(args)
        sys.stdout.flush()
    except UsageError as exc:
        print(f"portopt {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:
        # The reader stopped early (`portopt show adamw | head`): not an error of ours. Point stdout at
        # devnull so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    # Re-import so that subcommand modules and this entry point share one UsageError class.
    from portopt.cli import main as _main

    raise SystemExit(_main())
