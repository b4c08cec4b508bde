"""AdaBelief, LAMB and Lion against a hand computation of each paper's equations.

torch.optim has none of the three, so the truth here is the paper's algorithm written
out again in plain NumPy float64, independently of portopt's spec language, and
compared with the float64 reference backend after every step: parameters and states.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from portopt.algorithms import adabelief, lamb, lion
from portopt.backends.reference import build_reference_step
from portopt.lowering.backend import ParamState
from portopt.spec.definition import Spec

Array = NDArray[np.float64]
TOLERANCE = 1e-12
STEPS = 12
SHAPES: tuple[tuple[int, ...], ...] = ((4,), (2, 3), (), (0,))


@dataclass
class HandState:
    """One tensor's parameter and states, as the hand computation keeps them."""

    p: Array
    states: dict[str, Array]


HandStep = Callable[[HandState, Array, int], None]
"""Advance one tensor by one step in place, given its gradient and the step t (1-based)."""


def relative_error(ours: Array, truth: Array) -> float:
    assert ours.shape == truth.shape
    diff, scale = float(np.linalg.norm(ours - truth)), float(np.linalg.norm(truth))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def random_arrays(seed: int, shapes: tuple[tuple[int, ...], ...]) -> list[Array]:
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s), dtype=np.float64).reshape(s) for s in shapes]


def compare_runs(
    spec: Spec,
    hypers: dict[str, float],
    hand_step: HandStep,
    initial_params: list[Array],
    grads_per_step: list[list[Array]],
) -> float:
    """Run the reference backend and the hand computation side by side; return the worst error."""
    ours = [torch.from_numpy(p.copy()) for p in initial_params]
    ours_states: list[ParamState] = [{} for _ in ours]
    hand = [HandState(p.copy(), {}) for p in initial_params]
    step = build_reference_step(spec)
    worst = 0.0
    for t, grads in enumerate(grads_per_step, start=1):
        step(ours, [torch.from_numpy(g.copy()) for g in grads], ours_states, hypers)
        for index, (h, g) in enumerate(zip(hand, grads, strict=True)):
            hand_step(h, g, t)
            assert set(ours_states[index]) == {*h.states, "step"}
            assert float(ours_states[index]["step"]) == t
            errors = {"param": relative_error(ours[index].numpy(), h.p)}
            for name, value in h.states.items():
                errors[name] = relative_error(ours_states[index][name].numpy(), value)
            bad = {k: e for k, e in errors.items() if not e <= TOLERANCE}
            assert not bad, f"{spec.name} step {t} tensor {index}: relative error above {TOLERANCE}: {bad}"
            worst = max(worst, *errors.values())
    return worst


def _zeros_like_state(h: HandState, *names: str) -> None:
    for name in names:
        h.states.setdefault(name, np.zeros_like(h.p))


# AdaBelief ---------------------------------------------------------------------------------


def adabelief_by_hand(
    lr: float, beta1: float, beta2: float, eps: float, wd: float, decoupled: bool, maximize: bool
) -> HandStep:
    """Zhuang et al. 2020, Algorithm 2, with AdamW-style decay when ``decoupled``."""

    def step(h: HandState, grad: Array, t: int) -> None:
        _zeros_like_state(h, "exp_avg", "exp_avg_var")
        g = -grad if maximize else grad.copy()
        if not decoupled:
            g = g + wd * h.p
        m = beta1 * h.states["exp_avg"] + (1 - beta1) * g
        s = beta2 * h.states["exp_avg_var"] + (1 - beta2) * (g - m) ** 2 + eps
        m_hat = m / (1 - beta1**t)
        s_hat = s / (1 - beta2**t)
        decay = lr * wd * h.p if decoupled else 0.0
        h.p = h.p - decay - lr * m_hat / (np.sqrt(s_hat) + eps)
        h.states["exp_avg"], h.states["exp_avg_var"] = m, s

    return step


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("eps", [1e-16, 1e-8])
@pytest.mark.parametrize("maximize", [False, True])
def test_adabelief_matches_paper(decoupled: bool, wd: float, eps: float, maximize: bool) -> None:
    lr, beta1, beta2 = 0.01, 0.9, 0.99
    spec = adabelief(decoupled_weight_decay=decoupled)
    if maximize:
        spec = spec.maximized()
    hypers = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": wd}
    grads = [random_arrays(100 + t, SHAPES) for t in range(STEPS)]
    hand = adabelief_by_hand(lr, beta1, beta2, eps, wd, decoupled, maximize)
    compare_runs(spec, hypers, hand, random_arrays(1, SHAPES), grads)


def test_adabelief_defaults_are_the_papers() -> None:
    spec = adabelief()
    assert spec.defaults() == {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-16, "weight_decay": 0.0}
    assert spec.state_names == ("exp_avg", "exp_avg_var")


# LAMB --------------------------------------------------------------------------------------


