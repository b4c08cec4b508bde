"""``portopt list``: the registered algorithms, their titles and their options."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from portopt.algorithms import algorithm_names
from portopt.cli import Subcommand
from portopt.cli_options import build_spec, describe_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no arguments


def run(args: argparse.Namespace) -> int:
    del args
    table = Table(title="portopt algorithms (portopt show NAME [-o KEY=VALUE ...])")
    table.add_column("name", no_wrap=True)
    table.add_column("title")
    table.add_column("options (defaults)")
    for name in algorithm_names():
        table.add_row(name, build_spec(name).title, describe_options(name))
    Console().print(table)
    return 0


COMMAND = Subcommand("list", "list the algorithms with their titles and options", add_arguments, run)
