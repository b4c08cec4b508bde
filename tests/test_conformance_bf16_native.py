"""The two bfloat16 contracts: ``bf16`` (float32 arithmetic rounded once on store) and
``bf16-native`` (every operation rounded to bfloat16, torch.optim's arithmetic on bf16 tensors).

torch.optim is the independent implementation of op-by-op bfloat16 arithmetic here; its
tolerance is derived from a bfloat16 rounding at every operation of the spec.
"""

from __future__ import annotations

import torch

from portopt.conformance.candidates import TORCH_OPTIM_CLASSES, OptimizerFamily
from portopt.conformance.cases import build_cases
from portopt.conformance.precision import PRECISIONS
from portopt.conformance.results import FAIL, PASS
from portopt.conformance.runner import RunOptions, run_matrix


def test_torch_optim_in_bf16_fails_the_bf16_contract_and_says_which_one_it_follows() -> None:
    """torch.optim on bfloat16 tensors rounds after every op: not bf16's "float32 arithmetic rounded once
    on store". The failure says that is the contract, and bf16-native (op-by-op bfloat16) passes it."""
    impl = OptimizerFamily("torch.optim", TORCH_OPTIM_CLASSES)
    cases = build_cases(["adam", "sgd"])
    options = RunOptions(diagnose=False)
    strict = run_matrix(cases, [impl], [PRECISIONS["bf16"]], options=options)
    assert any(r.status == FAIL for r in strict)
    for r in strict:
        if r.status == FAIL:
            assert "float32 arithmetic, rounded once on store" in r.reason
            assert "--precision bf16-native" in r.reason
    native = run_matrix(cases, [impl], [PRECISIONS["bf16-native"]], options=options)
    assert native
    assert all(r.status == PASS for r in native), [(r.case, r.reason) for r in native if r.status != PASS]


def test_bf16_native_still_catches_a_wrong_formula() -> None:
    """The op-by-op allowance is wider, not blind: ε inside the square root still fails."""
    from portopt.conformance import mutants
    from portopt.conformance.candidates import StepFunctionImplementation

    impl = StepFunctionImplementation("eps-inside", mutants.adam_eps_inside_sqrt, "adam")
    (result,) = run_matrix(build_cases(["adam"])[:1], [impl], [PRECISIONS["bf16-native"]], options=RunOptions())
    assert result.status == FAIL
    assert result.diagnosis is not None
    assert result.diagnosis.matched is not None
    assert result.diagnosis.matched.name == "eps-inside-sqrt"


def test_bf16_native_rounds_every_operation_but_not_the_hyperparameters() -> None:
    native = PRECISIONS["bf16-native"]
    assert native.param_dtype == native.state_dtype == native.compute_dtype == torch.bfloat16
    assert native.unit_roundoff == 2.0**-8
    assert native.scalar_roundoff == 2.0**-24  # lr, betas and bias corrections stay host / float32 numbers
    assert PRECISIONS["bf16"].unit_roundoff == 2.0**-24
