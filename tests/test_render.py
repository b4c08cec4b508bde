"""Text and LaTeX renderings: every algorithm renders; the format is pinned on small hand-built specs.

The expected strings below are written from the rules in portopt/spec/render.py's docstring
(precedence, ``m`` old / ``m_t`` new, labels defined before use), not copied from output.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portopt.algorithms import ALGORITHMS
from portopt.cli_options import build_spec, option_variants
from portopt.spec import (
    Expr,
    G,
    Hyperparameter,
    Layout,
    Op,
    P,
    Spec,
    StateDecl,
    T,
    clamp,
    col_mean,
    const,
    eq,
    exp,
    hyper,
    log,
    max_abs,
    maximum,
    minimum,
    ne,
    norm,
    row_mean,
    rsqrt,
    sign,
    sqrt,
    square,
    state,
    tensor_mean,
    tensor_sum,
    where,
)
from portopt.spec.definition import OptionValue
from portopt.spec.render import format_number, render_expr, render_latex, render_text
from portopt.spec.symbols import NON_NEGATIVE, UNIT_INTERVAL_OPEN_RIGHT, Range

a, b, c = hyper("a"), hyper("b"), hyper("c")
SYMBOLS = Spec(
    "symbols",
    "Symbols",
    (Hyperparameter("a", 1.0, symbol="a", latex="a"), Hyperparameter("b", 1.0), Hyperparameter("c", 1.0)),
    (),
    (),
    P - (a + b + c) * G,
)


def _variants() -> list[tuple[str, dict[str, OptionValue]]]:
    """Every registered algorithm (read at test time: the registry grows) with each option combination."""
    return [(name, options) for name in sorted(ALGORITHMS) for options in option_variants(name)]


def _spec(name: str, options: dict[str, OptionValue], maximize: bool) -> Spec:
    return build_spec(name, {**options, "maximize": maximize})


def _balanced_latex(text: str) -> bool:
    body = text.replace(r"\{", "").replace(r"\}", "")
    return (
        body.count("{") == body.count("}")
        and text.count(r"\left(") == text.count(r"\right)")
        and text.count(r"\begin{cases}") == text.count(r"\end{cases}")
        and text.count("(") == text.count(")")
    )


# every algorithm -------------------------------------------------------------------------
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize(("name", "options"), _variants())
def test_every_algorithm_renders_as_text(name: str, options: dict[str, OptionValue], maximize: bool) -> None:
    spec = _spec(name, options, maximize)
    lines = render_text(spec).splitlines()
    assert lines[0].startswith(f"{spec.title} ({spec.name}")
    assert lines[1].startswith("hyperparameters: ")
    assert lines[2].startswith("state: ")
    header = 4 if spec.inputs else 3
    if spec.inputs:
        assert lines[3].startswith("inputs: ")
    methods = [line for line in lines if any(line.startswith(f"{m.name}(): ") for m in spec.methods)]
    assert len(methods) == len(spec.methods)
    equations = lines[header : len(lines) - len(methods)]
    assert equations[-1].startswith("p ← "), "the parameter update comes last (before the methods)"
    by_method = {n for m in spec.methods for n, _ in m.updates}
    for s in spec.states:
        expected = 0 if spec.update_map[s.name] == state(s.name) and s.name in by_method else 1
        assert sum(line.startswith(f"{s.symbol} ← ") for line in equations) == expected, s.name
        assert f"{s.symbol} = " in lines[2]
    for h in spec.hyperparameters:
        assert f"{h.text_symbol} = " in lines[1]
    assert all(line.count("(") == line.count(")") for line in lines)
    if maximize:
        assert "maximize=True" in lines[0]
        assert "−g" in render_text(spec, header=False)


@pytest.mark.parametrize(("name", "options"), _variants())
def test_every_algorithm_renders_as_latex(name: str, options: dict[str, OptionValue]) -> None:
    spec = _spec(name, options, maximize=False)
    text = render_latex(spec)
    lines = text.splitlines()
    header = 4 if spec.inputs else 3
    lines = lines[: len(lines) - len(spec.methods)]  # the methods follow as comments
    assert all(line.startswith("% ") for line in lines[:header])
    assert lines[header] == r"\begin{aligned}"
    assert lines[-1] == r"\end{aligned}"
    assert lines[-2].startswith(r"\theta_t &\leftarrow ")
    by_method = {n for m in spec.methods for n, _ in m.updates}
    for s in spec.states:
        lhs = s.latex_symbol + "_t" if "_" not in s.latex_symbol else "{" + s.latex_symbol + "}_t"
        if s.name not in by_method:
            assert any(line.startswith(f"{lhs} &\\leftarrow ") for line in lines), s.name
    assert all(line.endswith(" \\\\") for line in lines[header + 1 : -2])
    assert _balanced_latex(text)
    assert render_latex(spec, header=False).splitlines()[0] == r"\begin{aligned}"


# mathtext's dialect: the same symbols under other names.
_MATHTEXT = {
    r"\lVert": r"\Vert",
    r"\rVert": r"\Vert",
    r"\lvert": "|",
    r"\rvert": "|",
    r"\land": r"\wedge",
    r"\lnot": r"\neg",
}


def test_latex_equations_parse_with_an_independent_parser() -> None:
    """matplotlib's mathtext (a TeX math parser we do not control) accepts every equation but case blocks."""
    mathtext = pytest.importorskip("matplotlib.mathtext")
    parser = mathtext.MathTextParser("agg")
    checked = 0
    for name, options in _variants():
        for line in render_latex(_spec(name, options, maximize=True), header=False).splitlines()[1:-1]:
            equation = line.removesuffix(" \\\\").replace("&", "")
            if r"\begin{cases}" in equation:
                continue  # mathtext has no cases environment
            for ours, theirs in _MATHTEXT.items():
                equation = equation.replace(ours, theirs)
            parser.parse(f"${equation}$", dpi=72)
            checked += 1
    assert checked > len(ALGORITHMS)


