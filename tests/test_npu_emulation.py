"""The CPU emulation of torch_npu's optimizer ops against their documented formulas (an op-contract test).

This checks the emulation in :mod:`portopt.backends.npu_emulation`, not Ascend hardware
(tests/test_npu_hardware.py compares it with the real ops where an NPU is present). The
truth here is each op's formula from CANN's and op-plugin's documentation, written again
below in float64, independently of the emulation:

* ``npu_apply_adam_w`` (aclnnApplyAdamW): ``beta*_power`` is ``β^(t−1)`` and the op multiplies
  by β; ε outside the square root of the bias-corrected v; decay ``var·(1 − lr·λ)``; amsgrad
  writes ``max(max_grad_norm, v)`` into ``v``; scalars are tensors of var's dtype;
* ``_fused_adamw_`` (aclnnApplyAdamWV2): torch's AdamW with ``t`` from ``state_steps``;
  ``grad_scale``/``found_inf`` accepted and ignored;
* ``_fused_sgd_`` (aclnnFusedSgd): skip when ``found_inf == 1``, ``grad / grad_scale`` written
  back, momentum > 0 required;
* ``_fused_adam_``: torch's CPU kernel below Ascend950 (coupled decay, GradScaler honoured).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from portopt.backends import npu_emulation as emu

F64 = torch.float64
HYPERS = {"lr": 0.01, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-3}
"""Hyperparameters that make every term visible (ε = 1e-3 moves the denominator)."""


def tensors(n: int = 33, seed: int = 0) -> dict[str, Tensor]:
    """Inputs in float64 that float32 holds exactly (the ops see the same numbers as the formulas)."""
    gen = torch.Generator().manual_seed(seed)
    values = {
        "var": torch.randn(n, generator=gen),
        "m": torch.randn(n, generator=gen) * 0.1,
        "v": torch.rand(n, generator=gen) * 0.1,
        "vmax": torch.rand(n, generator=gen) * 0.2,
        "grad": torch.randn(n, generator=gen),
    }
    return {k: x.double() for k, x in values.items()}


def rounded(x: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(x, dtype=F64).to(dtype).double())


def as_kernel_scalars(h: dict[str, float], dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The hyperparameters as the kernels read them: one-element ``dtype`` tensors (float32 attributes)."""
    return {k: rounded(v, dtype) for k, v in h.items()}


def assert_close(got: Tensor, want: Tensor, dtype: torch.dtype, ulps: float = 2.0, rtol: float = 0.0) -> None:
    """``got`` within ``ulps`` units of ``dtype``'s epsilon (plus ``rtol``) of the float64 ``want``, relative to
    ``|want|`` plus its mean magnitude (an element near zero after cancellation keeps the scale of its terms)."""
    got64, want64 = got.double(), want.double()
    magnitude = want64.abs() + want64.abs().mean()
    allowed = ulps * torch.finfo(dtype).eps * magnitude + rtol * magnitude + torch.finfo(dtype).tiny
    gap = (got64 - want64).abs()
    assert bool((gap <= allowed).all()), f"off by up to {float((gap / allowed).max()):.3g} x the allowance"


# --------------------------------------------------------------------------------------
# npu_apply_adam_w


def apply_adam_w_formula(x: dict[str, Tensor], t: int, h: dict[str, float], *, maximize: bool, amsgrad: bool):
    """aclnnApplyAdamW's formula with the scalars as given (float64)."""
    g = -x["grad"] if maximize else x["grad"]
    m = h["beta1"] * x["m"] + (1 - h["beta1"]) * g
    v = h["beta2"] * x["v"] + (1 - h["beta2"]) * g * g
    if amsgrad:
        v = torch.maximum(x["vmax"], v)
    beta1_t = h["beta1"] ** (t - 1) * h["beta1"]
    beta2_t = h["beta2"] ** (t - 1) * h["beta2"]
    denom = torch.sqrt(v / (1 - beta2_t)) + h["eps"]
    var = x["var"] * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * (m / (1 - beta1_t)) / denom
    return var, m, v


