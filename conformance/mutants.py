"""Deliberately wrong implementations, to show that the suite catches and names each mistake.

Each public name is a ``build(spec) -> StepFunction`` callable, usable from the command
line, e.g.::

    portopt conformance --quick --impl portopt.conformance.mutants:adam_eps_inside_sqrt@adam

:func:`hand_written_adam` is Adam/AdamW written directly in torch ops (not from the spec),
as a vendor kernel would be; with ``bug=None`` it is correct (the control), and each bug
is one classic mistake. :func:`skip_one_element` wraps any backend and leaves one element
of the largest 1-d tensor unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from portopt.algorithms.radam import PAPER_THRESHOLD, radam
from portopt.lowering.backend import Hypers, ParamState, StepFunction
from portopt.lowering.registry import lookup_backend
from portopt.spec.definition import Spec

BUGS = ("eps-inside-sqrt", "beta-power-t-minus-1", "missing-weight-decay", "coupled-weight-decay")
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
                inside = bug == "eps-inside-sqrt"
                denom = (v / bc2).add(eps).sqrt() if inside else v.sqrt() / bc2.sqrt() + eps
                p.sub_((lr / bc1) * m / denom)

        return step

    return build


def skip_one_element(backend: str = "torch") -> Callable[[Spec], StepFunction]:
    """``backend``'s step, except that element 17 of each 1-d tensor of more than 100 elements keeps its value."""

    def build(spec: Spec) -> StepFunction:
        inner = lookup_backend(backend).build(spec)

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


def radam_paper_threshold(spec: Spec) -> StepFunction:
    """RAdam rectifying when ρ_t > 4 (the paper) whatever the spec asks, on the reference backend."""
    return lookup_backend("reference").build(radam(threshold=PAPER_THRESHOLD))


adam_correct = hand_written_adam(None)
adam_eps_inside_sqrt = hand_written_adam("eps-inside-sqrt")
adam_beta_power_t_minus_1 = hand_written_adam("beta-power-t-minus-1")
adam_missing_weight_decay = hand_written_adam("missing-weight-decay")
adamw_coupled_weight_decay = hand_written_adam("coupled-weight-decay")
torch_skip_one_element = skip_one_element("torch")
