"""Deliberately wrong implementations are caught, and the diagnosis names the mistake.

The wrong implementations (:mod:`portopt.conformance.mutants`) are written in torch ops,
independently of the spec; the same code without its bug is the control and must pass.
Element-level mistakes (SIMD bodies or tails, an overflow) are named as element patterns,
separately from the algebraic variants; two algebraic differences at once are named together.
"""

from __future__ import annotations

import pytest
import torch

from portopt.conformance import mutants
from portopt.conformance.candidates import OptimizerAdapter, StepFunctionImplementation, parse_implementation
from portopt.conformance.cases import build_cases, find_case
from portopt.conformance.precision import PRECISIONS
from portopt.conformance.problems import QUICK, Regime
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
        (mutants.adam_eps_clamp, "eps-clamp", "adam[wd=0.1]/quick"),
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


def test_two_differences_at_once_are_both_named() -> None:
    """RAdam as a tutorial writes it: the paper's threshold 4 and an uncorrected sqrt(v_t). No single
    variant explains it; the pair does, and the summary names both."""
    impl = StepFunctionImplementation("tutorial-radam", mutants.radam_tutorial, "radam")
    result = _run("radam[beta2=0.9]/quick", impl)
    assert result.status == FAIL
    assert result.diagnosis is not None
    assert not any(s.matched for s in result.diagnosis.scores if "+" not in s.name)
    assert result.diagnosis.matched is not None, result.reason
    assert set(result.diagnosis.matched.name.split("+")) == {"threshold=4.0", "no-second-moment-correction"}
    assert "two differences" in result.reason
    assert "threshold=4.0" in result.reason
    assert "uncorrected second moment" in result.reason


@pytest.mark.parametrize("case_name", ["sgd[momentum,wd=0.1,dampening=0.1]/quick", "adam[wd=0.1]/quick"])
@pytest.mark.parametrize("block", [16, 8])
def test_simd_bodies_left_unchanged_are_an_element_pattern_not_a_variant(case_name: str, block: int) -> None:
    """Only each tensor's tail moves (torch 2.13's CPU fused SGD in bf16): named as that pattern, with
    the block width read from the data, and no weight-decay or nesterov variant claimed."""
    algorithm = case_name.split("[")[0]
    impl = StepFunctionImplementation(f"tail-only-{block}", mutants.simd_tail_only("torch", block), algorithm)
    result = _run(case_name, impl)
    assert result.status == FAIL
    assert result.diagnosis is not None
    assert result.diagnosis.pattern == f"simd-body:{block}", result.reason
    assert result.diagnosis.matched is None
    assert f"full {block}-element blocks" in result.reason
    assert "kept their previous value" in result.reason
    assert "weight decay" not in result.reason
    assert "nesterov" not in result.reason


def test_a_missing_tail_loop_is_named() -> None:
    impl = StepFunctionImplementation("no-tail", mutants.torch_simd_body_only, "adam")
    result = _run("adam[wd=0.1]/quick", impl)
    assert result.diagnosis is not None
    assert result.diagnosis.pattern == "simd-tail:16", result.reason
    assert "remainder loop" in result.reason


def test_a_float32_overflow_of_huge_gradients_is_named_as_that() -> None:
    """sqrt(v̂) as (v̂²)^¼ overflows float32 only where gradients are huge; the huge tensor is contiguous,
    so the diagnosis cannot blame a layout."""
    impl = StepFunctionImplementation("overflow", mutants.adam_overflowing_square, "adam")
    result = _run("adam[wd=0.1]/quick", impl)
    assert result.status == FAIL
    assert result.diagnosis is not None
    assert result.diagnosis.pattern == "overflow", result.reason
    assert "float32 overflow in the huge-gradient regime" in result.reason
    assert "strided" not in result.reason
    huge = {QUICK.label(i) for i, t in enumerate(QUICK.tensors) if t.regime is Regime.HUGE}
    assert set(result.failed_tensors) == huge


def test_torch_cpu_fused_sgd_in_bf16_is_diagnosed_as_a_simd_pattern() -> None:
    """The issue's finding on torch 2.13's CPU ``_fused_sgd_`` in bfloat16: full vector blocks keep
    their values, only tails move. A torch release that fixes it passes (nothing to diagnose)."""
    impl = parse_implementation("torch.optim:fused=True")
    result = run_case(find_case("sgd[momentum,wd=0.1,dampening=0.1]/quick", CASES), impl, PRECISIONS["bf16"])
    if result.status == PASS:
        pytest.skip(f"torch {torch.__version__}'s CPU fused SGD passes in bf16: nothing to diagnose")
    assert result.diagnosis is not None
    assert (result.diagnosis.pattern or "").startswith("simd-body:"), result.reason
    assert result.diagnosis.matched is None
    for wrong in ("decoupled weight decay", "no weight-decay", "nesterov"):
        assert wrong not in result.reason


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