def run_apply_adam_w(x, t, h, dtype, *, maximize=False, amsgrad=False, beta_power_exponent=None):
    var, m, v, vmax, grad = (x[k].to(dtype) for k in ("var", "m", "v", "vmax", "grad"))
    k = t - 1 if beta_power_exponent is None else beta_power_exponent
    emu.npu_apply_adam_w(
        h["beta1"] ** k,
        h["beta2"] ** k,
        h["lr"],
        h["weight_decay"],
        h["beta1"],
        h["beta2"],
        h["eps"],
        grad,
        vmax if amsgrad else None,
        amsgrad,
        maximize,
        out=(var, m, v),
    )
    return var, m, v, vmax


@pytest.mark.parametrize("t", [1, 2, 7])
@pytest.mark.parametrize(("maximize", "amsgrad"), [(False, False), (True, False), (False, True)])
def test_apply_adam_w_follows_the_documented_formula(t: int, maximize: bool, amsgrad: bool) -> None:
    x = tensors()
    var, m, v, vmax = run_apply_adam_w(x, t, HYPERS, torch.float32, maximize=maximize, amsgrad=amsgrad)
    want_var, want_m, want_v = apply_adam_w_formula(x, t, as_kernel_scalars(HYPERS), maximize=maximize, amsgrad=amsgrad)
    # float32 arithmetic; 1 − β2ᵗ at t=1 amplifies the rounding of β2 by 1/(1 − β2) = 100.
    assert_close(var, want_var, torch.float32, ulps=400)
    assert_close(m, want_m, torch.float32, ulps=4)
    assert_close(v, want_v, torch.float32, ulps=4)
    assert torch.equal(vmax, x["vmax"].float()), "max_grad_norm is an input only"


def test_apply_adam_w_beta_powers_are_of_the_previous_step() -> None:
    """Passing β^t (torch's bias-correction power) instead of β^(t−1) computes another step: the test can tell."""
    x = tensors()
    var, *_ = run_apply_adam_w(x, 3, HYPERS, torch.float32, beta_power_exponent=3)
    want_var, *_ = apply_adam_w_formula(x, 3, HYPERS, maximize=False, amsgrad=False)
    assert float((var.double() - want_var).abs().max()) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_adam_w_rounds_its_scalars_to_the_parameter_dtype(dtype: torch.dtype) -> None:
    h = {**HYPERS, "beta2": 0.999}  # 0.999 is 0.998046875 in bfloat16: the bias correction halves
    x = tensors()
    x["var"] = x["var"] * 0.01  # small parameters: the update, not var's rounding, dominates the result
    var, m, v, _ = run_apply_adam_w(x, 1, h, dtype)
    exact = as_kernel_scalars(h, dtype)
    x16 = {k: val.to(dtype).double() for k, val in x.items()}
    want_var, want_m, want_v = apply_adam_w_formula(x16, 1, exact, maximize=False, amsgrad=False)
    assert_close(var, want_var, dtype, ulps=2, rtol=1e-4)
    assert_close(m, want_m, dtype, ulps=2)
    assert_close(v, want_v, dtype, ulps=2)
    unrounded, *_ = apply_adam_w_formula(x16, 1, h, maximize=False, amsgrad=False)
    if dtype == torch.bfloat16:
        assert float((var.double() - unrounded).abs().max()) > 10 * float((var.double() - want_var).abs().max())


def test_apply_adam_w_contract_errors() -> None:
    x = {k: val.float() for k, val in tensors().items()}
    scalars = (1.0, 1.0, 0.1, 0.0, 0.9, 0.99, 1e-8)
    with pytest.raises(RuntimeError, match="out="):
        emu.npu_apply_adam_w(*scalars, x["grad"], None, False, False)
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        emu.npu_apply_adam_w(*scalars, x["grad"], None, True, False, out=(x["var"], x["m"], x["v"]))
    double = [x[k].double() for k in ("var", "m", "v", "grad")]
    with pytest.raises(TypeError, match="float64"):
        emu.npu_apply_adam_w(*scalars, double[3], None, False, False, out=(double[0], double[1], double[2]))


