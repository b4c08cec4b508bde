"""Deliberately wrong implementations, to show that the suite catches and names each mistake.

Each public name is a ``build(spec) -> StepFunction`` callable, usable from the command
line, e.g.::

    portopt conformance --quick --impl portopt.conformance.mutants:adam_eps_inside_sqrt@adam

:func:`hand_written_adam` is Adam/AdamW written directly in torch ops (not from the spec),
as a vendor kernel would be; with ``bug=None`` it is correct (the control), and each bug
is one classic mistake: ε inside the square root, ``β^(t−1)``, no weight decay, coupled
decay for AdamW, heavyball's ``m̂ / max(sqrt(v̂), ε)`` (``eps-clamp``), and ``sqrt(v̂)``
evaluated as ``(v̂²)^¼`` (``overflowing-square``: right for ordinary magnitudes, but ``v̂²``
overflows float32 once ``|g|`` exceeds about ``1e9.5``). :func:`radam_tutorial` is RAdam as a
popular tutorial writes it: two differences at once (rectified when ``ρ_t > 4``, and an
uncorrected ``sqrt(v_t)`` in the adaptive branch).

Element-level mistakes wrap any backend: :func:`skip_one_element` leaves element 17 of
the large 1-d tensors unchanged; :func:`simd_tail_only` leaves every element of full
``block``-element blocks unchanged and updates only each tensor's tail (what torch 2.13's
CPU ``_fused_sgd_`` does in bfloat16: the vectorised body rounds the update away);
:func:`simd_body_only` forgets the tail loop instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from portopt.algorithms.radam import PAPER_THRESHOLD, radam
from portopt.backends import named_backend
from portopt.conformance.problems import memory_order
from portopt.lowering.backend import Hypers, ParamState, StepFunction
from portopt.spec.definition import Spec

BUGS = (
    "eps-inside-sqrt",
    "beta-power-t-minus-1",
    "missing-weight-decay",
    "coupled-weight-decay",
    "eps-clamp",
    "overflowing-square",
)
SKIPPED_INDEX = 17


def hand_written_adam(bug: str | None = None) -> Callable[[Spec], StepFunction]:
    """Adam (``spec.name == "adam"``) or AdamW written in torch ops, with an optional ``bug`` of :data:`BUGS`."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; known: {', '.join(BUGS)}")

    def build(spec: Spec) -> StepFunction:
        decoupled = spec.name == "adamw" and bug != "coupled-weight-decay"

        def step(
            params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers
        ) -> None:
            lr, b1, b2, eps, wd = (float(hypers[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
            if bug == "missing-weight-decay":
                wd = 0.0
            for p, g, st in zip(params, grads, states, strict=True):
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = float(st["step"])
                if decoupled:
                    p.mul_(1 - lr * wd)
                elif wd:
                    g = g + wd * p
                m = st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                v = st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                power = t - 1 if bug == "beta-power-t-minus-1" else t
                # Device-style scalars: 1 − β^0 = 0 gives inf, as a kernel would, not a Python error.
                bc1 = torch.tensor(1 - b1**power, dtype=torch.float64)
                bc2 = torch.tensor(1 - b2**power, dtype=torch.float64)
                if bug == "eps-inside-sqrt":
                    denom = (v / bc2).add(eps).sqrt()
                elif bug == "eps-clamp":  # heavyball: m̂ / max(sqrt(v̂), ε)
                    denom = torch.clamp((v / bc2).sqrt(), min=eps)
                elif bug == "overflowing-square":  # sqrt(v̂) as (v̂²)^¼: v̂² overflows float32 first
                    denom = (v / bc2).square().sqrt().sqrt() + eps
                else:
                    denom = v.sqrt() / bc2.sqrt() + eps
                p.sub_((lr / bc1) * m / denom)

        return step

    return build


def skip_one_element(backend: str = "torch") -> Callable[[Spec], StepFunction]:
    """``backend``'s step, except that element 17 of each 1-d tensor of more than 100 elements keeps its value."""

    def build(spec: Spec) -> StepFunction:
        inner = named_backend(backend).build(spec)

        def step(
            params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers
        ) -> None:
            kept = [(p, p[SKIPPED_INDEX].clone()) for p in params if p.dim() == 1 and p.numel() > 100]
            inner(params, grads, states, hypers)
            with torch.no_grad():
                for p, value in kept:
                    p[SKIPPED_INDEX] = value

        return step

    return build


def simd_tail_only(backend: str = "torch", block: int = 16) -> Callable[[Spec], StepFunction]:
    """``backend``'s step on the last ``numel mod block`` elements (in memory order) of each tensor only:
    the elements of every full ``block``-element block keep their value, states included."""
    return _masked(backend, block, keep_body=True)


def simd_body_only(backend: str = "torch", block: int = 16) -> Callable[[Spec], StepFunction]:
    """``backend``'s step on the full ``block``-element blocks only: each tensor's tail keeps its value."""
    return _masked(backend, block, keep_body=False)


def _masked(backend: str, block: int, keep_body: bool) -> Callable[[Spec], StepFunction]:
    def build(spec: Spec) -> StepFunction:
        inner = named_backend(backend).build(spec)

        def step(
            params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers
        ) -> None:
            kept = [_kept(p, st, block, keep_body) for p, st in zip(params, states, strict=True)]
            inner(params, grads, states, hypers)
            with torch.no_grad():
                for p, st, (where, values) in zip(params, states, kept, strict=True):
                    for name, old in values.items():
                        _put(p if name == "" else st[name], where, old)

        return step

    return build


def _kept(param: Tensor, state: ParamState, block: int, keep_body: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """The (logical, flat) indices that keep their values, and those values, of the parameter (key "")
    and its element-wise states; blocks are counted in the order the elements lie in memory."""
    n = param.numel()
    order = memory_order(param)
    body = (n // block) * block
    where = order[:body] if keep_body else order[body:]
    tensors = {"": param, **{k: v for k, v in state.items() if k != "step" and v.shape == param.shape}}
    return where, {k: v.detach().reshape(-1)[where].clone() for k, v in tensors.items()}


def _put(target: Tensor, where: Tensor, values: Tensor) -> None:
    flat = target.detach().reshape(-1).clone()
    flat[where] = values
    target.detach().copy_(flat.view(target.shape))


def radam_tutorial(spec: Spec) -> StepFunction:
    """RAdam as a popular tutorial writes it, in torch ops: rectified when ``ρ_t > 4`` (torch: 5) and
    ``l_t = 1/(sqrt(v_t) + ε)``, without torch's ``sqrt(1 − β2^t)`` (an uncorrected second moment)."""

    def step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers) -> None:
        lr, b1, b2, eps, wd = (float(hypers[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
        rho_inf = 2 / (1 - b2) - 1
        for p, g, st in zip(params, grads, states, strict=True):
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = float(st["step"])
            if wd:
                g = g + wd * p
            m = st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            v = st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = m / (1 - b1**t)
            rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
            if rho_t > 4:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                p.sub_(lr * r * m_hat / (v.sqrt() + eps))
            else:
                p.sub_(lr * m_hat)

    return step


def radam_paper_threshold(spec: Spec) -> StepFunction:
    """RAdam rectifying when ρ_t > 4 (the paper) whatever the spec asks, on the reference backend."""
    return named_backend("reference").build(radam(threshold=PAPER_THRESHOLD))


adam_correct = hand_written_adam(None)
adam_eps_inside_sqrt = hand_written_adam("eps-inside-sqrt")
adam_beta_power_t_minus_1 = hand_written_adam("beta-power-t-minus-1")
adam_missing_weight_decay = hand_written_adam("missing-weight-decay")
adamw_coupled_weight_decay = hand_written_adam("coupled-weight-decay")
adam_eps_clamp = hand_written_adam("eps-clamp")
adam_overflowing_square = hand_written_adam("overflowing-square")
torch_skip_one_element = skip_one_element("torch")
torch_simd_tail_only = simd_tail_only("torch")
torch_simd_body_only = simd_body_only("torch")
