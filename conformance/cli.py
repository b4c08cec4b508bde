"""``portopt conformance``: run the suite, record a golden file, or check against one.

::

    portopt conformance [--quick] [--backend NAME ...] [--impl IMPL ...] [--device DEV ...]
                        [--precision P ...] [--algorithm A ...] [--spec MODULE:FACTORY ...]
                        [--case PATTERN ...] [--report-dir DIR]
    portopt conformance record --out FILE [--quick] [--algorithm A ...] [--case PATTERN ...]
    portopt conformance check --golden FILE [--backend ...] [--impl ...] [--device ...] [--precision ...]
    portopt conformance list

Without ``--backend`` or ``--impl`` every registered backend runs. ``--impl`` adds an
implementation that is not a portopt backend: ``torch.optim`` (every algorithm torch has,
its default implementation), ``torch.optim:fused=True``, ``portopt`` (the front-end
classes), or ``package.module:Name@algorithm[:flag=value,...]`` (a torch.optim-style class
or a ``build(spec) -> StepFunction`` callable); one declared ``@algorithm`` runs that
algorithm's cases only. The exit code is 0 when nothing failed (skips are listed with
their reasons), 1 when a case failed or crashed, 2 for bad usage; an interrupted run
(SIGINT, SIGTERM, ``--time-limit``) exits with 130, 143 or 124 after writing its partial
report. A run that checked nothing is not a pass: the exit code is also 1, with a one-line
reason, when every run was skipped, when nothing ran on a device named by ``--device``
(absent here), or when an implementation named by ``--impl`` or ``--backend`` ran nothing
(an unknown flag such as ``--impl torch.optim:foo=bar``); ``--allow-skips`` accepts such
runs.

A run uses ``--workers`` processes (default: one per core), prints a progress line every
few runs when stdout is not a terminal (a bar when it is), and with ``--report-dir``
keeps ``conformance.{json,xml,html,md}`` up to date as it goes, marked partial until the
end.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from portopt.cli import Subcommand, UsageError

if TYPE_CHECKING:
    from portopt.conformance.candidates import Implementation
    from portopt.conformance.cases import Case
    from portopt.conformance.chain import ProblemSource
    from portopt.conformance.precision import Precision
    from portopt.conformance.results import RunResult

EXIT_OK = 0
EXIT_FAILED = 1


def _add_selection(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--backend",
        action="append",
        default=default,
        metavar="NAME",
        help="a registered backend (repeatable; default: all)",
    )
    parser.add_argument(
        "--impl",
        action="append",
        default=default,
        metavar="IMPL",
        help="another implementation: torch.optim, torch.optim:fused=True, portopt, or pkg.mod:Name@algorithm (repeatable)",
    )
    parser.add_argument(
        "--device", action="append", default=default, metavar="DEV", help="torch device (repeatable; default: cpu)"
    )
    parser.add_argument(
        "--precision",
        action="append",
        default=default,
        metavar="P",
        help="fp32, bf16, bf16-native, fp16+master, bf16+master, fp64 (repeatable; default: fp32, bf16, fp16+master)",
    )
    parser.add_argument(
        "--case",
        action="append",
        default=default,
        metavar="PATTERN",
        help="only cases whose name matches (glob, repeatable)",
    )
    parser.add_argument(
        "--report-dir", default=default, metavar="DIR", help="write conformance.json, .xml and .html here"
    )
    parser.add_argument(
        "--no-drift", action="store_true", default=argparse.SUPPRESS if suppress else False, help="lock-step only"
    )
    parser.add_argument(
        "--no-diagnose",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="skip the diagnosis of failures",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=argparse.SUPPRESS if suppress else None,
        metavar="N",
        help="worker processes (default: one per core; 1 runs everything in this process)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=argparse.SUPPRESS if suppress else None,
        metavar="SECONDS",
        help="stop after this long, with a partial report of what ran",
    )
    parser.add_argument(
        "--allow-skips",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="exit 0 even when nothing ran, a requested device is absent or a requested implementation ran nothing",
    )


def _add_case_set(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    parser.add_argument(
        "--algorithm",
        action="append",
        default=argparse.SUPPRESS if suppress else None,
        metavar="A",
        help="only these algorithms (repeatable; default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="the quick set (a few cases per algorithm, small problems, 8 steps) instead of the full one",
    )
    parser.add_argument(
        "--spec",
        action="append",
        default=argparse.SUPPRESS if suppress else None,
        metavar="MODULE:FACTORY",
        help="also (or, without --algorithm, only) a spec of your own: FACTORY() in MODULE (repeatable)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``portopt conformance`` options and its ``record``/``check``/``list`` subcommands."""
    _add_case_set(parser)
    _add_selection(parser)
    parser.add_argument(
        "--distributed",
        type=int,
        default=None,
        metavar="N",
        help="run the cases on N gloo ranks on localhost, parameters sharded as DTensors (Shard(0) and Shard(1)), "
        "against the one-process float64 reference",
    )
    sub = parser.add_subparsers(dest="conformance_command", metavar="{record,check,list}")
    rec = sub.add_parser("record", help="write the float64 reference trajectories to a golden file")
    rec.add_argument("--out", required=True, metavar="FILE", help="the golden file to write (.npz)")
    _add_case_set(rec, suppress=True)
    rec.add_argument(
        "--case", action="append", default=argparse.SUPPRESS, metavar="PATTERN", help="only matching cases"
    )
    chk = sub.add_parser("check", help="check implementations against a golden file")
    chk.add_argument(
        "--golden", required=True, metavar="FILE", help="a golden file written by `portopt conformance record`"
    )
    _add_selection(chk, suppress=True)
    sub.add_parser("list", help="list the cases, implementations and precisions")


