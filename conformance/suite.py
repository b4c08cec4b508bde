"""A whole conformance run: what to run, in units, in worker processes, with progress and reports.

A :class:`Selection` says what a run covers (cases, implementations, precisions, devices)
as plain, picklable data, so a worker process rebuilds exactly the parent's plan
(:func:`portopt.conformance.runner.plan`) from it. The plan is cut into *units*: the
consecutive jobs of one (case, precision), which share one reference chain. :func:`run`
runs the units (in ``workers`` processes, largest first, see
:mod:`portopt.conformance.parallel`), reports progress
(:mod:`portopt.conformance.progress`), keeps the report files up to date
(:class:`~portopt.conformance.report.ReportWriter`) and stops cleanly on SIGINT, SIGTERM
or its time limit: the results so far come back with the reason, and the report says
partial.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from portopt.conformance.precision import DEFAULT_PRECISIONS

if TYPE_CHECKING:
    from portopt.conformance.candidates import Implementation
    from portopt.conformance.cases import Case
    from portopt.conformance.chain import ProblemSource
    from portopt.conformance.precision import Precision
    from portopt.conformance.progress import Progress
    from portopt.conformance.report import ReportWriter
    from portopt.conformance.results import RunResult

Job = tuple["Case", "Implementation", "Precision", str]


class InterruptedRunError(BaseException):
    """The run was stopped before its end (a signal, or the time limit); ``reason`` says how.

    A ``BaseException``, as ``KeyboardInterrupt``: the ``except Exception`` that turns a crashing
    implementation into an error result must not swallow it."""

    def __init__(self, reason: str, exit_code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


@dataclass(frozen=True)
class Selection:
    """What a run covers, as data (see the module docstring); the defaults are the main job's."""

    quick: bool = False
    algorithms: tuple[str, ...] | None = None
    specs: tuple[str, ...] = ()
    """``module:factory`` of specs of the user's own (``--spec``), loaded again in each worker."""
    case_patterns: tuple[str, ...] = ()
    backends: tuple[str, ...] | None = None
    impls: tuple[str, ...] = ()
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    devices: tuple[str, ...] = ("cpu",)
    drift: bool = True
    diagnose: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def cases(self) -> list[Case]:
        from portopt.conformance.cases import matches, select_cases

        cases = select_cases(self.algorithms, self.quick, self.specs)
        if self.case_patterns:
            cases = [c for c in cases if matches(c.name, self.case_patterns)]
        return cases

    def implementations(self) -> list[Implementation]:
        from portopt.conformance.candidates import parse_implementation
        from portopt.conformance.runner import backend_implementations

        impls: list[Implementation] = []
        if self.backends or not self.impls:
            impls += backend_implementations(self.backends)
        impls += [parse_implementation(text) for text in self.impls]
        return impls

    def precision_list(self) -> list[Precision]:
        from portopt.conformance.precision import get_precision

        return [get_precision(p) for p in self.precisions]

    def jobs(self) -> list[Job]:
        from portopt.conformance.runner import plan

        return plan(self.cases(), self.implementations(), self.precision_list(), list(self.devices))


def units(jobs: Sequence[Job]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive jobs of one (case, precision)."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(jobs):
        j = i
        while j < len(jobs) and jobs[j][0] is jobs[i][0] and jobs[j][2] is jobs[i][2]:
            j += 1
        out.append((i, j))
        i = j
    return out


TENSOR_COST = 2500
"""The fixed cost of one tensor in one step (comparisons, bounds, kernel launches), in elements: measured
on a 2-core CPU, a tensor-step costs about 7 ms and an element-step about 3 us."""


def unit_cost(jobs: Sequence[Job], unit: tuple[int, int]) -> float:
    """An estimate of a unit's work: steps x (tensors x :data:`TENSOR_COST` + elements) x (runs + 1
    for the reference chain)."""
    problem = jobs[unit[0]][0].problem
    per_step = len(problem.tensors) * TENSOR_COST + problem.total_elements
    return float(jobs[unit[0]][0].steps * per_step * (unit[1] - unit[0] + 1))


# --- worker side -------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(selection: Selection) -> None:
    _WORKER["selection"] = selection
    _WORKER["jobs"] = selection.jobs()


def _run_unit(unit: tuple[int, int]) -> list[RunResult]:
    from portopt.conformance.runner import RunOptions, run_group

    selection: Selection = _WORKER["selection"]
    jobs: list[Job] = _WORKER["jobs"]
    case, _, precision, _ = jobs[unit[0]]
    members = [(impl, device) for _, impl, _, device in jobs[unit[0] : unit[1]]]
    options = RunOptions(drift=selection.drift, diagnose=selection.diagnose)
    source = _WORKER.get("sources", {}).get(case.name)
    return run_group(case, members, precision, options=options, source=source)


# --- parent side -------------------------------------------------------------------------


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise :class:`InterruptedRunError` while the run goes on."""

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        raise InterruptedRunError(f"interrupted by {name}", 128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Outcome:
    """What :func:`run` did: every result in plan order, and why it stopped early (``None``: it did not)."""

    results: list[RunResult]
    planned: int
    interrupted: InterruptedRunError | None = None


def run(
    selection: Selection,
    *,
    workers: int = 1,
    progress: Progress | None = None,
    writer: ReportWriter | None = None,
    time_limit: float | None = None,
    jobs: Sequence[Job] | None = None,
    sources: Mapping[str, ProblemSource] | None = None,
) -> Outcome:
    """Run ``selection``, or the given ``jobs`` with ``sources`` replacing the problems of the
    cases they name (a golden file's inputs; both in this process only)."""
    from portopt.conformance.parallel import map_units

    if jobs is not None or sources is not None:
        workers = 1  # jobs built here (golden cases, stored inputs) are not rebuilt from the selection
    jobs = list(jobs if jobs is not None else selection.jobs())
    spans = units(jobs)
    costs = [unit_cost(jobs, u) for u in spans]
    done: dict[int, list[RunResult]] = {}
    if progress is not None:
        progress.start(len(jobs), sum(costs))
    deadline = None if time_limit is None else time.monotonic() + time_limit

    def collect(index: int, found: list[RunResult]) -> None:
        done[index] = found
        if progress is not None:
            progress.advance(found, costs[index])
        if writer is not None:
            writer.update(_ordered(done))
        if deadline is not None and time.monotonic() > deadline:
            raise InterruptedRunError(f"stopped at the time limit of {time_limit:g} s", 124)

    interrupted: InterruptedRunError | None = None
    try:
        with _signals_interrupt():
            if workers <= 1:
                _WORKER.update(selection=selection, jobs=jobs, sources=dict(sources or {}))
                map_units(_run_unit, spans, 1, collect, costs=costs)
            else:
                map_units(
                    _run_unit, spans, workers, collect, costs=costs, initializer=_init_worker, initargs=(selection,)
                )
    except InterruptedRunError as exc:
        interrupted = exc
    except KeyboardInterrupt:
        interrupted = InterruptedRunError("interrupted by SIGINT", 130)
    finally:
        if progress is not None:
            progress.close()
    return Outcome(_ordered(done), len(jobs), interrupted)


def _ordered(done: dict[int, list[RunResult]]) -> list[RunResult]:
    return [r for i in sorted(done) for r in done[i]]