# --------------------------------------------------------------------------------------
# _fused_adamw_ (aclnnApplyAdamWV2) and _fused_adam_


def adamw_formula(x, t, h, *, maximize, amsgrad, decoupled=True):
    """torch.optim.AdamW's step (aclnnApplyAdamWV2's golden), or Adam's with ``decoupled=False``, in float64."""
    g = -x["grad"] if maximize else x["grad"]
    var = x["var"] * (1 - h["lr"] * h["weight_decay"]) if decoupled else x["var"]
    if not decoupled:
        g = g + h["weight_decay"] * x["var"]
    m = h["beta1"] * x["m"] + (1 - h["beta1"]) * g
    v = h["beta2"] * x["v"] + (1 - h["beta2"]) * g * g
    vmax = torch.maximum(x["vmax"], v) if amsgrad else x["vmax"]
    second = vmax if amsgrad else v
    denom = torch.sqrt(second) / math.sqrt(1 - h["beta2"] ** t) + h["eps"]
    return var - h["lr"] / (1 - h["beta1"] ** t) * (m / denom), m, v, vmax


def run_fused(op, x, t, h, dtype, *, maximize=False, amsgrad=False, grad_scale=None, found_inf=None):
    var, m, v, vmax, grad = (x[k].to(dtype) for k in ("var", "m", "v", "vmax", "grad"))
    grad_before = grad.clone()
    op(
        [var], [grad], [m], [v], [vmax] if amsgrad else [], [torch.tensor(float(t))],
        lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"], weight_decay=h["weight_decay"], eps=h["eps"],
        amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
    )  # fmt: skip
    return var, m, v, vmax, torch.equal(grad, grad_before)


@pytest.mark.parametrize("t", [1, 2, 40])
@pytest.mark.parametrize(("maximize", "amsgrad"), [(False, False), (True, True)])
def test_fused_adamw_follows_the_documented_formula(t: int, maximize: bool, amsgrad: bool) -> None:
    x = tensors()
    var, m, v, vmax, _ = run_fused(emu._fused_adamw_, x, t, HYPERS, torch.float32, maximize=maximize, amsgrad=amsgrad)
    want = adamw_formula(x, t, as_kernel_scalars(HYPERS), maximize=maximize, amsgrad=amsgrad)
    assert_close(var, want[0], torch.float32, ulps=400)
    for got, expected in zip((m, v, vmax), want[1:], strict=True):
        assert_close(got, expected, torch.float32, ulps=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_adamw_computes_16_bit_tensors_in_float32(dtype: torch.dtype) -> None:
    x = {k: val.to(dtype).double() for k, val in tensors().items()}
    var, m, v, _, _ = run_fused(emu._fused_adamw_, x, 3, HYPERS, dtype)
    want = adamw_formula(x, 3, as_kernel_scalars(HYPERS), maximize=False, amsgrad=False)
    for got, expected in zip((var, m, v), want[:3], strict=True):
        assert got.dtype == dtype
        assert_close(got, expected, dtype, ulps=1.01)  # float32 arithmetic, one rounding on store


def test_fused_adamw_ignores_grad_scale_and_found_inf() -> None:
    """Documented torch_npu behaviour: the step is taken, with the gradient as given, whatever GradScaler says."""
    x = tensors()
    plain = run_fused(emu._fused_adamw_, x, 2, HYPERS, torch.float32)
    told = run_fused(
        emu._fused_adamw_, x, 2, HYPERS, torch.float32, grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0)
    )
    for a, b in zip(plain[:4], told[:4], strict=True):
        assert torch.equal(a, b)
    assert told[4], "the gradient is not unscaled either"
    assert not torch.equal(told[0], x["var"].float()), "the step was taken despite found_inf"