# a small spec, pinned --------------------------------------------------------------------
def toy_spec() -> Spec:
    """Momentum with a per-tensor bias-correction product (a made-up algorithm)."""
    beta, lr, eps = hyper("beta"), hyper("lr"), hyper("eps")
    m_t = beta * state("exp_avg") + (1 - beta) * G
    n_t = state("prod") * beta
    m_hat = (m_t / (1 - n_t)).named("m̂", r"\hat{m}_t")
    return Spec(
        name="toy",
        title="Toy",
        hyperparameters=(
            Hyperparameter("lr", 0.1, NON_NEGATIVE, "lr", r"\eta"),
            Hyperparameter("beta", 0.9, UNIT_INTERVAL_OPEN_RIGHT, "β", r"\beta"),
            Hyperparameter("eps", 1e-8, NON_NEGATIVE, "ε", r"\epsilon"),
            Hyperparameter("shift", -2.5, Range()),
        ),
        states=(
            StateDecl("exp_avg", "m"),
            StateDecl("prod", "n", r"\pi", init=const(1.0), layout=Layout.TENSOR),
        ),
        updates=(("exp_avg", m_t), ("prod", n_t)),
        param_update=P - lr * m_hat / (sqrt(abs(m_hat)) + eps) + hyper("shift") * 0.0,
        options=(("variant", "a"),),
    )


def test_toy_text_is_pinned() -> None:
    assert render_text(toy_spec()) == "\n".join(
        [
            "Toy (toy, variant=a)",
            "hyperparameters: lr = 0.1 (lr ≥ 0); β = 0.9 (beta, 0 ≤ β < 1); ε = 1e-8 (eps, ε ≥ 0); shift = −2.5",
            "state: m = 0 (exp_avg); n = 1 (prod, per tensor)",
            "m ← β·m + (1 − β)·g",
            "n ← n·β",
            "m̂ = m/(1 − n)",
            "p ← p − lr·m̂/(√|m̂| + ε) + shift·0",
        ]
    )


