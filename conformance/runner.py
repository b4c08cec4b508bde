"""The runner: cases x implementations x precisions x devices against the reference.

:func:`run_group` runs one case on several implementations at once: the reference chain
(:mod:`portopt.conformance.chain`) is computed one step at a time and each step is handed
to every implementation's :class:`~portopt.conformance.session.Session` before the next,
then failures are diagnosed (:mod:`portopt.conformance.diagnosis`). :func:`run_matrix`
and :func:`run_jobs` group consecutive jobs of one (case, precision) and report progress
through a callback. Absent backends, devices and precision policies come back as skipped
results that carry the reason; a crashing implementation is an error result, never an
exception.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from portopt.conformance.bounds import has_discontinuity
from portopt.conformance.candidates import (
    BackendImplementation,
    Implementation,
    UnloadableBackend,
)
from portopt.conformance.cases import FOUND_INF, Case
from portopt.conformance.chain import ProblemSource, Reference, Trajectory
from portopt.conformance.precision import OP_BY_OP_HINT, Precision
from portopt.conformance.results import ERROR, FAIL, PASS, SKIP, RunResult
from portopt.conformance.session import Session
from portopt.conformance.tolerance import (
    OVERRIDES,
    TOLERANCES,
    Override,
    Tolerance,
    resolve,
)
from portopt.lowering.registry import registered_backends
from portopt.spec.definition import Spec

F64 = torch.float64


@dataclass(frozen=True)
class RunOptions:
    """What a run does beyond the lock-step comparison."""

    drift: bool = True
    diagnose: bool = True
    overrides: tuple[Override, ...] = OVERRIDES


def backend_implementations(names: Iterable[str] | None = None) -> list[Implementation]:
    """Every registered backend (or the named ones), as implementations under test.

    Backends whose ``portopt.backends`` entry point failed to load are included and are
    skipped with the reason, so that a report lists them.
    """
    from portopt.backends import available, load_entry_points

    load_entry_points()
    wanted = None if names is None else list(names)
    # Import the backend modules only when some backend is not registered yet (they are slow to import).
    needed = wanted is None or any(n not in registered_backends() for n in wanted)
    broken = _import_backend_modules() if needed else {}
    table = registered_backends()
    broken.update({row.name: row.reason for row in available() if row.name not in table})
    if wanted is None:
        impls: list[Implementation] = [
            BackendImplementation(b) for b in sorted(table.values(), key=lambda b: (-b.priority, b.name))
        ]
        return impls + [UnloadableBackend(name, reason) for name, reason in sorted(broken.items())]
    missing = [n for n in wanted if n not in table and n not in broken]
    if missing:
        raise ValueError(f"unknown backend(s) {', '.join(missing)}; registered backends: {', '.join(sorted(table))}")
    return [BackendImplementation(table[n]) if n in table else UnloadableBackend(n, broken[n]) for n in wanted]


def _import_backend_modules() -> dict[str, str]:
    """Import every module of ``portopt.backends`` (each registers itself); why a module failed."""
    import importlib
    import pkgutil

    import portopt.backends as package

    failed: dict[str, str] = {}
    for info in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception as exc:  # a vendor backend whose package is absent: listed, not fatal
            failed[info.name] = f"module portopt.backends.{info.name} failed to import: {type(exc).__name__}: {exc}"
    return failed


def skip_reason(case: Case, spec: Spec, impl: Implementation, precision: Precision, device: str) -> str | None:
    """Why this combination cannot run here, or ``None``."""
    return impl.unavailable_reason(case, spec, precision, device)


def run_case(
    case: Case,
    impl: Implementation,
    precision: Precision,
    device: str = "cpu",
    *,
    source: ProblemSource | None = None,
    options: RunOptions | None = None,
    trajectory: Trajectory | None = None,
) -> RunResult:
    """Run one case; never raises for a failing or crashing implementation (it is the result).

    ``trajectory`` is the reference chain to compare with (shared between runs); by
    default it is computed for this run.
    """
    return run_group(case, [(impl, device)], precision, source=source, options=options, trajectory=trajectory)[0]


def _prepare(
    case: Case, impl: Implementation, precision: Precision, device: str, options: RunOptions
) -> tuple[RunResult, Spec | None, Tolerance | None]:
    """The result skeleton, and the spec and tolerance when the combination can run."""
    result = RunResult(case.name, case.algorithm, impl.name, precision.name, device, PASS, steps=case.steps)
    spec = case.spec()
    resolved = resolve(case.name, impl.name, precision.name, has_discontinuity(spec), options.overrides)
    result.overrides = list(resolved.reasons)
    reason = skip_reason(case, spec, impl, precision, device) or resolved.skip_reason
    if reason:
        result.status, result.reason = SKIP, reason
        return result, None, None
    return result, spec, resolved.tolerance


def _crashed(result: RunResult, exc: Exception) -> None:
    if isinstance(exc, NotImplementedError):
        result.status, result.reason = SKIP, f"not implemented: {exc}"
        return
    result.status = ERROR
    result.reason = f"{type(exc).__name__}: {exc}"
    result.notes.append(traceback.format_exc(limit=6))


def run_group(
    case: Case,
    members: Sequence[tuple[Implementation, str]],
    precision: Precision,
    *,
    source: ProblemSource | None = None,
    options: RunOptions | None = None,
    trajectory: Trajectory | None = None,
) -> list[RunResult]:
    """Run one case on several (implementation, device) pairs, stepping them together.

    The reference chain is computed once and each of its steps is handed to every
    implementation before the next is computed, so even a problem of millions of elements
    needs one reference pass and one step of memory. Each pair's result is independent:
    a crash or a skip affects only its own.
    """
    options = options or RunOptions()
    results: list[RunResult] = []
    runs: list[tuple[RunResult, Session, Tolerance]] = []
    spec: Spec | None = None
    for impl, device in members:
        start = time.perf_counter()
        result = RunResult(case.name, case.algorithm, impl.name, precision.name, device, PASS, steps=case.steps)
        try:
            result, spec_here, tolerance = _prepare(case, impl, precision, device, options)
            if spec_here is not None and tolerance is not None:
                spec = spec_here
                trajectory = trajectory or new_trajectory(case, spec, precision, source)
                session = Session(case, spec, impl, precision, device, trajectory, tolerance, options.drift)
                runs.append((result, session, tolerance))
        except Exception as exc:
            _crashed(result, exc)
        result.seconds += time.perf_counter() - start
        results.append(result)
    if trajectory is None or spec is None:
        return results
    active = list(runs)
    for t in range(1, case.steps + 1):
        record = trajectory.step(t)
        for run in list(active):
            result, session, _ = run
            start = time.perf_counter()
            try:
                session.step(result, t, record)
            except Exception as exc:
                _crashed(result, exc)
                active.remove(run)
            result.seconds += time.perf_counter() - start
    for result, session, tolerance in runs:
        if result.status == FAIL and precision.name in OP_BY_OP_HINT:
            result.reason += f" (precision contract {precision.contract}; {OP_BY_OP_HINT[precision.name]})"
        if result.status != FAIL or not options.diagnose:
            continue
        start = time.perf_counter()
        try:
            from portopt.conformance.diagnosis import diagnose

            result.diagnosis = diagnose(
                case, spec, session.impl, precision, session.device, trajectory, tolerance, result
            )
            result.reason = result.diagnosis.summary
        except Exception as exc:  # a diagnosis that cannot run leaves the failure as it is
            result.notes.append(f"diagnosis failed: {type(exc).__name__}: {exc}")
        result.seconds += time.perf_counter() - start
    return results


SHARED_TRAJECTORY_ELEMENTS = 200_000
"""Problems up to this many elements keep their reference chain for the next implementation."""


def problem_source(case: Case, precision: Precision) -> ProblemSource:
    """The case's problem with its huge-gradient scale fitted to the precision."""
    return case.problem.with_huge_scale(precision.huge_gradient())


