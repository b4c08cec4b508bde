"""A CPU emulation of torch_npu's optimizer ops, written from their documented semantics. Not hardware.

This module has the interface that ``PORTOPT_NPU_OPS`` asks of an op module (see
:mod:`portopt.backends.npu.ops`): the functions below have torch_npu's signatures and
compute, on CPU tensors, what Ascend's documentation and torch_npu's source say the NPU
kernels compute. The ``npu-contract`` backend runs the NPU rules through it, so that the
rules' conventions (beta powers, step counts, loss scaling, dtype and SoC limits) are
proven on any machine; it proves nothing about the silicon, which only
``portopt conformance --device npu`` on an Ascend machine does.

**``npu_apply_adam_w(beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad,
max_grad_norm, amsgrad, maximize, *, out=(var, m, v))``** (``aclnnApplyAdamW``; sources:
Ascend/op-plugin ``op_plugin/ops/opapi/ApplyAdamWKernelNpuOpApi.cpp`` and
``test/test_base_ops/test_apply_adam_w.py``; CANN's ``aclnnApplyAdamW`` documentation,
hicann/ops-nn ``optim/apply_adam_w/docs/aclnnApplyAdamW.md``)::

    g    = −grad if maximize else grad
    m'   = β1·m + (1 − β1)·g            v' = β2·v + (1 − β2)·g²
    β1ᵗ  = beta1_power·β1               β2ᵗ = beta2_power·β2       (beta*_power is β^(t−1))
    v'   = max(max_grad_norm, v')        if amsgrad: stored in v; max_grad_norm is read only
    var' = var·(1 − lr·λ) − lr·(m'/(1 − β1ᵗ)) / (sqrt(v'/(1 − β2ᵗ)) + ε)

Only the ``out=`` form exists (the functional form raises); ``amsgrad`` needs
``max_grad_norm``; every scalar is a one-element tensor *of var's dtype*, so for a float16
or bfloat16 ``var`` the learning rate, ε, the betas and the beta powers are rounded to that
dtype before use (the elementwise arithmetic is emulated in float32).

**``_fused_adamw_``** with torch's signature (torch_npu >= 2.8; Ascend/op-plugin
``op_plugin/ops/opapi/FusedAdamWKernelNpuOpApi.cpp``; ``aclnnApplyAdamWV2``, hicann/ops-nn
``optim/apply_adam_w_v2/docs/aclnnApplyAdamWV2_en.md`` and ``tests/assets/golden.py``): a
loop over the tensors, one ``aclnnApplyAdamWV2`` each, with ``lr, β1, β2, λ, ε`` cast to
float32 and the step tensor ``state_steps[i] − 1``, to which the kernel adds 1 back::

    var_t = var·(1 − lr·λ);  m' = β1·m + (1 − β1)·g;  v' = β2·v + (1 − β2)·g²
    vmax' = max(vmax, v')                                      (amsgrad; stored in vmax)
    var'  = var_t − lr/(1 − β1ᵗ) · m' / (sqrt(vmax' or v')/sqrt(1 − β2ᵗ) + ε)

in float32 for float16/bfloat16 tensors, rounded once on store. ``grad_scale`` and
``found_inf`` are accepted **and ignored**: a GradScaler step with an overflow is taken,
with the scaled gradients.

**``_fused_adam_``** (torch_npu 2.13; ``FusedAdamKernelNpuOpApi.cpp``): below Ascend950 the
tensors are copied to the host and torch's own CPU ``_fused_adam_`` runs there, with
``grad_scale`` and ``found_inf``; that is what this emulation does (the tensors are on the
host already).

**``_fused_sgd_``** (torch_npu 2.13, ``aclnnFusedSgd``; hicann/ops-nn
``optim/fused_sgd/docs/aclnnFusedSgd.md``): returns at once when ``found_inf`` (read on the
host) equals 1; refuses ``momentum <= 0``; with ``lr, μ, λ, τ`` as float32::

    g̃ = g / grad_scale (if given);  ĝ = −g̃ if maximize;  ḡ = ĝ + λ·θ
    b' = ḡ on the first step, else μ·b + (1 − τ)·ḡ;  d = ḡ + μ·b' (nesterov) else b'
    θ' = θ − lr·d;  grad ← g̃

:func:`soc_name` tells the rules which SoC the emulation stands for (its dtype and kernel
limits): ``PORTOPT_NPU_EMULATED_SOC``, default ``Ascend950PR``, where every kernel above runs
natively.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__version__ = "emulation of torch_npu 2.13.0"

SOC_VARIABLE = "PORTOPT_NPU_EMULATED_SOC"
DEFAULT_SOC = "Ascend950PR"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""What the NPU kernels take (FLOAT16, BFLOAT16, FLOAT32 in CANN's documentation)."""


