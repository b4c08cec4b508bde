"""Property-based: random specs assembled from the primitives agree with the reference on every backend.

This proves the *lowering* of each primitive, not just the named algorithms: a random
update rule (element-wise ops, per-tensor reductions, a comparison-driven select, sign,
step-only scalars such as ``1 − β^t``), random shapes (0, 1, 0-d, odd sizes, matrices,
non-contiguous views), several param groups, random hyperparameters and gradient scales,
in float32 and bfloat16, runs on every available backend and must pass the conformance
tolerance model in lock-step and free-running mode.

Profiles: the default ("fast", a few examples, for CI) or ``HYPOTHESIS_PROFILE=deep``
(thousands of examples, on demand). Examples are derandomised in the fast profile so CI
is reproducible; the deep one explores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from portopt.conformance.cases import Case
from portopt.conformance.precision import PRECISIONS
from portopt.conformance.problems import GRAD_EVERY_STEP, GRAD_ODD_STEPS, Layout, Problem, Regime, TensorSpec
from portopt.conformance.results import PASS, SKIP
from portopt.conformance.runner import backend_implementations, new_trajectory, run_case
from portopt.spec import (
    Expr,
    G,
    Hyperparameter,
    P,
    Spec,
    SpecError,
    StateDecl,
    T,
    const,
    exp,
    hyper,
    log,
    max_abs,
    maximum,
    minimum,
    norm,
    rsqrt,
    sign,
    sqrt,
    square,
    state,
    tensor_mean,
    where,
)
from portopt.spec import (
    Layout as StateLayout,
)
from portopt.spec.render import render_text
from portopt.spec.serialize import spec_to_json

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fast")
SETTINGS = {
    "fast": settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]),
    "deep": settings(
        max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
    ),
}.get(PROFILE, settings(deadline=None, suppress_health_check=[HealthCheck.too_slow]))

S = state("s")
N = state("n")
LEAVES: tuple[Expr, ...] = (G, P, S, hyper("h1"), hyper("h2"), 1 - hyper("h1") ** T, hyper("h2") ** T)


@st.composite
def expressions(draw: st.DrawFn, depth: int) -> tuple[Expr, bool]:
    """A random expression and whether it is element-wise (so it may be reduced)."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        if draw(st.booleans()):
            value = draw(st.floats(0.25, 2.0)) * draw(st.sampled_from([-1.0, 1.0]))
            return const(value), False
        leaf = draw(st.sampled_from(LEAVES))
        return leaf, leaf in (G, P, S)
    a, a_elem = draw(expressions(depth - 1))
    kind = draw(st.sampled_from(["unary", "binary", "binary", "reduce", "select"]))
    if kind == "unary":
        name = draw(st.sampled_from(["neg", "abs", "square", "sqrt", "rsqrt", "log", "exp", "sign"]))
        unary: dict[str, Callable[[Expr], Expr]] = {
            "neg": lambda x: -x,
            "abs": abs,
            "square": square,
            "sqrt": lambda x: sqrt(abs(x)),
            "rsqrt": lambda x: rsqrt(abs(x) + 0.5),
            "log": lambda x: log(abs(x) + 1),
            "exp": lambda x: exp(minimum(maximum(x, -4.0), 4.0)),
            "sign": sign,
        }
        return unary[name](a), a_elem
    if kind == "reduce" and a_elem:
        reduce = draw(st.sampled_from([tensor_mean, norm, max_abs]))
        return reduce(a), False
    b, b_elem = draw(expressions(depth - 1))
    if kind == "select":
        c, c_elem = draw(expressions(depth - 1))
        return where(a > b, c, -c), a_elem or b_elem or c_elem
    binary = draw(st.sampled_from(["add", "sub", "mul", "div", "max", "min"]))
    built = {
        "add": a + b,
        "sub": a - b,
        "mul": a * b,
        "div": a / (abs(b) + 1),
        "max": maximum(a, b),
        "min": minimum(a, b),
    }[binary]
    return built, a_elem or b_elem


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    f1, _ = draw(expressions(3))
    f2, _ = draw(expressions(3))
    h1, lr = hyper("h1"), hyper("lr")
    states = [StateDecl("s", "s", init=draw(st.sampled_from([const(0.0), G, abs(G) + 1])))]
    updates: list[tuple[str, Expr]] = [("s", h1 * S + (1 - h1) * f1)]
    param_update = P - lr * f2
    if draw(st.booleans()):  # a per-tensor state (Layout.TENSOR), e.g. a running norm
        states.append(StateDecl("n", "n", init=const(1.0), layout=StateLayout.TENSOR))
        g3, elem = draw(expressions(2))
        updates.append(("n", 0.5 * N + 0.5 * (tensor_mean(abs(g3)) if elem else abs(g3))))
        param_update = P - lr * f2 / (N + 1)
    hypers = (
        Hyperparameter("lr", 0.01),
        Hyperparameter("h1", 0.9),
        Hyperparameter("h2", 0.5),
    )
    try:
        return Spec("random", "random spec", hypers, tuple(states), tuple(updates), param_update)
    except SpecError:
        assume(False)
        raise


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    shapes = st.sampled_from([(), (0,), (1,), (2,), (7,), (33,), (3, 5), (4, 9), (2, 3, 4)])
    tensors = []
    for i in range(draw(st.integers(1, 3))):
        shape = draw(shapes)
        layouts = [Layout.CONTIGUOUS] + ([Layout.TRANSPOSED, Layout.STRIDED] if len(shape) >= 2 else [])
        tensors.append(
            TensorSpec(
                shape,
                group=draw(st.integers(0, 1)) if i else 0,
                layout=draw(st.sampled_from(layouts)),
                regime=draw(st.sampled_from([Regime.NORMAL, Regime.MIXED, Regime.TINY])),
                grads=draw(st.sampled_from([GRAD_EVERY_STEP, GRAD_EVERY_STEP, GRAD_ODD_STEPS])),
                param_scale=draw(st.sampled_from([1.0, 0.01, 30.0])),
            )
        )
    return Problem("random", tuple(tensors), seed=draw(st.integers(0, 2**31 - 1)))


