"""``portopt doctor``: what this machine offers portopt, and why not where it does not.

Versions (Python, torch, torch_npu, CANN), the CPU's instruction sets, every device type
and backend, and the vendor kernels each backend may use per dtype, with the reason for
every one it does not (package missing, version, SoC, dtype, a failed probe). The facts
come from :mod:`portopt.doctor`; the exit code is 0 whatever they say.
"""

from __future__ import annotations

import argparse

from portopt.cli import Subcommand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``portopt doctor`` takes no options."""


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from portopt import doctor

    console = Console()

    def facts(title: str, rows: list[tuple[str, str]]) -> None:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("what", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        for name, value in rows:
            table.add_row(escape(name), escape(value))
        console.print(table)

    def listing(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column, overflow="fold", no_wrap=column in columns[:1])
        for row in rows:
            table.add_row(*(escape(cell) for cell in row), style="green" if "yes" in row[1:2] else None)
        console.print(table)

    facts("versions", doctor._guard("versions", doctor.versions))
    facts("CPU", doctor._guard("CPU", doctor.cpu_facts))
    listing("devices", ("device", "present", "names / why not"), doctor._guard("devices", doctor.devices))
    listing("backends", ("backend", "usable", "how chosen / why not"), doctor._guard("backends", doctor.backends))
    kernels = Table(title="vendor kernels (per backend, op, device and dtype: used, or why not)", title_justify="left")
    for column, width in (("backend", 12), ("op", 22), ("device", 16), ("dtypes", 17)):
        kernels.add_column(column, overflow="fold", max_width=width)
    kernels.add_column("used / why not", overflow="fold", ratio=1)
    for row in doctor.vendor_kernels():
        cells = (row.backend, row.op, row.device, row.dtypes, "yes" if row.why_not is None else row.why_not)
        kernels.add_row(*(escape(cell) for cell in cells), style="green" if row.why_not is None else None)
    console.print(kernels)
    return 0


COMMAND = Subcommand(
    "doctor",
    "what this machine offers portopt: versions, CPU features, devices, backends, vendor kernels, and why not",
    add_arguments,
    run,
)
