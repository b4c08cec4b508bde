"""The float64 reference backend against torch.optim, step by step.

For every algorithm torch.optim also has, the reference interpreter of our spec and
torch.optim's default single-tensor implementation (``foreach=False``), both in float64,
are fed the same seeded gradient stream. After *every* step (so t = 1 and t = 2 are
checked, and RAdam's branch on both sides of ρ_t = 5) the parameters, every state tensor
torch keeps, and the step counter must agree to ``TOLERANCE`` relative, norm-wise.
The hyperparameters come from torch's own param group, so our defaults and option
mapping are under test too.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from portopt.algorithms import adagrad, adam, adamax, adamw, nadam, radam, rmsprop, sgd
from portopt.algorithms.radam import PAPER_THRESHOLD, TORCH_THRESHOLD
from portopt.backends.reference import build_reference_step
from portopt.lowering.backend import ParamState
from portopt.spec.definition import Spec
from portopt.spec.errors import HyperparameterError

TOLERANCE = 1e-12
DELTA_TOLERANCE = 1e-9
"""For per-step changes p_t − p_{t−1}: the subtraction of two O(1) parameters loses the
digits of a change ~1e-4 times smaller (about 1e-12 relative, observed 3e-12)."""
STEPS = 32
SHAPES: tuple[tuple[int, ...], ...] = ((5,), (0,), (), (3, 4))
"""A vector, a zero-size tensor, a scalar and a matrix."""


@pytest.fixture(autouse=True)
def _float64_default() -> Iterator[None]:
    # torch.optim keeps its step counter (and NAdam's mu_product) in the default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@dataclass(frozen=True)
class Case:
    """One configuration: our spec factory's options and torch's optimizer with its kwargs."""

    factory: Any
    options: Mapping[str, Any]
    optimizer: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        # options not already spelled by torch's kwargs (e.g. rmsprop's momentum=True)
        extra = {k: v for k, v in self.options.items() if k not in self.kwargs}
        parts = [f"{k}={v}" for k, v in {**extra, **self.kwargs}.items()]
        return f"{self.optimizer.__name__}[{','.join(parts)}]"

    def spec(self) -> Spec:
        built: Spec = self.factory(**self.options)
        return built.maximized() if self.kwargs.get("maximize") else built


def relative_error(ours: Tensor, theirs: Tensor) -> float:
    """``‖ours − theirs‖ / ‖theirs‖`` (0 when both are empty or both zero)."""
    assert ours.shape == theirs.shape, f"shape {tuple(ours.shape)} != torch's {tuple(theirs.shape)}"
    diff = torch.linalg.vector_norm((ours.double() - theirs.double()).flatten()).item()
    scale = torch.linalg.vector_norm(theirs.double().flatten()).item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def hypers_from_group(spec: Spec, group: Mapping[str, Any]) -> dict[str, float]:
    """Our hyperparameter values read from torch's param group (``betas`` split by index)."""
    values: dict[str, float] = {}
    for h in spec.hyperparameters:
        raw = group[h.key]
        values[h.name] = float(raw if h.group_index is None else raw[h.group_index])
    return values


