"""Multi-tensor steps and cached plans against independent truth.

* The compiled backend's chunk graphs (several parameters per call) agree with the float64
  reference for a group of mixed shapes and ranks, more tensors than a graph has slots,
  zero-size and one-element tensors and strided (non-contiguous) parameters.
* 8-bit states decoded, updated and encoded inside the compiled pass agree with the generic
  backend's 8-bit step (quantize.py's codec): codes within one step of the map, parameters close.
* The front end checks a group once: later steps of an unchanged group run no per-parameter input
  checks, and stay equal to torch.optim through a learning-rate schedule, a loaded checkpoint, a
  parameter losing its gradient, a non-contiguous gradient and a new param group; a bad value
  after caching raises and changes nothing; nothing recompiles across steps, a learning-rate
  schedule and a changed param group.
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
from portopt.algorithms import get_spec
from portopt.backends import compiled as compiled_module
from portopt.backends.compiled import CompiledStep, compile_unavailable_reason
from portopt.backends.compiled_graphs import Q8_VARIABLE, compilations
from portopt.backends.reference import build_reference_step
from portopt.lowering.backend import ParamState
from portopt.optim import optimizer as optimizer_module
from portopt.precision.quantize import Q8State
from portopt.spec.errors import HyperparameterError

pytestmark = [
    pytest.mark.skipif(compile_unavailable_reason("cpu") is not None, reason=str(compile_unavailable_reason("cpu"))),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

RTOL, ATOL = 1e-5, 1e-6


def _excess(a: Tensor, b: Tensor) -> float:
    """max |a − b| / (ATOL + RTOL·(|b| + rms(b))): at most 1 within float32 tolerance."""
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    scale = b.square().mean().sqrt()
    return float(((a - b).abs() / (ATOL + RTOL * (b.abs() + scale))).max())


def _mixed_params(seed: int) -> tuple[list[Tensor], list[int]]:
    """11 parameters: 1-D and 2-D of many sizes, zero-size, one-element, and two strided views
    (a transposed matrix, every other element of a vector); also the indices of the strided ones."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen)

    params = [rand(37), rand(6, 9), rand(0), rand(1), rand(1000), rand(5, 301), rand(3), rand(2, 2)]
    params += [rand(9, 7).t(), rand(50)[::2], rand(17, 4)]
    return params, [8, 9]


@pytest.mark.parametrize("name", ["adamw", "lion", "lamb"])
def test_chunk_graphs_agree_with_the_reference_on_mixed_shapes(name: str) -> None:
    spec = get_spec(name)
    step = CompiledStep(spec, serial_arity=4, parallel_arity=2)
    reference = build_reference_step(spec)
    params, strided = _mixed_params(0)
    copies = [p.clone() for p in params]
    states: list[ParamState] = [{} for _ in params]
    ref_states: list[ParamState] = [{} for _ in params]
    gen = torch.Generator().manual_seed(1)
    hypers = {**spec.defaults(), "lr": 1e-2}
    if "weight_decay" in hypers:
        hypers["weight_decay"] = 0.05
    for t in range(1, 9):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        h = {**hypers, "lr": hypers["lr"] * (0.5 + 0.5 * math.cos(math.pi * t / 8))}
        step(params, grads, states, h)
        reference(copies, grads, ref_states, h)
        for i, (p, q) in enumerate(zip(params, copies, strict=True)):
            assert _excess(p, q) <= 1, f"{name}: parameter {i} (shape {tuple(p.shape)}) at t={t}"
            for s in spec.state_names:
                assert _excess(states[i][s], ref_states[i][s]) <= 1, f"{name}: state {s} of parameter {i} at t={t}"
            assert float(states[i]["step"]) == t
    (plan,) = step._plans.values()
    chunked = sorted(i for pack in plan.packs for chunk in pack.chunks for i in chunk.slots)
    assert set(strided) <= set(plan.fallback), "non-contiguous parameters take the uncompiled path"
    assert {0, 1, 4, 5, 6, 7, 10} <= set(chunked), "contiguous parameters take the chunk graphs"
    assert max(len(pack.chunks) for pack in plan.packs) >= 2, "more parameters of one kind than slots: several calls"


