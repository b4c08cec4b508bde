"""``backend="auto"``: the fastest correct lowering per device, spec and group size.

* A spec that one of torch's fused kernels is proven to compute goes to ``torch_fused``,
  whatever the group size; a spec no kernel computes goes to ``compiled`` once the group
  is large enough to repay compiling (``PORTOPT_COMPILE_MIN_NUMEL``), else to ``torch``.
* The choice is made per param group and device, and the front end reports it
  (:meth:`portopt.Optimizer.chosen_backends`).
* Naming a backend that does not lower a group's spec fails at construction, saying why.
* Independent truth for the default path: on the CPU, ``portopt.Adam``/``AdamW``/``SGD``/
  ``Adagrad`` with ``backend="auto"`` step exactly as ``torch.optim``'s ``fused=True``
  (same kernel, same inputs): bit for bit over steps with a schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import portopt
from portopt import backends
from portopt.algorithms import get_spec
from portopt.backends import compiled
from portopt.backends.torch_fused import PRIORITY, build_fused_step

COMPILE_REASON = compiled.compile_unavailable_reason("cpu")
needs_compiler = pytest.mark.skipif(COMPILE_REASON is not None, reason=str(COMPILE_REASON))
# Raised inside torch while dynamo imports; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

KERNEL_SPECS = [("adam", {}), ("adam", {"amsgrad": True}), ("adamw", {}), ("sgd", {"momentum": True}), ("adagrad", {})]
NO_KERNEL_SPECS = ["lion", "lamb", "radam", "nadam", "rmsprop", "adabelief", "adamax"]
LARGE = compiled.DEFAULT_MIN_NUMEL


@pytest.fixture(autouse=True)
def _default_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compiled.MIN_NUMEL_VARIABLE, raising=False)
    monkeypatch.delenv(compiled.DISABLE_VARIABLE, raising=False)


@pytest.mark.parametrize(("name", "options"), KERNEL_SPECS)
@pytest.mark.parametrize("numel", [10, LARGE])
def test_a_spec_a_fused_kernel_computes_goes_to_it_at_any_size(name: str, options: dict[str, bool], numel: int) -> None:
    spec = get_spec(name, **options)
    assert backends.select_backend("cpu", "auto", spec, numel).name == "torch_fused"
    assert backends.select_backend("cpu", "auto", spec.maximized(), numel).name == "torch_fused"


@pytest.mark.parametrize("name", NO_KERNEL_SPECS)
def test_other_specs_use_the_generic_backend_on_small_groups(name: str) -> None:
    assert backends.select_backend("cpu", "auto", get_spec(name), LARGE - 1).name == "torch"


@needs_compiler
@pytest.mark.parametrize("name", NO_KERNEL_SPECS)
def test_other_specs_are_compiled_on_large_groups(name: str) -> None:
    assert backends.select_backend("cpu", "auto", get_spec(name), LARGE).name == "compiled"


@needs_compiler
def test_the_compile_threshold_and_switch_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    lion = get_spec("lion")
    monkeypatch.setenv(compiled.MIN_NUMEL_VARIABLE, "1e3")
    assert backends.select_backend("cpu", "auto", lion, 999).name == "torch"
    assert backends.select_backend("cpu", "auto", lion, 1000).name == "compiled"
    monkeypatch.setenv(compiled.DISABLE_VARIABLE, "1")
    assert backends.select_backend("cpu", "auto", lion, 10**9).name == "torch"


@pytest.mark.parametrize("value", ["many", "-5"])
def test_a_bad_threshold_is_named_with_what_is_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(compiled.MIN_NUMEL_VARIABLE, value)
    with pytest.raises(ValueError, match=rf"PORTOPT_COMPILE_MIN_NUMEL must be a non-negative element count.*{value}"):
        compiled.auto_min_numel()


def test_a_call_the_fused_kernel_cannot_take_goes_where_auto_would_below_it(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_spec("adagrad")  # its kernel rounds lr/eps to bf16: bf16 calls are handed on
    assert backends.auto_choice("cpu", spec, 10, below_priority=PRIORITY) is backends.named_backend("torch")
    if COMPILE_REASON is None:
        assert backends.auto_choice("cpu", spec, LARGE, below_priority=PRIORITY) is backends.named_backend("compiled")


def test_naming_a_backend_that_does_not_lower_the_spec_fails_at_construction() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(
        ValueError, match=r"backend 'torch_fused' cannot run this param group: no matching fused kernel"
    ):
        portopt.Lion(params, backend="torch_fused")
    with pytest.raises(ValueError, match="no matching fused kernel for lion"):
        build_fused_step(get_spec("lion"))
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; registered backends: .*torch"):
        portopt.Adam(params, backend="nope")
    # A group whose options change the spec is checked too (maximize is fine: the kernels take it).
    opt = portopt.Adam(params, backend="torch_fused", maximize=True)
    assert opt.chosen_backends() == [{"cpu": "torch_fused"}]


def test_the_choice_is_per_group_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compiled.MIN_NUMEL_VARIABLE, "100")
    big, small = nn.Parameter(torch.zeros(10, 12)), nn.Parameter(torch.zeros(5))
    opt = portopt.Lion([{"params": [big]}, {"params": [small]}])
    expected_big = "compiled" if COMPILE_REASON is None else "torch"
    assert opt.chosen_backends() == [{"cpu": expected_big}, {"cpu": "torch"}]
    assert portopt.AdamW([big, small]).chosen_backends() == [{"cpu": "torch_fused"}]
    assert portopt.AdamW([big], backend="torch").chosen_backends() == [{"cpu": "torch"}]
    # bf16 states of fp32 params: the fused kernel cannot store them; the best backend that can, for the
    # group's size: the compiled kernel for a group that repays compiling, else the generic policy step.
    assert portopt.AdamW([big], precision="bf16-states").chosen_backends() == [{"cpu": expected_big}]
    assert portopt.AdamW([small], precision="bf16-states").chosen_backends() == [{"cpu": "torch"}]
    assert portopt.AdamW([big], precision="fp32").chosen_backends() == [{"cpu": "torch_fused"}]


FUSED_TWINS: list[tuple[str, dict[str, Any], Callable[..., torch.optim.Optimizer]]] = [
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, torch.optim.Adam),
    ("AdamW", {"lr": 0.01, "betas": (0.8, 0.95)}, torch.optim.AdamW),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, torch.optim.SGD),
    ("Adagrad", {"lr": 0.05, "weight_decay": 1e-2}, torch.optim.Adagrad),
]


@pytest.mark.parametrize(("name", "kwargs", "torch_class"), FUSED_TWINS, ids=[t[0] for t in FUSED_TWINS])
def test_auto_steps_like_torch_fused_bit_for_bit(
    name: str, kwargs: dict[str, Any], torch_class: Callable[..., torch.optim.Optimizer]
) -> None:
    torch.manual_seed(0)
    ours_net = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))
    theirs_net = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))
    theirs_net.load_state_dict(ours_net.state_dict())
    ours = getattr(portopt, name)(ours_net.parameters(), **kwargs)
    theirs = torch_class(theirs_net.parameters(), fused=True, **kwargs)
    assert ours.chosen_backends() == [{"cpu": "torch_fused"}]
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (ours, theirs)]
    for _ in range(8):
        x, y = torch.randn(16, 7), torch.randn(16, 3)
        for net, opt in ((ours_net, ours), (theirs_net, theirs)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        for schedule in schedules:
            schedule.step()
        for p, q in zip(ours_net.parameters(), theirs_net.parameters(), strict=True):
            assert torch.equal(p, q)
            for key, value in theirs.state[q].items():
                assert torch.equal(ours.state[p][key], value), key


@needs_compiler
def test_a_large_group_steps_through_the_compiled_kernel_and_agrees_with_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end: ``portopt.Lion`` on a group above the (lowered) threshold compiles, and 20 steps
    agree with the float64 reference backend within float32 rounding."""
    monkeypatch.setenv(compiled.MIN_NUMEL_VARIABLE, "1000")
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(40, 30)), nn.Parameter(torch.randn(30))]
    reference = [nn.Parameter(p.detach().double().clone()) for p in ours]
    opt = portopt.Lion(ours, lr=1e-3, weight_decay=0.1)
    ref = portopt.Lion(reference, lr=1e-3, weight_decay=0.1, backend="reference")
    assert opt.chosen_backends() == [{"cpu": "compiled"}]
    for _ in range(20):
        for p, q in zip(ours, reference, strict=True):
            g = torch.randn(p.shape, dtype=torch.float64)
            p.grad, q.grad = g.float(), g
        opt.step()
        ref.step()
    for p, q in zip(ours, reference, strict=True):
        # Lion moves every element by ±lr per step: a sign flip would show as an error of 2·lr.
        assert torch.allclose(p.double(), q, rtol=1e-6, atol=1e-6)
