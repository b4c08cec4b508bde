"""Complex parameters are stepped as torch.optim steps them: as ``torch.view_as_real``.

Two truths, both computed in each test: torch.optim on the complex parameter (its complex
kernels round weight decay and SGD's momentum in complex arithmetic, so agreement is to float32
rounding), and torch.optim on ``torch.view_as_real`` of the parameter, the semantics torch
documents, which portopt matches bit for bit where its lowering issues torch's calls (all but
NAdam and RAdam, see the README). States stay complex tensors, so checkpoints move to torch.optim.
For portopt's own algorithms the truth is the same portopt class on the real view.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import portopt

STEPS = 7
SHAPE = (4, 3)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}),
    ("Adagrad", {"initial_accumulator_value": 0.1, "lr_decay": 0.01}),
    ("RMSprop", {"centered": True, "momentum": 0.5}),
    ("NAdam", {"lr": 0.01}),
    ("RAdam", {"lr": 0.01}),
    ("Adamax", {"lr": 0.01}),
]
NOT_BIT_IDENTICAL = {"NAdam", "RAdam"}
PORTOPT_ONLY: list[tuple[str, dict[str, Any]]] = [
    ("LAMB", {"weight_decay": 0.1}),
    ("Lion", {"lr": 0.01}),
    ("AdaBelief", {}),
]


def run(library: Any, name: str, kwargs: dict[str, Any], as_complex: bool) -> tuple[torch.Tensor, Any, nn.Parameter]:
    """``STEPS`` steps on a complex problem (``as_complex``) or on its real view; the final parameter as a real view."""
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(SHAPE, dtype=torch.complex64, generator=gen)
    param = nn.Parameter(value.clone() if as_complex else torch.view_as_real(value).clone())
    opt = getattr(library, name)([param], **kwargs)
    for _ in range(STEPS):
        grad = torch.randn(SHAPE, dtype=torch.complex64, generator=gen)
        param.grad = grad if as_complex else torch.view_as_real(grad).clone()
        opt.step()
    out = torch.view_as_real(param.detach()) if as_complex else param.detach()
    return out.clone(), opt, param


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_complex_params_match_torch(name: str, kwargs: dict[str, Any]) -> None:
    ours, opt, param = run(portopt, name, kwargs, as_complex=True)
    theirs_complex, theirs_opt, theirs_param = run(torch.optim, name, kwargs, as_complex=True)
    theirs_real, _, _ = run(torch.optim, name, kwargs, as_complex=False)
    torch.testing.assert_close(ours, theirs_complex, rtol=2e-6, atol=1e-6)
    if name in NOT_BIT_IDENTICAL:
        torch.testing.assert_close(ours, theirs_real, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(ours, theirs_real)
    state, theirs_state = opt.state[param], theirs_opt.state[theirs_param]
    assert state.keys() == theirs_state.keys() | ({"step"} if name == "SGD" else set())
    for key, value in theirs_state.items():
        assert state[key].dtype == value.dtype, key  # complex states stay complex, per-tensor ones real
        torch.testing.assert_close(state[key], value, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "kwargs"), PORTOPT_ONLY, ids=[n for n, _ in PORTOPT_ONLY])
def test_portopt_algorithms_step_complex_params_as_their_real_view(name: str, kwargs: dict[str, Any]) -> None:
    ours, opt, param = run(portopt, name, kwargs, as_complex=True)
    real, _, _ = run(portopt, name, kwargs, as_complex=False)
    assert torch.equal(ours, real)
    assert all(v.is_complex() for k, v in opt.state[param].items() if k != "step")


def test_a_complex_checkpoint_moves_between_torch_and_portopt() -> None:
    _, ours, param = run(portopt, "Adam", {"lr": 0.01}, as_complex=True)
    target = nn.Parameter(param.detach().clone())
    theirs = torch.optim.Adam([target], lr=0.01)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # torch keeps the loaded tensors: copy them
    back = portopt.Adam([nn.Parameter(param.detach().clone())], lr=0.01)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    grad = torch.randn(SHAPE, dtype=torch.complex64, generator=torch.Generator().manual_seed(9))
    for opt in (ours, theirs, back):
        p = opt.param_groups[0]["params"][0]
        p.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(target.detach(), param.detach(), rtol=2e-6, atol=1e-6)
    assert torch.equal(back.param_groups[0]["params"][0].detach(), param.detach())


def test_complex_and_real_params_in_one_group() -> None:
    gen = torch.Generator().manual_seed(3)
    params = [
        nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=gen)),
        nn.Parameter(torch.randn(4, generator=gen)),
    ]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = portopt.Adam(params, lr=0.1), torch.optim.Adam(twins, lr=0.1)
    for _ in range(3):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-6)


def test_complex_params_with_a_precision_policy_are_refused() -> None:
    param = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    opt = portopt.Adam([param], precision="q8-states")
    param.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="complex parameters are stepped as stored"):
        opt.step()
    assert not opt.state
