"""The NPU optimizer kernels as specs, how the rules call them, and which user specs they compute.

Each kernel configuration is a :class:`~portopt.spec.Spec` of what the rule *and* the op
compute together, conventions included, written from the sources cited in
:mod:`portopt.backends.npu_emulation`:

* ``npu_apply_adam_w`` (``ApplyAdamW``): the rule passes ``beta1_power = β1^(t−1)`` and
  ``beta2_power = β2^(t−1)`` (float64 on the host), the op multiplies by β itself, so the
  bias corrections are ``1 − β^(t−1)·β``; ε is added outside the square root of the
  bias-corrected ``v``; decoupled decay ``p·(1 − lr·λ)`` first. Its ``amsgrad`` stores
  ``max(max_grad_norm, v)`` in ``v`` and leaves ``max_grad_norm`` as it was: that is not
  torch's AMSGrad (whose ``exp_avg_sq`` stays un-maxed), and the equivalence proof says so;
* ``_fused_adamw_`` (``aclnnApplyAdamWV2``): the op passes ``step − 1`` and the kernel adds 1,
  so ``t`` is torch's; AMSGrad keeps ``max(vmax, v)`` in ``max_exp_avg_sqs``: torch's AdamW;
* ``_fused_adam_``: torch's ``_fused_adam_`` (below Ascend950 it *is* torch's CPU kernel):
  the spec is :func:`portopt.backends.torch_fused.fused_adam_spec`;
* ``_fused_sgd_`` (``aclnnFusedSgd``): ``ḡ = ±g + λ·θ``, buffer ``ḡ`` on the first step
  (``is_first_step = t == 1``) else ``μ·b + (1 − τ)·ḡ``; only with a momentum buffer and
  ``momentum > 0`` (torch_npu checks), and ``lr, λ, τ >= 0`` (CANN checks).

A kernel serves a user's spec only when :func:`portopt.lowering.equivalence.find_binding`
(the same randomized float64 identity proof as the torch fused rules) binds it; the rule
never passes GradScaler's ``grad_scale``/``found_inf`` to an op (``_fused_adamw_`` ignores
them): loss scaling is done before the op is called (:mod:`portopt.backends.npu.step`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from portopt.backends.npu.ops import NpuOps
from portopt.backends.npu.soc import FROM_A2, TRAINING_PARTS, Family, supported_on
from portopt.backends.torch_fused import fused_adam_spec
from portopt.lowering.equivalence import Binding, find_binding
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, G, P, T, eq, hyper, maximum, sqrt, state, where
from portopt.spec.symbols import NON_NEGATIVE, UNIT_INTERVAL_OPEN_RIGHT, Hyperparameter, StateDecl

NEUTRAL = {"weight_decay": 0.0, "dampening": 0.0}
"""Kernel hyperparameters a user's spec may lack, held at the value that removes them."""
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Launch = Callable[[NpuOps, list[Tensor], list[Tensor], list[list[Tensor]], float, Mapping[str, float]], None]
"""``launch(ops, params, grads, states, t, hypers)``: one call for a bucket at step ``t``; ``states``
are lists in the kernel spec's state order."""


def _hypers(*names: str) -> tuple[Hyperparameter, ...]:
    ranges = {"beta1": UNIT_INTERVAL_OPEN_RIGHT, "beta2": UNIT_INTERVAL_OPEN_RIGHT}
    return tuple(Hyperparameter(n, 0.0, ranges.get(n, NON_NEGATIVE)) for n in names)


def _gradient(maximize: bool) -> Expr:
    return -G if maximize else G


# --------------------------------------------------------------------------------------
# Specs.


