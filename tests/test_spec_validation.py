"""A wrong spec is refused when it is built, with a message naming the algorithm, the symbol and the fix.

Each case builds a small spec ("toy") with one mistake and pins the full message, so a
change of wording is a deliberate change of this file. (Messages of bad hyperparameter
values against torch.optim's own wording are in test_reference_vs_torch.py.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from portopt.spec import (
    Expr,
    G,
    Hyperparameter,
    HyperparameterError,
    Layout,
    Op,
    P,
    Range,
    Spec,
    SpecError,
    StateDecl,
    T,
    col_mean,
    const,
    hyper,
    norm,
    row_mean,
    state,
    tensor_mean,
    where,
)
from portopt.spec.symbols import NON_NEGATIVE, UNIT_INTERVAL_OPEN_RIGHT

LR = Hyperparameter("lr", 0.1, NON_NEGATIVE, what="learning rate")
M = StateDecl("exp_avg", "m")


def make(
    states: tuple[StateDecl, ...] = (),
    updates: tuple[tuple[str, Expr], ...] = (),
    param_update: Expr | None = None,
    hypers: tuple[Hyperparameter, ...] = (LR,),
) -> Spec:
    """A one-line SGD-like spec ``p ← p − lr·g`` unless told otherwise."""
    return Spec("toy", "Toy", hypers, states, updates, P - hyper("lr") * G if param_update is None else param_update)


def row_state(init: Expr | None = None) -> StateDecl:
    return StateDecl("r", "r", init=const(0.0) if init is None else init, layout=Layout.ROW)


def _shape_mismatch(where: str, kind: str, layout: str) -> str:
    return (
        f"toy: shape mismatch in {where}: the value is {kind}-shaped but the state is stored with layout "
        f"'{layout}'; reduce the value (row_mean/col_mean/norm) or change the state's layout"
    )


_NOT_INIT = "an initial value may use only constants, hyperparameters, inputs, p, g and the tensor's shape"
_BOOL_HINT = "wrap the comparison in where(condition, 1.0, 0.0) to turn it into a number"

CASES: dict[str, tuple[Callable[[], object], str]] = {
    "unknown hyperparameter": (
        lambda: make(param_update=P - hyper("lrr") * G),
        "toy: unknown hyperparameter 'lrr' in the parameter update; declare it in hyperparameters= (declared: lr)",
    ),
    "unknown hyperparameter in a state update": (
        lambda: make(states=(M,), updates=(("exp_avg", hyper("beta") * G),)),
        "toy: unknown hyperparameter 'beta' in the update of state 'exp_avg'; declare it in hyperparameters= "
        "(declared: lr)",
    ),
    "undeclared state read": (
        lambda: make(param_update=P - state("m")),
        "toy: unknown state 'm'; declare it in states= (declared: none)",
    ),
    "update of an undeclared state": (
        lambda: make(states=(M,), updates=(("exp_avg", G), ("m", G))),
        "toy: update of undeclared state 'm'; declare it in states= (declared: exp_avg)",
    ),
    "state read but never updated": (
        lambda: make(states=(M,), param_update=P - state("exp_avg")),
        "toy: state 'exp_avg' is read but never updated; add ('exp_avg', <new value>) to updates=",
    ),
    "state updated twice": (
        lambda: make(states=(M,), updates=(("exp_avg", G), ("exp_avg", 2.0 * G))),
        "toy: state 'exp_avg' is updated twice; give each state exactly one update",
    ),
    "state declared twice": (
        lambda: make(states=(M, M), updates=(("exp_avg", G),)),
        "toy: state 'exp_avg' is declared twice; declare each state once",
    ),
    "hyperparameter declared twice": (
        lambda: make(hypers=(LR, LR)),
        "toy: hyperparameter 'lr' is declared twice; declare each hyperparameter once",
    ),
    "state declared but unused": (
        lambda: make(states=(M,)),
        "toy: state 'exp_avg' is declared but never used; remove it from states=",
    ),
    "reserved state name": (
        lambda: make(states=(StateDecl("step", "s"),), updates=(("step", G),)),
        "toy: state name 'step' is reserved for the step counter; rename the state",
    ),
    "reduction of a step scalar": (
        lambda: make(param_update=P - norm(hyper("lr"))),
        "toy: norm() is applied to a value that is already one number per tensor (scalar); "
        "reduce an element-wise or factored value",
    ),
    "reduction of a per-tensor value": (
        lambda: make(param_update=P - tensor_mean(norm(G))),
        "toy: mean() is applied to a value that is already one number per tensor (tensor); "
        "reduce an element-wise or factored value",
    ),
    "reduction of a constant": (
        lambda: make(param_update=P - G * norm(const(2.0))),
        "toy: norm() is applied to a value that is already one number per tensor (const); "
        "reduce an element-wise or factored value",
    ),
    "row_mean of a step scalar": (
        lambda: make(param_update=P - row_mean(hyper("lr"))),
        "toy: row_mean() needs an element-wise value or a column factor, got a scalar value; "
        "apply it to a gradient statistic such as g*g",
    ),
    "col_mean of a column factor": (
        lambda: make(param_update=P - col_mean(col_mean(G * G))),
        "toy: col_mean() needs an element-wise value or a row factor, got a col value; "
        "apply it to a gradient statistic such as g*g",
    ),
    "column value into a row state": (
        lambda: make(states=(row_state(),), updates=(("r", col_mean(G * G)),)),
        _shape_mismatch("the update of state 'r'", "col", "row"),
    ),
    "element value into a row state": (
        lambda: make(states=(row_state(),), updates=(("r", G * G),)),
        _shape_mismatch("the update of state 'r'", "element", "row"),
    ),
    "element value into a per-tensor state": (
        lambda: make(states=(StateDecl("n", "n", layout=Layout.TENSOR),), updates=(("n", G * G),)),
        _shape_mismatch("the update of state 'n'", "element", "tensor"),
    ),
    "element initial value of a row state": (
        lambda: make(states=(row_state(init=P),), updates=(("r", row_mean(G * G)),)),
        _shape_mismatch("the initial value of state 'r'", "element", "row"),
    ),
    "infinite constant": (
        lambda: make(param_update=P - G * math.inf),
        "toy: constant inf in the parameter update is not finite; use a finite number",
    ),
    "NaN constant": (
        lambda: make(param_update=P - G * math.nan),
        "toy: constant nan in the parameter update is not finite; use a finite number",
    ),
    "constant beyond float32": (
        lambda: make(param_update=P - G * 1e39),
        "toy: constant 1e+39 in the parameter update overflows float32 (max 3.403e+38); rescale the expression",
    ),
    "constant below float32's normal range": (
        lambda: make(param_update=P - G * 1e-39),
        "toy: constant 1e-39 in the parameter update is below float32's smallest normal number (1.175e-38) and "
        "would flush to zero on some devices; rescale it or make it a hyperparameter",
    ),
    "float32-impossible initial value": (
        lambda: make(states=(StateDecl("exp_avg", "m", init=const(-1e300)),), updates=(("exp_avg", G),)),
        "toy: constant -1e+300 in the initial value of state 'exp_avg' overflows float32 (max 3.403e+38); "
        "rescale the expression",
    ),
    "boolean in arithmetic": (
        lambda: make(param_update=P - (G > 0)),
        f"toy: sub is applied to a boolean; {_BOOL_HINT}",
    ),
    "boolean reduced": (
        lambda: make(param_update=P - G * norm(G > 0)),
        f"toy: norm is applied to a boolean; {_BOOL_HINT}",
    ),
    "boolean where() branch": (
        lambda: make(param_update=P - where(G > 0, G < 1, 0.0)),
        f"toy: where is applied to a boolean; {_BOOL_HINT}",
    ),
    "boolean state update": (
        lambda: make(states=(M,), updates=(("exp_avg", G > 0),)),
        "toy: the update of state 'exp_avg' is a boolean; wrap it in where(cond, 1.0, 0.0)",
    ),
    "boolean parameter update": (
        lambda: make(param_update=P > 0),
        "toy: the parameter update is a boolean; it must be a number",
    ),
    "logic on a number": (
        lambda: make(param_update=P - where((G > 0) & G, G, 0.0)),
        "toy: and needs boolean operands (comparisons)",
    ),
    "numeric where() condition": (
        lambda: make(param_update=P - where(G, G, 0.0)),
        "toy: the condition of where() must be a comparison or a logical combination of comparisons "
        "(e.g. rho > 5), not a number",
    ),
    "initial value reads t": (
        lambda: make(states=(StateDecl("exp_avg", "m", init=T * 1.0),), updates=(("exp_avg", G),)),
        f"toy: the initial value of state 'exp_avg' reads the step counter; {_NOT_INIT}",
    ),
    "initial value reads a state": (
        lambda: make(
            states=(StateDecl("exp_avg", "m"), StateDecl("v", "v", init=state("exp_avg"))),
            updates=(("exp_avg", G), ("v", G * G)),
        ),
        f"toy: the initial value of state 'v' reads state 'exp_avg'; {_NOT_INIT}",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_spec_is_refused_with_its_message(case: str) -> None:
    build, message = CASES[case]
    with pytest.raises(SpecError) as info:
        build()
    assert str(info.value) == message


def test_every_case_is_one_mistake_away_from_a_valid_spec() -> None:
    """The helpers build valid specs, so each case fails for its own reason (including factored layouts)."""
    make()
    make(states=(M,), updates=(("exp_avg", 0.9 * state("exp_avg") + G),), param_update=P - state("exp_avg"))
    spec = make(states=(row_state(),), updates=(("r", row_mean(G * G)),), param_update=P - G / (state("r") + 1.0))
    assert spec.state_decl("r").layout is Layout.ROW
    make(param_update=P - where((G > 0) & (T > 1), G, 0.0) * norm(G))


def test_expression_has_no_truth_value() -> None:
    with pytest.raises(SpecError) as info:
        bool(G > 0)
    assert str(info.value) == (
        "an expression has no truth value while the spec is built; "
        "use where(condition, if_true, if_false) instead of Python's if/and/or"
    )
    with pytest.raises(SpecError, match="no truth value"):
        _ = G if (P < 0) else P  # Python's if on an expression


@pytest.mark.parametrize(
    ("operand", "shown"),
    [("x", "'x' (str)"), (True, "True (bool)"), (None, "None (NoneType)")],
)
def test_non_numbers_are_refused_in_expressions(operand: object, shown: str) -> None:
    with pytest.raises(SpecError) as info:
        _ = P + operand  # type: ignore[operator]
    assert str(info.value) == f"cannot use {shown} in a spec; use a number or an expression"


def test_wrong_operand_count_is_refused() -> None:
    with pytest.raises(SpecError) as info:
        Expr(Op.ADD, (G,))
    assert str(info.value) == "op 'add' takes 2 operand(s), got 1"


# hyperparameters ---------------------------------------------------------------------
def test_default_outside_its_constraint_is_refused() -> None:
    bad = Hyperparameter("lr", -1.0, NON_NEGATIVE, what="learning rate")
    with pytest.raises(HyperparameterError) as info:
        make(hypers=(bad,))
    assert str(info.value) == "Invalid learning rate: -1.0 (toy: lr must satisfy 0 <= lr)"


@pytest.mark.parametrize(
    ("hyperparameter", "value", "message"),
    [
        (
            Hyperparameter("beta1", 0.9, UNIT_INTERVAL_OPEN_RIGHT, what="beta parameter at index 0"),
            1.0,
            "Invalid beta parameter at index 0: 1.0 (toy: beta1 must satisfy 0 <= beta1 < 1)",
        ),
        (
            Hyperparameter("rho", 0.5, Range(0.0, 1.0, low_inclusive=False)),
            0.0,
            "Invalid rho value: 0.0 (toy: rho must satisfy 0 < rho <= 1)",
        ),
        (
            Hyperparameter("clip", 1.0, Range(high=10.0, high_inclusive=False)),
            10.0,
            "Invalid clip value: 10.0 (toy: clip must satisfy clip < 10)",
        ),
        (
            Hyperparameter("lr", 0.1, NON_NEGATIVE, what="learning rate"),
            math.nan,
            "Invalid learning rate: nan (toy: lr must satisfy 0 <= lr)",
        ),
        (
            Hyperparameter("lr", 0.1, NON_NEGATIVE, what="learning rate"),
            -math.inf,
            "Invalid learning rate: -inf (toy: lr must satisfy 0 <= lr)",
        ),
        (
            Hyperparameter("tau", 0.1, Range(0.0, 0.5)),
            0.75,
            "Invalid tau value: 0.75 (toy: tau must satisfy 0 <= tau <= 0.5)",
        ),
    ],
)
def test_hyperparameter_check_messages(hyperparameter: Hyperparameter, value: float, message: str) -> None:
    with pytest.raises(HyperparameterError) as info:
        hyperparameter.check(value, "toy")
    assert str(info.value) == message


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_values_on_a_closed_bound_are_accepted(value: float) -> None:
    Hyperparameter("tau", 0.1, Range(0.0, 1.0)).check(value, "toy")


def test_check_hyperparameters_reports_a_missing_value_then_a_bad_one() -> None:
    spec = make(
        param_update=P - hyper("lr") * hyper("beta1") * G, hypers=(LR, Hyperparameter("beta1", 0.9, Range(0.0, 1.0)))
    )
    with pytest.raises(SpecError) as info:
        spec.check_hyperparameters({"lr": 0.1})
    assert str(info.value) == "toy: hyperparameter 'beta1' has no value"
    with pytest.raises(HyperparameterError) as bad:
        spec.check_hyperparameters({"lr": 0.1, "beta1": 2})
    assert str(bad.value) == "Invalid beta1 value: 2.0 (toy: beta1 must satisfy 0 <= beta1 <= 1)"
    spec.check_hyperparameters({"lr": 0.0, "beta1": 1.0})


def test_unknown_lookups_list_what_exists() -> None:
    spec = make(states=(M,), updates=(("exp_avg", G),), param_update=P - state("exp_avg"))
    with pytest.raises(KeyError, match=r"toy has no hyperparameter 'beta1' \(has: lr\)"):
        spec.hyperparameter("beta1")
    with pytest.raises(KeyError, match=r"toy has no state 'v' \(has: exp_avg\)"):
        spec.state_decl("v")