def _q8_pair(shapes: list[tuple[int, ...]]) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(2)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, b


def test_8bit_states_in_the_compiled_pass_agree_with_the_generic_8bit_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(Q8_VARIABLE, raising=False)  # the in-pass 8-bit step is the default
    # 4096 elements: whole blocks only (an empty last row); 4097: a last block of one element;
    # 5000 and 5600: ordinary tails; 2-d and 3-d parameters are cut into blocks in row-major order;
    # 10: under the 8-bit threshold, stays float32.
    shapes: list[tuple[int, ...]] = [(5000,), (5600,), (4096,), (4097,), (64, 80), (16, 16, 17), (10,)]
    compiled_params, generic_params = _q8_pair(shapes)
    fast = portopt.Adam(compiled_params, lr=1e-2, precision="q8-states", backend="compiled")
    slow = portopt.Adam(generic_params, lr=1e-2, precision="q8-states", backend="torch")
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        for a, b in zip(compiled_params, generic_params, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fast.step()
        slow.step()
    assert fast.chosen_backends() == [{"cpu": "compiled"}]
    for a, b in zip(compiled_params, generic_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for name in ("exp_avg", "exp_avg_sq"):
            x, y = fast.state[a][name], slow.state[b][name]
            assert type(x) is type(y)
            if isinstance(x, Q8State):
                assert (x.codes.int() - y.codes.int()).abs().max() <= 1, f"{name} of shape {tuple(a.shape)}"
                torch.testing.assert_close(x.absmax, y.absmax, rtol=1e-5, atol=0)
            else:
                torch.testing.assert_close(x, y)
    assert sum(isinstance(fast.state[p]["exp_avg"], Q8State) for p in compiled_params) == 6
    plan = next(iter(fast._step_functions.values()))._plans  # type: ignore[attr-defined]
    (group_plan,) = plan.values()
    in_graphs = {i for pack in group_plan.packs for c in pack.chunks for i in c.slots}
    assert {0, 1, 2, 4, 5} <= in_graphs, "8-bit tensors whose last block is empty or ordinary: in the graph"


def test_8bit_states_in_the_compiled_pass_follow_a_replaced_param_data() -> None:
    # The graph steps block views of each tensor; ``p.data = ...`` (same Parameter, new storage) must
    # move the step to the new storage, as torch.optim and the generic step do.
    compiled_params, generic_params = _q8_pair([(5000,), (64, 80)])
    fast = portopt.Adam(compiled_params, lr=1e-2, precision="q8-states", backend="compiled")
    slow = portopt.Adam(generic_params, lr=1e-2, precision="q8-states", backend="torch")
    gen = torch.Generator().manual_seed(4)
    for t in range(4):
        if t == 2:
            for a, b in zip(compiled_params, generic_params, strict=True):
                a.data = torch.randn(a.shape, generator=gen)
                b.data = a.data.clone()
        for a, b in zip(compiled_params, generic_params, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fast.step()
        slow.step()
    for a, b in zip(compiled_params, generic_params, strict=True):
        # a stale view would leave the new storage unstepped: every element off by about 2·lr; an 8-bit
        # code one apart (arithmetic an ulp apart, as in the test above) moves a few elements by less
        # than one step (lr)
        diff = (a - b).abs()
        assert diff.median() <= 1e-6, f"shape {tuple(a.shape)}: median {diff.median():.3g}"
        assert diff.max() < 1e-2, f"shape {tuple(a.shape)}: max {diff.max():.3g}"


class _Counter:
    def __init__(self, wrapped: Callable[..., Any]) -> None:
        self.wrapped, self.calls = wrapped, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.wrapped(*args, **kwargs)


def _pair(seed: int, shapes: list[tuple[int, ...]]) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    return a, [torch.nn.Parameter(p.detach().clone()) for p in a]


def _set_grads(a: list[torch.nn.Parameter], b: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    for x, y in zip(a, b, strict=True):
        x.grad = torch.randn(x.shape, generator=gen)
        y.grad = x.grad.clone()


@pytest.mark.parametrize("backend", ["auto", "compiled"])
def test_an_unchanged_group_is_checked_once_and_stays_equal_to_torch(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = _pair(4, [(30, 7), (7,), (100,), (3, 3, 3)])
    opt = portopt.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    gen = torch.Generator().manual_seed(5)
    front = _Counter(optimizer_module.check_step_inputs)
    inner = _Counter(compiled_module.check_step_inputs)
    monkeypatch.setattr(optimizer_module, "check_step_inputs", front)
    monkeypatch.setattr(compiled_module, "check_step_inputs", inner)
    for t in range(8):
        _set_grads(ours, theirs, gen)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        if t == 1:
            checked = front.calls + inner.calls
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    assert checked > 0
    assert front.calls + inner.calls == checked, "steps of an unchanged group run no per-parameter checks"


def test_cached_groups_follow_checkpoints_missing_grads_strided_grads_and_new_groups() -> None:
    ours, theirs = _pair(6, [(20, 5), (5,), (64,)])
    opt = portopt.AdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(7)

    def both_step() -> None:
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)

    for _ in range(3):
        _set_grads(ours, theirs, gen)
        both_step()
    # a checkpoint replaces every state: the next step takes the loaded ones
    saved = copy.deepcopy(ref.state_dict())
    for entry in saved["state"].values():
        entry["exp_avg"].mul_(-0.5)
        entry["step"].add_(10.0)
    ref.load_state_dict(saved)
    opt.load_state_dict(copy.deepcopy(saved))  # (torch.optim keeps the loaded tensors: no sharing)
    _set_grads(ours, theirs, gen)
    both_step()
    # a parameter without a gradient is skipped
    _set_grads(ours, theirs, gen)
    ours[1].grad = theirs[1].grad = None
    both_step()
    # a non-contiguous gradient of the same shape
    _set_grads(ours, theirs, gen)
    wide = torch.randn(5, 20, generator=gen)
    ours[0].grad, theirs[0].grad = wide.t(), wide.t().contiguous()
    both_step()
    # a new param group
    extra_ours, extra_theirs = _pair(8, [(11,)])
    opt.add_param_group({"params": extra_ours, "lr": 3e-2})
    ref.add_param_group({"params": extra_theirs, "lr": 3e-2})
    ours += extra_ours
    theirs += extra_theirs
    for _ in range(2):
        _set_grads(ours, theirs, gen)
        both_step()
    for a, b in zip(ours, theirs, strict=True):
        assert float(opt.state[a]["step"]) == float(ref.state[b]["step"])


@pytest.mark.parametrize("backend", ["auto", "compiled"])
def test_a_bad_value_after_caching_raises_and_changes_nothing(backend: str) -> None:
    params = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(4, 4))]
    opt = portopt.Lion(params, lr=1e-2, backend=backend)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    before = [p.detach().clone() for p in params]
    states = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(HyperparameterError, match="lr"):
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, states[k])
    opt.param_groups[0]["lr"] = 1e-2
    opt.step()
    assert not torch.equal(params[0], before[0])


def test_no_recompile_across_steps_schedules_and_a_changed_param_group() -> None:
    gen = torch.Generator().manual_seed(10)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(40,), (6, 7), (13,)]]
    opt = portopt.Lion(params, lr=1e-2, backend="compiled")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)

    def step() -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        schedule.step()

    step()
    compiled_before = compilations()
    for _ in range(5):
        step()
    opt.param_groups[0]["params"].pop()  # a parameter leaves the group
    step()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(9, 2, generator=gen))], "lr": 1e-3})
    for _ in range(3):
        step()
    assert compilations() == compiled_before
