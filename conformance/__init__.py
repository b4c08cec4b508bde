"""The conformance suite, imported as ``portopt.conformance``: is an implementation the spec?

Every backend in the registry, and any third-party optimizer through an adapter, runs a
registry of cases (algorithm x options x hyperparameters x problem) in several
precisions; each step is compared, element by element, parameters, states and step
counters, with the float64 reference under a documented tolerance model, and a failure
is diagnosed ("computes Adam with ε inside the square root").

Modules: :mod:`~portopt.conformance.cases` (the case registry),
:mod:`~portopt.conformance.problems` (deterministic problems),
:mod:`~portopt.conformance.precision`, :mod:`~portopt.conformance.tolerance` (the model),
:mod:`~portopt.conformance.bounds` (reference with error bounds),
:mod:`~portopt.conformance.chain` (the re-synced reference trajectory),
:mod:`~portopt.conformance.candidates` (implementations under test and adapters),
:mod:`~portopt.conformance.session` (one implementation judged step by step),
:mod:`~portopt.conformance.runner`, :mod:`~portopt.conformance.variants`, :mod:`~portopt.conformance.patterns` (which
elements differ) and :mod:`~portopt.conformance.diagnosis`, :mod:`~portopt.conformance.golden`,
:mod:`~portopt.conformance.suite` (a whole run: units, :mod:`~portopt.conformance.parallel`
workers, :mod:`~portopt.conformance.progress`, interruption),
:mod:`~portopt.conformance.report` (JSON, JUnit; :mod:`~portopt.conformance.report_html`,
:mod:`~portopt.conformance.report_markdown`, :mod:`~portopt.conformance.report_terminal`,
:mod:`~portopt.conformance.summary`, :mod:`~portopt.conformance.plots`),
:mod:`~portopt.conformance.cli` (``portopt conformance``), :mod:`~portopt.conformance.plugin`
(pytest), :mod:`~portopt.conformance.mutants` (deliberately wrong implementations) and
:mod:`~portopt.conformance.catch` (which cases catch which mutants).

The names below are imported on first use, so importing this package (as pytest does
for the plugin) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Case": "cases",
    "build_cases": "cases",
    "CASE_TABLE": "cases",
    "Precision": "precision",
    "PRECISIONS": "precision",
    "Tolerance": "tolerance",
    "Override": "tolerance",
    "OVERRIDES": "tolerance",
    "BackendImplementation": "candidates",
    "OptimizerAdapter": "candidates",
    "OptimizerFamily": "candidates",
    "StepFunctionImplementation": "candidates",
    "parse_implementation": "candidates",
    "RunOptions": "runner",
    "backend_implementations": "runner",
    "run_case": "runner",
    "run_matrix": "runner",
    "RunResult": "results",
    "write_reports": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'portopt.conformance' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"portopt.conformance.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