def apply_adam_w_spec(*, amsgrad: bool, maximize: bool) -> Spec:
    """``torch_npu.npu_apply_adam_w`` with the rule's beta powers ``β^(t−1)``, on one tensor."""
    lr, b1, b2, eps, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    g = _gradient(maximize)
    m_new = b1 * state("exp_avg") + (1 - b1) * g
    v_new = b2 * state("exp_avg_sq") + (1 - b2) * g * g
    states = [StateDecl("exp_avg", "m"), StateDecl("exp_avg_sq", "v")]
    updates: list[tuple[str, Expr]] = [("exp_avg", m_new)]
    if amsgrad:  # max(max_grad_norm, v) is written into v; max_grad_norm is an input only
        v_new = maximum(state("max_grad_norm"), v_new)
        states.append(StateDecl("max_grad_norm", "n"))
        updates.append(("max_grad_norm", state("max_grad_norm")))
    updates.insert(1, ("exp_avg_sq", v_new))
    b1_t = b1 ** (T - 1) * b1  # beta1_power (the rule's β1^(t−1)) times β1, in the op
    b2_t = b2 ** (T - 1) * b2
    denom = sqrt(v_new / (1 - b2_t)) + eps
    return Spec(
        name="torch_npu.npu_apply_adam_w",
        title=f"torch_npu.npu_apply_adam_w(amsgrad={amsgrad}, maximize={maximize})",
        hyperparameters=_hypers("lr", "beta1", "beta2", "eps", "weight_decay"),
        states=tuple(states),
        updates=tuple(updates),
        param_update=P * (1 - lr * wd) - lr * (m_new / (1 - b1_t)) / denom,
        options=(("amsgrad", amsgrad), ("maximize", maximize)),
    )


def apply_adam_w_v2_spec(*, amsgrad: bool, maximize: bool) -> Spec:
    """torch_npu's ``_fused_adamw_`` (``aclnnApplyAdamWV2`` per tensor) on one tensor."""
    lr, b1, b2, eps, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    g = _gradient(maximize)
    m_new = b1 * state("exp_avg") + (1 - b1) * g
    v_new = b2 * state("exp_avg_sq") + (1 - b2) * g * g
    states = [StateDecl("exp_avg", "m"), StateDecl("exp_avg_sq", "v")]
    updates: list[tuple[str, Expr]] = [("exp_avg", m_new), ("exp_avg_sq", v_new)]
    second = v_new
    if amsgrad:
        second = maximum(state("max_exp_avg_sq"), v_new)
        states.append(StateDecl("max_exp_avg_sq", "vmax"))
        updates.append(("max_exp_avg_sq", second))
    t = (T - 1) + 1  # the op passes state_steps − 1; the kernel adds 1
    denom = sqrt(second) / sqrt(1 - b2**t) + eps
    return Spec(
        name="torch_npu._fused_adamw_",
        title=f"torch_npu _fused_adamw_(amsgrad={amsgrad}, maximize={maximize})",
        hyperparameters=_hypers("lr", "beta1", "beta2", "eps", "weight_decay"),
        states=tuple(states),
        updates=tuple(updates),
        param_update=P * (1 - lr * wd) - (lr / (1 - b1**t)) * (m_new / denom),
        options=(("amsgrad", amsgrad), ("maximize", maximize)),
    )


def npu_fused_adam_spec(*, amsgrad: bool, maximize: bool) -> Spec:
    """torch_npu's ``_fused_adam_``: torch's ``_fused_adam_`` (its CPU kernel below Ascend950)."""
    spec = fused_adam_spec(decoupled=False, amsgrad=amsgrad, maximize=maximize)
    return dataclasses.replace(
        spec, name="torch_npu._fused_adam_", title=f"torch_npu _fused_adam_(amsgrad={amsgrad}, maximize={maximize})"
    )


def fused_sgd_spec(*, nesterov: bool, maximize: bool) -> Spec:
    """torch_npu's ``_fused_sgd_`` (``aclnnFusedSgd``) with a momentum buffer; ``is_first_step`` is ``t = 1``."""
    lr, wd, mu, tau = (hyper(n) for n in ("lr", "weight_decay", "momentum", "dampening"))
    g_bar = _gradient(maximize) + wd * P
    buf = where(eq(T, 1), g_bar, mu * state("momentum_buffer") + (1 - tau) * g_bar)
    direction = g_bar + mu * buf if nesterov else buf
    return Spec(
        name="torch_npu._fused_sgd_",
        title=f"torch_npu _fused_sgd_(nesterov={nesterov}, maximize={maximize})",
        hyperparameters=_hypers("lr", "weight_decay", "momentum", "dampening"),
        states=(StateDecl("momentum_buffer", "b"),),
        updates=(("momentum_buffer", buf),),
        param_update=P - lr * direction,
        options=(("momentum", True), ("nesterov", nesterov), ("maximize", maximize)),
    )