def lamb_by_hand(lr: float, beta1: float, beta2: float, eps: float, wd: float, bias_correction: bool) -> HandStep:
    """You et al. 2020, Algorithm 2 (φ = identity), trust ratio 1 when either norm is 0."""

    def step(h: HandState, g: Array, t: int) -> None:
        _zeros_like_state(h, "exp_avg", "exp_avg_sq")
        m = beta1 * h.states["exp_avg"] + (1 - beta1) * g
        v = beta2 * h.states["exp_avg_sq"] + (1 - beta2) * g * g
        m_hat, v_hat = (m / (1 - beta1**t), v / (1 - beta2**t)) if bias_correction else (m, v)
        r = m_hat / (np.sqrt(v_hat) + eps)
        u = r + wd * h.p
        p_norm = math.sqrt(sum(float(x) * float(x) for x in h.p.flat))
        u_norm = math.sqrt(sum(float(x) * float(x) for x in u.flat))
        trust = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
        h.p = h.p - lr * trust * u
        h.states["exp_avg"], h.states["exp_avg_sq"] = m, v

    return step


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lamb_matches_paper(bias_correction: bool, wd: float) -> None:
    lr, beta1, beta2, eps = 0.02, 0.9, 0.999, 1e-6
    spec = lamb(bias_correction=bias_correction)
    hypers = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": wd}
    grads = [random_arrays(200 + t, SHAPES) for t in range(STEPS)]
    hand = lamb_by_hand(lr, beta1, beta2, eps, wd, bias_correction)
    compare_runs(spec, hypers, hand, random_arrays(2, SHAPES), grads)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lamb_zero_norm_guards(wd: float) -> None:
    """A zero parameter (‖p‖ = 0), a zero update (‖u‖ = 0) and both: the trust ratio is 1.

    Tensor 0 starts at zero with nonzero gradients: without the guard the ratio
    0/‖u‖ = 0 would freeze it at zero forever. Tensor 1 is nonzero with zero gradients:
    with wd = 0 its update is exactly zero and an unguarded ‖p‖/0 gives inf·0 = NaN.
    Tensor 2 is zero with zero gradients: both norms vanish and it must stay zero.
    """
    lr, beta1, beta2, eps = 0.02, 0.9, 0.999, 1e-6
    shapes = ((3,), (2, 2), (5,))
    initial = [np.zeros(3), random_arrays(3, ((2, 2),))[0], np.zeros(5)]
    grads = [[random_arrays(300 + t, ((3,),))[0], np.zeros((2, 2)), np.zeros(5)] for t in range(STEPS)]
    hypers = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": wd}
    hand = lamb_by_hand(lr, beta1, beta2, eps, wd, True)
    compare_runs(lamb(), hypers, hand, initial, grads)

    # Independent of the hand computation: the guards' visible effects after one step.
    params = [torch.from_numpy(p.copy()) for p in initial]
    states: list[ParamState] = [{} for _ in shapes]
    build_reference_step(lamb())(params, [torch.from_numpy(g) for g in grads[0]], states, hypers)
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert float(params[0].norm()) > 0.0, "a zero parameter must move (trust ratio 1, not 0)"
    if wd == 0.0:
        assert torch.equal(params[1], torch.from_numpy(initial[1])), "a zero update leaves the parameter as it is"
    assert float(params[2].abs().max()) == 0.0


# Lion --------------------------------------------------------------------------------------


def lion_by_hand(lr: float, beta1: float, beta2: float, wd: float) -> HandStep:
    """Chen et al. 2023, Algorithm 2: sign of the β1 interpolation, momentum tracked with β2."""

    def step(h: HandState, g: Array, t: int) -> None:
        _zeros_like_state(h, "exp_avg")
        m = h.states["exp_avg"]
        c = beta1 * m + (1 - beta1) * g
        h.p = h.p - lr * (np.sign(c) + wd * h.p)
        h.states["exp_avg"] = beta2 * m + (1 - beta2) * g

    return step


@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.95, 0.98)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_matches_paper(betas: tuple[float, float], wd: float) -> None:
    lr = 0.01
    hypers = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "weight_decay": wd}
    # Tensor 3 of the extra zero-gradient shape checks sign(0) = 0 (no movement but decay).
    shapes = (*SHAPES, (3,))
    grads = [[*random_arrays(400 + t, SHAPES), np.zeros(3)] for t in range(STEPS)]
    hand = lion_by_hand(lr, betas[0], betas[1], wd)
    compare_runs(lion(), hypers, hand, random_arrays(4, shapes), grads)


def test_lion_step_has_magnitude_lr() -> None:
    """Without decay every coordinate with a nonzero interpolation moves by exactly lr."""
    lr = 0.125  # a power of two: p ± lr is exact for these p
    p = torch.tensor([0.5, -0.25, 1.0, 0.0])
    g = torch.tensor([3.0, -1e-30, 0.0, -2.0])
    states: list[ParamState] = [{}]
    build_reference_step(lion())([p], [g], states, {"lr": lr, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0})
    assert p.tolist() == [0.5 - lr, -0.25 + lr, 1.0, lr]
