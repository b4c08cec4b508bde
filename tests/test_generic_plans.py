"""The generic backend's planned steps (checked once, confirmed by a snapshot) and flat groups of small tensors.

Truths used: the float64 reference backend (same spec, independent interpreter) run through the same front
end, and torch.optim for bit-identity where the README promises it. Every run takes enough steps for the
plan to be built (the third step of the same inputs) and used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import portopt
from portopt.lowering.checks import StepInputError
from portopt.spec.errors import HyperparameterError

FLAT_ALGORITHMS = ("lion", "radam", "adabelief")
"""Element-wise algorithms not promised bit-identical to torch.optim: their small tensors run flat."""


def mixed_params(dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """Many one-element tensors and the awkward ones: 0-d, zero-size, odd sizes, 2-d, strided, one above the
    flat threshold."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,)] * 40 + [(), (0,), (3,), (2, 3), (5, 1), (7,), (1500,), (17,)]
    tensors = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    tensors.append(torch.randn(6, 4, generator=gen, dtype=dtype).t())  # non-contiguous
    tensors.append(torch.randn(3, 8, generator=gen, dtype=dtype)[:, ::2])  # strided
    return [torch.nn.Parameter(t) for t in tensors]


def gradient(t: int, i: int, p: Tensor) -> Tensor:
    gen = torch.Generator().manual_seed(1000 * t + i)
    return torch.randn(p.shape, generator=gen, dtype=p.dtype) * math.exp(math.sin(t + i))


def twin_runs(
    name: str, dtype: torch.dtype, steps: int, live: Callable[[int, int], bool] = lambda t, i: True
) -> tuple[list[Tensor], list[Tensor], portopt.Optimizer, portopt.Optimizer]:
    """The same run on the generic backend and on the float64 reference; ``live(t, i)``: whether
    parameter ``i`` has a gradient at step ``t``."""
    ours, ref = mixed_params(dtype), mixed_params(dtype)
    opt = portopt.Optimizer(ours, name, backend="torch", lr=1e-2)
    ref_opt = portopt.Optimizer(ref, name, backend="reference", lr=1e-2)
    for t in range(steps):
        for params in (ours, ref):
            for i, p in enumerate(params):
                p.grad = gradient(t, i, p) if live(t, i) else None
        opt.step()
        ref_opt.step()
    return ours, ref, opt, ref_opt


def worst_error(ours: list[Tensor], ref: list[Tensor], opt: portopt.Optimizer, ref_opt: portopt.Optimizer) -> float:
    worst = 0.0
    pairs = [(a, b) for a, b in zip(ours, ref, strict=True)]
    for a, b in pairs:
        sa, sb = opt.state.get(a, {}), ref_opt.state.get(b, {})
        assert set(sa) == set(sb)
        for x, y in [(a, b), *((sa[k], sb[k]) for k in sb)]:
            if x.numel():
                scale = y.double().abs().max().item() + 1e-30
                worst = max(worst, (x.double() - y.double()).abs().max().item() / scale)
    return worst


def flat_buffers(opt: portopt.Optimizer, params: list[Tensor], name: str) -> set[int]:
    """The storages the states ``name`` of the one-element parameters live in."""
    return {opt.state[p][name].untyped_storage().data_ptr() for p in params if p.shape == (1,)}


@pytest.mark.parametrize("name", FLAT_ALGORITHMS)
def test_flat_groups_match_the_reference_in_float64(name: str) -> None:
    ours, ref, opt, ref_opt = twin_runs(name, torch.float64, steps=8)
    state_name = portopt.algorithms.get_spec(name).state_names[0]
    assert len(flat_buffers(opt, ours, state_name)) == 1, "the small tensors' states are views of one buffer"
    assert worst_error(ours, ref, opt, ref_opt) <= 1e-12
    assert all(float(opt.state[p]["step"]) == 8.0 for p in ours)


@pytest.mark.parametrize("name", FLAT_ALGORITHMS)
def test_flat_groups_match_the_reference_in_float32(name: str) -> None:
    ours, ref, opt, ref_opt = twin_runs(name, torch.float32, steps=6)
    # 6 steps of a handful of float32 roundings each, relative to the largest value of each tensor
    assert worst_error(ours, ref, opt, ref_opt) <= 6 * 16 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("name", [*FLAT_ALGORITHMS, "nadam", "lamb", "adam"])
def test_tensors_at_different_step_values_match_the_reference(name: str) -> None:
    """Half the parameters start four steps late; then the plan's buckets hold two step values."""
    ours, ref, opt, ref_opt = twin_runs(name, torch.float64, steps=10, live=lambda t, i: t >= 4 or i % 2 == 0)
    assert worst_error(ours, ref, opt, ref_opt) <= 1e-12
    assert {float(opt.state[p]["step"]) for p in ours} == {10.0, 6.0}


def test_a_planned_step_still_refuses_a_bad_gradient_and_changes_nothing() -> None:
    params = mixed_params(torch.float32)
    opt = portopt.Lion(params, lr=1e-3)
    for t in range(4):
        for i, p in enumerate(params):
            p.grad = gradient(t, i, p)
        opt.step()
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    grad = params[3].grad
    assert grad is not None
    grad.data = torch.randn(2)  # (assigning .grad itself checks the shape; .data does not)
    with pytest.raises(StepInputError, match="gradient has shape"):
        opt.step()
    params[3].grad = gradient(9, 3, params[3])
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    for p, saved in zip(params, states, strict=True):
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises((HyperparameterError, ValueError), match="lr"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_a_loaded_checkpoint_replaces_the_planned_states() -> None:
    """States replaced by load_state_dict (not views of the plan's buffers) are checked and planned again."""
    ours, ref = mixed_params(torch.float64), mixed_params(torch.float64)
    opt = portopt.Optimizer(ours, "radam", backend="torch", lr=1e-2)
    ref_opt = portopt.Optimizer(ref, "radam", backend="reference", lr=1e-2)
    saved: list[dict[str, Any]] = []
    for t in range(9):
        if t == 6:  # back to step 3's states (the parameters go on from where they are)
            opt.load_state_dict(saved[0])
            ref_opt.load_state_dict(saved[1])
        for params in (ours, ref):
            for i, p in enumerate(params):
                p.grad = gradient(t, i, p)
        opt.step()
        ref_opt.step()
        if t == 2:
            saved = [copy.deepcopy(opt.state_dict()), copy.deepcopy(ref_opt.state_dict())]
    assert worst_error(ours, ref, opt, ref_opt) <= 1e-12
    assert all(float(opt.state[p]["step"]) == 6.0 for p in ours)


@pytest.mark.parametrize(("ours", "theirs"), [(portopt.Adam, torch.optim.Adam), (portopt.AdamW, torch.optim.AdamW)])
def test_many_small_tensors_stay_bit_identical_to_torch(ours: type, theirs: type) -> None:
    """The README's promise for Adam/AdamW on CPU float32 holds on the planned path (no flat groups there)."""
    a, b = mixed_params(torch.float32), mixed_params(torch.float32)
    opt = ours(a, lr=1e-2, weight_decay=0.1, backend="torch")
    torch_opt = theirs(b, lr=1e-2, weight_decay=0.1, foreach=False)
    for t in range(6):
        for params in (a, b):
            for i, p in enumerate(params):
                p.grad = gradient(t, i, p)
        opt.step()
        torch_opt.step()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[x][k], torch_opt.state[y][k])
