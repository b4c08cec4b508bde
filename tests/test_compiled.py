"""The compiled backend (generated kernel + torch.compile) against independent truth.

* Parity: 50 steps against the float64 reference backend (and the generic torch backend)
  for every algorithm; adamw, lamb and lion in the default run, every algorithm x
  structural option behind ``-m slow``.
* No recompilation: 100 steps with a changing learning-rate schedule (and betas, and
  tensors of new sizes) leave dynamo's and the backend's compile counters unchanged.
* Precision: bf16 storage computes in float32 and rounds once: one step agrees with the
  float64 result rounded to bf16 within one bf16 ulp.
* float64 parameters compute in float64 (1e-12 against the reference); row/column
  factored states compile as rank-2 and rank-3 graphs.
* Hoisting, the eager path (sizes 0/1, non-contiguous tensors), per-parameter step
  counters, tensor hyperparameters and all-or-nothing errors.

Compiled graphs are shared through a session-scoped cache of step functions, and
Inductor's on-disk cache makes a second run cheap.
"""

from __future__ import annotations

import inspect
import itertools
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

if sys.platform.startswith("linux"):
    import resource

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters

from portopt.algorithms import ALGORITHMS, get_spec
from portopt.backends.compiled import CompiledStep, build_compiled_step, compile_unavailable_reason
from portopt.backends.reference import build_reference_step
from portopt.backends.torch_generic import build_torch_step
from portopt.lowering.backend import ParamState
from portopt.lowering.checks import StepInputError
from portopt.lowering.codegen import plan_kernel
from portopt.lowering.interpreter import Bindings, evaluate_step
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec import Hyperparameter, Layout, P, Spec, StateDecl, hyper, sqrt, square, state
from portopt.spec.expr import G, col_mean, row_mean
from portopt.spec.symbols import NON_NEGATIVE, UNIT_INTERVAL_OPEN_RIGHT