def gradient_stream(seed: int, steps: int) -> list[list[Tensor]]:
    """Seeded gradients, one list per step, with a per-step scale spread over 3 decades."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for _ in range(steps):
        scale = math.exp(3.0 * float(torch.randn((), generator=gen, dtype=torch.float64)))
        stream.append([scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES])
    return stream


def run_against_torch(case: Case, seed: int = 0, steps: int = STEPS) -> float:
    """Step both implementations ``steps`` times; return the worst relative error seen.

    Every step compares each parameter, every state torch keeps and the step count.
    """
    gen = torch.Generator().manual_seed(1000 + seed)
    initial = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    theirs = [p.clone().requires_grad_(True) for p in initial]
    ours = [p.clone() for p in initial]
    kwargs: dict[str, Any] = {"foreach": False, **case.kwargs}  # torch's single-tensor (for-loop) path
    optimizer = case.optimizer(theirs, **kwargs)
    spec = case.spec()
    hypers = hypers_from_group(spec, optimizer.param_groups[0])
    step = build_reference_step(spec)
    states: list[ParamState] = [{} for _ in ours]
    worst = 0.0
    for t, grads in enumerate(gradient_stream(seed, steps), start=1):
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        step(ours, grads, states, hypers)
        for index, (mine, their) in enumerate(zip(ours, theirs, strict=True)):
            where = f"{case.id} step {t} param {index} (shape {tuple(their.shape)})"
            errors = {"param": relative_error(mine, their.detach())}
            their_state = optimizer.state[their]
            assert set(states[index]) == set(their_state) | {"step"}, where
            for name, value in their_state.items():
                errors[name] = relative_error(states[index][name], value)
            if "step" not in their_state:  # torch's SGD keeps no counter; ours must still count
                assert float(states[index]["step"]) == t, where
            else:
                assert float(states[index]["step"]) == float(their_state["step"]) == t, where
            bad = {k: e for k, e in errors.items() if not e <= TOLERANCE}
            assert not bad, f"{where}: relative error above {TOLERANCE}: {bad}"
            worst = max(worst, *errors.values())
    return worst


def _grid(**axes: tuple[Any, ...]) -> list[dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


def _cases() -> list[Case]:
    cases: list[Case] = []
    # maximize is checked with weight decay on, where the sign interplay (g -> -g before decay) matters.
    common = [{"weight_decay": 0.0, "maximize": False}, *_grid(weight_decay=(0.1,), maximize=(False, True))]
    for kw in common:
        cases.append(Case(sgd, {}, torch.optim.SGD, {"lr": 0.05, **kw}))
        for dampening in (0.0, 0.3):
            cases.append(
                Case(
                    sgd,
                    {"momentum": True},
                    torch.optim.SGD,
                    {"lr": 0.05, "momentum": 0.9, "dampening": dampening, **kw},
                )
            )
        cases.append(
            Case(
                sgd,
                {"momentum": True, "nesterov": True},
                torch.optim.SGD,
                {"lr": 0.05, "momentum": 0.8, "nesterov": True, **kw},
            )
        )
        for lr_decay, initial in ((0.0, 0.0), (0.05, 0.0), (0.0, 0.5), (0.05, 0.5)):
            cases.append(
                Case(
                    adagrad,
                    {},
                    torch.optim.Adagrad,
                    {"lr": 0.1, "lr_decay": lr_decay, "initial_accumulator_value": initial, **kw},
                )
            )
        for centered, momentum, alpha in itertools.product((False, True), (0.0, 0.8), (0.99, 0.9)):
            cases.append(
                Case(
                    rmsprop,
                    {"centered": centered, "momentum": momentum > 0},
                    torch.optim.RMSprop,
                    {"lr": 0.01, "alpha": alpha, "momentum": momentum, "centered": centered, **kw},
                )
            )
        for amsgrad, betas in itertools.product((False, True), ((0.9, 0.999), (0.5, 0.9))):
            ams = {"amsgrad": amsgrad}
            cases.append(Case(adam, ams, torch.optim.Adam, {"lr": 0.05, "betas": betas, **ams, **kw}))
            cases.append(Case(adamw, ams, torch.optim.AdamW, {"lr": 0.05, "betas": betas, **ams, **kw}))
        for decoupled, betas, psi in (
            (False, (0.9, 0.999), 4e-3),
            (True, (0.9, 0.999), 4e-3),
            (False, (0.6, 0.9), 0.1),
            (True, (0.6, 0.9), 0.1),
        ):
            dwd = {"decoupled_weight_decay": decoupled}
            cases.append(
                Case(nadam, dwd, torch.optim.NAdam, {"lr": 0.05, "betas": betas, "momentum_decay": psi, **dwd, **kw})
            )
        for betas in ((0.9, 0.999), (0.5, 0.8)):
            cases.append(Case(adamax, {}, torch.optim.Adamax, {"lr": 0.05, "betas": betas, **kw}))
        # beta2 = 0.999 / 0.7 / 0.68 cross rho_t = 5 at t = 6 / 10 / 12; 0.6 never does (rho_inf = 4).
        for decoupled, beta2 in itertools.product((False, True), (0.999, 0.7, 0.68, 0.6)):
            dwd = {"decoupled_weight_decay": decoupled}
            cases.append(Case(radam, dwd, torch.optim.RAdam, {"lr": 0.05, "betas": (0.9, beta2), **dwd, **kw}))
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_matches_torch(case: Case) -> None:
    assert run_against_torch(case) <= TOLERANCE


def rho(t: int, beta2: float) -> float:
    """RAdam's ρ_t, written out here independently of the spec."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    return rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)


@pytest.mark.parametrize("beta2", [0.999, 0.7, 0.68, 0.6])
def test_radam_steps_cover_both_branches(beta2: float) -> None:
    """The grid's beta2 values give rho_t <= 5 at t = 1, 2 and, except 0.6, rho_t > 5 later in the run."""
    rhos = [rho(t, beta2) for t in range(1, STEPS + 1)]
    assert rhos[0] == pytest.approx(1.0)
    assert rhos[1] <= TORCH_THRESHOLD
    assert any(r > TORCH_THRESHOLD for r in rhos) == (beta2 != 0.6)


