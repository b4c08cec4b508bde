"""The generic torch backend: every spec against the float64 reference, numerics, leanness, selection.

Truths used: the float64 reference interpreter (same spec, independent lowering) for
values; torch's own float64 tensor rules for the host-scalar rules; for low-precision
storage, the same step computed on float32 copies and rounded once (which is what
"element-wise math in float32, rounding once on store" means).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

import portopt.backends as backends
from portopt.algorithms import ALGORITHMS, adam, radam, sgd
from portopt.algorithms.common import learning_rate
from portopt.backends.reference import build_reference_step
from portopt.backends.torch_generic import TORCH_GENERIC, TorchStep
from portopt.lowering.backend import Backend, ParamState
from portopt.lowering.checks import SparseGradientError, StepInputError
from portopt.lowering.host import HOST_RULES, evaluate_host
from portopt.lowering.program import SpecPlan
from portopt.lowering.registry import lookup_backend, registered_backends
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec import (
    G,
    Layout,
    P,
    Spec,
    StateDecl,
    T,
    col_mean,
    const,
    exp,
    hyper,
    log,
    maximum,
    minimum,
    norm,
    row_mean,
    rsqrt,
    sign,
    square,
    state,
    tensor_mean,
    where,
)
from portopt.spec.errors import HyperparameterError
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import Op
from portopt.spec.symbols import Hyperparameter, Range

SHAPES: tuple[tuple[int, ...], ...] = ((5,), (0,), (), (3, 4))
MATRIX_SHAPES: tuple[tuple[int, ...], ...] = ((3, 4), (1, 5), (2, 3, 2))


def option_sets(name: str) -> list[dict[str, Any]]:
    """Every combination of the boolean options of an algorithm factory."""
    factory = ALGORITHMS[name]
    flags = [k for k, v in factory.__kwdefaults__.items() if isinstance(v, bool)] if factory.__kwdefaults__ else []
    sets = [dict(zip(flags, values, strict=True)) for values in itertools.product((False, True), repeat=len(flags))]
    return [s for s in sets if not (name == "sgd" and s.get("nesterov") and not s.get("momentum"))]


SPECS = [(name, opts) for name in sorted(ALGORITHMS) for opts in option_sets(name)]


def hypers_for(spec: Spec) -> dict[str, float]:
    values = spec.defaults()
    values.update({"lr": 0.05})
    for key, value in {
        "weight_decay": 0.1,
        "momentum": 0.9,
        "lr_decay": 0.05,
        "initial_accumulator_value": 0.2,
    }.items():
        if key in values:
            values[key] = value
    return values


def relative_error(ours: Tensor, theirs: Tensor) -> float:
    diff = torch.linalg.vector_norm((ours.double() - theirs.double()).flatten()).item()
    scale = torch.linalg.vector_norm(theirs.double().flatten()).item()
    return (0.0 if diff == 0.0 else math.inf) if scale == 0.0 else diff / scale


def compare_with_reference(
    spec: Spec, hypers: dict[str, float], shapes: Sequence[tuple[int, ...]], steps: int = 16, seed: int = 0
) -> float:
    """Step the generic backend and the reference on float64 copies; parameters skip some steps."""
    gen = torch.Generator().manual_seed(seed)
    initial = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours, ref = [p.clone() for p in initial], [p.clone() for p in initial]
    our_states: list[ParamState] = [{} for _ in shapes]
    ref_states: list[ParamState] = [{} for _ in shapes]
    step, reference = TorchStep(spec), build_reference_step(spec)
    worst = 0.0
    for t in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) * math.exp(2 * math.sin(t)) for s in shapes]
        live = [i for i in range(len(shapes)) if (t + i) % 3 != 2]  # step counters drift apart
        for params, states, fn in ((ours, our_states, step), (ref, ref_states, reference)):
            fn([params[i] for i in live], [grads[i] for i in live], [states[i] for i in live], hypers)
        for i in range(len(shapes)):
            worst = max(worst, relative_error(ours[i], ref[i]))
            assert set(our_states[i]) == set(ref_states[i])
            for key, value in ref_states[i].items():
                worst = max(worst, relative_error(our_states[i][key], value))
    return worst


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize(("name", "options"), SPECS, ids=[f"{n}{o}" for n, o in SPECS])
def test_every_algorithm_matches_the_reference_in_float64(name: str, options: dict[str, Any], maximize: bool) -> None:
    spec = ALGORITHMS[name](**options)
    spec = spec.maximized() if maximize else spec
    assert compare_with_reference(spec, hypers_for(spec), SHAPES) <= 1e-12


def kitchen_sink() -> Spec:
    """Factored (row/column) and per-tensor states, tensor-valued where, host−tensor and host/tensor ops."""
    lr, beta = hyper("lr"), hyper("beta")
    g2 = square(G) + 1e-30
    r_t = beta * state("r") + (1 - beta) * row_mean(g2)
    c_t = beta * state("c") + (1 - beta) * col_mean(g2)
    u = G * rsqrt(r_t * c_t / tensor_mean(r_t))
    n_t = maximum(state("n") * beta, norm(u))
    s_t = where(G > 0, state("s") + 1.0, state("s") * 0.5)
    clip = minimum(1.0, 1.0 / (n_t + 1e-3))
    shaped = 0.1 * sign(s_t) * exp(-abs(s_t)) + 0.01 * log(1 + abs(P)) + 0.01 * (1 - const(2.0) ** (-abs(G)))
    return Spec(
        name="kitchen_sink",
        title="Kitchen sink",
        hyperparameters=(learning_rate(0.01), Hyperparameter("beta", 0.9, Range(0.0, 1.0))),
        states=(
            StateDecl("r", "r", layout=Layout.ROW),
            StateDecl("c", "c", layout=Layout.COL),
            StateDecl("n", "n", init=const(1.0), layout=Layout.TENSOR),
            StateDecl("s", "s", init=G * 0.5),
        ),
        updates=(("r", r_t), ("c", c_t), ("n", n_t), ("s", s_t)),
        param_update=P - lr * clip * (u + shaped) - lr * T * 1e-4,
    )


def swap() -> Spec:
    """Two states that take each other's value: new values live in each other's buffers (a cycle)."""
    return Spec(
        name="swap",
        title="Swap",
        hyperparameters=(learning_rate(0.1),),
        states=(StateDecl("a", "a"), StateDecl("b", "b", init=const(1.0))),
        updates=(("a", state("b")), ("b", state("a") * 2.0)),
        param_update=P - hyper("lr") * G,
    )


@pytest.mark.parametrize(("spec", "shapes"), [(kitchen_sink(), MATRIX_SHAPES), (swap(), SHAPES)], ids=["sink", "swap"])
def test_generic_lowering_of_every_primitive_kind(spec: Spec, shapes: Sequence[tuple[int, ...]]) -> None:
    assert compare_with_reference(spec, spec.defaults(), shapes) <= 1e-12


SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 3.0, math.inf, -math.inf, math.nan, 1e300, -1e-300]


HOST_OPS = sorted(HOST_RULES, key=lambda o: o.value)


ULPS = {Op.SQRT: 1, Op.RSQRT: 3, Op.EXP: 2, Op.LOG: 2, Op.POW: 2}
"""How far, in float64 ulps, torch's CPU kernel may be from Python's value: IEEE 754 makes +, −, ·, /,
negation, comparisons, min/max and x·x correctly rounded everywhere, so those agree bit for bit. Python's
sqrt is correctly rounded, but torch's kernel need not be (on an AVX-512 Xeon, torch 2.13 gives
sqrt(0.5) = 0.7071067811865475, one ulp below): 1 ulp. exp, log and pow are within 1 ulp of the exact
value in both libm and torch's vectorised (SLEEF) code, hence 2 ulps apart; Python's rsqrt is 1/sqrt (two
roundings) and torch's may round sqrt too: 3. None of these depend on the CPU's vector width."""


@pytest.mark.parametrize("op", HOST_OPS, ids=[o.value for o in HOST_OPS])
def test_host_rules_follow_torch_float64(op: Op) -> None:
    """Step scalars are Python floats; every rule gives what torch's float64 rule gives (IEEE), to the
    rounding the op allows (:data:`ULPS`); specials (inf, NaN, the sign of an infinity) exactly."""
    if op in (Op.AND, Op.OR, Op.NOT, Op.WHERE):
        values: list[Any] = [True, False]
    else:
        values = SPECIAL
    arity = {Op.NOT: 1, Op.WHERE: 3}.get(op, 2 if op in TORCH_RULES and _binary(op) else 1)
    for args in itertools.product(values, repeat=arity):
        if op is Op.WHERE:
            args = (args[0], 1.5, -2.0)
        ours = HOST_RULES[op](*args)
        tensors = [torch.tensor(a, dtype=torch.bool if isinstance(a, bool) else torch.float64) for a in args]
        theirs = TORCH_RULES[op](*tensors).item()
        assert isinstance(ours, (bool, float)), (op, args, ours)
        if math.isnan(ours) or math.isnan(theirs) or math.isinf(ours) or math.isinf(theirs) or op not in ULPS:
            same = (math.isnan(ours) and math.isnan(theirs)) or ours == theirs
            assert same, (op, args, ours, theirs)
        else:
            allowed = ULPS[op] * math.ulp(max(abs(ours), abs(theirs)))
            assert abs(ours - theirs) <= allowed, (op, args, ours, theirs)


def _binary(op: Op) -> bool:
    from portopt.spec.ops import OP_INFO

    return OP_INFO[op].arity == 2


def test_step_scalars_are_float64_on_the_host() -> None:
    """``1 − β2^t`` is Python's float64 value, never the float32 (let alone bfloat16) one."""
    spec = adam()
    plan = SpecPlan.of(spec)
    values: dict[Expr, float | bool] = {}
    evaluate_host(plan.host_nodes, 3.0, spec.defaults(), values)
    bias2 = next(
        n
        for n in walk(list(spec.roots))
        if n.op is Op.SUB and n.args[1].op is Op.POW and n.args[1].args[0] == hyper("beta2")
    )
    assert values[bias2] == 1 - 0.999**3
    assert values[bias2] != float(torch.tensor(1.0) - torch.tensor(0.999) ** 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("name", "options"), [("adam", {}), ("nadam", {}), ("lamb", {}), ("rmsprop", {"centered": True})]
)
def test_low_precision_storage_rounds_once(name: str, options: dict[str, Any], dtype: torch.dtype) -> None:
    """Each low-precision step equals the float32 step from the same (widened) values, rounded once."""
    spec = ALGORITHMS[name](**options)
    hypers = hypers_for(spec)
    gen = torch.Generator().manual_seed(3)
    shapes = ((4, 3), (7,))
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    states: list[ParamState] = [{} for _ in shapes]
    step = TorchStep(spec)
    for _ in range(6):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        wide_params = [p.float() for p in params]
        wide_states: list[ParamState] = [
            {k: v.to(torch.float32 if k != "step" else v.dtype, copy=True) for k, v in s.items()} for s in states
        ]
        TorchStep(spec)(wide_params, [g.float() for g in grads], wide_states, hypers)
        step(params, grads, states, hypers)
        for p, wide in zip(params, wide_params, strict=True):
            assert p.dtype == dtype
            assert torch.equal(p, wide.to(dtype))
        for s, wide_s in zip(states, wide_states, strict=True):
            assert torch.equal(s["step"], wide_s["step"])
            for decl in spec.states:
                value = s[decl.name]
                assert value.dtype == (dtype if decl.layout is Layout.ELEMENTWISE else torch.float32), decl.name
                assert torch.equal(value, wide_s[decl.name].to(value.dtype)), decl.name