def test_toy_latex_is_pinned() -> None:
    assert render_latex(toy_spec()) == "\n".join(
        [
            "% Toy (toy, variant=a)",
            r"% hyperparameters: \eta = 0.1 (lr, \eta \ge 0); \beta = 0.9 (beta, 0 \le \beta < 1); "
            r"\epsilon = 10^{-8} (eps, \epsilon \ge 0); \mathrm{shift} = -2.5 (shift)",
            r"% state: m_0 = 0 (exp_avg); \pi_0 = 1 (prod, per tensor)",
            r"\begin{aligned}",
            r"m_t &\leftarrow \beta m_{t-1} + (1 - \beta) g_t \\",
            r"\pi_t &\leftarrow \pi_{t-1} \beta \\",
            r"\hat{m}_t &= \frac{m_t}{1 - \pi_t} \\",
            r"\theta_t &\leftarrow \theta_{t-1} - \frac{\eta \hat{m}_t}{\sqrt{\lvert \hat{m}_t \rvert} + \epsilon}"
            r" + \mathrm{shift} \cdot 0",
            r"\end{aligned}",
        ]
    )


def test_toy_without_header() -> None:
    assert render_text(toy_spec(), header=False).splitlines()[0] == "m ← β·m + (1 − β)·g"


# parentheses -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "text"),
    [
        (a - (b - c), "a − (b − c)"),
        ((a - b) - c, "a − b − c"),
        (a + (b + c), "a + (b + c)"),
        (a - (b + c), "a − (b + c)"),
        (a + b * c, "a + b·c"),
        ((a + b) * c, "(a + b)·c"),
        (a / (b * c), "a/(b·c)"),
        (a / b * c, "a/b·c"),
        (a * (b / c), "a·(b/c)"),
        (a / b / c, "a/b/c"),
        (a / (b / c), "a/(b/c)"),
        ((a + b) ** 2, "(a + b)^2"),
        (a + b**2, "a + b^2"),
        (a ** (b + c), "a^(b + c)"),
        ((a**b) ** c, "(a^b)^c"),
        (a ** (b**c), "a^(b^c)"),
        (a**-1.0, "a^(−1)"),
        (-(a**2), "−a^2"),
        ((-a) ** 2, "(−a)^2"),
        (const(-2.0) ** 2, "(−2)^2"),
        (-(a + b), "−(a + b)"),
        (Expr(Op.NEG, (-a,)), "−(−a)"),
        (-a * b, "−a·b"),
        (-(a * b), "−(a·b)"),
        (a * -b, "a·(−b)"),
        (a - (-b), "a − (−b)"),
        (a * -2.0, "a·(−2)"),
        (a / (-b), "a/(−b)"),
        (sqrt(a + b), "√(a + b)"),
        (sqrt(a) * b, "√a·b"),
        (sqrt(a) ** 2, "(√a)^2"),
        (sqrt(a**2), "√(a^2)"),
        (-sqrt(a), "−√a"),
        (square(a + b), "(a + b)^2"),
        (square(a), "a^2"),
        (rsqrt(a), "1/√a"),
        (b / rsqrt(a), "b/(1/√a)"),
        ((a / b) ** 2, "(a/b)^2"),
        (abs(a - b) ** 2, "|a − b|^2"),
        (exp(a + b) * log(c), "exp(a + b)·log(c)"),
        (sign(G) * maximum(a, b) - minimum(a, b), "sign(g)·max(a, b) − min(a, b)"),
        (clamp(G, -1.0, 1.0), "clamp(g, −1, 1)"),
        (norm(G) / (max_abs(P) + 1.0), "‖g‖/(max|p| + 1)"),
        (tensor_sum(G * G) + tensor_mean(G), "sum(g·g) + mean(g)"),
        (row_mean(G * G) * col_mean(G * G), "rowmean(g·g)·colmean(g·g)"),
        (a * T**2, "a·t^2"),
        (const(1e-8) * a, "1e-8·a"),
        (const(0.001), "0.001"),
    ],
)
def test_text_parentheses(expr: Expr, text: str) -> None:
    assert render_expr(expr, SYMBOLS) == text