BACKENDS = backend_implementations()


@SETTINGS
@given(
    spec=specs(),
    problem=problems(),
    precision=st.sampled_from(["fp32", "bf16"]),
    hypers=st.fixed_dictionaries(
        {"lr": st.floats(1e-3, 0.3), "h1": st.floats(0.0, 0.999), "h2": st.floats(1e-3, 0.999)}
    ),
)
def test_random_specs_agree_with_the_reference_on_every_backend(
    spec: Spec, problem: Problem, precision: str, hypers: dict[str, float]
) -> None:
    case = Case(
        name="random",
        algorithm="random",
        options=(),
        hypers=tuple(hypers.items()),
        problem=problem,
        steps=3,
        spec_json=spec_to_json(spec),
    )
    p = PRECISIONS[precision]
    trajectory = new_trajectory(case, case.spec(), p)
    # Keep to values every storage format holds: overflow is the format's limit, not the lowering's.
    for t in range(1, case.steps + 1):
        after = trajectory.step(t).after
        values = [*after.params, *(v for s in after.states if s for v in s.values())]
        assume(all(v.numel() == 0 or float(v.abs().max()) < 1e30 for v in values))
        assume(all(not v.isnan().any() and math.isfinite(float(v.abs().sum())) for v in values))
    ran = 0
    for impl in BACKENDS:
        result = run_case(case, impl, p, trajectory=trajectory)
        if result.status == SKIP:
            continue
        ran += 1
        assert result.status == PASS, f"{impl.name} {precision}: {result.reason}\n{render_text(spec)}"
    assert ran >= 1


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_the_built_in_backends_are_covered(name: str) -> None:
    assert name in {b.name for b in BACKENDS}