def test_states_and_params_are_updated_in_place() -> None:
    """torch.optim semantics: the state tensors and parameter storages stay the same objects (the step
    counters move once into one tensor, as the fused and compiled backends' do, and then stay put)."""
    spec = adam(amsgrad=True)
    params = [torch.randn(3, 2), torch.randn(4)]
    states: list[ParamState] = [{}, {}]
    step = TorchStep(spec)
    step(params, [torch.randn(3, 2), torch.randn(4)], states, hypers_for(spec))
    ids = [{k: id(v) for k, v in s.items() if k != "step"} for s in states]
    pointers = [p.data_ptr() for p in params]
    step(params, [torch.randn(3, 2), torch.randn(4)], states, hypers_for(spec))
    counters = [id(s["step"]) for s in states]
    for _ in range(3):
        step(params, [torch.randn(3, 2), torch.randn(4)], states, hypers_for(spec))
    assert [{k: id(v) for k, v in s.items() if k != "step"} for s in states] == ids
    assert [id(s["step"]) for s in states] == counters
    assert [float(s["step"]) for s in states] == [5.0, 5.0]
    assert [p.data_ptr() for p in params] == pointers


def program_for(spec: Spec, hypers: dict[str, float], t: float = 1.0) -> Any:
    plan = SpecPlan.of(spec)
    values: dict[Expr, float | bool] = {}
    evaluate_host(plan.host_nodes, t, hypers, values)
    return plan.program(values, grad_writable=False)