@pytest.mark.parametrize(
    ("expr", "text"),
    [
        ((a < b) & ((b <= c) | ~(a > c)), "a < b ∧ (b ≤ c ∨ ¬(a > c))"),
        (((a < b) & (b <= c)) | (a >= c), "a < b ∧ b ≤ c ∨ a ≥ c"),
        (eq(T, 1) | ne(a, b), "t = 1 ∨ a ≠ b"),
        (a + b < c * 2.0, "a + b < c·2"),
        (where(G > 0, G, -G), "{g if g > 0; −g otherwise}"),
        (where(a > 0, a, where(b > 0, b, c)), "{a if a > 0; b if b > 0; c otherwise}"),
        (where(a > 0, where(b > 0, b, c), a), "{{b if b > 0; c otherwise} if a > 0; a otherwise}"),
        (1.0 + where(a > 0, a, b), "1 + {a if a > 0; b otherwise}"),
    ],
)
def test_text_logic_and_cases(expr: Expr, text: str) -> None:
    assert render_expr(expr, SYMBOLS) == text


@pytest.mark.parametrize(
    ("expr", "latex"),
    [
        (a - (b - c), r"a - (\mathrm{b} - \mathrm{c})"),
        ((a + b) ** 2, r"(a + \mathrm{b})^{2}"),
        (a / (b * c), r"\frac{a}{\mathrm{b} \mathrm{c}}"),
        ((a / b) ** 2, r"\left(\frac{a}{\mathrm{b}}\right)^{2}"),
        (-(a**2), "-a^{2}"),
        ((-a) ** 2, "(-a)^{2}"),
        (sqrt(a) ** 2, r"(\sqrt{a})^{2}"),
        (2.0 * a, "2 a"),
        (a * 2.0, r"a \cdot 2"),
        (a * -b, r"a (-\mathrm{b})"),
        (a ** (T + 1), "a^{t + 1}"),
        (const(1e-8) * a, "10^{-8} a"),
        (const(2.5e-8), r"2.5 \cdot 10^{-8}"),
        (norm(G) * abs(P), r"\lVert g_t \rVert \lvert \theta_{t-1} \rvert"),
        (max_abs(G), r"\max\lvert g_t \rvert"),
        (exp(a / b), r"\exp\left(\frac{a}{\mathrm{b}}\right)"),
        (sign(G), r"\operatorname{sign}(g_t)"),
        (clamp(G, -1.0, 1.0), r"\operatorname{clamp}(g_t, -1, 1)"),
        (rsqrt(a), r"\frac{1}{\sqrt{a}}"),
        ((a <= b) & ~(T > 1), r"a \le \mathrm{b} \land \lnot (t > 1)"),
        (
            where(a > 0, a, where(b > 0, b, c)),
            r"\begin{cases} a & \text{if } a > 0 \\ \mathrm{b} & \text{if } \mathrm{b} > 0 \\ "
            r"\mathrm{c} & \text{otherwise} \end{cases}",
        ),
        (
            1.0 + where(a > 0, a, b),
            r"1 + \left(\begin{cases} a & \text{if } a > 0 \\ \mathrm{b} & \text{otherwise} \end{cases}\right)",
        ),
    ],
)
def test_latex_parentheses(expr: Expr, latex: str) -> None:
    assert render_expr(expr, SYMBOLS, latex=True) == latex


def test_expression_without_spec_uses_names() -> None:
    assert render_expr(hyper("lr") * state("exp_avg")) == "lr·exp_avg"
    assert render_expr(hyper("lr") * state("exp_avg"), latex=True) == r"\mathrm{lr} \mathrm{exp\_avg}_{t-1}"