@pytest.mark.parametrize("beta2", [0.999, 0.7, 0.68])
def test_radam_paper_threshold_differs_exactly_where_4_lt_rho_le_5(beta2: float) -> None:
    """The paper's ρ_t > 4 changes the update exactly at the steps with 4 < ρ_t ≤ 5.

    Without weight decay the moments do not depend on the parameter, so the per-step
    parameter change of each variant can be compared to torch's step by step.
    """
    lr, beta1, eps = 0.05, 0.9, 1e-8
    spec = radam(threshold=PAPER_THRESHOLD)
    hypers = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": 0.0}
    reference = build_reference_step(spec)
    theirs = [torch.ones(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    ours = [torch.ones(s, dtype=torch.float64) for s in SHAPES]
    optimizer = torch.optim.RAdam(theirs, lr=lr, betas=(beta1, beta2), eps=eps, foreach=False)
    states: list[ParamState] = [{} for _ in ours]
    window = []
    for t, grads in enumerate(gradient_stream(7, STEPS), start=1):
        before = [p.detach().clone() for p in theirs]
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        ours_before = [p.clone() for p in ours]
        reference(ours, grads, states, hypers)
        r = rho(t, beta2)
        # Both start from equal params; compare this step's change only.
        their_delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(theirs, before, strict=True)])
        our_delta = torch.cat([(p - b).flatten() for p, b in zip(ours, ours_before, strict=True)])
        if PAPER_THRESHOLD < r <= TORCH_THRESHOLD:
            window.append(t)
            # Paper's rectified step, by hand: -lr * m_hat * sqrt(1-b2^t)/(sqrt(v)+eps) * r_t.
            exp_avg = torch.cat([states[i]["exp_avg"].flatten() for i in range(len(SHAPES))])
            exp_avg_sq = torch.cat([states[i]["exp_avg_sq"].flatten() for i in range(len(SHAPES))])
            rho_inf = 2.0 / (1.0 - beta2) - 1.0
            rect = math.sqrt((r - 4) * (r - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * r))
            adaptive = math.sqrt(1 - beta2**t) / (exp_avg_sq.sqrt() + eps)
            expected = -lr * exp_avg / (1 - beta1**t) * adaptive * rect
            assert relative_error(our_delta, expected) <= DELTA_TOLERANCE, t
            assert relative_error(our_delta, their_delta) > 1e-3, f"step {t} (rho_t={r:.4f}) should differ"
        else:
            assert relative_error(our_delta, their_delta) <= DELTA_TOLERANCE, f"step {t} (rho_t={r:.4f}) should agree"
    assert window, "the run never had 4 < rho_t <= 5"


TORCH_OF: dict[str, tuple[type[torch.optim.Optimizer], Spec]] = {
    "sgd": (torch.optim.SGD, sgd(momentum=True)),
    "adagrad": (torch.optim.Adagrad, adagrad()),
    "rmsprop": (torch.optim.RMSprop, rmsprop(centered=True, momentum=True)),
    "adam": (torch.optim.Adam, adam()),
    "adamw": (torch.optim.AdamW, adamw()),
    "nadam": (torch.optim.NAdam, nadam()),
    "adamax": (torch.optim.Adamax, adamax()),
    "radam": (torch.optim.RAdam, radam()),
}


@pytest.mark.parametrize("name", sorted(TORCH_OF))
def test_defaults_match_torch(name: str) -> None:
    optimizer_class, spec = TORCH_OF[name]
    signature = inspect.signature(optimizer_class.__init__).parameters
    for h in spec.hyperparameters:
        default = signature[h.key].default
        expected = default if h.group_index is None else default[h.group_index]
        assert h.default == expected, f"{name}.{h.name}: ours {h.default}, torch {expected}"


def _bad_values(spec: Spec) -> Iterator[tuple[str, float]]:
    for h in spec.hyperparameters:
        r = h.constraint
        if math.isfinite(r.low):
            yield h.name, (r.low - 1.0 if r.low_inclusive else r.low)
        if math.isfinite(r.high):
            yield h.name, (r.high + 1.0 if r.high_inclusive else r.high)


@pytest.mark.parametrize("name", sorted(TORCH_OF))
def test_bad_hyperparameters_fail_with_torchs_words(name: str) -> None:
    """Each value our constraint refuses, torch refuses too, and our message starts with torch's."""
    optimizer_class, spec = TORCH_OF[name]
    checked = 0
    for hyper_name, value in _bad_values(spec):
        h = spec.hyperparameter(hyper_name)
        kwargs: dict[str, Any] = {}
        if h.group_index is None:
            kwargs[h.key] = value
        else:
            betas = list(inspect.signature(optimizer_class.__init__).parameters[h.key].default)
            betas[h.group_index] = value
            kwargs[h.key] = tuple(betas)
        with pytest.raises(ValueError, match=r"^Invalid ") as theirs:
            optimizer_class([torch.zeros(2, requires_grad=True)], **kwargs)
        with pytest.raises(HyperparameterError) as ours:
            h.check(value, spec.name)
        assert str(ours.value).startswith(str(theirs.value)), (str(ours.value), str(theirs.value))
        assert hyper_name in str(ours.value)
        checked += 1
    assert checked >= 3