@pytest.mark.parametrize(("maximize", "amsgrad"), [(False, False), (True, True)])
def test_fused_adam_is_torchs_coupled_adam_and_honours_found_inf(maximize: bool, amsgrad: bool) -> None:
    x = tensors()
    var, m, _, _, _ = run_fused(emu._fused_adam_, x, 5, HYPERS, torch.float32, maximize=maximize, amsgrad=amsgrad)
    want = adamw_formula(x, 5, HYPERS, maximize=maximize, amsgrad=amsgrad, decoupled=False)
    assert_close(var, want[0], torch.float32, ulps=400)
    assert_close(m, want[1], torch.float32, ulps=4)
    skipped = run_fused(emu._fused_adam_, x, 5, HYPERS, torch.float32, found_inf=torch.tensor(1.0))
    assert torch.equal(skipped[0], x["var"].float()), "the host fallback runs torch's kernel, which skips"


# --------------------------------------------------------------------------------------
# _fused_sgd_ (aclnnFusedSgd)


def sgd_formula(theta, grad, buf, *, first, h, nesterov, maximize, scale=1.0):
    g = grad / scale
    g = -g if maximize else g
    g = g + h["weight_decay"] * theta
    b = g if first else h["momentum"] * buf + (1 - h["dampening"]) * g
    d = g + h["momentum"] * b if nesterov else b
    return theta - h["lr"] * d, b


SGD = {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.9, "dampening": 0.2}


def run_sgd(x, h, *, first=False, nesterov=False, maximize=False, grad_scale=None, found_inf=None):
    theta, grad, buf = (x[k].float() for k in ("var", "grad", "m"))
    emu._fused_sgd_(
        [theta], [grad], [buf], weight_decay=h["weight_decay"], momentum=h["momentum"], lr=h["lr"],
        dampening=h["dampening"], nesterov=nesterov, maximize=maximize, is_first_step=first,
        grad_scale=grad_scale, found_inf=found_inf,
    )  # fmt: skip
    return theta, grad, buf


@pytest.mark.parametrize(
    ("first", "nesterov", "maximize"), [(True, False, False), (False, False, True), (False, True, False)]
)
def test_fused_sgd_follows_the_documented_formula(first: bool, nesterov: bool, maximize: bool) -> None:
    x = tensors()
    theta, grad, buf = run_sgd(x, SGD, first=first, nesterov=nesterov, maximize=maximize)
    want_theta, want_buf = sgd_formula(
        x["var"], x["grad"], x["m"], first=first, h=SGD, nesterov=nesterov, maximize=maximize
    )
    assert_close(theta, want_theta, torch.float32, ulps=8)
    assert_close(buf, want_buf, torch.float32, ulps=8)
    assert torch.equal(grad, x["grad"].float())


def test_fused_sgd_found_inf_and_grad_scale() -> None:
    x = tensors()
    theta, grad, buf = run_sgd(x, SGD, found_inf=torch.tensor(1.0))
    assert torch.equal(theta, x["var"].float())
    assert torch.equal(buf, x["m"].float())
    theta, grad, buf = run_sgd(x, SGD, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    want_theta, _ = sgd_formula(
        x["var"], x["grad"], x["m"], first=False, h=SGD, nesterov=False, maximize=False, scale=4.0
    )
    assert_close(theta, want_theta, torch.float32, ulps=8)
    assert_close(grad, x["grad"] / 4.0, torch.float32, ulps=1)  # the unscaled gradient is written back
    with pytest.raises(RuntimeError, match="momentum must be positive"):
        run_sgd(x, {**SGD, "momentum": 0.0})


def test_emulated_soc_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(emu.SOC_VARIABLE, raising=False)
    assert emu.soc_name() == emu.DEFAULT_SOC
    monkeypatch.setenv(emu.SOC_VARIABLE, "Ascend910B3")
    assert emu.soc_name() == "Ascend910B3"
