"""torch.optim under test through the adapter: no false alarms for the algorithms torch has.

torch.optim is an independent implementation of the same arithmetic (each spec follows
it), with its own evaluation order (``lerp`` for moments, ``addcdiv``, host or device
scalars); every case of an algorithm torch has must pass in float32, the default
implementation as well as the foreach and fused ones, and every other case must be
skipped with a reason.
"""

from __future__ import annotations

import pytest

from portopt.conformance.candidates import TORCH_OPTIM_CLASSES, OptimizerFamily, parse_implementation
from portopt.conformance.cases import build_cases
from portopt.conformance.precision import PRECISIONS
from portopt.conformance.results import ERROR, PASS, SKIP
from portopt.conformance.runner import RunOptions, run_matrix

FP32 = PRECISIONS["fp32"]
TORCH_DEFECTS = {"adafactor": "ZeroDivisionError"}
"""torch.optim.Adafactor divides by ``numel() ** 0.5`` (and by an empty axis's length): a problem with a zero-size
tensor makes it raise; portopt's RMS of an empty tensor is 0."""


def _check(results):
    for r in results:
        if r.algorithm in TORCH_DEFECTS and r.status == ERROR:
            assert TORCH_DEFECTS[r.algorithm] in r.reason, r.reason
        elif r.algorithm in TORCH_OPTIM_CLASSES and "threshold" not in r.case and "has no option" not in r.reason:
            assert r.status == PASS, f"{r.case} on {r.implementation}: {r.reason}"
        else:
            assert r.status == SKIP, f"{r.case} on {r.implementation}: {r.status} {r.reason}"
            assert "has no" in r.reason


def test_torch_optim_default_passes_every_quick_case_it_has() -> None:
    results = run_matrix(build_cases(), [OptimizerFamily("torch.optim", TORCH_OPTIM_CLASSES)], [FP32])
    _check(results)
    assert {r.algorithm for r in results if r.status == PASS} == set(TORCH_OPTIM_CLASSES) - set(TORCH_DEFECTS)
    skipped = {r.algorithm: r.reason for r in results if r.status == SKIP}
    assert skipped["lion"] == "torch.optim has no lion optimizer"


def test_torch_optim_foreach_passes() -> None:
    impl = parse_implementation("torch.optim:foreach=True")
    results = run_matrix(build_cases(["adam", "rmsprop", "sgd"]), [impl], [FP32], options=RunOptions(drift=False))
    assert results
    assert all(r.status == PASS for r in results), [(r.case, r.reason) for r in results if r.status != PASS]


def test_torch_optim_fused_cpu_kernels_ignore_strides() -> None:
    """A finding, not a false alarm: torch 2.13's CPU ``_fused_*`` kernels read parameters and
    gradients through their data pointers, so a strided (every-other-row) parameter view gets
    the wrong elements updated. Every other tensor of the problem matches, and the diagnosis says so."""
    impl = parse_implementation("torch.optim:fused=True")
    results = run_matrix(build_cases(["adamw", "sgd"]), [impl], [FP32], options=RunOptions(drift=False))
    assert results
    for r in results:
        if r.status == PASS:  # a torch release that fixes its kernels
            continue
        assert r.first_failure is not None
        assert r.first_failure.tensor == "t6 (6, 11)", r.reason
        assert r.diagnosis is not None
        assert r.diagnosis.localized is not None
        assert r.diagnosis.localized.startswith("only tensors strided"), r.diagnosis.localized


@pytest.mark.slow
def test_torch_optim_default_passes_the_full_set() -> None:
    results = run_matrix(build_cases(quick=False), [OptimizerFamily("torch.optim", TORCH_OPTIM_CLASSES)], [FP32])
    for r in results:
        if r.case.endswith("/skip-nonfinite"):
            assert r.status == SKIP
        elif r.algorithm in TORCH_OPTIM_CLASSES and "threshold" not in r.case:
            assert r.status == PASS, f"{r.case}: {r.reason}"
