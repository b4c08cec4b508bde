"""Sparse gradients: SGD and Adagrad take them as torch.optim does, and portopt has a SparseAdam.

Every case runs torch.optim on the same sparse gradient stream (duplicate indices included,
plain and hybrid 2-D layouts) in the same test. torch sums a sparse gradient's duplicates in
another order and Adagrad divides before scaling where portopt's lowering scales first, so
SGD and Adagrad agree to float32 rounding; SparseAdam issues torch's arithmetic and agrees bit
for bit on 1-d parameters (to one float32 rounding on hybrid rows). The errors are torch's:
same type, same message.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import portopt

STEPS = 6


def sparse_grads(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    """COO gradients with 5 entries each (rows repeat: duplicates to sum), rows only (hybrid) for 2-D."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        rows = torch.randint(0, shape[0], (5,), generator=gen)
        values = torch.randn(5, *shape[1:], generator=gen)
        grads.append(torch.sparse_coo_tensor(rows[None], values, shape))
    return grads


def run(
    library: Any, name: str, kwargs: dict[str, Any], shape: tuple[int, ...]
) -> tuple[torch.Tensor, Any, nn.Parameter]:
    param = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    opt = getattr(library, name)([param], **kwargs)
    for grad in sparse_grads(shape, STEPS):
        param.grad = grad
        opt.step()
    return param.detach().clone(), opt, param


CASES: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    ("SGD", {"lr": 0.1, "foreach": True}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "maximize": True}),
    ("Adagrad", {"lr": 0.1, "eps": 0.0}),
    ("SparseAdam", {"lr": 0.01}),
    ("SparseAdam", {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-3, "maximize": True}),
]


@pytest.mark.parametrize("shape", [(10,), (10, 3)], ids=["1-d", "hybrid 2-d"])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_sparse_gradients_match_torch(name: str, kwargs: dict[str, Any], shape: tuple[int, ...]) -> None:
    ours, opt, param = run(portopt, name, kwargs, shape)
    theirs, theirs_opt, theirs_param = run(torch.optim, name, kwargs, shape)
    if name == "SparseAdam" and len(shape) == 1:
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(ours).all()  # Adagrad with eps=0: rows never touched do not become 0/0
    for key, value in theirs_opt.state[theirs_param].items():
        mine = opt.state[param][key]
        expected = value.to_dense() if isinstance(value, torch.Tensor) and value.is_sparse else value
        torch.testing.assert_close(mine, torch.as_tensor(expected, dtype=mine.dtype), rtol=1e-6, atol=1e-6)


def test_rows_never_in_a_gradient_keep_their_values_and_states() -> None:
    """SparseAdam (and Adagrad) move only the rows a gradient holds: no decay of the others' moments."""
    shape = (10, 3)
    param = nn.Parameter(torch.randn(shape))
    before = param.detach().clone()
    opt = portopt.SparseAdam([param], lr=0.01)
    for _ in range(3):
        param.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 3), shape)
        opt.step()
    untouched = [r for r in range(10) if r not in (1, 4)]
    assert torch.equal(param.detach()[untouched], before[untouched])
    assert not opt.state[param]["exp_avg"][untouched].any()
    assert float(opt.state[param]["step"]) == 3.0


def _error(make: Any) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 - compared with torch's below
        make()
    return info.value


def _step_with(library: Any, name: str, grad: torch.Tensor, **kwargs: Any) -> None:
    param = nn.Parameter(torch.ones(grad.shape))
    opt = getattr(library, name)([param], **kwargs)
    param.grad = grad
    opt.step()


SPARSE = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (4,))


