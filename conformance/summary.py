"""What every report format shows first: the summary matrix and the grouped skip reasons.

The matrix has one row per algorithm and one column per (implementation, precision,
device); a cell gathers the runs of that algorithm's cases in that column. A cell's status
is the worst of its runs (error, then fail, then pass; skip only when nothing ran), and its
score is the worst normalised error (error / allowed, lock-step or free-running) of the
runs that ran: a skipped cell has no score, never a perfect one.

Skip reasons are grouped by their headline (:func:`skip_headline`): the torch fused
backend's long "no matching fused kernel for radam: ..." reasons, one per algorithm and
trial, become one group whose full texts stay available (collapsed in HTML).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from portopt.conformance.results import ERROR, FAIL, PASS, SKIP, RunResult


@dataclass(frozen=True)
class Column:
    """One column of the matrix: an implementation in one precision on one device."""

    implementation: str
    precision: str
    device: str

    @property
    def label(self) -> str:
        return f"{self.implementation} · {self.precision} · {self.device}"

    @staticmethod
    def of(r: RunResult) -> Column:
        return Column(r.implementation, r.precision, r.device)


@dataclass
class Cell:
    """The runs of one algorithm in one column."""

    results: list[RunResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ran(self) -> list[RunResult]:
        return [r for r in self.results if r.status in (PASS, FAIL)]

    @property
    def status(self) -> str:
        for status in (ERROR, FAIL, PASS):
            if self.count(status):
                return status
        return SKIP

    @property
    def worst(self) -> float | None:
        """The worst normalised error of the runs that ran (``None``: none ran)."""
        ran = self.ran
        if not ran:
            return None
        return max(max(r.worst_lockstep, r.worst_drift) for r in ran)

    @property
    def borderline(self) -> bool:
        return any(r.borderline for r in self.results)

    @property
    def tally(self) -> str:
        """``3/3`` (passed of run) or ``1/3 ✗``; ``skip`` when nothing ran."""
        ran = [r for r in self.results if r.status != SKIP]
        if not ran:
            return "skip"
        return f"{self.count(PASS)}/{len(ran)}"


@dataclass
class Matrix:
    """Algorithms (rows) x columns, in the order the results came."""

    rows: list[str]
    columns: list[Column]
    cells: dict[tuple[str, Column], Cell]

    def cell(self, algorithm: str, column: Column) -> Cell:
        return self.cells.get((algorithm, column), Cell())

    def implementations(self) -> list[str]:
        return list(dict.fromkeys(c.implementation for c in self.columns))


def build_matrix(results: Iterable[RunResult]) -> Matrix:
    """Columns grouped by implementation (in the order they first appear), then precision, then device."""
    rows: dict[str, None] = {}
    columns: dict[Column, None] = {}
    cells: dict[tuple[str, Column], Cell] = {}
    for r in results:
        column = Column.of(r)
        rows.setdefault(r.algorithm)
        columns.setdefault(column)
        cells.setdefault((r.algorithm, column), Cell()).results.append(r)
    first = {
        key: {v: i for i, v in enumerate(dict.fromkeys(getattr(c, key) for c in columns))}
        for key in ("implementation", "precision", "device")
    }
    ordered = sorted(
        columns,
        key=lambda c: (
            first["implementation"][c.implementation],
            first["precision"][c.precision],
            first["device"][c.device],
        ),
    )
    return Matrix(sorted(rows), ordered, cells)


def format_score(x: float | None) -> str:
    """A normalised error for a table: 3 significant digits, ``—`` for none."""
    if x is None:
        return "—"
    if not math.isfinite(x):
        return "inf" if x > 0 else str(x)
    return f"{x:.3g}"


@dataclass
class SkipGroup:
    """Skipped runs that share a headline."""

    headline: str
    results: list[RunResult]

    @property
    def reasons(self) -> list[str]:
        """Every distinct full reason, in order of first appearance."""
        return list(dict.fromkeys(r.reason for r in self.results))

    @property
    def algorithms(self) -> list[str]:
        return list(dict.fromkeys(r.algorithm for r in self.results))

    @property
    def implementations(self) -> list[str]:
        return list(dict.fromkeys(r.implementation for r in self.results))


_FOR_NAME = re.compile(r" for [\w.+-]+$")


def skip_headline(reason: str, algorithm: str = "") -> str:
    """The part of a skip reason that says why, without per-algorithm detail.

    ``backend torch_fused does not lower this spec: no matching fused kernel for radam: ...``
    has the headline ``backend torch_fused does not lower this spec: no matching fused
    kernel``; a short reason is its own headline. A part that only names the algorithm
    (``... does not lower this spec: adafactor: it reads the tensor's shape ...``) is left
    out, so the headline keeps the part that says why.
    """
    parts = [p for p in reason.split(": ") if not algorithm or p.strip() != algorithm]
    head = ": ".join(parts[:2])
    head = _FOR_NAME.sub("", head)
    if algorithm:
        head = re.sub(rf"\b{re.escape(algorithm)}\b", "<algorithm>", head)
    return head


def skip_groups(results: Sequence[RunResult]) -> list[SkipGroup]:
    """The skipped runs grouped by headline, largest group first."""
    groups: dict[str, SkipGroup] = {}
    for r in results:
        if r.status != SKIP:
            continue
        key = skip_headline(r.reason, r.algorithm)
        groups.setdefault(key, SkipGroup(key, [])).results.append(r)
    return sorted(groups.values(), key=lambda g: -len(g.results))