def test_labels_inside_an_expression_print_by_name() -> None:
    d = (sqrt(a) + 1.0).named("d", "d_t")
    assert render_expr(b / d, SYMBOLS) == "b/d"
    assert render_expr(b / d, SYMBOLS, latex=True) == r"\frac{\mathrm{b}}{d_t}"
    assert render_expr(d, SYMBOLS) == "√a + 1", "the root itself is expanded"


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0, "0"), (1.0, "1"), (-2.0, "−2"), (0.9, "0.9"), (1e-8, "1e-8"), (1e20, "1e20"), (-1.5e-10, "−1.5e-10")],
)
def test_numbers(value: float, text: str) -> None:
    assert format_number(value) == text


# old and new values of a state -----------------------------------------------------------
def _small(states: tuple[StateDecl, ...], updates: tuple[tuple[str, Expr], ...], param_update: Expr) -> Spec:
    hypers = tuple(Hyperparameter(n, 0.5, symbol=n, latex=n) for n in ("lr", "b1", "b2"))
    return Spec("s", "S", hypers, states, updates, param_update)


def test_a_reader_of_an_old_value_comes_before_its_overwrite() -> None:
    """Lion's interpolation reads m before m's update; the text puts it first so `m` stays unambiguous."""
    b1, b2, lr = hyper("b1"), hyper("b2"), hyper("lr")
    c_t = (b1 * state("m") + (1 - b1) * G).named("c", "c_t")
    m_t = b2 * state("m") + (1 - b2) * G
    spec = _small((StateDecl("m", "m"),), (("m", m_t),), P - lr * sign(c_t))
    assert render_text(spec, header=False).splitlines() == [
        "c = b1·m + (1 − b1)·g",
        "m ← b2·m + (1 − b2)·g",
        "p ← p − lr·sign(c)",
    ]
    assert render_latex(spec, header=False).splitlines()[1:4] == [
        r"c_t &= b1 m_{t-1} + (1 - b1) g_t \\",
        r"m_t &\leftarrow b2 m_{t-1} + (1 - b2) g_t \\",
        r"\theta_t &\leftarrow \theta_{t-1} - lr \operatorname{sign}(c_t)",
    ]


def test_new_value_prints_as_the_state_and_old_as_its_previous_value() -> None:
    lr, b1 = hyper("lr"), hyper("b1")
    m_t = b1 * state("m") + G
    spec = _small((StateDecl("m", "m"),), (("m", m_t),), P - lr * m_t)
    assert render_text(spec, header=False).splitlines() == ["m ← b1·m + g", "p ← p − lr·m"]
    assert render_latex(spec, header=False).splitlines()[1:3] == [
        r"m_t &\leftarrow b1 m_{t-1} + g_t \\",
        r"\theta_t &\leftarrow \theta_{t-1} - lr m_t",
    ]


def test_states_that_read_each_others_old_value_are_marked() -> None:
    """No order of `x ← ...y...` and `y ← ...x...` reads right in pseudo-code: the old value is marked."""
    half = 0.5
    x_t = half * state("x") + state("y") * G
    y_t = half * state("y") + state("x") * G
    spec = _small((StateDecl("x", "x"), StateDecl("y", "y")), (("x", x_t), ("y", y_t)), P - hyper("lr") * (x_t + y_t))
    assert render_text(spec, header=False).splitlines() == [
        "x ← 0.5·x + y·g",
        "y ← 0.5·y + x_{t-1}·g",
        "p ← p − lr·(x + y)",
    ]


def test_a_state_copied_from_a_leaf_is_not_confused_with_it() -> None:
    """`prev ← g` must not turn every other g into `prev`."""
    spec = _small((StateDecl("prev", "h"),), (("prev", G),), P - hyper("lr") * (G - state("prev")))
    assert render_text(spec, header=False).splitlines() == ["p ← p − lr·(g − h)", "h ← g"]
    assert render_latex(spec, header=False).splitlines()[1:3] == [
        r"\theta_t &\leftarrow \theta_{t-1} - lr (g_t - h_{t-1}) \\",
        r"h_t &\leftarrow g_t",
    ]


