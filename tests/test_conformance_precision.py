"""Precision policies under test: float32 master weights and skipped non-finite steps.

The front end (``portopt.Optimizer(precision="mixed-fp16", skip_nonfinite=True)``) is run
against the reference chain kept in the master's dtype; the master copy is compared as
well as the float16 parameter, and an implementation that ignores the policy is caught.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import portopt
from portopt.conformance.candidates import PORTOPT_CLASSES, OptimizerAdapter, OptimizerFamily
from portopt.conformance.cases import build_cases
from portopt.conformance.precision import PRECISIONS, policy_unavailable_reason
from portopt.conformance.results import FAIL, PASS
from portopt.conformance.runner import backend_implementations, run_matrix

MASTER = PRECISIONS["fp16+master"]
pytestmark = pytest.mark.skipif(
    policy_unavailable_reason(MASTER) is not None, reason=f"{policy_unavailable_reason(MASTER)}"
)


def test_master_weights_pass_and_the_master_is_compared() -> None:
    impls = [*backend_implementations(["torch"]), OptimizerFamily("portopt", PORTOPT_CLASSES)]
    results = run_matrix(build_cases(["adam", "sgd", "lion"]), impls, [MASTER, PRECISIONS["bf16+master"]])
    assert results
    for r in results:
        assert r.status == PASS, f"{r.case} {r.implementation} {r.precision}: {r.reason}"
        assert "master" in r.lockstep_curves  # the float32 copy is judged, not only the float16 parameter
        assert "master" in r.drift_curves


class _NoMaster(portopt.Adam):
    """Takes precision= but ignores it: float16 states, no master copy."""

    def __init__(self, params: Any, precision: object = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)


def test_an_optimizer_that_ignores_the_policy_is_caught() -> None:
    (result,) = run_matrix(
        build_cases(["adam"])[:1], [OptimizerAdapter("adam", _NoMaster, label="no-master")], [MASTER]
    )
    assert result.status == FAIL
    assert result.first_failure is not None
    assert result.first_failure.message in (
        "state 'master' is missing",
        "state 'exp_avg' is stored in torch.float16, less precise than the torch.float32 that precision "
        "fp16+master requires",
    )


def _skip_cases() -> list[Any]:
    return [c for c in build_cases(["adam", "lion"], quick=False) if c.requires == "found_inf"]


def test_a_step_with_inf_or_nan_gradients_is_skipped_whole() -> None:
    impls = [*backend_implementations(["torch"]), OptimizerFamily("portopt", PORTOPT_CLASSES)]
    results = run_matrix(_skip_cases(), impls, [PRECISIONS["fp32"], MASTER])
    assert len(results) == 8
    assert all(r.status == PASS for r in results), [(r.case, r.implementation, r.reason) for r in results]


class _NoSkip(torch.optim.Adam):
    """Accepts skip_nonfinite but steps anyway: inf/NaN reach the parameters."""

    def __init__(self, params: Any, skip_nonfinite: bool = False, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)


def test_an_optimizer_that_does_not_skip_is_caught() -> None:
    (case,) = [c for c in _skip_cases() if c.algorithm == "adam"]
    (result,) = run_matrix([case], [OptimizerAdapter("adam", _NoSkip, label="no-skip")], [PRECISIONS["fp32"]])
    assert result.status == FAIL
    assert result.first_failure is not None
    assert result.first_failure.step == 2  # the step whose gradients hold inf and NaN
    assert "the step with inf/NaN gradients (step 2) was not skipped" in result.reason