def new_trajectory(case: Case, spec: Spec, precision: Precision, source: ProblemSource | None = None) -> Trajectory:
    """The reference chain of ``case`` in ``precision`` (kept whole unless the problem is large)."""
    source = source or problem_source(case, precision)
    bound_factor = TOLERANCES.get(precision.name, Tolerance()).bound_factor
    skip = case.requires == FOUND_INF
    reference = Reference(spec, source, case.group_hypers(spec), precision, bound_factor, skip_nonfinite=skip)
    elements = sum(t.numel for t in source.tensors)
    return Trajectory(reference, keep_history=elements <= SHARED_TRAJECTORY_ELEMENTS)


ProgressCallback = Callable[[RunResult], None]


def plan(
    cases: Sequence[Case],
    impls: Sequence[Implementation],
    precisions: Sequence[Precision],
    devices: Sequence[str],
) -> list[tuple[Case, Implementation, Precision, str]]:
    """Every combination, in a stable order: precision, case, device, implementation.

    Devices and implementations are innermost so that they share one reference chain per case.
    An implementation of one algorithm (``pkg.mod:Name@adam``) is planned for that
    algorithm's cases only: it is not a skip of every other algorithm.
    """
    return [
        (c, i, p, d) for p in precisions for c in cases for d in devices for i in impls if implements(i, c.algorithm)
    ]


