"""Bad input: torch.optim's errors where torch has one, and a failing step changes nothing.

Constructor errors are compared with what torch.optim itself raises for the same
arguments (same exception type, our message starts with torch's). A step that fails its
checks (a sparse gradient, an invalid value set on a group after construction, a
corrupted state) must leave every parameter, state and step counter of every group as
it was, and create no state.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import portopt
from portopt.lowering.checks import SparseGradientError, StepInputError

BAD_ARGUMENTS: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {"lr": -1.0}),
    ("SGD", {"lr": torch.tensor([0.1, 0.2])}),
    ("SGD", {"momentum": -0.5}),
    ("SGD", {"weight_decay": -1e-3}),
    ("SGD", {"nesterov": True}),
    ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}),
    ("SGD", {"fused": True, "foreach": True}),
    ("Adagrad", {"lr": -1.0}),
    ("Adagrad", {"lr_decay": -0.1}),
    ("Adagrad", {"weight_decay": -0.1}),
    ("Adagrad", {"initial_accumulator_value": -0.1}),
    ("Adagrad", {"eps": -1e-10}),
    ("Adagrad", {"fused": True, "foreach": True}),
    ("RMSprop", {"lr": -1.0}),
    ("RMSprop", {"eps": -1.0}),
    ("RMSprop", {"momentum": -0.9}),
    ("RMSprop", {"weight_decay": -1.0}),
    ("RMSprop", {"alpha": -0.5}),
    ("Adam", {"lr": -1.0}),
    ("Adam", {"lr": torch.tensor(0.1), "foreach": True}),
    ("Adam", {"eps": -1e-8}),
    ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, -0.1)}),
    ("Adam", {"betas": (0, 0.999)}),
    ("Adam", {"weight_decay": -1.0}),
    ("Adam", {"fused": True, "foreach": True}),
    ("Adam", {"fused": True, "differentiable": True}),
    ("AdamW", {"lr": -0.5}),
    ("AdamW", {"betas": (0.9, 1.5)}),
    ("AdamW", {"weight_decay": -1e-2}),
    ("NAdam", {"lr": -1.0}),
    ("NAdam", {"eps": -1.0}),
    ("NAdam", {"betas": (-0.1, 0.999)}),
    ("NAdam", {"betas": (0.9, 1.0)}),
    ("NAdam", {"weight_decay": -1.0}),
    ("NAdam", {"momentum_decay": -4e-3}),
    ("Adamax", {"lr": -1.0}),
    ("Adamax", {"eps": -1.0}),
    ("Adamax", {"betas": (1.0, 0.999)}),
    ("Adamax", {"weight_decay": -1.0}),
    ("RAdam", {"lr": -1.0}),
    ("RAdam", {"eps": -1.0}),
    ("RAdam", {"betas": (0.9, 1.0)}),
    ("RAdam", {"weight_decay": -1.0}),
]


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize(("name", "kwargs"), BAD_ARGUMENTS, ids=lambda v: str(v))
def test_constructor_errors_match_torch(name: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(Exception) as theirs:  # noqa: PT011 - the type is torch's, asserted below
        getattr(torch.optim, name)(_params(), **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        getattr(portopt, name)(_params(), **kwargs)
    assert str(ours.value).startswith(str(theirs.value)), (str(ours.value), str(theirs.value))


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("AdaBelief", {"lr": -1.0}, r"Invalid learning rate: -1.0 \(adabelief: lr must satisfy 0 <= lr\)"),
        ("AdaBelief", {"betas": (0.9, 1.0)}, r"Invalid beta parameter at index 1: 1.0 \(adabelief: beta2 must"),
        ("LAMB", {"eps": -1e-6}, r"Invalid epsilon value: -1e-06 \(lamb: eps must satisfy 0 <= eps\)"),
        ("LAMB", {"weight_decay": -0.1}, r"Invalid weight_decay value: -0.1"),
        (
            "Lion",
            {"betas": (1.2, 0.99)},
            r"Invalid beta parameter at index 0: 1.2 \(lion: beta1 must satisfy 0 <= beta1 < 1\)",
        ),
        ("Lion", {"lr": float("nan")}, r"Invalid learning rate: nan"),
        # torch trips over the ambiguous truth value of a 2-element tensor here; we say what is wrong.
        ("Adam", {"betas": (torch.tensor([0.9, 0.8]), torch.tensor(0.999))}, "'beta1' must be a number or a 1-element"),
    ],
)
def test_constructor_errors_name_parameter_value_and_range(name: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        getattr(portopt, name)(_params(), **kwargs)


def test_generic_optimizer_rejects_unknown_hyperparameters() -> None:
    with pytest.raises(
        TypeError, match=r"unknown hyperparameter\(s\) 'momentum'; accepted: lr, betas \(beta1, beta2\)"
    ):
        portopt.Optimizer(_params(), "adam", momentum=0.9)


def test_invalid_group_is_not_added() -> None:
    opt = portopt.Adam(_params(), lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 0: 2\.0"):
        opt.add_param_group({"params": _params(), "betas": (2.0, 0.999)})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------------------------
# A failing step changes nothing, in any group.


def two_group_model() -> tuple[nn.Linear, nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 3), nn.Linear(3, 2)
    groups: list[dict[str, Any]] = [{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.01}]
    opt = portopt.Adam(groups, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        second(first(torch.randn(5, 4))).square().sum().backward()
        opt.step()
    opt.zero_grad()
    second(first(torch.randn(5, 4))).square().sum().backward()
    return first, second, opt


def everything(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
        "state": copy.deepcopy({id(p): dict(s) for p, s in opt.state.items()}),
    }


def assert_unchanged(opt: torch.optim.Optimizer, before: dict[str, Any]) -> None:
    after = everything(opt)
    for x, y in zip(after["params"], before["params"], strict=True):
        assert torch.equal(x, y)
    assert after["state"].keys() == before["state"].keys()
    for key, state in before["state"].items():
        assert after["state"][key].keys() == state.keys()
        for name, value in state.items():
            assert torch.equal(after["state"][key][name], value), name


def test_sparse_gradient_in_the_last_group_changes_nothing() -> None:
    _, second, opt = two_group_model()
    before = everything(opt)
    assert second.bias.grad is not None
    second.bias.grad = second.bias.grad.to_sparse()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients") as info:
        opt.step()
    assert isinstance(info.value, SparseGradientError)
    assert isinstance(info.value, ValueError)
    assert_unchanged(opt, before)


def test_invalid_value_set_on_a_group_after_construction_changes_nothing() -> None:
    _, _, opt = two_group_model()
    before = everything(opt)
    opt.param_groups[1]["betas"] = (0.9, 1.0)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1\.0"):
        opt.step()
    assert_unchanged(opt, before)


def test_corrupted_state_changes_nothing() -> None:
    _, second, opt = two_group_model()
    opt.state[second.weight]["exp_avg"] = torch.zeros(5)
    before = everything(opt)
    with pytest.raises(StepInputError, match=r"state 'exp_avg' has shape \(5,\), expected \(2, 3\)"):
        opt.step()
    assert_unchanged(opt, before)


def test_new_parameters_get_no_state_when_the_step_fails() -> None:
    _, second, opt = two_group_model()
    extra = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(2)
    assert second.bias.grad is not None
    second.bias.grad = second.bias.grad.to_sparse()
    before = everything(opt)
    with pytest.raises(SparseGradientError):
        opt.step()
    assert extra not in opt.state
    assert_unchanged(opt, before)
