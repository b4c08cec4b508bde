"""Progress of a conformance run: a bar on a terminal, a line every few runs in a log.

Both estimate the time left from the work done (steps x tensors and elements x runs, see
:func:`portopt.conformance.suite.unit_cost`), not from the number of runs, since a run on
the million-element problem takes many times one on the quick problem.
:func:`make_progress` picks the bar when stdout is a terminal, else :class:`LogProgress`,
which prints a line every :attr:`~LogProgress.every` runs (about every 5 %) and at least
every :data:`LOG_INTERVAL` seconds while runs finish, flushed so CI logs show it at once.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

from portopt.conformance.results import RunResult

LOG_INTERVAL = 60.0


class Progress(Protocol):
    def start(self, runs: int, cost: float) -> None:
        """``runs`` runs are planned, worth ``cost`` in all."""

    def advance(self, results: Sequence[RunResult], cost: float) -> None:
        """``results`` finished, worth ``cost``."""

    def close(self) -> None:
        """The run is over (or interrupted)."""


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _Tally:
    def __init__(self) -> None:
        self.runs = 0
        self.cost = 0.0
        self.done = 0
        self.done_cost = 0.0
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()

    def add(self, results: Sequence[RunResult], cost: float) -> None:
        self.done += len(results)
        self.done_cost += cost
        self.counts.update(r.status for r in results)

    def remaining(self) -> float | None:
        """Seconds left, from the share of the work done; ``None`` before anything is done."""
        if self.done_cost <= 0 or self.cost <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed * max(self.cost - self.done_cost, 0.0) / self.done_cost


class LogProgress:
    """A line per :attr:`every` runs: done / planned, elapsed, time left, status counts, the last run."""

    def __init__(self, stream: TextIO | None = None, every: int | None = None) -> None:
        self.stream = stream or sys.stdout
        self.every = every
        self.tally = _Tally()
        self._printed_at = 0
        self._printed_time = time.monotonic()

    def start(self, runs: int, cost: float) -> None:
        self.tally = _Tally()
        self.tally.runs, self.tally.cost = runs, cost
        if self.every is None:
            self.every = max(1, runs // 20)
        self._print(f"conformance: {runs} runs planned")

    def advance(self, results: Sequence[RunResult], cost: float) -> None:
        self.tally.add(results, cost)
        t = self.tally
        due = t.done - self._printed_at >= (self.every or 1) or time.monotonic() - self._printed_time >= LOG_INTERVAL
        if (due or t.done >= t.runs) and results:
            self._print(self.line(results[-1]))

    def line(self, last: RunResult | None = None) -> str:
        t = self.tally
        elapsed = time.monotonic() - t.started
        share = 100.0 * t.done_cost / t.cost if t.cost else 100.0
        left = t.remaining()
        eta = "" if left is None or t.done >= t.runs else f", about {_duration(left)} left"
        counts = ", ".join(f"{t.counts[s]} {s}" for s in ("pass", "fail", "error", "skip"))
        tail = f"; last: {last.case} | {last.implementation} | {last.precision} | {last.device}" if last else ""
        return f"conformance: {t.done}/{t.runs} runs ({share:.0f}% of the work), {_duration(elapsed)} elapsed{eta}; {counts}{tail}"

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self._printed_at = self.tally.done
        self._printed_time = time.monotonic()

    def close(self) -> None:
        if self.tally.done != self._printed_at:
            self._print(self.line())


class BarProgress:
    """rich's progress bar, by share of the work, with the time left."""

    def __init__(self, console: Any | None = None) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn(), console=console, transient=False,
        )  # fmt: skip
        self.task: Any = None
        self.tally = _Tally()

    def start(self, runs: int, cost: float) -> None:
        self.tally.runs, self.tally.cost = runs, cost
        self.bar.start()
        self.task = self.bar.add_task(f"conformance 0/{runs}", total=max(cost, 1e-9))

    def advance(self, results: Sequence[RunResult], cost: float) -> None:
        from rich.markup import escape

        self.tally.add(results, cost)
        last = results[-1] if results else None
        mark = {"pass": "[green]pass", "fail": "[red]FAIL", "error": "[red]ERROR", "skip": "[dim]skip"}
        what = (
            f" {mark[last.status]}[/] {escape(f'{last.case} | {last.implementation} | {last.precision}')}"
            if last
            else ""
        )
        self.bar.update(self.task, advance=cost, description=f"{self.tally.done}/{self.tally.runs}{what}")

    def close(self) -> None:
        self.bar.stop()


def make_progress(stream: TextIO | None = None, console: Any | None = None) -> Progress:
    """The bar on a terminal, lines in a log."""
    stream = stream or sys.stdout
    if hasattr(stream, "isatty") and stream.isatty():
        return BarProgress(console)
    return LogProgress(stream)
