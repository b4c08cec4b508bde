"""The problems are discriminating: each mutant is caught by the cases meant to catch it, and the
problems keep their regimes apart so that a diagnosis can name one cause."""

from __future__ import annotations

import itertools

import pytest

from portopt.conformance.cases import build_cases, find_case
from portopt.conformance.catch import ELEMENT_MUTANTS, catalogue, measure
from portopt.conformance.patterns import SIMD_BLOCKS
from portopt.conformance.problems import FULL, GRAD_EVERY_STEP, QUICK, Layout, Problem, Regime, TensorSpec

NEEDS_FULL_SET = {"large-tail-skipped", "nonfinite-zeroed"}
"""Element mutants only the full set's large and non-finite problems reveal."""


def _causes(t: TensorSpec) -> set[str]:
    """The causes a diagnosis may name that this tensor carries."""
    causes = set()
    if t.layout is not Layout.CONTIGUOUS:
        causes.add(f"layout:{t.layout.value}")
    if t.regime in (Regime.HUGE, Regime.TINY, Regime.ZERO):
        causes.add(f"regime:{t.regime.value}")
    if t.zero_at:
        causes.add("zero-step")
    if t.grads != GRAD_EVERY_STEP:
        causes.add(f"grads:{t.grads}")
    return causes


@pytest.mark.parametrize("problem", [QUICK, FULL], ids=lambda p: p.name)
def test_no_tensor_carries_two_causes(problem: Problem) -> None:
    for i, t in enumerate(problem.tensors):
        assert len(_causes(t)) <= 1, f"{problem.label(i)} confounds {sorted(_causes(t))}"
    present = set().union(*(_causes(t) for t in problem.tensors))
    assert {"layout:strided", "layout:transposed", "regime:huge", "regime:tiny", "zero-step"} <= present


@pytest.mark.parametrize("problem", [QUICK, FULL], ids=lambda p: p.name)
def test_dense_sizes_tell_simd_widths_apart(problem: Problem) -> None:
    dense = [t.numel for t in problem.tensors if t.layout is not Layout.STRIDED and t.numel > 0]
    for a, b in itertools.combinations(SIMD_BLOCKS, 2):
        assert any(n // a * a != n // b * b for n in dense), (a, b)


def test_the_quick_set_catches_every_element_mutant_it_has_the_features_for() -> None:
    case = find_case("adam[wd=0.1]/quick", build_cases(["adam"]))
    matrix = measure([case])
    caught = matrix.caught()
    assert len(caught) == len(catalogue("adam", [case]))
    for name, _, _ in ELEMENT_MUTANTS:
        assert caught[f"adam/{name}"] is (name not in NEEDS_FULL_SET), name
    assert all(v for k, v in caught.items() if k.startswith("adam/variant:")), [k for k, v in caught.items() if not v]


def test_a_mutant_that_equals_the_spec_on_a_case_is_not_caught_there() -> None:
    """The measure is honest both ways: SGD without momentum keeps no state, so never writing its
    states back changes nothing (its step counter is still compared, and right)."""
    case = find_case("sgd[wd=0.1,maximize]/quick", build_cases(["sgd"]))
    caught = measure([case]).caught()
    assert caught["sgd/states-frozen"] is False
    assert caught["sgd/shared-step-counter"] is True  # the odd-step tensor's counter is wrong
    assert caught["sgd/skip-one-element"] is True


@pytest.mark.slow
def test_the_full_set_catches_the_mutants_the_quick_set_cannot() -> None:
    cases = [c for c in build_cases(["adam"], quick=False) if c.name.endswith(("/large", "/nonfinite"))]
    caught = measure(cases).caught()
    for name in NEEDS_FULL_SET:
        assert caught[f"adam/{name}"], name