def test_reading_p_keeps_the_parameter_update_last() -> None:
    spec = _small((StateDecl("m", "m"),), (("m", state("m") + P * G),), P - hyper("lr") * state("m"))
    assert render_text(spec, header=False).splitlines() == ["m ← m + p·g", "p ← p − lr·m_{t-1}"]


def test_factored_state_and_initial_values() -> None:
    b2 = hyper("b2")
    r_t = b2 * state("r") + (1 - b2) * row_mean(G * G)
    c_t = b2 * state("c") + (1 - b2) * col_mean(G * G)
    spec = _small(
        (
            StateDecl("r", "R", init=const(0.0), layout=Layout.ROW),
            StateDecl("c", "C", init=const(0.0), layout=Layout.COL),
            StateDecl("copy", "k", init=P * 1.0),
        ),
        (("r", r_t), ("c", c_t), ("copy", state("copy") * 0.5 + G)),
        P - hyper("lr") * G / sqrt(r_t * c_t),
    )
    lines = render_text(spec).splitlines()
    assert lines[2] == "state: R = 0 (r, per row); C = 0 (c, per column); k = p·1 (copy)"
    assert lines[3:6] == ["R ← b2·R + (1 − b2)·rowmean(g·g)", "C ← b2·C + (1 − b2)·colmean(g·g)", "k ← k·0.5 + g"]
    assert render_latex(spec).splitlines()[2] == (
        r"% state: R_0 = 0 (r, per row); C_0 = 0 (c, per column); k_0 = \theta_0 \cdot 1 (copy)"
    )


def test_superscripted_symbols_stay_valid_latex() -> None:
    """`v^{\\max}_t` squared needs braces (a double superscript is a LaTeX error)."""
    v_t = maximum(state("v"), G * G)
    spec = _small((StateDecl("v", "v_max", r"v^{\max}"),), (("v", v_t),), P - hyper("lr") * G / square(v_t))
    assert render_latex(spec, header=False).splitlines()[2] == (
        r"\theta_t &\leftarrow \theta_{t-1} - \frac{lr g_t}{{v^{\max}_t}^{2}}"
    )
    assert re.search(r"\^\{[^}]*\}\^", render_latex(spec)) is None


# random specs ----------------------------------------------------------------------------
_LEAVES = st.sampled_from([P, G, T, a, b, state("m"), const(2.0), const(-0.5), const(1e-8)])


def _grow(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    compare = st.builds(lambda x, y: x < y, children, children)
    return st.one_of(
        st.builds(
            lambda op, x: Expr(op, (x,)), st.sampled_from([Op.NEG, Op.SQRT, Op.RSQRT, Op.SQUARE, Op.ABS]), children
        ),
        st.builds(
            lambda op, x, y: Expr(op, (x, y)),
            st.sampled_from([Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW]),
            children,
            children,
        ),
        st.builds(lambda c1, c2, x, y: where(c1 & ~c2, x, y), compare, compare, children, children),
        st.builds(lambda x: norm(x * G), children),
        st.builds(lambda x, n: x.named(f"L{n}", f"L_{{{n}}}"), children, st.integers(0, 3)),
    )


@settings(max_examples=100, deadline=None)
@given(update=st.recursive(_LEAVES, _grow, max_leaves=12), param=st.recursive(_LEAVES, _grow, max_leaves=12))
def test_random_specs_render(update: Expr, param: Expr) -> None:
    m_t = update + state("m")
    spec = Spec("random", "Random", SYMBOLS.hyperparameters, (StateDecl("m", "m"),), (("m", m_t),), P - param * m_t)
    text = render_text(spec, header=False).splitlines()
    assert text[-1].startswith("p ← ")
    assert sum(line.startswith("m ← ") for line in text) == 1
    assert all(line.count("(") == line.count(")") for line in text)
    assert _balanced_latex(render_latex(spec))