def _cases(args: argparse.Namespace) -> list[Case]:
    from portopt.conformance.cases import select_cases

    try:
        cases = select_cases(args.algorithm, args.quick, tuple(args.spec or ()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.case:
        from portopt.conformance.cases import matches

        cases = [c for c in cases if matches(c.name, args.case)]
        if not cases:
            raise UsageError(f"no case matches {', '.join(args.case)}; see `portopt conformance list`")
    return cases


def _implementations(args: argparse.Namespace) -> list[Implementation]:
    """The implementations under test; those named on the command line are recorded in ``args.requested``
    (``(flag, implementation name)``) for :func:`skip_failure`."""
    from portopt.conformance.candidates import parse_implementation
    from portopt.conformance.runner import backend_implementations

    impls: list[Implementation] = []
    requested: list[tuple[str, str]] = []
    try:
        if args.backend or not args.impl:
            backends = backend_implementations(args.backend)
            impls += backends
            if args.backend:
                requested += [(f"--backend {impl.name}", impl.name) for impl in backends]
        for text in args.impl or ():
            impl = parse_implementation(text)
            impls.append(impl)
            requested.append((f"--impl {text}", impl.name))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args.requested = requested
    return impls


def skip_failure(results: Sequence[RunResult], args: argparse.Namespace) -> str | None:
    """Why a run without failures still checked too little to pass (module doc), or ``None``.

    The golden file's own reference check does not count as a run of an implementation.
    """
    from portopt.conformance.golden import REFERENCE_NAME
    from portopt.conformance.results import SKIP

    if getattr(args, "allow_skips", False):
        return None
    runs = [r for r in results if r.implementation != REFERENCE_NAME]

    def first_reason(rows: Sequence[RunResult]) -> str:
        return next((r.reason for r in rows if r.reason), "no reason given")

    for device in args.device or ():
        on_device = [r for r in runs if r.device == device]
        if on_device and not any(r.status != SKIP for r in on_device):
            return f"nothing ran on device {device!r}: {first_reason(on_device)}"
    for flag, name in getattr(args, "requested", ()):
        mine = [r for r in runs if r.implementation == name]
        if mine and not any(r.status != SKIP for r in mine):
            return f"{flag} ran nothing: {first_reason(mine)}"
    if not any(r.status != SKIP for r in runs):
        return f"nothing ran: all {len(runs)} run(s) were skipped ({first_reason(runs)})"
    return None


def _precisions(args: argparse.Namespace) -> list[Precision]:
    from portopt.conformance.precision import DEFAULT_PRECISIONS, get_precision

    try:
        return [get_precision(p) for p in (args.precision or DEFAULT_PRECISIONS)]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


SMALL_RUN = 8
"""A run of fewer jobs than this stays in this process: starting workers would cost more."""


def _workers(args: argparse.Namespace, jobs: int) -> int:
    from portopt.conformance.parallel import default_workers

    if args.workers is not None:
        if args.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {args.workers}")
        return int(args.workers)
    return 1 if jobs < SMALL_RUN else default_workers()


def _selection(args: argparse.Namespace) -> Any:
    from portopt.conformance.suite import Selection

    return Selection(
        quick=args.quick,
        algorithms=tuple(args.algorithm) if args.algorithm else None,
        specs=tuple(args.spec or ()),
        case_patterns=tuple(args.case or ()),
        backends=tuple(args.backend) if args.backend else None,
        impls=tuple(args.impl or ()),
        precisions=tuple(p.name for p in _precisions(args)),
        devices=tuple(args.device or ["cpu"]),
        drift=not args.no_drift,
        diagnose=not args.no_diagnose,
    )


def _execute(
    args: argparse.Namespace,
    jobs: list[tuple[Case, Implementation, Precision, str]],
    meta: dict[str, Any],
    sources: dict[str, ProblemSource] | None = None,
) -> tuple[list[RunResult], Any, Any]:
    """Run ``jobs`` with progress and incremental reports; the results, the writer and how it stopped."""
    from portopt.conformance import suite
    from portopt.conformance.progress import make_progress
    from portopt.conformance.report import ReportWriter

    workers = 1 if sources is not None else _workers(args, len(jobs))
    meta = {**meta, "workers": workers}
    writer = ReportWriter(args.report_dir, meta, planned=len(jobs)) if args.report_dir else None
    outcome = suite.run(
        _selection(args),
        workers=workers,
        progress=make_progress(),
        writer=writer,
        time_limit=args.time_limit,
        jobs=jobs if workers == 1 else None,
        sources=sources,
    )
    return outcome.results, writer, outcome.interrupted


def _finish(
    results: list[RunResult], args: argparse.Namespace, started: float, writer: Any, interrupted: Any = None
) -> int:
    from portopt.conformance.report_terminal import console, terminal_report
    from portopt.conformance.results import ERROR, FAIL

    out = console()
    terminal_report(results, out)
    elapsed = time.perf_counter() - started
    out.print(f"wall time {elapsed:.1f} s")
    if interrupted is not None:
        out.print(f"[yellow]partial run: {interrupted.reason}[/yellow]", highlight=False)
    if writer is not None:
        reason = None if interrupted is None else f"{interrupted.reason} after {len(results)} of {writer.planned} runs"
        paths = writer.finish(results, reason, {"wall_seconds": round(elapsed, 1)})
        out.print("reports: " + ", ".join(str(p) for p in paths), highlight=False)
    if interrupted is not None:
        return int(interrupted.exit_code)
    if any(r.status in (FAIL, ERROR) for r in results):
        return EXIT_FAILED
    too_little = skip_failure(results, args)
    if too_little is not None:
        print(f"portopt conformance: error: {too_little} (pass --allow-skips to accept this)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _command_line() -> str:
    """The command as typed (``portopt conformance ...`` or ``python -m portopt.conformance ...``)."""
    program = sys.argv[0].rsplit("/", 1)[-1]
    head = ["python", "-m", "portopt.conformance"] if program in ("__main__.py", "-m", "-c") else [program]
    return shlex.join([*head, *sys.argv[1:]])


def _run_suite(args: argparse.Namespace) -> int:
    from portopt.conformance.runner import plan

    started = time.perf_counter()
    if getattr(args, "distributed", None) is not None:
        return _run_distributed(args, started)
    cases, impls, precisions = _cases(args), _implementations(args), _precisions(args)
    jobs = plan(cases, impls, precisions, args.device or ["cpu"])
    results, writer, interrupted = _execute(args, jobs, {"command": _command_line(), "quick": args.quick})
    return _finish(results, args, started, writer, interrupted)


def _run_distributed(args: argparse.Namespace, started: float) -> int:
    """``--distributed N``: the cases on N ranks (:mod:`portopt.conformance.distributed`)."""
    from portopt.conformance.distributed import run_distributed

    ranks = args.distributed
    if ranks < 1:
        raise UsageError(f"--distributed takes a number of ranks >= 1, got {ranks}")
    for option in ("backend", "impl", "spec", "device"):
        if getattr(args, option, None):
            raise UsageError(
                f"--distributed runs portopt's front end on sharded CPU tensors; --{option} does not apply to it"
            )
    cases, precisions = _cases(args), _precisions(args)
    results = run_distributed(
        cases, precisions, ranks, quick=args.quick, algorithms=args.algorithm, drift=not args.no_drift
    )
    from portopt.conformance.report import ReportWriter

    meta = {"command": _command_line(), "quick": args.quick, "distributed": ranks}
    writer = ReportWriter(args.report_dir, meta, planned=len(results)) if args.report_dir else None
    return _finish(results, args, started, writer)


def _record(args: argparse.Namespace) -> int:
    from rich.console import Console

    from portopt.conformance.golden import record

    console = Console()
    cases = _cases(args)
    started = time.perf_counter()
    path = record(cases, args.out, progress=lambda c: console.print(f"recorded {c.name}", markup=False))
    console.print(f"wrote {len(cases)} case(s) to {path} in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from portopt.conformance.golden import GoldenError, load, verify_reference
    from portopt.conformance.results import FAIL

    console = Console()
    started = time.perf_counter()
    try:
        golden = load(args.golden)
    except GoldenError as exc:
        print(f"portopt conformance check: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    entries = list(enumerate(golden.cases()))
    if args.case:
        from portopt.conformance.cases import matches

        entries = [e for e in entries if matches(e[1][0].name, args.case)]
    results: list[RunResult] = []
    runnable = []
    for index, (case, source) in entries:
        verified = verify_reference(golden, index, case, source)
        results.append(verified)
        if verified.status == FAIL:
            console.print(f"{case.name}: {verified.reason}", style="red", markup=False)
        else:
            runnable.append((case, source))
    from portopt.conformance.runner import plan

    impls, precisions = _implementations(args), _precisions(args)
    jobs = plan([c for c, _ in runnable], impls, precisions, args.device or ["cpu"])
    meta = {
        "command": _command_line(),
        "golden": str(args.golden),
        "recorded_on": golden.manifest.get("machine", ""),
    }
    ran, writer, interrupted = _execute(args, jobs, meta, sources={c.name: s for c, s in runnable})
    return _finish(results + ran, args, started, writer, interrupted)


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console

    from portopt.backends import available
    from portopt.conformance.candidates import FAMILIES
    from portopt.conformance.cases import build_cases
    from portopt.conformance.precision import PRECISIONS, policy_unavailable_reason

    console = Console()
    console.print("[bold]backends[/bold]")
    for row in available():
        console.print(f"  {row.name}: {'available' if row.usable else 'unavailable'} ({row.reason})", markup=False)
    console.print("[bold]other implementations (--impl)[/bold]: " + ", ".join(FAMILIES) + ", pkg.module:Name@algorithm")
    console.print("[bold]precisions[/bold]")
    for p in PRECISIONS.values():
        reason = policy_unavailable_reason(p)
        console.print(f"  {p.name}: {p.summary}{'' if reason is None else ' (' + reason + ')'}", markup=False)
    for quick in (True, False):
        cases = build_cases(quick=quick)
        console.print(f"[bold]{'quick' if quick else 'full'} cases ({len(cases)})[/bold]")
        for c in cases:
            console.print(f"  {c.name}: {c.describe()}", markup=False)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Dispatch ``portopt conformance`` and its subcommands; the exit code."""
    command = getattr(args, "conformance_command", None)
    for name, default in (
        ("algorithm", None),
        ("spec", None),
        ("quick", False),
        ("case", None),
        ("no_drift", False),
        ("no_diagnose", False),
        ("workers", None),
        ("time_limit", None),
        ("allow_skips", False),
    ):
        if not hasattr(args, name):
            setattr(args, name, default)
    if command == "record":
        return _record(args)
    if command == "check":
        return _check(args)
    if command == "list":
        return _list(args)
    return _run_suite(args)


COMMAND = Subcommand(
    name="conformance",
    help="check backends and other implementations against the float64 reference, number by number",
    add_arguments=add_arguments,
    run=run,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m portopt.conformance``: the same command without the ``portopt`` front."""
    from portopt.cli import USAGE_ERROR

    parser = argparse.ArgumentParser(prog="portopt conformance", description=COMMAND.help)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    try:
        return run(args)
    except UsageError as exc:
        print(f"portopt conformance: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


__all__ = ["COMMAND", "add_arguments", "main", "run"]