def implements(impl: Implementation, algorithm: str) -> bool:
    """False for an implementation declared for another algorithm (its ``algorithm`` attribute)."""
    own = getattr(impl, "algorithm", None)
    return own is None or own == algorithm


def run_matrix(
    cases: Sequence[Case],
    impls: Sequence[Implementation],
    precisions: Sequence[Precision],
    devices: Sequence[str] = ("cpu",),
    *,
    options: RunOptions | None = None,
    progress: ProgressCallback | None = None,
    sources: Mapping[str, ProblemSource] | None = None,
) -> list[RunResult]:
    """Run every combination of :func:`plan`; ``progress`` is called after each."""
    return run_jobs(plan(cases, impls, precisions, devices), options=options, progress=progress, sources=sources)


def run_jobs(
    jobs: Sequence[tuple[Case, Implementation, Precision, str]],
    *,
    options: RunOptions | None = None,
    progress: ProgressCallback | None = None,
    sources: Mapping[str, ProblemSource] | None = None,
) -> list[RunResult]:
    """Run ``jobs`` in order; consecutive jobs of one (case, precision) run together on one
    reference chain (:func:`run_group`). ``sources`` replaces the problems of the named
    cases (golden inputs)."""
    results: list[RunResult] = []
    i = 0
    while i < len(jobs):
        case, _, precision, _ = jobs[i]
        j = i
        while j < len(jobs) and jobs[j][0] is case and jobs[j][2] is precision:
            j += 1
        members = [(impl, device) for _, impl, _, device in jobs[i:j]]
        source = None if sources is None else sources.get(case.name)
        for result in run_group(case, members, precision, source=source, options=options):
            results.append(result)
            if progress is not None:
                progress(result)
        i = j
    return results


class TrajectoryCache:
    """The reference chain of the latest (case, precision), handed to the next implementation."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.trajectory: Trajectory | None = None

    def get(
        self, case: Case, impl: Implementation, precision: Precision, device: str, source: ProblemSource | None = None
    ) -> Trajectory | None:
        """The shared chain for this job, or ``None`` (run_case then builds its own, or skips)."""
        key = (case.name, precision.name)
        if key == self.key and self.trajectory is not None and self.trajectory.keep_history:
            return self.trajectory
        if skip_reason_or_none(case, impl, precision, device) is not None:
            return None
        try:
            self.key, self.trajectory = key, new_trajectory(case, case.spec(), precision, source)
        except Exception:  # an invalid case is reported by run_case
            self.key, self.trajectory = None, None
        return self.trajectory


def skip_reason_or_none(case: Case, impl: Implementation, precision: Precision, device: str) -> str | None:
    """:func:`skip_reason`, with a case whose spec cannot be built read as runnable (run_case reports it)."""
    try:
        return skip_reason(case, case.spec(), impl, precision, device)
    except Exception:
        return None
