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
or a ``build(spec) -> StepFunction`` callable). The exit code is 0 when nothing failed
(skips are listed with their reasons), 1 when a case failed or crashed, 2 for bad usage.
A run that checked nothing is not a pass: the exit code is also 1, with a one-line reason,
when every run was skipped, when nothing ran on a device named by ``--device`` (absent
here), or when an implementation named by ``--impl`` or ``--backend`` ran nothing (an
unknown flag such as ``--impl torch.optim:foo=bar``); ``--allow-skips`` accepts such runs.
"""

from __future__ import annotations

import argparse
import fnmatch
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
        help="fp32, bf16, fp16+master, bf16+master, fp64 (repeatable; default: fp32, bf16, fp16+master)",
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


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """``name`` equals a pattern or matches it as a glob (case names contain ``[``, a glob character)."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _cases(args: argparse.Namespace) -> list[Case]:
    from portopt.cli_options import load_user_spec
    from portopt.conformance.cases import build_cases, spec_cases

    try:
        specs = [load_user_spec(target) for target in args.spec or ()]
        cases = build_cases(args.algorithm, quick=args.quick) if args.algorithm or not specs else []
        for spec in specs:
            cases += spec_cases(spec, quick=args.quick)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.case:
        cases = [c for c in cases if _matches(c.name, args.case)]
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


def _run_with_progress(
    jobs: list[tuple[Case, Implementation, Precision, str]],
    args: argparse.Namespace,
    sources: dict[str, ProblemSource] | None = None,
) -> list[RunResult]:
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from portopt.conformance.runner import RunOptions, run_jobs

    options = RunOptions(drift=not args.no_drift, diagnose=not args.no_diagnose)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    ) as progress:
        task = progress.add_task("conformance", total=len(jobs))

        def advance(result: RunResult) -> None:
            mark = {"pass": "[green]pass", "fail": "[red]FAIL", "error": "[red]ERROR", "skip": "[dim]skip"}[
                result.status
            ]
            what = escape(f"{result.case} | {result.implementation} | {result.precision}")
            progress.update(task, advance=1, description=f"{mark}[/] {what}")

        return run_jobs(jobs, options=options, progress=advance, sources=sources)


def _finish(results: list[RunResult], args: argparse.Namespace, started: float, meta: dict[str, Any]) -> int:
    from rich.console import Console

    from portopt.conformance.report import terminal_report, write_reports
    from portopt.conformance.results import ERROR, FAIL

    console = Console()
    terminal_report(results, console)
    elapsed = time.perf_counter() - started
    console.print(f"wall time {elapsed:.1f} s")
    if args.report_dir:
        paths = write_reports(results, args.report_dir, {**meta, "wall_seconds": round(elapsed, 1)})
        console.print("reports: " + ", ".join(str(p) for p in paths))
    if any(r.status in (FAIL, ERROR) for r in results):
        return EXIT_FAILED
    too_little = skip_failure(results, args)
    if too_little is not None:
        print(f"portopt conformance: error: {too_little} (pass --allow-skips to accept this)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _command_line(args: argparse.Namespace) -> str:
    return " ".join(
        f"{k}={v}" for k, v in sorted(vars(args).items()) if not k.startswith("_") and v not in (None, False)
    )


def _run_suite(args: argparse.Namespace) -> int:
    from portopt.conformance.runner import plan

    started = time.perf_counter()
    cases, impls, precisions = _cases(args), _implementations(args), _precisions(args)
    jobs = plan(cases, impls, precisions, args.device or ["cpu"])
    results = _run_with_progress(jobs, args)
    return _finish(results, args, started, {"command": _command_line(args), "quick": args.quick})


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
        entries = [e for e in entries if _matches(e[1][0].name, args.case)]
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
    results += _run_with_progress(jobs, args, sources={c.name: s for c, s in runnable})
    meta = {
        "command": _command_line(args),
        "golden": str(args.golden),
        "recorded_on": golden.manifest.get("machine", ""),
    }
    return _finish(results, args, started, meta)


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
