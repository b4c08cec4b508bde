"""``differentiable=True``: autograd runs through the step, as through torch.optim's.

The hypergradient test of torch's differentiable mode: a parameter ``q`` (a non-leaf copy of
a leaf ``w``), one step with ``lr`` a tensor that requires grad, then ``dL/dlr`` and ``dL/dw``
of a loss of the new ``q``. Truths, in the same test: torch.optim's differentiable mode, and
central finite differences of portopt's own step in float64. Under float64 as the default
dtype torch keeps its step counter in float64 and the two agree to 1e-12; under float32 torch
computes its bias corrections from a float32 counter (portopt in float64), so they agree to
float32 rounding. Where torch's differentiable mode takes no tensor lr (RMSprop, Adamax,
Adagrad) it is compared with a float lr; where it detaches a value (SGD's first momentum
buffer) finite differences decide.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import portopt

TENSOR_LR_CASES: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("Adam", {"weight_decay": 0.1}),
    ("Adam", {"amsgrad": True}),
    ("AdamW", {}),
    ("NAdam", {}),
    ("RAdam", {}),
]
FLOAT_LR_CASES: list[tuple[str, dict[str, Any]]] = [
    ("RMSprop", {"centered": True, "momentum": 0.5}),  # torch's differentiable RMSprop, Adamax and Adagrad
    ("Adamax", {"weight_decay": 0.1}),  # take no tensor lr: compared with a float lr (gradient w.r.t. w)
    ("Adagrad", {"lr_decay": 0.01, "weight_decay": 0.1}),
]
LR = 0.05


@pytest.fixture
def float64_default() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(6, dtype=torch.float64, generator=gen) for _ in range(3))  # type: ignore[return-value]


def hypergradient(
    library: Any,
    name: str,
    kwargs: dict[str, Any],
    lr: float = LR,
    steps: int = 1,
    *,
    lr_tensor: bool = True,
    w0: torch.Tensor | None = None,
    offset: float = 0.5,
) -> tuple[float, float | None, torch.Tensor]:
    """The loss after ``steps`` steps, its gradient w.r.t. ``lr`` (``None`` for a float lr) and w.r.t. the
    initial parameter. Step ``k``'s gradient is ``(k + 1)·g + offset·w`` with ``w`` detached: a
    constant of the step, as ``.grad`` is to an optimizer, never a function of ``lr``."""
    start, g, target = problem()
    w = (start if w0 is None else w0).clone().requires_grad_(True)
    rate = torch.tensor(lr, dtype=torch.float64, requires_grad=True) if lr_tensor else lr
    q = w.clone()  # a non-leaf parameter, as torch's differentiable tests use
    opt = getattr(library, name)([q], lr=rate, differentiable=True, **kwargs)
    for step in range(steps):
        q.grad = g * (step + 1) + offset * w.detach()
        opt.step()
    loss = ((q - target) ** 2).sum()
    wanted = [rate, w] if lr_tensor else [w]
    grads = torch.autograd.grad(loss, wanted)  # type: ignore[arg-type]
    dlr = float(grads[0]) if lr_tensor else None
    return float(loss.detach()), dlr, grads[-1]


def finite_difference_lr(name: str, kwargs: dict[str, Any], steps: int = 1, h: float = 1e-6) -> float:
    up = hypergradient(portopt, name, kwargs, LR + h, steps)[0]
    down = hypergradient(portopt, name, kwargs, LR - h, steps)[0]
    return (up - down) / (2 * h)


def finite_difference_w(name: str, kwargs: dict[str, Any], h: float = 1e-6) -> torch.Tensor:
    """``dL/dw`` by central differences, with gradients that do not depend on ``w`` (``offset=0``)."""
    start = problem()[0]
    out = torch.empty_like(start)
    for i in range(start.numel()):
        bump = torch.zeros_like(start)
        bump[i] = h
        up = hypergradient(portopt, name, kwargs, w0=start + bump, offset=0.0)[0]
        down = hypergradient(portopt, name, kwargs, w0=start - bump, offset=0.0)[0]
        out[i] = (up - down) / (2 * h)
    return out


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize(("name", "kwargs"), TENSOR_LR_CASES, ids=[f"{n}-{k}" for n, k in TENSOR_LR_CASES])
def test_hypergradient_matches_torch_and_finite_differences(name: str, kwargs: dict[str, Any]) -> None:
    loss, dlr, dw = hypergradient(portopt, name, kwargs)
    theirs_loss, theirs_dlr, theirs_dw = hypergradient(torch.optim, name, kwargs)
    assert loss == pytest.approx(theirs_loss, rel=1e-12)
    assert dlr == pytest.approx(theirs_dlr, rel=1e-10)
    torch.testing.assert_close(dw, theirs_dw, rtol=1e-10, atol=1e-12)
    assert dlr == pytest.approx(finite_difference_lr(name, kwargs), rel=1e-6)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize(("name", "kwargs"), FLOAT_LR_CASES, ids=[f"{n}-{k}" for n, k in FLOAT_LR_CASES])
def test_gradient_through_the_step_matches_torch_with_a_float_lr(name: str, kwargs: dict[str, Any]) -> None:
    loss, _, dw = hypergradient(portopt, name, kwargs, lr_tensor=False)
    theirs_loss, _, theirs_dw = hypergradient(torch.optim, name, kwargs, lr_tensor=False)
    assert loss == pytest.approx(theirs_loss, rel=1e-12)
    torch.testing.assert_close(dw, theirs_dw, rtol=1e-10, atol=1e-12)
    _, dlr, _ = hypergradient(portopt, name, kwargs)  # portopt takes a tensor lr here too
    assert dlr == pytest.approx(finite_difference_lr(name, kwargs), rel=1e-6)


@pytest.mark.usefixtures("float64_default")
def test_sgd_momentum_gradient_keeps_the_first_buffer_where_torch_detaches_it() -> None:
    """torch.optim.SGD's first momentum buffer is ``grad.detach().clone()``: its gradient w.r.t. the
    parameter (through weight decay) is dropped. portopt's is the derivative of the step (finite
    differences); w.r.t. ``lr`` both agree."""
    kwargs = {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}
    loss, dlr, dw = hypergradient(portopt, "SGD", kwargs, offset=0.0)
    theirs_loss, theirs_dlr, theirs_dw = hypergradient(torch.optim, "SGD", kwargs, offset=0.0)
    assert loss == pytest.approx(theirs_loss, rel=1e-12)
    assert dlr == pytest.approx(theirs_dlr, rel=1e-10)
    torch.testing.assert_close(dw, finite_difference_w("SGD", kwargs), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(dw, theirs_dw)


@pytest.mark.parametrize("name", ["Adam", "NAdam"])
def test_hypergradient_with_float32_step_counters_agrees_with_torch_to_float32_rounding(name: str) -> None:
    """Under the float32 default dtype torch computes ``1 − β^t`` from a float32 counter; portopt in float64."""
    loss, dlr, _ = hypergradient(portopt, name, {})
    theirs_loss, theirs_dlr, _ = hypergradient(torch.optim, name, {})
    assert loss == pytest.approx(theirs_loss, rel=1e-6)
    assert dlr == pytest.approx(theirs_dlr, rel=1e-4)
    assert dlr == pytest.approx(finite_difference_lr(name, {}), rel=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("RAdam", {"betas": (0.9, 0.9)}),  # crosses the rectification threshold at step 6: no NaN from the branch
        ("SGD", {"momentum": 0.9, "dampening": 0.1}),
        ("Adagrad", {"lr_decay": 0.01}),
        ("RMSprop", {"momentum": 0.5}),
        ("LAMB", {"weight_decay": 0.1}),
        ("AdaBelief", {}),
    ],
    ids=str,
)
def test_hypergradient_over_several_steps_matches_finite_differences(name: str, kwargs: dict[str, Any]) -> None:
    _, dlr, _ = hypergradient(portopt, name, kwargs, steps=8)
    assert dlr is not None
    assert math.isfinite(dlr)
    assert dlr == pytest.approx(finite_difference_lr(name, kwargs, steps=8), rel=1e-5)


def test_a_leaf_parameter_is_refused_as_torch_refuses_it() -> None:
    """An in-place update of a leaf that requires grad is an autograd error, in torch as in portopt."""
    for library in (torch.optim, portopt):
        param = torch.nn.Parameter(torch.ones(3))
        opt = library.SGD([param], lr=0.1, differentiable=True)
        param.grad = torch.ones(3)
        with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
            opt.step()


def test_differentiable_states_carry_the_graph_and_the_step_counter_does_not() -> None:
    lr = torch.tensor(0.1, requires_grad=True)
    param = torch.ones(3, requires_grad=True).clone()
    opt = portopt.Adam([param], lr=lr, differentiable=True)
    param.grad = torch.ones(3)
    opt.step()
    state = opt.state[param]
    assert state["exp_avg"].grad_fn is not None
    assert not state["step"].requires_grad
    state["step"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="`requires_grad` is not supported for `step` in differentiable mode"):
        opt.step()


def _diff_fn(
    p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], opt_class: Any, kwargs: dict[str, Any], *ignored: Any
) -> tuple[torch.Tensor, ...]:
    """torch's own differentiable-optimizer test function (test/optim/test_optim.py): one step from a
    given state; the outputs are the new parameter and every state that requires grad."""
    p = p.clone()
    p.grad = grad
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    opt = opt_class([p], **kwargs)
    opt.state[p].update(state)
    opt.step()
    return (p, *(v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.requires_grad))


def _rand(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, dtype=torch.float64, generator=_GEN, requires_grad=True)


_GEN = torch.Generator().manual_seed(7)
_STEP = {"step": torch.tensor(10.0, dtype=torch.float64)}
GRADCHECK_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("SGD", {"momentum": 0.9, "weight_decay": 0.1}, {"momentum_buffer": _rand(10)}),  # no step: torch's SGD keeps none
    (
        "Adam",
        {"amsgrad": True, "weight_decay": 0.1},
        {**_STEP, "exp_avg": _rand(10), "exp_avg_sq": _rand(10), "max_exp_avg_sq": _rand(10)},
    ),
    (
        "NAdam",
        {},
        {
            **_STEP,
            "exp_avg": _rand(10),
            "exp_avg_sq": _rand(10),
            "mu_product": torch.tensor(1.0, dtype=torch.float64, requires_grad=True),
        },
    ),
    ("RAdam", {}, {**_STEP, "exp_avg": _rand(10), "exp_avg_sq": _rand(10)}),
    ("RMSprop", {"momentum": 0.9}, {**_STEP, "square_avg": _rand(10), "momentum_buffer": _rand(10)}),
    ("Adagrad", {"lr_decay": 0.1}, {**_STEP, "sum": _rand(10)}),
    ("Adamax", {}, {**_STEP, "exp_avg": _rand(10), "exp_inf": _rand(10)}),
]


@pytest.mark.parametrize(("name", "kwargs", "state"), GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck_of_one_step_from_any_state_as_torchs_own_test(
    name: str, kwargs: dict[str, Any], state: dict[str, Any]
) -> None:
    """Jacobians of the new parameter and states w.r.t. the parameter, gradient and states, numerically checked
    (``torch.autograd.gradcheck``), on torch.optim's class as on portopt's."""
    p, grad = _rand(10), _rand(10)
    for library in (torch.optim, portopt):
        options = {"lr": 0.9, "differentiable": True, **kwargs}
        inputs = (p, grad, state, getattr(library, name), options, *state.values())
        assert torch.autograd.gradcheck(_diff_fn, inputs), library.__name__