pytestmark = [
    pytest.mark.skipif(compile_unavailable_reason("cpu") is not None, reason=str(compile_unavailable_reason("cpu"))),
    # Raised inside torch while dynamo imports; not ours to fix.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

STEPS = 50
RTOL = 1e-5
ATOL = 1e-6
"""Element-wise |a − b| <= ATOL + RTOL·(|b| + rms(b)): fp32 relative error, measured against
the element and the tensor's scale, since an element passing near zero (a momentum
crossing 0) keeps the absolute error of the large terms that cancelled there."""
SHAPES: tuple[tuple[int, ...], ...] = ((37,), (6, 9), (0,), (1,), (3, 4, 5))
"""Sizes that take the compiled graph (37, 54, 60 elements) and the eager path (0 and 1)."""
DEFAULT_ALGORITHMS = ("adamw", "lamb", "lion")


def _option_sets(name: str) -> list[dict[str, Any]]:
    """Every combination of the factory's boolean options that it accepts."""
    factory = ALGORITHMS[name]
    flags = [p.name for p in inspect.signature(factory).parameters.values() if isinstance(p.default, bool)]
    sets = []
    for values in itertools.product((False, True), repeat=len(flags)):
        options = dict(zip(flags, values, strict=True))
        try:
            factory(**options)
        except ValueError:  # e.g. nesterov without momentum
            continue
        sets.append(options)
    return sets


FULL_MATRIX = [(name, options) for name in ALGORITHMS for options in _option_sets(name)]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, options = case
    on = [k for k, v in options.items() if v]
    return "-".join([name, *on])


def _hypers(spec: Spec) -> dict[str, float]:
    """Defaults, with every optional term switched on so that it is under test."""
    values = spec.defaults()
    overrides = {"lr": 1e-2, "weight_decay": 0.05, "momentum": 0.9, "dampening": 0.1, "lr_decay": 0.01}
    values.update({k: v for k, v in overrides.items() if k in values})
    if spec.name == "sgd" and spec.option_map.get("nesterov"):
        values["dampening"] = 0.0
    return values


@pytest.fixture(scope="session")
def compiled() -> Callable[[Spec], CompiledStep]:
    """Compiled step functions shared by every test of the session (one compile per spec and signature)."""
    cache: dict[Spec, CompiledStep] = {}

    def get(spec: Spec) -> CompiledStep:
        if spec not in cache:
            step = build_compiled_step(spec)
            assert isinstance(step, CompiledStep)
            cache[spec] = step
        return cache[spec]

    return get


def _problem(seed: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def _gradients(seed: int, dtype: torch.dtype = torch.float32) -> Iterator[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def _excess(a: Tensor, b: Tensor) -> float:
    """max |a − b| / (ATOL + RTOL·(|b| + rms(b))): at most 1 when ``a`` matches ``b`` within tolerance."""
    a, b = a.double(), b.double().expand_as(a)
    if a.numel() == 0:
        return 0.0
    scale = b.square().mean().sqrt()
    return float(((a - b).abs() / (ATOL + RTOL * (b.abs() + scale))).max())


def _run_parity(spec: Spec, step: Callable[..., None]) -> None:
    """``step`` against the reference (and the generic backend) for STEPS steps, every step compared."""
    hypers = _hypers(spec)
    others = {"reference": build_reference_step(spec), "torch": build_torch_step(spec)}
    params = _problem(0)
    copies = {name: [p.clone() for p in params] for name in others}
    states: list[ParamState] = [{} for _ in params]
    other_states: dict[str, list[ParamState]] = {name: [{} for _ in params] for name in others}
    grads = _gradients(1)
    for t in range(1, STEPS + 1):
        g = next(grads)
        lr = hypers["lr"] * (0.5 + 0.5 * math.cos(math.pi * t / STEPS))  # a schedule, as a user would
        h = {**hypers, "lr": lr}
        step(params, g, states, h)
        for name, other in others.items():
            other(copies[name], g, other_states[name], h)
        for name in others:
            for i, (p, q) in enumerate(zip(params, copies[name], strict=True)):
                assert _excess(p, q) <= 1, f"{spec.name}: parameter {i} vs {name} at t={t}: {_excess(p, q):.2f}"
                for s in spec.state_names:
                    got, want = states[i][s], other_states[name][i][s]
                    assert _excess(got, want) <= 1, f"{spec.name}: state {s!r} of parameter {i} vs {name} at t={t}"
                assert float(states[i]["step"]) == t


@pytest.mark.parametrize("name", DEFAULT_ALGORITHMS)
def test_parity_with_reference_default_subset(name: str, compiled: Callable[[Spec], CompiledStep]) -> None:
    spec = get_spec(name)
    _run_parity(spec, compiled(spec))


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_MATRIX, ids=_case_id)
def test_parity_with_reference_every_algorithm(
    case: tuple[str, dict[str, Any]], compiled: Callable[[Spec], CompiledStep]
) -> None:
    name, options = case
    spec = get_spec(name, **options)
    _run_parity(spec, compiled(spec))
    _run_parity(spec.maximized(), compiled(spec.maximized()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults with getrusage (Linux semantics)")
def test_a_reduced_value_is_recomputed_not_stored(compiled: Callable[[Spec], CompiledStep]) -> None:
    """LAMB's update u is reduced (‖u‖) and then applied: the kernel recomputes it in the update pass
    instead of storing a tensor-sized temporary, so a step touches no fresh memory. A temporary of
    64 MB (above glibc's mmap threshold) would be a fresh mapping every step: one page fault per page."""
    spec = get_spec("lamb")
    step = compiled(spec)
    n = 1 << 24
    params, grads = [torch.randn(n)], [torch.randn(n)]
    states: list[ParamState] = [{}]
    hypers = _hypers(spec)
    for _ in range(2):
        step(params, grads, states, hypers)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step(params, grads, states, hypers)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    assert faults_per_step < 0.01 * n * 4 / 4096, faults_per_step
    assert torch.isfinite(params[0]).all()


def test_no_recompilation_over_100_steps_with_a_schedule(compiled: Callable[[Spec], CompiledStep]) -> None:
    spec = get_spec("adamw")
    step = compiled(spec)
    params = _problem(2)
    states: list[ParamState] = [{} for _ in params]
    grads = _gradients(3)
    step(params, next(grads), states, _hypers(spec))  # compiles (or loads) the graph
    graphs_before = counters["stats"]["unique_graphs"]
    compiled_before = sum(g.graphs_compiled for g in step.graphs.values())
    signatures_before = len(step.graphs)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), max_lr=0.1, total_steps=200
    )
    for t in range(100):
        hypers = {**_hypers(spec), "lr": schedule.get_last_lr()[0], "beta1": 0.9 - 0.001 * t}
        schedule.optimizer.step()
        schedule.step()
        step(params, next(grads), states, hypers)
    # New tensor sizes reuse the graph too (sizes are dynamic).
    for n in (2, 1000, 4099):
        step([torch.randn(n)], [torch.randn(n)], [{}], _hypers(spec))
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert sum(g.graphs_compiled for g in step.graphs.values()) == compiled_before
    assert len(step.graphs) == signatures_before
    assert all(g.usable for g in step.graphs.values()), "calls should bypass dynamo's guards"


def test_step_only_scalars_are_hoisted_out_of_the_kernel() -> None:
    plan = plan_kernel(get_spec("adam"))
    body = [line for line in plan.source.splitlines() if "= op_" in line]
    # Bias corrections (powers of t), square roots of them, lr / (1 − β1^t): all on the host.
    assert not any("op_pow" in line for line in body)
    assert sum("op_sqrt" in line for line in body) == 1  # sqrt(v) only, per element
    assert len(plan.scalars) >= 5
    assert plan.reductions == 0
    assert plan_kernel(get_spec("lamb")).reductions == 2  # ‖p‖ and ‖u‖


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_bf16_storage_rounds_once_from_float32_math(name: str, compiled: Callable[[Spec], CompiledStep]) -> None:
    """One step on bf16 tensors equals the float64 result rounded to bf16, within one bf16 ulp."""
    spec = get_spec(name)
    step = compiled(spec)
    hypers = {**_hypers(spec), "lr": 0.05}
    gen = torch.Generator().manual_seed(4)
    n = 4099
    param = torch.randn(n, generator=gen).bfloat16()
    grad = torch.randn(n, generator=gen).bfloat16()
    state: ParamState = {}
    step([param.clone()], [grad], [state], hypers)  # creates bf16 states
    for s in spec.state_names:
        state[s].copy_(torch.rand(n, generator=gen).bfloat16())
    inputs = {s: state[s].double() for s in spec.state_names}
    expected_states, expected = evaluate_step(
        spec, TORCH_RULES, Bindings(param.double(), grad.double(), 2.0, hypers, inputs)
    )
    step([param], [grad], [state], hypers)
    for got, want in [(param, expected), *((state[s], expected_states[s]) for s in spec.state_names)]:
        assert got.dtype == torch.bfloat16
        gap = (got.double() - want.expand(n)).abs()
        ulp = want.expand(n).abs() * 2.0**-7 + 1e-30
        assert bool((gap <= ulp).all()), f"{name}: {int((gap > ulp).sum())} elements off by more than one bf16 ulp"


def test_eager_path_non_contiguous_and_tiny_tensors_agree_with_reference(
    compiled: Callable[[Spec], CompiledStep],
) -> None:
    spec = get_spec("adamw")
    step = compiled(spec)
    base = torch.randn(8, 6)
    params = [base.t(), torch.randn(1), torch.randn(0), torch.randn(5, 4)[:, ::2]]
    assert not params[0].is_contiguous()
    assert not params[3].is_contiguous()
    copies = [p.clone() for p in params]
    states: list[ParamState] = [{} for _ in params]
    ref_states: list[ParamState] = [{} for _ in params]
    reference = build_reference_step(spec)
    for seed in range(5):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) for p in params]
        step(params, grads, states, _hypers(spec))
        reference(copies, grads, ref_states, _hypers(spec))
    for p, q in zip(params, copies, strict=True):
        assert _excess(p, q) <= 1


