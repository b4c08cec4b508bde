"""The JSON form of a spec: exact round trips, deterministic bytes, shared nodes kept, bad input refused."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portopt.algorithms import ALGORITHMS
from portopt.cli_options import build_spec, option_variants
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
    const,
    hyper,
    state,
)
from portopt.spec.definition import OptionValue
from portopt.spec.expr import walk
from portopt.spec.serialize import FORMAT, VERSION, spec_from_dict, spec_from_json, spec_to_dict, spec_to_json
from portopt.spec.symbols import NON_NEGATIVE


def _variants() -> list[tuple[str, dict[str, OptionValue], bool]]:
    """Every registered algorithm (read at test time) x each option combination x maximize."""
    return [
        (name, options, maximize)
        for name in sorted(ALGORITHMS)
        for options in option_variants(name)
        for maximize in (False, True)
    ]


def _strict_loads(text: str) -> Any:
    """json.loads that refuses the non-standard NaN/Infinity literals."""

    def refuse(literal: str) -> None:
        raise AssertionError(f"non-standard JSON literal {literal}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("name", "options", "maximize"), _variants())
def test_every_algorithm_round_trips(name: str, options: dict[str, OptionValue], maximize: bool) -> None:
    spec = build_spec(name, {**options, "maximize": maximize})
    text = spec_to_json(spec)
    loaded = spec_from_json(text)
    assert loaded == spec
    assert loaded.roots == spec.roots
    assert spec_to_json(loaded) == text
    # Built again from scratch, the same spec gives the same bytes.
    assert spec_to_json(build_spec(name, {**options, "maximize": maximize})) == text
    data = _strict_loads(text)
    assert (data["format"], data["version"]) == (FORMAT, VERSION)
    assert data == spec_to_dict(spec)
    extra = [s.when for s in spec.states if s.when is not None]
    extra += [e for m in spec.methods for _, e in m.updates] + [m.due for m in spec.methods if m.due is not None]
    assert len(data["nodes"]) == len(walk([*(s.init for s in spec.states), *spec.roots, *extra]))
    # The analysis of the loaded spec agrees node by node.
    for node in walk(list(spec.roots)):
        assert loaded.kind(node) == spec.kind(node)


def test_bytes_are_equal_exactly_when_specs_are() -> None:
    """(adam with decoupled_weight_decay=True is adamw: equal specs, equal bytes.)"""
    specs = [build_spec(n, o) for n in sorted(ALGORITHMS) for o in option_variants(n)]
    texts = [spec_to_json(s) for s in specs]
    for i in range(len(specs)):
        for j in range(i + 1, len(specs)):
            assert (specs[i] == specs[j]) == (texts[i] == texts[j]), (specs[i].name, specs[j].name)


def test_shared_nodes_are_stored_once_and_shared_after_loading() -> None:
    spec = build_spec("adam")
    data = spec_to_dict(spec)
    m_t = spec.update_map["exp_avg"]
    nodes = data["nodes"]
    assert len(nodes) == len({json.dumps(n, sort_keys=True) for n in nodes}), "each node once"
    loaded = spec_from_dict(data)
    new_m = loaded.update_map["exp_avg"]
    assert new_m == m_t
    # The m_t the parameter update reads is the very object the state update holds.
    assert any(node is new_m for node in walk([loaded.param_update]))
    m_index = next(u["value"] for u in data["updates"] if u["state"] == "exp_avg")
    users = [i for i, n in enumerate(nodes) if m_index in n.get("args", [])]
    assert users, "m_t is referenced by index from the parameter update"
    assert all(i > m_index for i in users), "operands come before their users"


def test_non_finite_numbers_are_portable_strings() -> None:
    spec = Spec(
        "toy",
        "Toy",
        (Hyperparameter("lr", 0.1, NON_NEGATIVE), Hyperparameter("shift", -0.5, Range(-math.inf, 0.0))),
        (),
        (),
        P - hyper("lr") * G + hyper("shift") * 0.0,
        options=(("cap", math.inf), ("floor", -math.inf), ("word", "inf"), ("n", 3), ("x", 2.0), ("on", True)),
    )
    text = spec_to_json(spec)
    assert "Infinity" not in text
    assert "NaN" not in text
    data = _strict_loads(text)
    assert data["hyperparameters"][0]["constraint"]["high"] == "inf"
    assert data["hyperparameters"][1]["constraint"]["low"] == "-inf"
    loaded = spec_from_json(text)
    assert loaded == spec
    assert loaded.option_map == {"cap": math.inf, "floor": -math.inf, "word": "inf", "n": 3, "x": 2.0, "on": True}
    assert [type(v) for _, v in loaded.options] == [float, float, str, int, float, bool]


def test_negative_zero_gives_the_same_bytes_as_zero() -> None:
    def make(zero: float) -> Spec:
        return Spec("toy", "Toy", (Hyperparameter("lr", zero, NON_NEGATIVE),), (), (), P - hyper("lr") * G + zero)

    assert make(-0.0) == make(0.0)
    assert spec_to_json(make(-0.0)) == spec_to_json(make(0.0))


def test_states_layouts_labels_and_notes_survive() -> None:
    beta = hyper("beta")
    r_t = (beta * state("r") + (1 - beta) * (G * G)).named("r̃", r"\tilde{r}_t")
    spec = Spec(
        "toy",
        "Toy",
        (Hyperparameter("beta", 0.5, Range(0.0, 1.0), "β", r"\beta", "decay", "beta", "betas", 0),),
        (
            StateDecl("r", "r", r"\rho", init=P * 0.0, layout=Layout.ELEMENTWISE, doc="running square"),
            StateDecl("k", "k", init=const(1.0), layout=Layout.TENSOR),
        ),
        (("r", r_t), ("k", state("k") * beta)),
        P - G / (r_t + state("k") + T),
        references=("A paper, 2024",),
        notes="notes survive\nwith newlines and ünïcode",
    )
    loaded = spec_from_json(spec_to_json(spec))
    assert loaded == spec
    assert loaded.state_decl("k").layout is Layout.TENSOR
    assert loaded.update_map["r"].label == r_t.label
    assert loaded.hyperparameter("beta").group_index == 0


# tampered input --------------------------------------------------------------------------
def _adam_dict() -> dict[str, Any]:
    return copy.deepcopy(spec_to_dict(build_spec("adam", {"amsgrad": True})))


def _first(data: dict[str, Any], op: str) -> int:
    return next(i for i, n in enumerate(data["nodes"]) if n["op"] == op)


def _set(path: str, value: Any) -> Any:
    def tamper(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return tamper


def _set_node(which: str, **fields: Any) -> Any:
    """Change fields of the first node whose op is ``which``."""

    def tamper(data: dict[str, Any]) -> None:
        data["nodes"][_first(data, which)].update(fields)

    return tamper


TAMPERED: dict[str, tuple[Any, str]] = {
    "wrong format": (_set("format", "other.thing"), "format is 'other.thing', expected 'portopt.spec'"),
    "future version": (_set("version", 2), "unsupported version 2 (this portopt reads version 1)"),
    "version as a string": (_set("version", "1"), "unsupported version '1'"),
    "version true": (_set("version", True), "unsupported version True"),
    "unknown op": (_set_node("sqrt", op="cbrt"), "unknown op 'cbrt' (known: "),
    "forward reference": (_set_node("sqrt", args=[10_000]), "operand 10000 is not the index of an earlier node"),
    "negative reference": (_set_node("sqrt", args=[-1]), "operand -1 is not the index of an earlier node"),
    "wrong operand count": (_set_node("sqrt", args=[0, 0]), "op 'sqrt' takes 1 operand(s), got 2"),
    "dangling parameter update": (_set("param_update", 10_000), "param_update: node reference 10000 is dangling"),
    "dangling state init": (_set("states.0.init", -1), "state 0 init: node reference -1 is dangling"),
    "dangling update": (_set("updates.1.value", 3.5), "update 1: node reference 3.5 is dangling"),
    "unknown field": (_set("extra", 1), "top level: unknown field(s) 'extra'"),
    "unknown node field": (_set_node("step", shape=[2]), "unknown field(s) 'shape'"),
    "value on a valueless op": (_set_node("step", value=3), "op 'step' takes no value"),
    "name not a string": (_set("name", 7), "field 'name' must be a string, got 7"),
    "constant not a number": (_set_node("const", value="zero"), "must be a number or one of 'inf', '-inf', 'nan'"),
    "boolean default": (_set("hyperparameters.0.default", True), "must be a number"),
    "unknown layout": (_set("states.0.layout", "diagonal"), "unknown layout 'diagonal'"),
    "missing field": (lambda d: d.pop("title"), "missing field 'title'"),
    "hyperparameter renamed": (
        _set("hyperparameters.0.name", "learning_rate"),
        "adam: unknown hyperparameter 'lr' in the parameter update; declare it in hyperparameters=",
    ),
    "update of an undeclared state": (_set("updates.0.state", "mystery"), "update of undeclared state 'mystery'"),
    "non-finite constant": (_set_node("const", value="inf"), "constant inf in the initial value"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_json_is_refused(case: str) -> None:
    tamper, message = TAMPERED[case]
    data = _adam_dict()
    tamper(data)
    with pytest.raises(SpecError) as info:
        spec_from_json(json.dumps(data))
    assert message in str(info.value)


def test_invalid_json_text_and_non_objects_are_refused() -> None:
    with pytest.raises(SpecError, match="spec JSON: not valid JSON"):
        spec_from_json("{not json")
    with pytest.raises(SpecError, match=r"top level: must be an object, got \[1, 2\]"):
        spec_from_json("[1, 2]")
    with pytest.raises(SpecError, match="not valid JSON"):
        spec_from_json(b"\xff\xfe")


def test_a_default_outside_its_constraint_is_refused_on_load() -> None:
    data = _adam_dict()
    data["hyperparameters"][1]["default"] = 1.5  # beta1
    with pytest.raises(HyperparameterError, match=r"Invalid beta parameter at index 0: 1.5"):
        spec_from_dict(data)


# random expressions ----------------------------------------------------------------------
_CONSTANTS = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False).filter(lambda x: x == 0 or abs(x) >= 1e-37)
_LEAVES = st.sampled_from([P, G, T, hyper("lr"), hyper("b"), state("m")]) | _CONSTANTS.map(const)
_UNARY = [Op.NEG, Op.SQRT, Op.RSQRT, Op.SQUARE, Op.ABS, Op.SIGN, Op.EXP, Op.LOG]
_BINARY = [Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAXIMUM, Op.MINIMUM]
_COMPARE = [Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]
_REDUCE = [Op.SUM, Op.MEAN, Op.NORM, Op.MAX_ABS, Op.ROW_MEAN, Op.COL_MEAN]


def _extend(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    compare = st.builds(lambda op, x, y: Expr(op, (x, y)), st.sampled_from(_COMPARE), children, children)
    logic = st.one_of(
        compare,
        st.builds(lambda op, x, y: Expr(op, (x, y)), st.sampled_from([Op.AND, Op.OR]), compare, compare),
        st.builds(lambda x: Expr(Op.NOT, (x,)), compare),
    )
    return st.one_of(
        st.builds(lambda op, x: Expr(op, (x,)), st.sampled_from(_UNARY), children),
        st.builds(lambda op, x, y: Expr(op, (x, y)), st.sampled_from(_BINARY), children, children),
        st.builds(lambda cond, x, y: Expr(Op.WHERE, (cond, x, y)), logic, children, children),
        # x·g is element-wise whatever x is, so every reduction is legal.
        st.builds(lambda op, x: Expr(op, (x * G,)), st.sampled_from(_REDUCE), children),
        st.builds(lambda x, text, latex: x.named(text, latex), children, _LABEL_TEXT, _LABEL_LATEX),
    )


# Any printable text (portopt.spec.limits refuses control, format and line-separator characters);
# LaTeX from characters that need no command.
_LABEL_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")), max_size=4)
_LABEL_LATEX = st.text(alphabet="abxyz019 _'()+-=<>", max_size=4)


EXPRESSIONS = st.recursive(_LEAVES, _extend, max_leaves=16)


@settings(max_examples=150, deadline=None)
@given(update=EXPRESSIONS, param=EXPRESSIONS, init=_CONSTANTS)
def test_random_expressions_round_trip(update: Expr, param: Expr, init: float) -> None:
    spec = Spec(
        "random",
        "Random",
        (Hyperparameter("lr", 0.1, NON_NEGATIVE), Hyperparameter("b", 0.5)),
        (StateDecl("m", "m", init=G * init),),
        (("m", update + state("m")),),
        P - param,
    )
    text = spec_to_json(spec)
    loaded = spec_from_json(text)
    assert loaded == spec
    assert spec_to_json(loaded) == text
