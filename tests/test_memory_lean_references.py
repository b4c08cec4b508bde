"""Adafactor, CAME, SophiaG and Adan against their references: float64, 35 steps, 1-D/2-D/3-D parameters.

Independent truth: torch.optim.Adafactor; came-pytorch's ``CAME`` and sophia-opt's ``SophiaG`` (the
authors' code on PyPI, the ``references`` extra; skipped with the reason where they are not
installed); transcriptions, in this file, of transformers' ``Adafactor``
(huggingface/transformers, src/transformers/optimization.py) and of sail-sg/Adan's ``adan.py``
(its single-tensor path), loops over tensors with the reference's formulas in its order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

import portopt
from portopt.algorithms import get_spec

F64 = torch.float64
STEPS = 35
SHAPES = [(7,), (5, 4), (3, 4, 5), (1, 6), (6, 1), ()]
BACKENDS = ["torch", "reference"]


def _grads(step: int, shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(s, dtype=F64, generator=gen) for s in shapes]


def _run_pair(
    mine: torch.optim.Optimizer,
    ours: list[Tensor],
    ref: torch.optim.Optimizer,
    theirs: list[Tensor],
    shapes: Sequence[tuple[int, ...]],
    between: Callable[[int], None] | None = None,
) -> float:
    """Step both optimizers on the same gradients; the largest relative difference of any parameter."""
    worst = 0.0
    for t in range(1, STEPS + 1):
        for p, q, g in zip(ours, theirs, _grads(t, shapes), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
        if between is not None:
            between(t)
        for p, q in zip(ours, theirs, strict=True):
            scale = q.detach().abs().max().clamp(min=1e-300) if q.numel() else torch.tensor(1.0)
            worst = max(worst, float((p.detach() - q.detach()).abs().max() / scale) if q.numel() else 0.0)
    return worst


def _params(shapes: Sequence[tuple[int, ...]]) -> tuple[list[Tensor], list[Tensor]]:
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    return [x.clone().requires_grad_() for x in start], [x.clone().requires_grad_() for x in start]


# Adafactor -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.05},
        {"lr": 0.05, "weight_decay": 0.1, "d": 1.5, "beta2_decay": -0.6},
        {"lr": 0.02, "eps": (1e-3, 1e-3), "maximize": True},
    ],
)
def test_adafactor_matches_torch_optim(backend: str, kwargs: dict[str, object]) -> None:
    ours, theirs = _params(SHAPES)
    worst = _run_pair(
        portopt.Adafactor(ours, backend=backend, **kwargs),
        ours,
        torch.optim.Adafactor(theirs, **kwargs),  # type: ignore[arg-type]
        theirs,
        SHAPES,
    )
    assert worst <= 1e-10


def test_adafactor_state_layout_is_torchs() -> None:
    ours, theirs = _params([(3, 4, 5), (7,)])
    mine, ref = portopt.Adafactor(ours), torch.optim.Adafactor(theirs)
    _run_pair(mine, ours, ref, theirs, [(3, 4, 5), (7,)])
    for p, q in zip(ours, theirs, strict=True):
        a, b = mine.state[p], ref.state[q]
        assert set(a) == set(b)
        for key in b:
            assert a[key].shape == b[key].shape, key
            torch.testing.assert_close(a[key].to(F64), b[key].to(F64), rtol=1e-10, atol=0)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 4), (0,)])
def test_adafactor_empty_tensors_stay_finite(shape: tuple[int, ...]) -> None:
    """torch.optim.Adafactor divides by numel() ** 0.5 = 0 (ZeroDivisionError); portopt's RMS of an empty
    tensor is 0 and every state stays finite."""
    p = torch.zeros(shape, dtype=F64, requires_grad=True)
    opt = portopt.Adafactor([p])
    for _ in range(3):
        p.grad = torch.zeros(shape, dtype=F64)
        opt.step()
    assert all(bool(torch.isfinite(v).all()) for v in opt.state[p].values())


def _transformers_adafactor(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """transformers' Adafactor.step for one group (src/transformers/optimization.py), its formulas in order."""

    def rms(x: Tensor) -> Tensor:
        return x.norm(2) / (x.numel() ** 0.5)

    for p, grad, state in zip(params, grads, states, strict=True):
        factored = grad.dim() >= 2
        first = group["beta1"] is not None
        if not state:
            state["step"] = 0
            if first:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["row"] = torch.zeros(grad.shape[:-1], dtype=F64)
                state["col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], dtype=F64)
            else:
                state["sq"] = torch.zeros_like(grad)
        state["step"] = int(state["step"]) + 1
        t = state["step"]
        rel = group["lr"]
        if group["relative_step"]:
            rel = min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
        scale = max(group["eps"][1], rms(p)) if group["scale_parameter"] else 1.0
        lr = scale * rel
        beta2t = 1.0 - math.pow(t, group["decay_rate"])
        update = grad**2 + group["eps"][0]
        if factored:
            row, col = state["row"], state["col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r, c).mul_(grad)
        else:
            sq = state["sq"]
            sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = sq.rsqrt().mul_(grad)
        update.div_((rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if first:
            m = state["exp_avg"]
            m.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = m
        if group["weight_decay"] != 0:
            p.add_(p, alpha=-group["weight_decay"] * lr)
        p.add_(-update)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"warmup_init": True},
        {"relative_step": False, "scale_parameter": False, "first_moment": True},
        {"relative_step": False, "first_moment": True},
    ],
)
def test_adafactor_transformers_convention_matches_its_transcription(options: dict[str, bool]) -> None:
    spec = get_spec("adafactor", convention="transformers", **options)
    relative = options.get("relative_step", True)
    group = {
        "lr": None if relative else 0.02,
        "eps": (1e-30, 1e-3),
        "clip_threshold": 1.0,
        "decay_rate": -0.8,
        "beta1": 0.9 if options.get("first_moment") else None,
        "weight_decay": 0.1,
        "scale_parameter": options.get("scale_parameter", True),
        "relative_step": relative,
        "warmup_init": options.get("warmup_init", False),
    }
    ours, theirs = _params(SHAPES)
    hypers: dict[str, Any] = {"weight_decay": 0.1} | ({} if relative else {"lr": 0.02})
    mine = portopt.Optimizer(ours, spec, backend="torch", **hypers)
    states: list[dict[str, Any]] = [{} for _ in theirs]
    worst = 0.0
    for t in range(1, STEPS + 1):
        grads = _grads(t, SHAPES)
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        mine.step()
        with torch.no_grad():
            _transformers_adafactor([q.detach() for q in theirs], grads, states, group)
        for p, q in zip(ours, theirs, strict=True):
            worst = max(worst, float((p.detach() - q.detach()).abs().max() / q.detach().abs().max()))
    assert worst <= 1e-10


# CAME ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{"lr": 0.01}, {"lr": 0.02, "weight_decay": 0.1, "clip_threshold": 0.5}])
def test_came_matches_came_pytorch(backend: str, kwargs: dict[str, float]) -> None:
    came_pytorch = pytest.importorskip("came_pytorch", reason="came-pytorch (the references extra) is not installed")
    ours, theirs = _params(SHAPES)
    worst = _run_pair(
        portopt.CAME(ours, backend=backend, **kwargs),
        ours,
        came_pytorch.CAME(theirs, **kwargs),
        theirs,
        SHAPES,
    )
    assert worst <= 1e-10


# SophiaG -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_sophiag_matches_the_reference_with_update_hessian(backend: str) -> None:
    sophia_opt = pytest.importorskip("sophia_opt", reason="sophia-opt (the references extra) is not installed")
    ours, theirs = _params(SHAPES)
    mine = portopt.SophiaG(ours, lr=0.01, rho=0.05, weight_decay=0.1, backend=backend)
    ref = sophia_opt.SophiaG(theirs, lr=0.01, rho=0.05, weight_decay=0.1)
    due: list[bool] = []

    def hessian_every_10(t: int) -> None:
        due.append(mine.method_due("update_hessian"))
        if t % 10 == 0 or t == 3:  # the reference's cadence, and once off it
            for p, q, g in zip(ours, theirs, _grads(t, SHAPES, seed=1), strict=True):
                p.grad, q.grad = g.clone(), g.clone()
            mine.update_hessian()
            ref.update_hessian()

    class BatchSize:  # both step(bs=64): the reference's default is 5120
        def __init__(self, opt: torch.optim.Optimizer) -> None:
            self.opt = opt

        def step(self) -> None:
            step: Any = self.opt.step
            step(bs=64)

    worst = _run_pair(BatchSize(mine), ours, BatchSize(ref), theirs, SHAPES, hessian_every_10)  # type: ignore[arg-type]
    assert worst <= 1e-10
    assert due == [t % 10 == 0 for t in range(1, STEPS + 1)]
    assert all(float(mine.state[p]["step"]) == STEPS for p in ours)  # update_hessian does not count as a step


def test_sophiag_update_hessian_before_any_step_creates_the_state() -> None:
    p = torch.ones(3, dtype=F64, requires_grad=True)
    opt = portopt.SophiaG([p])
    p.grad = torch.full((3,), 2.0, dtype=F64)
    opt.update_hessian()
    assert float(opt.state[p]["step"]) == 0
    torch.testing.assert_close(opt.state[p]["hessian"], torch.full((3,), 0.01 * 4.0, dtype=F64))


# Adan ----------------------------------------------------------------------------------------------
class _AdanTranscription(torch.optim.Optimizer):
    """sail-sg/Adan's adan.py (``Adan.step`` and ``_single_tensor_adan``), its formulas in order."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float, float], eps: float,
                 weight_decay: float, max_grad_norm: float, no_prox: bool) -> None:  # fmt: skip
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "max_grad_norm": max_grad_norm, "no_prox": no_prox}  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        clip = 1.0
        if self.defaults["max_grad_norm"] > 0:
            total = torch.zeros(1, dtype=F64)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        total.add_(p.grad.pow(2).sum())
            clip = float(torch.clamp(self.defaults["max_grad_norm"] / (total.sqrt() + group["eps"]), max=1.0))
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            bc1, bc2, bc3 = (1.0 - b ** group["step"] for b in (b1, b2, b3))
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"], state["exp_avg_diff"] = (torch.zeros_like(p) for _ in "123")
                if "neg_pre_grad" not in state or group["step"] == 1:
                    state["neg_pre_grad"] = p.grad.clone().mul_(-clip)
                grad, q = p.grad, state["neg_pre_grad"]
                grad.mul_(clip)
                q.add_(grad)
                state["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
                state["exp_avg_diff"].mul_(b2).add_(q, alpha=1 - b2)
                q.mul_(b2).add_(grad)
                state["exp_avg_sq"].mul_(b3).addcmul_(q, q, value=1 - b3)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bc3)).add_(group["eps"])
                lr, wd = group["lr"], group["weight_decay"]
                if group["no_prox"]:
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / bc1)
                    p.addcdiv_(state["exp_avg_diff"], denom, value=-lr * b2 / bc2)
                else:
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / bc1)
                    p.addcdiv_(state["exp_avg_diff"], denom, value=-lr * b2 / bc2)
                    p.div_(1 + lr * wd)
                q.zero_().add_(grad, alpha=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.01, "weight_decay": 0.1, "no_prox": False, "max_grad_norm": 0.0},
        {"lr": 0.01, "weight_decay": 0.1, "no_prox": True, "max_grad_norm": 0.0},
        {"lr": 0.02, "weight_decay": 0.0, "no_prox": False, "max_grad_norm": 1.0},
    ],
)
def test_adan_matches_sail_sg_adan(backend: str, kwargs: dict[str, float]) -> None:
    ours, theirs = _params(SHAPES)
    args = {"betas": (0.98, 0.92, 0.99), "eps": 1e-8, **kwargs}
    worst = _run_pair(
        portopt.Adan(ours, backend=backend, **args),
        ours,
        _AdanTranscription(theirs, **args),  # type: ignore[arg-type]
        theirs,
        SHAPES,
    )
    assert worst <= 1e-10
