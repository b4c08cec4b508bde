"""Adafactor and CAME on a weight matrix: the state bytes a real step allocates equal the accounting, and
grow with rows + cols, not rows x cols."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

import portopt
from portopt.precision.memory import memory_for_params
from portopt.precision.policy import parse_policy
from portopt.precision.quantize import Q8State


def _storages(tensors: Sequence[torch.Tensor]) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def _held(state: dict[str, object]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for key, value in state.items():
        if key == "step":
            continue
        out += [value.codes, value.absmax] if isinstance(value, Q8State) else [value]  # type: ignore[list-item]
    return out


@pytest.mark.parametrize(("name", "policy"), [("Adafactor", "torch"), ("CAME", "torch"), ("CAME", "q8-states")])
@pytest.mark.parametrize(("rows", "cols"), [(512, 384), (1024, 768)])
def test_measured_state_bytes_equal_the_accounting(name: str, policy: str, rows: int, cols: int) -> None:
    weight = torch.randn(rows, cols, requires_grad=True)
    bias = torch.randn(cols, requires_grad=True)
    opt = getattr(portopt, name)([weight, bias], precision=None if policy == "torch" else policy)
    (weight.square().sum() + bias.square().sum()).backward()
    opt.step()
    spec = opt.group_spec(opt.param_groups[0])
    accounting = memory_for_params(spec, parse_policy(policy), [weight, bias])
    measured = {p: _storages(_held(opt.state[p])) for p in (weight, bias)}
    assert sum(accounting.states.values()) == sum(measured.values())
    per_element = 1 if name == "Adafactor" else (4 if policy == "torch" else 1)  # CAME keeps m (8-bit: 1 byte)
    factors = measured[weight] - (per_element * rows * cols if name == "CAME" else 0)
    if name == "CAME" and policy != "torch":  # and the absmax of m's blocks
        factors -= 4 * opt.state[weight]["exp_avg"].absmax.numel()
    # Adafactor: R and C; CAME: R, C, R', C' (float32): O(rows + cols)
    assert factors == (1 if name == "Adafactor" else 2) * 4 * (rows + cols)
    assert measured[bias] == _storages(_held(opt.state[bias])) == (4 if name == "Adafactor" else 8) * cols


def test_adafactor_state_of_a_3d_tensor_is_factored_per_slice() -> None:
    p = torch.randn(3, 40, 50, requires_grad=True)
    opt = portopt.Adafactor([p])
    p.square().sum().backward()
    opt.step()
    assert opt.state[p]["row_var"].shape == (3, 40, 1)
    assert opt.state[p]["col_var"].shape == (3, 1, 50)
    assert "variance" not in opt.state[p]


def test_cli_memory_adafactor(capsys: pytest.CaptureFixture[str]) -> None:
    from portopt.cli import main

    assert main(["memory", "adafactor", "--model-shapes", "4096x4096,4096"]) == 0
    out = capsys.readouterr().out
    assert "state.row_var" in out
    assert "16.00 KiB" in out
    assert main(["memory", "adafactor"]) == 0
    assert "variance: not kept for a large matrix" in capsys.readouterr().out