def soc_name() -> str:
    """The SoC this emulation stands for: ``$PORTOPT_NPU_EMULATED_SOC``, default ``Ascend950PR``."""
    return os.environ.get(SOC_VARIABLE) or DEFAULT_SOC


def _check_tensors(op: str, tensors: Sequence[Tensor], like: Tensor) -> None:
    """CANN's input checks: a supported dtype, one dtype and one shape for the elementwise inputs."""
    if like.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: dtype {like.dtype} is not supported (FLOAT16, BFLOAT16, FLOAT32)")
    for t in tensors:
        if t.dtype != like.dtype or t.shape != like.shape:
            raise RuntimeError(
                f"{op}: the inputs must share var's dtype and shape: got {t.dtype} {tuple(t.shape)}, "
                f"var is {like.dtype} {tuple(like.shape)}"
            )


def _as(value: float | Tensor, dtype: torch.dtype) -> Tensor:
    """A scalar argument as the one-element tensor the kernel reads: rounded to ``dtype``, then widened to float32."""
    return torch.as_tensor(float(value), dtype=torch.float64).to(dtype).to(torch.float32)


@torch.no_grad()
def npu_apply_adam_w(
    beta1_power: float,
    beta2_power: float,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    grad: Tensor,
    max_grad_norm: Tensor | None = None,
    amsgrad: bool | None = False,
    maximize: bool | None = False,
    *,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch_npu.npu_apply_adam_w``, emulated (module docstring); updates ``out = (var, m, v)`` in place."""
    if out is None:
        raise RuntimeError("npu_apply_adam_w is not implemented for Tensor (use the out=(var, m, v) form)")
    var, m, v = out
    if amsgrad and max_grad_norm is None:
        raise RuntimeError("if amsgrad is true, max_grad_norm input must be entered")
    _check_tensors(
        "npu_apply_adam_w", [m, v, grad, *([max_grad_norm] if amsgrad and max_grad_norm is not None else [])], var
    )
    dtype = var.dtype
    b1, b2, lr_, wd, eps = (_as(x, dtype) for x in (beta1, beta2, lr, weight_decay, epsilon))
    b1_t = _as(beta1_power, dtype) * b1
    b2_t = _as(beta2_power, dtype) * b2
    g = grad.float()
    if maximize:
        g = -g
    m_new = m.float() * b1 + (1 - b1) * g
    v_new = v.float() * b2 + (1 - b2) * g * g
    if amsgrad:
        assert max_grad_norm is not None
        v_new = torch.maximum(max_grad_norm.float(), v_new)
    denom = torch.sqrt(v_new / (1 - b2_t)) + eps
    var_new = var.float() * (1 - lr_ * wd) - lr_ * (m_new / (1 - b1_t)) / denom
    var.copy_(var_new)
    m.copy_(m_new)
    v.copy_(v_new)
    return var, m, v


def _f32(value: float) -> Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def _check_lists(op: str, lists: Sequence[Sequence[Tensor]], optional: Sequence[Tensor] = ()) -> None:
    n = len(lists[0])
    if any(len(x) != n for x in lists) or (optional and len(optional) != n):
        raise RuntimeError(f"{op}: the size of tensor list should be same.")


@torch.no_grad()
def _fused_adamw_(
    self: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """torch_npu's ``_fused_adamw_``, emulated: ``aclnnApplyAdamWV2`` per tensor; ``grad_scale``/``found_inf`` ignored."""
    del grad_scale, found_inf  # accepted and unused, as in FusedAdamWKernelNpuOpApi.cpp
    _check_lists("_fused_adamw_", [self, grads, exp_avgs, exp_avg_sqs, state_steps], max_exp_avg_sqs)
    lr_, b1, b2, wd, eps_ = (_f32(x) for x in (lr, beta1, beta2, weight_decay, eps))
    for i, var in enumerate(self):
        vmax = max_exp_avg_sqs[i] if max_exp_avg_sqs else None
        extra = [vmax] if amsgrad and vmax is not None else []
        _check_tensors("aclnnApplyAdamWV2", [grads[i], exp_avgs[i], exp_avg_sqs[i], *extra], var)
        step = float(state_steps[i]) - 1.0  # the op's state_steps[i].sub(1)
        t = step + 1.0  # the kernel's step + 1
        g = grads[i].float()
        if maximize:
            g = -g
        var_t = var.float() * (1 - lr_ * wd)
        m_new = b1 * exp_avgs[i].float() + (1 - b1) * g
        v_new = b2 * exp_avg_sqs[i].float() + (1 - b2) * g * g
        bias_correction1 = 1 - b1**t
        bias_correction2_sqrt = torch.sqrt(1 - b2**t)
        second = v_new
        if amsgrad and vmax is not None:
            second = torch.maximum(vmax.float(), v_new)
            vmax.copy_(second)
        denom = torch.sqrt(second) / bias_correction2_sqrt + eps_
        var.copy_(var_t - (lr_ / bias_correction1) * (m_new / denom))
        exp_avgs[i].copy_(m_new)
        exp_avg_sqs[i].copy_(v_new)


@torch.no_grad()
def _fused_adam_(
    self: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """torch_npu's ``_fused_adam_`` below Ascend950, emulated: torch's CPU kernel on host copies."""
    _check_lists("_fused_adam_", [self, grads, exp_avgs, exp_avg_sqs, state_steps], max_exp_avg_sqs)
    for tensors in (self, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
        for t in tensors:
            _check_tensors("_fused_adam_", [t], t)
    torch._fused_adam_(
        list(self),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(max_exp_avg_sqs),
        list(state_steps),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=amsgrad,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


@torch.no_grad()
def _fused_sgd_(
    self: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffer_list: Sequence[Tensor],
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """torch_npu's ``_fused_sgd_``, emulated (``aclnnFusedSgd``; module docstring)."""
    if found_inf is not None and float(found_inf.item()) == 1:
        return
    if not float(momentum) > 0:
        raise RuntimeError(f"momentum must be positive, but got {float(momentum)}")
    for name, value in (("lr", lr), ("momentum", momentum), ("weightDecay", weight_decay), ("dampening", dampening)):
        if value < 0:
            raise RuntimeError(f"aclnnFusedSgd: {name} must be >= 0, got {value}")
    _check_lists("_fused_sgd_", [self, grads], momentum_buffer_list)
    lr_, mu, wd, tau = (_f32(x) for x in (lr, momentum, weight_decay, dampening))
    scale = None if grad_scale is None else grad_scale.float().reshape(())
    for i, theta in enumerate(self):
        buffer = momentum_buffer_list[i] if momentum_buffer_list else None
        _check_tensors("aclnnFusedSgd", [grads[i], *([buffer] if buffer is not None else [])], theta)
        g_tilde = grads[i].float() if scale is None else grads[i].float() / scale
        g_hat = -g_tilde if maximize else g_tilde
        g_bar = g_hat + wd * theta.float()
        direction = g_bar
        if buffer is not None:
            b_new = g_bar if is_first_step else mu * buffer.float() + (1 - tau) * g_bar
            direction = g_bar + mu * b_new if nesterov else b_new
            buffer.copy_(b_new)
        theta.copy_(theta.float() - lr_ * direction)
        if scale is not None:
            grads[i].copy_(g_tilde)