# --------------------------------------------------------------------------------------
# Calls.


def _steps(t: float, params: list[Tensor]) -> list[Tensor]:
    counter = torch.tensor(t, dtype=torch.float32, device=params[0].device)
    return [counter] * len(params)


def _apply_adam_w_launch(amsgrad: bool, maximize: bool) -> Launch:
    def launch(
        ops: NpuOps,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[list[Tensor]],
        t: float,
        h: Mapping[str, float],
    ) -> None:
        op = ops.op("npu_apply_adam_w")
        assert op is not None
        beta1_power, beta2_power = h["beta1"] ** (t - 1.0), h["beta2"] ** (t - 1.0)  # float64, on the host
        for i, param in enumerate(params):  # a per-tensor op: one call each
            op(
                beta1_power,
                beta2_power,
                h["lr"],
                h["weight_decay"],
                h["beta1"],
                h["beta2"],
                h["eps"],
                grads[i],
                states[2][i] if amsgrad else None,
                amsgrad,
                maximize,
                out=(param, states[0][i], states[1][i]),
            )

    return launch


def _adam_launch(op_name: str, amsgrad: bool, maximize: bool) -> Launch:
    def launch(
        ops: NpuOps,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[list[Tensor]],
        t: float,
        h: Mapping[str, float],
    ) -> None:
        op = ops.op(op_name)
        assert op is not None
        op(
            params,
            grads,
            states[0],
            states[1],
            states[2] if amsgrad else [],
            _steps(t, params),
            lr=h["lr"],
            beta1=h["beta1"],
            beta2=h["beta2"],
            weight_decay=h["weight_decay"],
            eps=h["eps"],
            amsgrad=amsgrad,
            maximize=maximize,
            grad_scale=None,  # never handed to the op: torch_npu's _fused_adamw_ ignores it
            found_inf=None,
        )

    return launch


def _sgd_launch(nesterov: bool, maximize: bool) -> Launch:
    def launch(
        ops: NpuOps,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[list[Tensor]],
        t: float,
        h: Mapping[str, float],
    ) -> None:
        op = ops.op("_fused_sgd_")
        assert op is not None
        op(
            params,
            grads,
            states[0],
            weight_decay=h["weight_decay"],
            momentum=h["momentum"],
            lr=h["lr"],
            dampening=h["dampening"],
            nesterov=nesterov,
            maximize=maximize,
            is_first_step=t == 1.0,
            grad_scale=None,
            found_inf=None,
        )

    return launch


def _sgd_refuses(h: Mapping[str, float]) -> str | None:
    if not h["momentum"] > 0.0:
        return f"torch_npu's _fused_sgd_ refuses momentum <= 0 (momentum={h['momentum']:g})"
    negative = [n for n in ("lr", "weight_decay", "dampening") if h[n] < 0.0]
    if negative:
        return f"aclnnFusedSgd needs lr, weight_decay and dampening >= 0 ({', '.join(negative)} < 0)"
    return None


