"""Checkpoints are data from elsewhere: values that cannot occur are refused and the optimizer is unchanged.

Truth: a checkpoint of a real run, edited one field at a time; after each refused load the
optimizer's state, param groups and parameters are compared bit for bit with a copy taken
before, and the next step is compared with the step of an optimizer that never saw the file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import portopt
from portopt.optim.state_dict import CheckpointError
from portopt.precision.quantize import Q8State


def trained(policy: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, portopt.Optimizer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 3)).to(dtype)  # 5120 weights: 8-bit under q8
    opt = portopt.AdamW(net.parameters(), lr=1e-2, precision=policy, backend="torch")
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 64, dtype=dtype)).float().square().mean().backward()
        opt.step()
    return net, opt


def snapshot(net: nn.Module, opt: portopt.Optimizer) -> list[Any]:
    """Everything a load could change, as plain values (8-bit states through their saved dict)."""
    state = copy.deepcopy(opt.state_dict())
    return [[p.detach().clone() for p in net.parameters()], state]


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _set_step(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(checkpoint: dict[str, Any]) -> None:
        for state in checkpoint["state"].values():
            state["step"] = value

    return edit


EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "step -1": (_set_step(torch.tensor(-1.0)), "'step' is -1.0; a step count is a whole number from 0"),
    "step 1.5": (_set_step(torch.tensor(1.5)), "'step' is 1.5"),
    "step nan": (_set_step(torch.tensor(math.nan)), "'step' is nan"),
    "step inf": (_set_step(math.inf), "'step' is inf"),
    "step int -3": (_set_step(-3), "'step' is -3.0"),
    "step 2**70": (_set_step(2**70), "at most 9007199254740992 steps"),
    "step a string": (_set_step("2"), "'step' is '2'; a number or a 1-element tensor"),
    "step a vector": (_set_step(torch.ones(2)), "'step' has shape (2,)"),
    "step complex": (_set_step(torch.tensor(1 + 0j)), "a real number is needed"),
    "state shape": (
        lambda c: c["state"][0].__setitem__("exp_avg", torch.zeros(3)),
        "state 'exp_avg' has shape (3,), the parameter needs (80, 64)",
    ),
    "state dtype": (
        lambda c: c["state"][0].__setitem__("exp_avg", torch.zeros(80, 64, dtype=torch.int64)),
        "state 'exp_avg' has dtype torch.int64; a floating dtype is needed",
    ),
    "state not a tensor": (lambda c: c["state"][0].__setitem__("exp_avg", [0.0]), "state 'exp_avg' is a list"),
    "unknown state": (lambda c: c["state"][0].__setitem__("payload", torch.zeros(1)), "unexpected: payload"),
    "lr negative": (lambda c: c["param_groups"][0].__setitem__("lr", -1.0), "Invalid learning rate: -1.0"),
    "lr nan": (lambda c: c["param_groups"][0].__setitem__("lr", math.nan), "Invalid learning rate: nan"),
    "betas": (lambda c: c["param_groups"][0].__setitem__("betas", (1.5, 0.9)), "Invalid beta parameter at index 0"),
    "precision unknown": (lambda c: c["param_groups"][0].__setitem__("precision", "fp4"), "unknown preset 'fp4'"),
    "param_groups not a list": (lambda c: c.__setitem__("param_groups", 3), "'param_groups' is a int, not a list"),
    "group not a dict": (lambda c: c.__setitem__("param_groups", [3]), "param group 0 is not a dict"),
    "state not a dict": (lambda c: c.__setitem__("state", [3]), "'state' is a list, not a dict"),
    "8-bit state into a plain policy": (
        lambda c: c["state"][0].__setitem__("exp_avg", Q8State.zeros((80, 64), "signed", "cpu").to_dict()),
        "state 'exp_avg' is 8-bit in the checkpoint, but this group's precision policy (torch)",
    ),
}


@pytest.mark.parametrize("label", sorted(EDITS))
def test_an_impossible_checkpoint_is_refused_and_changes_nothing(label: str) -> None:
    edit, message = EDITS[label]
    net, opt = trained()
    checkpoint = copy.deepcopy(opt.state_dict())
    edit(checkpoint)
    before = snapshot(net, opt)
    with pytest.raises(CheckpointError, match=_escape(message)):
        opt.load_state_dict(checkpoint)
    assert_same(snapshot(net, opt), before)
    _assert_steps_like_an_untouched_twin(net, opt)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def _assert_steps_like_an_untouched_twin(net: nn.Module, opt: portopt.Optimizer) -> None:
    twin_net, twin = trained()
    for model, optimizer in ((net, opt), (twin_net, twin)):
        torch.manual_seed(1)
        optimizer.zero_grad()
        model(torch.randn(4, 64)).square().mean().backward()
        optimizer.step()
    for p, q in zip(net.parameters(), twin_net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_mixed_fp16_checkpoint_does_not_load_into_a_mixed_bf16_optimizer() -> None:
    """Before: it loaded, and then every step raised. The policy must fit the parameters' dtype."""
    _, fp16 = trained("mixed-fp16", torch.float16)
    net, bf16 = trained("mixed-bf16", torch.bfloat16)
    before = snapshot(net, bf16)
    with pytest.raises(CheckpointError, match=r"expects fp16 parameters, but param group 0, parameter 0 .* is bf16"):
        bf16.load_state_dict(fp16.state_dict())
    assert_same(snapshot(net, bf16), before)
    bf16.zero_grad()
    net(torch.randn(4, 64, dtype=torch.bfloat16)).float().square().mean().backward()
    bf16.step()  # still steps: its own policy was kept


def test_a_valid_8_bit_checkpoint_still_round_trips() -> None:
    """The checks refuse only what cannot occur: a real q8 checkpoint loads and resumes bit-exactly."""
    net, opt = trained("q8-states")
    checkpoint = copy.deepcopy(opt.state_dict())
    twin_net, twin = trained("q8-states")
    twin.load_state_dict(checkpoint)
    assert_same(snapshot(twin_net, twin), snapshot(net, opt))