def test_per_parameter_step_counters_and_tensor_hyperparameters(compiled: Callable[[Spec], CompiledStep]) -> None:
    """A parameter that skipped steps has its own t; lr may be a 0-d tensor."""
    spec = get_spec("adamw")
    step, reference = compiled(spec), build_reference_step(spec)
    params = [torch.randn(40), torch.randn(50)]
    copies = [p.clone() for p in params]
    states: list[ParamState] = [{}, {}]
    ref_states: list[ParamState] = [{}, {}]
    hypers: Mapping[str, float | Tensor] = {**_hypers(spec), "lr": torch.tensor(0.02)}
    for t in range(6):
        idx = [0, 1] if t % 2 == 0 else [0]  # parameter 1 has no gradient on odd steps
        grads = [torch.randn(params[i].shape) for i in idx]
        step([params[i] for i in idx], grads, [states[i] for i in idx], hypers)
        reference([copies[i] for i in idx], grads, [ref_states[i] for i in idx], hypers)
    assert float(states[0]["step"]) == 6
    assert float(states[1]["step"]) == 3
    for p, q in zip(params, copies, strict=True):
        assert _excess(p, q) <= 1


def test_a_failing_step_changes_nothing(compiled: Callable[[Spec], CompiledStep]) -> None:
    spec = get_spec("adamw")
    step = compiled(spec)
    params = [torch.randn(40), torch.randn(50)]
    states: list[ParamState] = [{}, {}]
    step(params, [torch.randn(40), torch.randn(50)], states, _hypers(spec))
    states[1]["exp_avg"] = torch.zeros(49)  # corrupt the second parameter's state
    before = [p.clone() for p in params]
    before_state = {k: v.clone() for k, v in states[0].items()}
    with pytest.raises(StepInputError, match="exp_avg"):
        step(params, [torch.randn(40), torch.randn(50)], states, _hypers(spec))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(states[0][k], v) for k, v in before_state.items())
    with pytest.raises(ValueError, match="lr"):
        step(params[:1], [torch.randn(40)], states[:1], {k: v for k, v in _hypers(spec).items() if k != "lr"})
    assert torch.equal(params[0], before[0])