# --------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class NpuKernel:
    """One configuration of an NPU kernel: its spec, the op it calls, where and in which dtypes the rule uses it.

    ``dtype_note`` says why a dtype outside ``dtypes`` is not handed to it; ``soc_note``, when
    given, replaces the generic message for a SoC outside ``families``; ``refuses(values)``
    says why it cannot take these (kernel) hyperparameter values.
    """

    spec: Spec
    op: str
    launch: Launch = field(compare=False)
    families: frozenset[Family] = field(compare=False)
    dtypes: tuple[torch.dtype, ...] = field(default=ALL_DTYPES, compare=False)
    dtype_note: str = field(default="", compare=False)
    soc_note: str = field(default="", compare=False)
    refuses: Callable[[Mapping[str, float]], str | None] = field(default=lambda _: None, compare=False)

    @property
    def name(self) -> str:
        return self.spec.title

    def soc_reason(self, soc: str | None) -> str | None:
        """``None`` if the kernel runs natively on ``soc``, else why the rule does not use it there."""
        reason = supported_on(soc, self.families, self.op)
        if reason is not None and self.soc_note and soc is not None:
            return f"{self.soc_note} (SoC {soc})"
        return reason

    def dtype_reason(self, dtype: torch.dtype) -> str | None:
        """``None`` if the rule hands ``dtype`` tensors to this kernel, else why not."""
        if dtype in self.dtypes:
            return None
        return self.dtype_note or f"{self.op} takes {', '.join(str(d) for d in self.dtypes)}, not {dtype}"


def _kernels() -> tuple[NpuKernel, ...]:
    kernels: list[NpuKernel] = []
    flags = (False, True)
    for amsgrad, maximize in itertools.product(flags, flags):
        kernels.append(
            NpuKernel(
                apply_adam_w_v2_spec(amsgrad=amsgrad, maximize=maximize),
                "_fused_adamw_",
                _adam_launch("_fused_adamw_", amsgrad, maximize),
                FROM_A2,
            )
        )
    for amsgrad, maximize in itertools.product(flags, flags):
        kernels.append(
            NpuKernel(
                apply_adam_w_spec(amsgrad=amsgrad, maximize=maximize),
                "npu_apply_adam_w",
                _apply_adam_w_launch(amsgrad, maximize),
                TRAINING_PARTS,
                dtypes=(torch.float32,),
                dtype_note=(
                    "npu_apply_adam_w rounds lr, eps, the betas and the beta powers to a float16/bfloat16 "
                    "parameter's dtype (its scalar inputs are tensors of var's dtype)"
                ),
            )
        )
    for amsgrad, maximize in itertools.product(flags, flags):
        kernels.append(
            NpuKernel(
                npu_fused_adam_spec(amsgrad=amsgrad, maximize=maximize),
                "_fused_adam_",
                _adam_launch("_fused_adam_", amsgrad, maximize),
                frozenset({Family.ASCEND950}),
                soc_note="below Ascend950 torch_npu runs _fused_adam_ on the host (a CPU fallback)",
            )
        )
    for nesterov, maximize in itertools.product(flags, flags):
        kernels.append(
            NpuKernel(
                fused_sgd_spec(nesterov=nesterov, maximize=maximize),
                "_fused_sgd_",
                _sgd_launch(nesterov, maximize),
                FROM_A2,
                refuses=_sgd_refuses,
            )
        )
    return tuple(kernels)


KERNELS: tuple[NpuKernel, ...] = _kernels()
"""Every kernel configuration, in the order the rule prefers them (a list op before a per-tensor one)."""


@dataclass(frozen=True)
class NpuMatch:
    """A kernel that computes a spec's step, and where its inputs come from."""

    kernel: NpuKernel
    binding: Binding


@functools.lru_cache(maxsize=128)
def match_kernels(spec: Spec) -> tuple[NpuMatch, ...]:
    """Every NPU kernel proven to compute ``spec``'s step, in order of preference (empty: none)."""
    matches = []
    for kernel in KERNELS:
        binding, _ = find_binding(spec, kernel.spec, NEUTRAL)
        if binding is not None:
            matches.append(NpuMatch(kernel, binding))
    return tuple(matches)


def no_match_reason(spec: Spec) -> str | None:
    """``None`` if an NPU kernel computes ``spec``, else why none does (the closest attempts)."""
    if match_kernels(spec):
        return None
    reasons = [(k.name, find_binding(spec, k.spec, NEUTRAL)[1]) for k in KERNELS]
    reasons.sort(key=lambda r: "differs" not in r[1])
    return f"no NPU kernel computes {spec.name}: " + "; ".join(f"{k}: {why}" for k, why in reasons[:2])