def test_adam_allocates_no_more_than_torch() -> None:
    """torch.optim.Adam allocates one buffer per parameter (the denominator); so do we."""
    for spec in (adam(), adam(decoupled_weight_decay=True), adam(amsgrad=True)):
        hypers = {**spec.defaults(), "weight_decay": 0.0}
        assert program_for(spec, hypers).allocations == 1, spec.name
    forms = [i.form for i in program_for(adam(), adam().defaults()).instrs]
    assert forms.count("lerp") == 1
    assert forms.count("addcmul") == 1
    assert forms.count("addcdiv") == 1


def test_zero_weight_decay_and_untaken_branches_cost_nothing() -> None:
    """``g + 0·p`` is not computed (as torch skips it); RAdam's rectified branch only when taken."""
    spec = adam()
    with_decay = program_for(spec, {**spec.defaults(), "weight_decay": 0.1})
    without = program_for(spec, spec.defaults())
    assert len(without.instrs) == len(with_decay.instrs) - 1
    rectified = radam()
    hypers = rectified.defaults()
    early = program_for(rectified, hypers, t=1.0)
    late = program_for(rectified, hypers, t=50.0)
    assert not any(i.node.op is Op.SQRT for i in early.instrs)
    assert any(i.node.op is Op.SQRT for i in late.instrs)


