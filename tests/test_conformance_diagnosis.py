"""Deliberately wrong implementations are caught, and the diagnosis names the mistake.

The wrong implementations (:mod:`portopt.conformance.mutants`) are written in torch ops,
independently of the spec; the same code without its bug is the control and must pass.
"""

from __future__ import annotations

import pytest
import torch

from portopt.conformance import mutants
from portopt.conformance.candidates import OptimizerAdapter, StepFunctionImplementation
from portopt.conformance.cases import build_cases, find_case
from portopt.conformance.precision import PRECISIONS
from portopt.conformance.results import FAIL, LOCKSTEP, PASS
from portopt.conformance.runner import RunOptions, run_case

FP32 = PRECISIONS["fp32"]
CASES = build_cases(quick=True)


def _run(case_name: str, impl: object, **kw: object):
    return run_case(find_case(case_name, CASES), impl, FP32, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("case_name", ["adam[wd=0.1]/quick", "adamw[wd=0.1]/quick"])
def test_the_hand_written_control_passes(case_name: str) -> None:
    algorithm = case_name.split("[")[0]
    result = _run(case_name, StepFunctionImplementation("hand-written", mutants.adam_correct, algorithm))
    assert result.status == PASS, result.reason


@pytest.mark.parametrize(
    ("build", "variant", "case_name"),
    [
        (mutants.adam_eps_inside_sqrt, "eps-inside-sqrt", "adam[wd=0.1]/quick"),
        (mutants.adam_beta_power_t_minus_1, "beta-power-t-minus-1", "adam[wd=0.1]/quick"),
        (mutants.adam_missing_weight_decay, "no-weight-decay", "adam[wd=0.1]/quick"),
        (mutants.adamw_coupled_weight_decay, "coupled-weight-decay", "adamw[wd=0.1]/quick"),
        (mutants.radam_paper_threshold, "threshold=4.0", "radam[beta2=0.9]/quick"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_a_wrong_implementation_is_caught_and_named(build, variant: str, case_name: str) -> None:
    algorithm = case_name.split("[")[0].split("/")[0]
    result = _run(case_name, StepFunctionImplementation(f"mutant-{variant}", build, algorithm))
    assert result.status == FAIL
    assert result.first_failure is not None
    assert result.first_failure.mode == LOCKSTEP
    assert result.diagnosis is not None
    assert result.diagnosis.matched is not None, result.reason
    assert result.diagnosis.matched.name == variant, [(s.name, s.worst) for s in result.diagnosis.scores[:3]]
    # Only the named variant fits: the runner-up misses by a wide margin.
    assert [s.name for s in result.diagnosis.scores if s.matched] == [variant]
    assert result.diagnosis.matched.description in result.reason


def test_the_first_divergence_says_where() -> None:
    result = _run("adam[wd=0.1]/quick", StepFunctionImplementation("mutant", mutants.adam_eps_inside_sqrt, "adam"))
    first = result.first_failure
    assert first is not None
    assert first.step == 1
    assert first.quantity == "param"
    assert first.normalised > 100
    # ε inside the square root matters where |g| is near sqrt(ε): the tiny-gradient tensor t3.
    assert first.tensor.startswith("t3 ")
    assert f"step {first.step}" in result.reason
    assert first.tensor in result.reason


def test_an_update_skipped_on_one_element_is_localised() -> None:
    impl = StepFunctionImplementation("skip-one", mutants.torch_skip_one_element, "adam")
    result = _run("adam[wd=0.1]/quick", impl)
    assert result.status == FAIL
    first = result.first_failure
    assert first is not None
    assert first.count_over == 1
    assert first.index == [mutants.SKIPPED_INDEX]
    assert result.diagnosis is not None
    assert result.diagnosis.matched is None
    assert result.diagnosis.localized is not None
    assert result.diagnosis.localized.startswith("the update is skipped on tensor t4 (1031,): 1 of 1031")
    assert f"[{mutants.SKIPPED_INDEX}]" in result.diagnosis.localized


def test_torch_adam_put_under_test_as_adamw_is_diagnosed_as_coupled_decay() -> None:
    """A vendor mapping AdamW to its Adam kernel: weight decay lands in the gradient."""
    impl = OptimizerAdapter("adamw", torch.optim.Adam, label="torch.optim.Adam")
    result = _run("adamw[wd=0.1]/quick", impl)
    assert result.status == FAIL
    assert result.diagnosis is not None
    assert result.diagnosis.matched is not None
    assert result.diagnosis.matched.name == "coupled-weight-decay"


def test_no_diagnosis_when_asked_not_to() -> None:
    impl = StepFunctionImplementation("mutant", mutants.adam_eps_inside_sqrt, "adam")
    result = _run("adam[wd=0.1]/quick", impl, options=RunOptions(diagnose=False))
    assert result.status == FAIL
    assert result.diagnosis is None


def test_a_crashing_implementation_is_an_error_not_a_crash() -> None:
    def build(spec):
        def step(params, grads, states, hypers):
            raise RuntimeError("kernel launch failed")

        return step

    result = _run("sgd[wd=0.1,maximize]/quick", StepFunctionImplementation("crash", build, "sgd"))
    assert result.status == "error"
    assert "kernel launch failed" in result.reason
