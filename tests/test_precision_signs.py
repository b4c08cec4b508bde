"""Which states are provably non-negative (and get the unsigned 8-bit map).

Truth: the algorithms' equations read by hand (second moments are sums of squares with
non-negative weights; first moments and momentum buffers carry the gradient's sign), small
specs built to exercise each rule, and a float64 reference run where the analysis says >= 0.
"""

from __future__ import annotations

import pytest
import torch

from portopt.algorithms import ALGORITHMS, get_spec
from portopt.backends.reference import build_reference_step
from portopt.precision.signs import nonnegative_states
from portopt.spec.definition import Spec
from portopt.spec.expr import G, P, const, hyper, maximum, sqrt, square, state, where
from portopt.spec.symbols import NON_NEGATIVE, UNIT_INTERVAL, Hyperparameter, Range, StateDecl

EXPECTED = {
    "sgd": set(),
    "adam": {"exp_avg_sq"},
    "adamw": {"exp_avg_sq"},
    "adagrad": {"sum"},  # initial_accumulator_value >= 0 is declared
    "rmsprop": set(),  # torch accepts alpha > 1, and then (1 − alpha)·g² is negative
    "nadam": {"exp_avg_sq"},
    "adamax": {"exp_inf"},
    "radam": {"exp_avg_sq"},
    "adabelief": {"exp_avg_var"},
    "lamb": {"exp_avg_sq"},
    "lion": set(),
    "sparse_adam": set(),  # torch's v + (g² − v)·(1 − β2): >= 0, but not a sum of non-negative terms as written
    "adafactor": {"row_var", "col_var", "variance"},  # 1 − t^τ in [0, 1) for τ <= 0
    "came": {"exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col", "exp_avg_sq"},
    "sophiag": {"hessian"},
    "adan": {"exp_avg_sq"},
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_library_algorithms(name: str) -> None:
    assert nonnegative_states(get_spec(name)) == EXPECTED[name]


def test_options() -> None:
    assert nonnegative_states(get_spec("adam", amsgrad=True)) == {"exp_avg_sq", "max_exp_avg_sq"}
    assert nonnegative_states(get_spec("rmsprop", centered=True, momentum=True)) == set()
    assert nonnegative_states(get_spec("sgd", momentum=True)) == set()
    assert nonnegative_states(get_spec("adam").maximized()) == {"exp_avg_sq"}  # g → −g keeps g² >= 0


def toy(updates: dict[str, object], inits: dict[str, object] | None = None, rho: Range = UNIT_INTERVAL) -> Spec:
    inits = inits or {}
    return Spec(
        name="toy",
        title="Toy",
        hyperparameters=(Hyperparameter("lr", 0.1, NON_NEGATIVE), Hyperparameter("rho", 0.5, rho)),
        states=tuple(StateDecl(n, n, init=inits.get(n, const(0.0))) for n in updates),  # type: ignore[arg-type]
        updates=tuple(updates.items()),  # type: ignore[arg-type]
        param_update=P - hyper("lr") * G,
    )


def test_rules() -> None:
    rho = hyper("rho")
    a = state("a")
    # (1 − ρ) >= 0 needs ρ <= 1: declared here, not when ρ is unbounded above.
    assert nonnegative_states(toy({"a": rho * a + (1 - rho) * square(G)})) == {"a"}
    assert nonnegative_states(toy({"a": rho * a + (1 - rho) * square(G)}, rho=NON_NEGATIVE)) == set()
    assert nonnegative_states(toy({"a": a + G * G})) == {"a"}  # x·x of one node
    assert nonnegative_states(toy({"a": a + G * P})) == set()
    assert nonnegative_states(toy({"a": a - square(G)})) == set()
    assert nonnegative_states(toy({"a": maximum(a, G)})) == {"a"}  # max(>= 0, anything) >= 0
    assert nonnegative_states(toy({"a": sqrt(a + 1) / (a + 2)})) == {"a"}
    assert nonnegative_states(toy({"a": a / (G - 1)})) == set()  # divisor of unknown sign
    assert nonnegative_states(toy({"a": where(G > 0, a, square(G))})) == {"a"}
    assert nonnegative_states(toy({"a": a + square(G)}, inits={"a": -1.0 * square(P) - 1})) == set()  # init < 0


def test_states_are_decided_together() -> None:
    a, b, c = state("a"), state("b"), state("c")
    # a and b each stay >= 0 only if the other does: both are, by induction from their inits.
    assert nonnegative_states(toy({"a": a * b, "b": b + a})) == {"a", "b"}
    # c has no sign, so b = a·c has none, and then a = b + a loses its proof too.
    assert nonnegative_states(toy({"a": b + a, "b": a * c, "c": c + G})) == set()


@pytest.mark.parametrize("name", ["adam", "adabelief", "adamax", "adagrad"])
def test_reference_run_agrees(name: str) -> None:
    """States the analysis calls non-negative are >= 0 over a float64 run with gradients of both signs."""
    spec = get_spec(name)
    step = build_reference_step(spec)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(50, dtype=torch.float64, generator=gen)]
    states: list[dict[str, torch.Tensor]] = [{}]
    hypers = {h.name: h.default for h in spec.hyperparameters}
    for _ in range(20):
        step(params, [torch.randn(50, dtype=torch.float64, generator=gen) * 10], states, hypers)
        for state_name in nonnegative_states(spec):
            assert bool((states[0][state_name] >= 0).all())
