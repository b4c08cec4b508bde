"""The pytest plugin: ``pytest --pyargs portopt.conformance --portopt-backend=NAME``.

Registered through the ``pytest11`` entry point, so its options exist in every pytest run
of an environment where portopt is installed; it imports nothing heavy until the
conformance tests are collected. Each (case, implementation, precision, device) becomes
one test of :mod:`portopt.conformance.test_conformance`: it passes, fails with the
diagnosis as its message, or is skipped with the reason (absent device, backend or
precision policy).

Options (each repeatable): ``--portopt-backend``, ``--portopt-impl`` (``torch.optim``,
``torch.optim:fused=True``, ``pkg.mod:Name@algorithm``), ``--portopt-precision``,
``--portopt-device``, ``--portopt-algorithm``; ``--portopt-full`` runs the full case set
instead of the quick one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from portopt.conformance.candidates import Implementation
    from portopt.conformance.cases import Case
    from portopt.conformance.precision import Precision

Job = tuple["Case", "Implementation", "Precision", str]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("portopt-conformance", "portopt conformance suite (pytest --pyargs portopt.conformance)")
    group.addoption(
        "--portopt-backend", action="append", default=[], metavar="NAME", help="backend under test (default: all)"
    )
    group.addoption(
        "--portopt-impl",
        action="append",
        default=[],
        metavar="IMPL",
        help="other implementation: torch.optim, pkg.mod:Name@algorithm",
    )
    group.addoption(
        "--portopt-precision",
        action="append",
        default=[],
        metavar="P",
        help="precision (default: fp32, bf16, fp16+master)",
    )
    group.addoption("--portopt-device", action="append", default=[], metavar="DEV", help="torch device (default: cpu)")
    group.addoption("--portopt-algorithm", action="append", default=[], metavar="A", help="algorithm (default: all)")
    group.addoption(
        "--portopt-full", action="store_true", default=False, help="the full case set instead of the quick one"
    )


def _option(config: pytest.Config, name: str) -> Any:
    # getoption with a default works whether or not the plugin's options were registered.
    return config.getoption(name, default=None)


def conformance_jobs(config: pytest.Config) -> list[Job]:
    """The (case, implementation, precision, device) combinations the options select."""
    from portopt.conformance.candidates import parse_implementation
    from portopt.conformance.cases import build_cases
    from portopt.conformance.precision import DEFAULT_PRECISIONS, get_precision
    from portopt.conformance.runner import backend_implementations, plan

    backends = _option(config, "--portopt-backend") or None
    impl_texts = _option(config, "--portopt-impl") or []
    impls: list[Implementation] = []
    if backends or not impl_texts:
        impls += backend_implementations(backends)
    impls += [parse_implementation(text) for text in impl_texts]
    precisions = [get_precision(p) for p in (_option(config, "--portopt-precision") or DEFAULT_PRECISIONS)]
    devices = _option(config, "--portopt-device") or ["cpu"]
    cases = build_cases(_option(config, "--portopt-algorithm") or None, quick=not _option(config, "--portopt-full"))
    return plan(cases, impls, precisions, devices)


def job_id(job: Job) -> str:
    case, impl, precision, device = job
    return f"{case.name}|{impl.name}|{precision.name}|{device}"