def test_sgd_momentum_first_step_branch() -> None:
    spec = sgd(momentum=True)
    assert compare_with_reference(spec, {**spec.defaults(), "momentum": 0.9, "dampening": 0.3}, SHAPES) <= 1e-12


# ---------------------------------------------------------------------------------------
# All or nothing.

Corruption = Callable[[list[Tensor], list[Tensor], list[ParamState], dict[str, Any]], None]


def _bad_grad_shape(
    params: list[Tensor], grads: list[Tensor], states: list[ParamState], hypers: dict[str, Any]
) -> None:
    grads[-1] = torch.zeros(7, dtype=torch.float64)


def _sparse_grad(params: list[Tensor], grads: list[Tensor], states: list[ParamState], hypers: dict[str, Any]) -> None:
    grads[-1] = grads[-1].to_sparse()


def _integer_grad(params: list[Tensor], grads: list[Tensor], states: list[ParamState], hypers: dict[str, Any]) -> None:
    grads[-1] = grads[-1].to(torch.int64)


def _bad_state_shape(
    params: list[Tensor], grads: list[Tensor], states: list[ParamState], hypers: dict[str, Any]
) -> None:
    states[-1]["exp_avg"] = torch.zeros(2, 2, dtype=torch.float64)


def _missing_state(params: list[Tensor], grads: list[Tensor], states: list[ParamState], hypers: dict[str, Any]) -> None:
    del states[-1]["exp_avg_sq"]


def _bad_hyper(params: list[Tensor], grads: list[Tensor], states: list[ParamState], hypers: dict[str, Any]) -> None:
    hypers["beta2"] = 1.0


def _missing_hyper(params: list[Tensor], grads: list[Tensor], states: list[ParamState], hypers: dict[str, Any]) -> None:
    del hypers["eps"]


CORRUPTIONS: list[tuple[Corruption, type[Exception], str]] = [
    (_bad_grad_shape, StepInputError, r"the gradient has shape \(7,\)"),
    (_sparse_grad, SparseGradientError, "does not support sparse gradients"),
    (_integer_grad, StepInputError, "real floating-point gradient"),
    (_bad_state_shape, StepInputError, r"state 'exp_avg' has shape \(2, 2\), expected \(3, 4\)"),
    (_missing_state, StepInputError, "lacks 'exp_avg_sq'"),
    (_bad_hyper, HyperparameterError, "Invalid beta parameter at index 1: 1.0"),
    (_missing_hyper, HyperparameterError, "no value for hyperparameter 'eps'"),
]