def _factored_spec() -> Spec:
    """An Adafactor-like spec: second moment kept per row and per column (rank-2 and rank-3 graphs)."""
    lr, b2, eps = hyper("lr"), hyper("beta2"), hyper("eps")
    r = b2 * state("row") + (1 - b2) * row_mean(square(G))
    c = b2 * state("col") + (1 - b2) * col_mean(square(G))
    return Spec(
        name="factored",
        title="factored second moment",
        hyperparameters=(
            Hyperparameter("lr", 1e-2, NON_NEGATIVE),
            Hyperparameter("beta2", 0.9, UNIT_INTERVAL_OPEN_RIGHT),
            Hyperparameter("eps", 1e-3, NON_NEGATIVE),
        ),
        states=(StateDecl("row", "r", layout=Layout.ROW), StateDecl("col", "c", layout=Layout.COL)),
        updates=(("row", r), ("col", c)),
        param_update=P - lr * G / (sqrt(r * c) + eps),
    )


def test_factored_states_keep_their_rows_and_columns(compiled: Callable[[Spec], CompiledStep]) -> None:
    spec = _factored_spec()
    step, reference = compiled(spec), build_reference_step(spec)
    shapes = [(6, 9), (2, 5, 7), (1, 4)]  # rank 2, rank 3, and a row of 1 (uncompiled)
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen) for s in shapes]
    copies = [p.clone() for p in params]
    states: list[ParamState] = [{} for _ in params]
    ref_states: list[ParamState] = [{} for _ in params]
    for _ in range(10):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        step(params, grads, states, spec.defaults())
        reference(copies, grads, ref_states, spec.defaults())
    for i, (p, q) in enumerate(zip(params, copies, strict=True)):
        assert _excess(p, q) <= 1
        assert states[i]["row"].shape == (*shapes[i][:-1], 1)
        assert _excess(states[i]["col"], ref_states[i]["col"]) <= 1
    assert {g.key.kind.rank for g in step.graphs.values()} == {2, 3}


def test_float64_parameters_compute_in_float64(compiled: Callable[[Spec], CompiledStep]) -> None:
    """float64 is its own compute dtype: the compiled kernel agrees with the reference to 1e-12."""
    spec = get_spec("adamw")
    step, reference = compiled(spec), build_reference_step(spec)
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(1000, generator=gen, dtype=torch.float64)]
    copies = [params[0].clone()]
    states: list[ParamState] = [{}]
    ref_states: list[ParamState] = [{}]
    for _ in range(20):
        grads = [torch.randn(1000, generator=gen, dtype=torch.float64)]
        step(params, grads, states, _hypers(spec))
        reference(copies, grads, ref_states, _hypers(spec))
    assert float((params[0] - copies[0]).norm() / copies[0].norm()) <= 1e-12
    assert states[0]["exp_avg"].dtype == torch.float64
