"""Slots per call fitted to the group: a small group gets a small graph, a later one reuses a wider one.

* :func:`~portopt.backends.compiled_plan.fitted_arity` is the next power of two at or above the
  group's count of one kind, capped at the configured arity (checked against ``2**ceil(log2 n)``).
* A step function with 16-slot serial graphs compiles a 4-slot graph for a group of three
  same-kind tensors, a 16-slot one for a group of twenty, then steps a group of two on the
  smallest graph it has that is wide enough, compiling nothing; every group's parameters agree with
  the float64 reference backend.
"""

from __future__ import annotations

import math

import pytest
import torch

from portopt.algorithms import get_spec
from portopt.backends.compiled import CompiledStep, compile_unavailable_reason
from portopt.backends.compiled_plan import fitted_arity
from portopt.backends.reference import build_reference_step
from portopt.lowering.backend import ParamState

pytestmark = pytest.mark.skipif(
    compile_unavailable_reason("cpu") is not None, reason=str(compile_unavailable_reason("cpu"))
)


@pytest.mark.parametrize("most", [1, 2, 4, 16])
def test_fitted_arity_is_the_next_power_of_two_capped(most: int) -> None:
    for members in range(1, 70):
        expected = min(2 ** math.ceil(math.log2(members)), most)
        assert fitted_arity(members, most) == expected, (members, most)


def _step_group(step: CompiledStep, sizes: list[int], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two steps of ``step`` and of the reference on fresh 1-D parameters of ``sizes``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in sizes]
    ref_params = [p.double() for p in params]
    reference = build_reference_step(step.spec)
    states: list[ParamState] = [{} for _ in params]
    ref_states: list[ParamState] = [{} for _ in params]
    hypers = {**step.spec.defaults(), "lr": 0.01, "weight_decay": 0.05}
    for _ in range(2):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        step(params, grads, states, hypers)
        reference(ref_params, [g.double() for g in grads], ref_states, hypers)
    return params, ref_params


def test_a_small_group_compiles_a_small_graph_and_a_later_one_reuses_a_wider_graph() -> None:
    step = CompiledStep(get_spec("lion"), serial_arity=16, parallel_arity=4)
    arities: list[list[int]] = []
    for sizes, seed in (([7, 11, 13], 0), ([17 + i for i in range(20)], 1), ([5, 9], 2)):
        params, expected = _step_group(step, sizes, seed)
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-6)
        arities.append(sorted(k.arity for k in step.graphs))
    assert arities == [[4], [4, 16], [4, 16]]  # the group of two ran on the 4-slot graph, nothing compiled
