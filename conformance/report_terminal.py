"""The terminal report: totals per column, the summary matrix, failures, grouped skip reasons.

Tables never cut a name with an ellipsis: long cells wrap (``overflow="fold"``), and
:func:`console` gives logs (stdout not a terminal) a wide page, at least :data:`LOG_WIDTH`
characters, instead of rich's 80.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from portopt.conformance.results import ERROR, FAIL, PASS, SKIP, RunResult, summarize
from portopt.conformance.summary import build_matrix, format_score, skip_groups

LOG_WIDTH = 200
"""The page width of the terminal report in logs, where no terminal says how wide it is."""
REASON_TEXT = 400


def console(file: Any | None = None) -> Any:
    """A rich console: the terminal's width on a terminal, a wide page in logs."""
    from rich.console import Console

    stream = file or sys.stdout
    if hasattr(stream, "isatty") and stream.isatty():
        return Console(file=file)
    # COLUMNS in a log is the width of a terminal that launched the job, not of the log's reader.
    width = max(int(os.environ.get("COLUMNS", "0") or 0), LOG_WIDTH)
    return Console(file=file, width=width, soft_wrap=False)


def terminal_report(results: Sequence[RunResult], out: Any | None = None) -> None:
    """Print the report of ``results`` on ``out`` (a rich console; default: :func:`console`)."""
    from rich.table import Table
    from rich.text import Text

    out = out or console()
    summary = Table(title="portopt conformance", show_lines=False)
    for column in ("implementation", "precision", "device"):
        summary.add_column(column, overflow="fold")
    for column in ("pass", "fail", "error", "skip", "worst lock-step", "worst free-running"):
        summary.add_column(column, justify="right", overflow="fold")
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.implementation, r.precision, r.device), []).append(r)
    for (impl, precision, device), members in groups.items():
        counts = Counter(r.status for r in members)
        ran = [r for r in members if r.status in (PASS, FAIL)]
        worst_lock = max((r.worst_lockstep for r in ran), default=None)
        worst_drift = max((r.worst_drift for r in ran), default=None)
        style = "red" if counts[FAIL] or counts[ERROR] else ("dim" if counts[PASS] == 0 else "green")
        summary.add_row(
            Text(impl), precision, device, str(counts[PASS]), str(counts[FAIL]), str(counts[ERROR]), str(counts[SKIP]),
            format_score(worst_lock), format_score(worst_drift), style=style,
        )  # fmt: skip
    out.print(summary)
    _matrix(results, out)
    bad = [r for r in results if r.status in (FAIL, ERROR) or r.borderline]
    if bad:
        table = Table(title="failures, errors and borderline passes", show_lines=True)
        for column in ("case", "implementation", "precision", "status", "lock-step", "free-running", "why"):
            table.add_column(column, overflow="fold")
        for r in bad:
            why = (
                r.reason if len(r.reason) <= REASON_TEXT else r.reason[:REASON_TEXT] + " … (whole text in the reports)"
            )
            table.add_row(
                Text(r.case), Text(r.implementation), r.precision, r.status + (" (borderline)" if r.borderline else ""),
                format_score(r.worst_lockstep), format_score(r.worst_drift), Text(why),
            )  # fmt: skip
        out.print(table)
    groups_ = skip_groups(results)
    if groups_:
        table = Table(title="skipped (grouped by reason; full reasons in the HTML and JSON reports)", show_lines=False)
        table.add_column("runs", justify="right")
        table.add_column("reason", overflow="fold")
        table.add_column("where", overflow="fold")
        for g in groups_:
            where = f"{', '.join(g.implementations)}: {', '.join(g.algorithms)}"
            text = g.reasons[0] if len(g.reasons) == 1 and len(g.reasons[0]) <= 160 else g.headline
            table.add_row(str(len(g.results)), Text(text), Text(where))
        out.print(table)
    totals = summarize(list(results))
    out.print(
        f"[bold]{totals[PASS]} passed, {totals[FAIL]} failed, {totals[ERROR]} errors, {totals[SKIP]} skipped "
        f"({totals['borderline']} borderline)[/bold]"
    )


def _matrix(results: Sequence[RunResult], out: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    m = build_matrix(results)
    if len(m.columns) < 2 or not m.rows:
        return
    table = Table(title="summary: algorithm x implementation / precision / device (passes/runs, worst error)")
    table.add_column("algorithm", overflow="fold")
    for c in m.columns:
        table.add_column(f"{c.implementation}\n{c.precision}\n{c.device}", justify="center", overflow="fold")
    styles = {PASS: "green", FAIL: "bold red", ERROR: "bold red", SKIP: "dim"}
    for algorithm in m.rows:
        row: list[Text] = [Text(algorithm)]
        for c in m.columns:
            cell = m.cell(algorithm, c)
            if not cell.results:
                row.append(Text(""))
                continue
            score = "" if cell.worst is None else f" {format_score(cell.worst)}"
            row.append(Text(f"{cell.tally}{score}", style=styles[cell.status]))
        table.add_row(*row)
    out.print(table)
