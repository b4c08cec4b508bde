"""An infinite gradient makes an infinite moment; an update that clips the moment keeps a finite step.

SophiaG's ``min(|m|/(ρ·bs·h + ε), 1)`` and Lion's ``sign`` turn ``m = ±inf`` into a step of ``±lr``
(sophia-opt's ``mul_``/``add_`` moment update does exactly that). ``lerp(m, g, 1 − β)`` would make that
moment NaN the next step, and the parameter NaN: the generic backend keeps the spec's arithmetic for
algorithms torch.optim does not have (torch.optim's own use ``lerp``, and stay bit-identical to it).
Truth: the float64 reference backend.
"""

from __future__ import annotations

import math

import pytest
import torch

import portopt

GRADS = ([0.1, 0.2, 0.3, 0.4], [math.inf, -math.inf, math.nan, 0.1], [0.1, 0.2, 0.3, 0.4], [-0.3, 0.2, 0.1, 0.5])


def _run(make: type[torch.optim.Optimizer], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    param = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.3, 0.1]))
    optimizer = make([param], lr=0.01, weight_decay=0.1, backend=backend)  # type: ignore[call-arg]
    for grad in GRADS:
        param.grad = torch.tensor(grad)
        optimizer.step()
    return param.detach().clone(), optimizer.state[param]["exp_avg"].clone()


@pytest.mark.parametrize(
    ("make", "backend"),
    # compiled declines SophiaG (its step input bs): the generic backend is where it runs
    [(portopt.SophiaG, "torch"), (portopt.Lion, "torch"), (portopt.Lion, "compiled")],
    ids=["SophiaG-torch", "Lion-torch", "Lion-compiled"],
)
def test_a_clipped_update_stays_finite_after_an_infinite_gradient(make: type, backend: str) -> None:
    param, moment = _run(make, backend)
    expected_param, expected_moment = _run(make, "reference")
    # Elements 0 and 1 saw +inf/-inf: the moment stays infinite, the parameter moves by finite steps.
    assert torch.isinf(moment[:2]).all()
    assert torch.equal(torch.sign(moment[:2]), torch.tensor([1.0, -1.0]))
    assert torch.isfinite(param[[0, 1, 3]]).all()
    assert torch.equal(torch.isnan(param), torch.isnan(expected_param))  # the NaN gradient as the reference
    finite = torch.tensor([True, True, False, True])
    # float32 steps of lr-sized updates: a few float32 ulps of |p| <= 1 from the float64 reference
    assert torch.allclose(param[finite], expected_param[finite], rtol=0, atol=1e-6)
    assert torch.equal(torch.isinf(moment), torch.isinf(expected_moment))
