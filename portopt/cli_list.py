"""``portopt list``: the registered algorithms and options, and the backends usable here."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from portopt.algorithms import algorithm_names
from portopt.cli import Subcommand
from portopt.cli_options import build_spec, describe_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", action="store_true", help="list the backends (usable here or why not) instead")


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.backends:
        from portopt.backends import available

        backends = Table(title='portopt backends (backend="auto" takes the usable one of highest priority per spec)')
        backends.add_column("name", no_wrap=True)
        backends.add_column("usable here")
        backends.add_column("how / why not")
        for row in available():
            backends.add_row(row.name, "yes" if row.usable else "no", row.reason)
        console.print(backends)
        return 0
    table = Table(title="portopt algorithms (portopt show NAME [-o KEY=VALUE ...]; portopt list --backends)")
    table.add_column("name", no_wrap=True)
    table.add_column("title")
    table.add_column("options (defaults)")
    for name in algorithm_names():
        table.add_row(name, build_spec(name).title, describe_options(name))
    console.print(table)
    return 0


COMMAND = Subcommand("list", "list the algorithms with their options (--backends: the backends)", add_arguments, run)
