"""GradScaler on the NPU path: torch_npu's documented ``_fused_adamw_`` corrupts a run, portopt's rule does not.

An op-contract test on CPU (emulated ops, not hardware). torch_npu registers an NPU kernel
for ``torch._fused_adamw_`` that accepts GradScaler's ``grad_scale``/``found_inf`` and ignores
them (Ascend/op-plugin ``FusedAdamWKernelNpuOpApi.cpp``). ``torch.optim.AdamW(fused=True)``
hands them to it, so on an NPU it neither unscales nor skips an overflowing step. Here the
emulated kernel stands in for the NPU one (``torch._fused_adamw_`` patched), and the same
GradScaler training runs three ways:

* truth: ``torch.optim.AdamW(foreach=False)``, which GradScaler unscales and skips itself;
* torch_npu's behaviour: ``torch.optim.AdamW(fused=True)`` on the emulated kernel: every step
  is computed from the *scaled* gradients, and the overflow step writes NaN into the model;
* portopt: ``portopt.AdamW(backend="npu-contract")`` on the same emulated kernel: equal to the
  truth, the overflow step skipped, the kernel never handed GradScaler's tensors.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import portopt
from portopt.backends import npu_emulation
from portopt.backends.npu.ops import OPS_VARIABLE

STEPS = 6
OVERFLOW_AT = 3
HYPERS: dict[str, Any] = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.1}
"""An ε that matters: with scaled gradients (S = 2^16) the update m/(sqrt(v) + ε) is another number."""


def train(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int = STEPS
) -> tuple[list[Tensor], torch.optim.Optimizer, list[float]]:
    """A small model trained with GradScaler for ``steps`` steps, the scaled loss overflowing at step OVERFLOW_AT."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = make(list(net.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    gen = torch.Generator().manual_seed(1)
    scales = []
    for step in range(steps):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 3, generator=gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        if step == OVERFLOW_AT:
            loss = loss * float("inf")  # an overflow: GradScaler finds inf/NaN gradients
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(float(scaler.get_scale()))
    return [p.detach().clone() for p in net.parameters()], opt, scales


@pytest.fixture
def emulated_npu_kernel(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """``torch._fused_adamw_`` as torch_npu registers it for NPU tensors (emulated), and a portopt op module
    around the same emulation; both record the GradScaler arguments they were handed."""
    seen: list[tuple[Any, Any]] = []

    def kernel(*args: Any, **kwargs: Any) -> None:
        seen.append((kwargs.get("grad_scale"), kwargs.get("found_inf")))
        npu_emulation._fused_adamw_(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", kernel)
    module = types.ModuleType("portopt_test_npu_amp_ops")
    module._fused_adamw_ = kernel  # type: ignore[attr-defined]
    module.soc_name = lambda: "Ascend910B3"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setenv(OPS_VARIABLE, module.__name__)
    return seen


def test_torch_npu_fused_adamw_corrupts_a_grad_scaler_run(emulated_npu_kernel: list[tuple[Any, Any]]) -> None:
    _, _, truth_scales = train(lambda ps: torch.optim.AdamW(ps, foreach=False, **HYPERS))
    corrupted, _, scales = train(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPERS))
    assert scales[: OVERFLOW_AT + 1] == truth_scales[: OVERFLOW_AT + 1]  # GradScaler saw the same overflow
    assert emulated_npu_kernel, "torch.optim's fused path called the (emulated) NPU kernel"
    assert any(gs is not None for gs, _ in emulated_npu_kernel), "and handed it grad_scale/found_inf"
    assert not all(bool(torch.isfinite(p).all()) for p in corrupted), "the overflow step wrote NaN into the model"
    assert scales[-1] < truth_scales[-1], "from then on every step overflows: GradScaler keeps backing off"


def test_torch_npu_fused_adamw_steps_on_scaled_gradients(emulated_npu_kernel: list[tuple[Any, Any]]) -> None:
    """Before any overflow: the kernel never unscales, so even the first step is another number."""
    truth, _, _ = train(lambda ps: torch.optim.AdamW(ps, foreach=False, **HYPERS), steps=1)
    wrong, _, _ = train(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPERS), steps=1)
    right, _, _ = train(lambda ps: portopt.AdamW(ps, backend="npu-contract", **HYPERS), steps=1)
    gap_wrong = max(float((w - t).abs().max()) for w, t in zip(wrong, truth, strict=True))
    gap_right = max(float((r - t).abs().max()) for r, t in zip(right, truth, strict=True))
    assert gap_wrong > 1e-4 > 100 * gap_right


def test_portopt_npu_rule_keeps_a_grad_scaler_run_correct(emulated_npu_kernel: list[tuple[Any, Any]]) -> None:
    truth, truth_opt, truth_scales = train(lambda ps: torch.optim.AdamW(ps, foreach=False, **HYPERS))
    ours, opt, scales = train(lambda ps: portopt.AdamW(ps, backend="npu-contract", **HYPERS))
    assert scales == truth_scales
    assert emulated_npu_kernel, "the rule ran the emulated NPU kernel"
    assert all(gs is None and fi is None for gs, fi in emulated_npu_kernel), "and never handed it GradScaler's tensors"
    for got, want in zip(ours, truth, strict=True):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p in opt.param_groups[0]["params"]:
        assert float(opt.state[p]["step"]) == STEPS - 1, "the overflow step did not count"
        want_state = truth_opt.state[truth_opt.param_groups[0]["params"][0]]
        assert float(want_state["step"]) == STEPS - 1