@pytest.mark.parametrize(("corrupt", "error", "message"), CORRUPTIONS, ids=[c[0].__name__ for c in CORRUPTIONS])
def test_a_failing_step_changes_nothing(corrupt: Corruption, error: type[Exception], message: str) -> None:
    spec = adam()
    step = TorchStep(spec)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    states: list[ParamState] = [{} for _ in SHAPES]
    hypers: dict[str, Any] = hypers_for(spec)
    step(params, [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES], states, hypers)
    params.append(torch.randn(3, 4, generator=gen, dtype=torch.float64))
    states.append({})
    step(params[-1:], [torch.randn(3, 4, dtype=torch.float64)], states[-1:], hypers)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    corrupt(params, grads, states, hypers)
    before_params = [p.clone() for p in params]
    before_states = [{k: v.clone() for k, v in s.items()} for s in states]
    fresh: ParamState = {}
    with pytest.raises(error, match=message):
        step(
            [*params, torch.ones(2, dtype=torch.float64)],
            [*grads, torch.ones(2, dtype=torch.float64)],
            [*states, fresh],
            hypers,
        )
    assert not fresh
    for p, old in zip(params, before_params, strict=True):
        assert torch.equal(p, old)
    for s, old_state in zip(states, before_states, strict=True):
        assert s.keys() == old_state.keys()
        for key, value in old_state.items():
            assert torch.equal(s[key], value)


# ---------------------------------------------------------------------------------------
# Registration, selection and availability.


def test_registered_as_torch() -> None:
    assert lookup_backend("torch") is TORCH_GENERIC
    assert isinstance(TORCH_GENERIC.build(adam()), TorchStep)
    assert TORCH_GENERIC.priority > lookup_backend("reference").priority


def test_auto_picks_the_usable_backend_of_highest_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    usable = [
        b
        for b in registered_backends().values()
        if b.auto_select and "cpu" in b.device_types and b.unavailable_reason() is None
    ]
    assert backends.select_backend("cpu") is max(usable, key=lambda b: (b.priority, b.name))
    from portopt.lowering import registry

    by_name_only = Backend("by-name", "test", ("cpu",), TORCH_GENERIC.build, priority=10**7, auto_select=False)
    monkeypatch.setitem(registry._BACKENDS, "by-name", by_name_only)
    assert backends.select_backend("cpu").name != "by-name"
    assert backends.select_backend("cpu", "by-name") is by_name_only

    step = TORCH_GENERIC.build
    monkeypatch.setitem(registry._BACKENDS, "gpu-only", Backend("gpu-only", "test", ("cuda",), step, priority=10**6))
    missing = Backend(
        "missing", "test", ("cpu",), step, unavailable_reason=lambda: "package foo is not installed", priority=10**6
    )
    monkeypatch.setitem(registry._BACKENDS, "missing", missing)
    assert backends.select_backend("cpu").name not in ("gpu-only", "missing")
    with pytest.raises(ValueError, match="backend 'missing' is not usable here: package foo is not installed"):
        backends.select_backend("cpu", "missing")
    with pytest.raises(ValueError, match="backend 'gpu-only' does not run on cpu tensors"):
        backends.select_backend("cpu", "gpu-only")
    rows = {row.name: row for row in backends.available()}
    assert rows["missing"] == ("missing", False, "package foo is not installed")
    assert rows["torch"].usable
    assert rows["reference"].usable
    assert rows["gpu-only"].usable == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "no cuda device" in rows["gpu-only"].reason


def test_broken_entry_point_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        name = "vendor"
        value = "vendor_backend:BACKEND"

        def load(self) -> Any:
            raise ImportError("No module named 'vendor_backend'")

    monkeypatch.setattr(backends, "_entry_points_loaded", False)
    monkeypatch.setattr(backends, "_entry_point_failures", {})
    monkeypatch.setattr(backends.importlib.metadata, "entry_points", lambda group: [Broken()])
    rows = {row.name: row for row in backends.available()}
    assert rows["vendor"].usable is False
    assert "No module named 'vendor_backend'" in rows["vendor"].reason
    assert backends.select_backend("cpu").priority >= TORCH_GENERIC.priority  # the others still work
    with pytest.raises(ValueError, match=r"unknown backend 'vendor' \(entry point .* failed to load"):
        backends.select_backend("cpu", "vendor")


def test_device_reasons() -> None:
    assert backends.device_unavailable_reason("cpu") is None
    cuda = backends.device_unavailable_reason("cuda")
    assert (cuda is None) == torch.cuda.is_available()
    npu = backends.device_unavailable_reason("npu")
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        assert npu == "package torch_npu is not installed"
