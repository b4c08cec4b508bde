"""Loss scaling inside the step: GradScaler's grad_scale/found_inf protocol and skipped steps.

Truth: torch.optim.Adam(fused=True), which implements the same protocol in torch's own
kernel, run side by side with a small Adam written on portopt's helpers, each under its own
GradScaler; and bit-for-bit snapshots around a skipped step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
import torch

from portopt.precision.scaling import (
    LossScaling,
    any_nonfinite,
    prepare_gradients,
    unscale,
    write_back_unscaled,
)


def grad_of(param: torch.Tensor) -> torch.Tensor:
    assert param.grad is not None
    return param.grad


class HelperAdam(torch.optim.Optimizer):
    """Adam (torch's arithmetic) whose step honours GradScaler through portopt.precision.scaling."""

    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        raw = [grad_of(p) for p in params]
        grads = prepare_gradients(raw, LossScaling.of(self))
        if grads is None:
            return  # skipped: nothing written
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            t = state["step"].item()
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))
        write_back_unscaled(raw, grads)


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in opt.state.values():
        tensors += [v.clone() for _, v in sorted(state.items())]
    return tensors


def test_protocol_matches_torch_fused_adam_including_a_skipped_step() -> None:
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    runs = []
    for make_opt in (
        lambda m: HelperAdam(m.parameters()),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True),
    ):
        model = make_model(0)
        opt = make_opt(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        scales, grads = [], []
        for step in range(8):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if step == 4:  # an overflow: this step must change nothing but the scale
                grad_of(next(iter(model.parameters())))[0, 0] = math.inf
                before = snapshot(model, opt)
                scaled_grads = [grad_of(p).clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if step == 4:
                after = snapshot(model, opt)
                assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # bit-identical
                assert all(torch.equal(grad_of(p), g) for p, g in zip(model.parameters(), scaled_grads, strict=True))
            scales.append(scaler.get_scale())
            grads.append([grad_of(p).clone() for p in model.parameters()])
        runs.append((model, opt, scales, grads))
    (ours, our_opt, our_scales, our_grads), (theirs, their_opt, their_scales, their_grads) = runs
    assert our_scales == their_scales
    assert our_scales[4] == our_scales[3] / 2
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert our_opt.state[p]["step"].item() == their_opt.state[q]["step"].item() == 7  # 8 steps, one skipped
    for ours_g, theirs_g in zip(our_grads[-1], their_grads[-1], strict=True):
        torch.testing.assert_close(ours_g, theirs_g)  # unscaled gradients left in .grad, as torch's fused kernel


def test_unscale_before_step_for_clipping() -> None:
    """After scaler.unscale_(opt) the scaler passes grad_scale=None: the gradients are used as they are."""
    model = make_model(1)
    opt = HelperAdam(model.parameters())
    reference = make_model(1)
    ref_opt = HelperAdam(reference.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    scaler.step(opt)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_unscale_runs_in_float32() -> None:
    grad = torch.tensor([3.0e-3, 6.0e4, 1.0], dtype=torch.float16)
    scale = torch.tensor(2.0**16)
    value = unscale(grad, scale)
    assert value.dtype == torch.float32
    assert torch.equal(value, grad.float() / 2**16)
    assert value[0].item() > 0  # 3e-3 / 65536 is below fp16's smallest subnormal (6e-8): fp16 would give 0
    assert (grad / scale.half())[0].item() == 0
    assert unscale(torch.ones(2, dtype=torch.float64), scale).dtype == torch.float64
    assert torch.equal(unscale(grad, None), grad.float())


def test_prepare_gradients_skip_rules() -> None:
    grads = [torch.ones(3), torch.empty(0), torch.tensor([2.0, math.nan])]
    assert prepare_gradients(grads, LossScaling(found_inf=torch.tensor(1.0))) is None
    assert prepare_gradients(grads, skip_nonfinite=True) is None
    kept = prepare_gradients(grads)  # no scaler, not asked to check: NaN goes through
    assert kept is not None
    assert math.isnan(kept[2][1].item())
    finite = [torch.ones(3), torch.empty(0)]
    out = prepare_gradients(finite, LossScaling(torch.tensor(4.0), torch.tensor(0.0)), skip_nonfinite=True)
    assert out is not None
    assert torch.equal(out[0], torch.full((3,), 0.25))
    assert out[1].shape == (0,)
    assert prepare_gradients([], skip_nonfinite=True) == []
    assert not any_nonfinite([torch.empty(0)])
    assert any_nonfinite([torch.tensor([-math.inf])])


def test_loss_scaling_of_reads_the_attributes() -> None:
    class Bare:
        pass

    bare = Bare()
    assert LossScaling.of(bare) == LossScaling(None, None)
    assert not LossScaling.of(bare).found_inf_set()
    scale = torch.tensor(8.0)
    bare.grad_scale = scale  # type: ignore[attr-defined]
    bare.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]
    scaling = LossScaling.of(bare)
    assert scaling.grad_scale is scale
    assert not scaling.found_inf_set()


@pytest.mark.cuda
def test_protocol_on_cuda() -> None:
    model = make_model(2).cuda()
    opt = HelperAdam(model.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x, y = torch.randn(16, 6, device="cuda"), torch.randn(16, 1, device="cuda")
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    grad_of(next(iter(model.parameters())))[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**9
    assert not opt.state