@pytest.mark.parametrize(
    ("name", "grad", "kwargs"),
    [
        ("Adam", SPARSE, {}),
        ("AdamW", SPARSE, {}),
        ("NAdam", SPARSE, {}),
        ("RAdam", SPARSE, {}),
        ("RMSprop", SPARSE, {}),
        ("Adamax", SPARSE, {}),
        ("Adagrad", SPARSE, {"weight_decay": 0.1}),
        ("SGD", SPARSE, {"weight_decay": 0.1}),
        ("SGD", SPARSE, {"fused": True}),
        ("SparseAdam", torch.ones(4), {}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_what_torch_refuses_is_refused_with_its_error(name: str, grad: torch.Tensor, kwargs: dict[str, Any]) -> None:
    theirs = _error(lambda: _step_with(torch.optim, name, grad, **kwargs))
    ours = _error(lambda: _step_with(portopt, name, grad, **kwargs))
    assert isinstance(theirs, RuntimeError), theirs
    assert isinstance(ours, RuntimeError), ours
    if name == "SGD":  # torch fails inside an op; portopt says which argument
        assert "does not support sparse gradients" in str(ours) or "weight_decay" in str(ours)
    elif name == "AdamW":  # torch.optim.AdamW reports itself as Adam
        assert str(ours) == str(theirs).replace("Adam", "AdamW", 1)
    else:
        assert str(ours).startswith(str(theirs)), (str(ours), str(theirs))


@pytest.mark.parametrize(
    ("params", "kwargs"),
    [
        ([nn.Parameter(torch.ones(3))], {"lr": 0.0}),
        ([nn.Parameter(torch.ones(3))], {"eps": 0.0}),
        ([nn.Parameter(torch.ones(3))], {"betas": (1.0, 0.9)}),
        ([nn.Parameter(torch.ones(3))], {"lr": torch.tensor([0.1, 0.2])}),
        ([nn.Parameter(SPARSE.clone())], {}),
        ([nn.Parameter(torch.ones(3, dtype=torch.complex64))], {}),
    ],
    ids=["lr=0", "eps=0", "beta1=1", "2-element lr", "sparse param", "complex param"],
)
def test_sparse_adam_constructor_errors_are_torchs(params: list[nn.Parameter], kwargs: dict[str, Any]) -> None:
    theirs = _error(lambda: torch.optim.SparseAdam(params, **kwargs))
    ours = _error(lambda: portopt.SparseAdam(params, **kwargs))
    assert type(theirs) is ValueError
    assert isinstance(ours, ValueError)
    assert str(ours).startswith(str(theirs)), (str(ours), str(theirs))


def test_sparse_adam_checkpoints_move_between_torch_and_portopt() -> None:
    shape = (10, 3)
    _, ours, param = run(portopt, "SparseAdam", {"lr": 0.01}, shape)
    target = nn.Parameter(param.detach().clone())
    theirs = torch.optim.SparseAdam([target], lr=0.01)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # torch keeps the loaded tensors: copy them
    back = portopt.SparseAdam([nn.Parameter(param.detach().clone())], lr=0.01)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    (grad,) = sparse_grads(shape, 1, seed=5)
    for opt in (ours, theirs, back):
        opt.param_groups[0]["params"][0].grad = grad
        opt.step()
    torch.testing.assert_close(target.detach(), param.detach(), rtol=2e-7, atol=1e-7)
    assert torch.equal(back.param_groups[0]["params"][0].detach(), param.detach())


def test_a_torch_sgd_checkpoint_with_a_sparse_momentum_buffer_loads() -> None:
    theirs_param = nn.Parameter(torch.ones(4))
    theirs = torch.optim.SGD([theirs_param], lr=0.1, momentum=0.9)
    theirs_param.grad = SPARSE.clone()
    theirs.step()
    assert theirs.state[theirs_param]["momentum_buffer"].is_sparse
    param = nn.Parameter(theirs_param.detach().clone())
    ours = portopt.SGD([param], lr=0.1, momentum=0.9)
    ours.load_state_dict(theirs.state_dict())
    for p, opt in ((param, ours), (theirs_param, theirs)):
        p.grad = SPARSE.clone()  # torch's sparse buffer takes only sparse gradients
        opt.step()
    torch.testing.assert_close(param.detach(), theirs_param.detach())
