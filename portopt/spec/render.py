"""Text and LaTeX renderings of a spec: the equations in the order a paper writes them.

A rendering is one equation per line:

* labelled intermediates (``expr.named("α", r"\\alpha_t")``) as ``α = ...``, each defined
  before its first use;
* each state update as ``m ← β1·m + (1 − β1)·g``;
* the parameter update ``p ← ...``, last.

A large unlabelled subexpression used in several places (more than ``_SHARED_SIZE`` nodes
spelled out), or a very large one (more than ``_LONG_SIZE``), is printed once, as
``e1 = ...``, and referred to by that name, so the text grows with the number of distinct
nodes, never with the tree a shared DAG unfolds to, and no equation is unreadably long;
:func:`render_expr` and the header append such definitions (``..., where e1 = ...``).
Rendering is iterative: a chain of any depth prints without recursion.

Inside an equation a node that *is* the new value of a state prints as that state's
symbol, a labelled node prints as its label, and ``state(name)`` prints the value before
the step. LaTeX tells the two apart by subscripts (``m_t`` is new, ``m_{t-1}`` is old;
``\\theta_{t-1}`` and ``g_t`` for ``p`` and ``g``). The text form reads top to bottom like
pseudo-code, so ``m`` means the latest value assigned; the equations are ordered so that
every read of an old value comes before its overwrite, and where the spec makes that
impossible (two states that read each other's old value) the old value prints as
``m_{t-1}``.

Parentheses follow precedence, loosest to tightest: ``∨``, ``∧``, comparisons, ``¬`` (its
operand is parenthesised unless atomic: ``¬(a > b)``), ``+ −``, ``· /``, unary minus (so
``−x^2`` is ``−(x^2)``), ``√``, ``^``, atoms. A right operand of equal precedence
keeps its parentheses (``a − (b − c)``, ``a/(b·c)``), so the printed grouping is the
tree's grouping; a negated value is parenthesised as a right operand (``a·(−b)``).
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from portopt.spec.definition import OptionValue, Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import Op
from portopt.spec.symbols import Layout, Range

__all__ = ["format_number", "render_expr", "render_latex", "render_text"]

# Precedence levels, loosest to tightest.
_OR, _AND, _CMP, _NOT, _ADD, _MUL, _NEG, _ROOT, _POW, _ATOM = range(10)

_TEXT_MINUS = "\N{MINUS SIGN}"

_COMPARE_TEXT = {Op.LT: "<", Op.LE: "≤", Op.GT: ">", Op.GE: "≥", Op.EQ: "=", Op.NE: "≠"}
_COMPARE_LATEX = {Op.LT: "<", Op.LE: r"\le", Op.GT: ">", Op.GE: r"\ge", Op.EQ: "=", Op.NE: r"\neq"}
_FUNCTION_TEXT = {
    Op.SIGN: "sign",
    Op.EXP: "exp",
    Op.LOG: "log",
    Op.MAXIMUM: "max",
    Op.MINIMUM: "min",
    Op.SUM: "sum",
    Op.MEAN: "mean",
    Op.ROW_MEAN: "rowmean",
    Op.COL_MEAN: "colmean",
    Op.ROW_SUM: "rowsum",
    Op.COL_SUM: "colsum",
    Op.ROW_MAX: "rowmax",
    Op.COL_MAX: "colmax",
    Op.MOD: "mod",
}
_FUNCTION_LATEX = {
    Op.SIGN: r"\operatorname{sign}",
    Op.EXP: r"\exp",
    Op.LOG: r"\log",
    Op.MAXIMUM: r"\max",
    Op.MINIMUM: r"\min",
    Op.SUM: r"\operatorname{sum}",
    Op.MEAN: r"\operatorname{mean}",
    Op.ROW_MEAN: r"\operatorname{rowmean}",
    Op.COL_MEAN: r"\operatorname{colmean}",
    Op.ROW_SUM: r"\operatorname{rowsum}",
    Op.COL_SUM: r"\operatorname{colsum}",
    Op.ROW_MAX: r"\operatorname{rowmax}",
    Op.COL_MAX: r"\operatorname{colmax}",
    Op.MOD: r"\operatorname{mod}",
}
_LAYOUT_WORDS = {Layout.TENSOR: "per tensor", Layout.ROW: "per row", Layout.COL: "per column"}

_Key = tuple[str, object]  # ("state", name) | ("label", node) | ("param", "") | ("auto", number)
_PARAM_KEY: _Key = ("param", "")
_SHARED_SIZE = 40
"""A shared subexpression that would spell out more nodes than this gets a name of its own."""
_LONG_SIZE = 120
"""So does any subexpression that would spell out more nodes than this."""


@dataclass(frozen=True)
class _Piece:
    """A rendered subexpression: its text, its precedence, and whether it can carry ``^``."""

    text: str
    prec: int
    base_safe: bool = False


@dataclass(frozen=True)
class _Context:
    """How leaves and references print in one equation."""

    latex: bool
    spec: Spec | None
    refs: dict[Expr, _Key]
    stale: frozenset[_Key] = frozenset()  # text form: values already overwritten above
    initial: bool = False  # an initial value: LaTeX prints θ_0 and g_1


# numbers ----------------------------------------------------------------------------
def _magnitude(x: float) -> str:
    """Shortest round-tripping form of a non-negative number: ``1``, ``0.9``, ``1e-8``."""
    if x.is_integer() and x < 1e16:
        return str(int(x))
    text = repr(x)
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], text)


def _number(x: float, latex: bool) -> _Piece:
    x = float(x)
    if math.isnan(x):
        return _Piece(r"\mathrm{NaN}" if latex else "nan", _ATOM, True)
    negative = math.copysign(1.0, x) < 0
    if math.isinf(x):
        body = _Piece(r"\infty" if latex else "∞", _ATOM, True)
    else:
        text = _magnitude(abs(x))
        if "e" not in text:
            body = _Piece(text, _ATOM, True)
        elif not latex:
            body = _Piece(text, _ATOM, False)
        else:
            mantissa, exponent = text.split("e")
            power = f"10^{{{exponent}}}"
            body = _Piece(power, _POW) if mantissa == "1" else _Piece(rf"{mantissa} \cdot {power}", _MUL)
    if not negative:
        return body
    return _Piece(("-" if latex else _TEXT_MINUS) + _wrap(body, body.prec <= _NEG, latex), _NEG)


def format_number(x: float) -> str:
    """A number as the text rendering prints it (``0.001``, ``1e-8``, ``−1``)."""
    return _number(x, latex=False).text


# symbols ----------------------------------------------------------------------------
def _mathrm(name: str) -> str:
    """A name without a LaTeX symbol, upright, its underscores escaped: ``\\mathrm{exp\\_avg}``."""
    escaped = name.replace("_", r"\_")
    return rf"\mathrm{{{escaped}}}"


def _subscript(symbol: str, sub: str) -> str:
    """``m`` -> ``m_t``; a symbol that already has a subscript is braced first."""
    base = f"{{{symbol}}}" if re.search(r"(?<!\\)_", symbol) else symbol
    return f"{base}_{sub}" if len(sub) == 1 else f"{base}_{{{sub}}}"


def _hyper_symbol(name: str, ctx: _Context) -> str:
    if ctx.spec is not None and name in ctx.spec.hyper_names:
        h = ctx.spec.hyperparameter(name)
        if ctx.latex:
            return h.latex or _mathrm(name)
        return h.text_symbol
    return _mathrm(name) if ctx.latex else name


def _state_symbol(name: str, ctx: _Context) -> str:
    if ctx.spec is not None and name in ctx.spec.state_names:
        s = ctx.spec.state_decl(name)
        return s.latex_symbol if ctx.latex else s.symbol
    return _mathrm(name) if ctx.latex else name


def _old_state(name: str, ctx: _Context) -> str:
    symbol = _state_symbol(name, ctx)
    if ctx.latex:
        return _subscript(symbol, "t-1")
    return f"{symbol}_{{t-1}}" if ("state", name) in ctx.stale else symbol


def _new_state(name: str, ctx: _Context) -> str:
    symbol = _state_symbol(name, ctx)
    return _subscript(symbol, "t") if ctx.latex else symbol


def _leaf(node: Expr, ctx: _Context) -> _Piece:
    if node.op is Op.CONST:
        return _number(float(node.value or 0.0), ctx.latex)
    if node.op is Op.HYPER:
        return _Piece(_hyper_symbol(str(node.value), ctx), _ATOM, True)
    if node.op is Op.STATE:
        return _Piece(_old_state(str(node.value), ctx), _ATOM, True)
    if node.op is Op.STEP:
        return _Piece("t", _ATOM, True)
    if node.op is Op.PARAM:
        if ctx.latex:
            return _Piece(r"\theta_0" if ctx.initial else r"\theta_{t-1}", _ATOM, True)
        return _Piece("p_{t-1}" if _PARAM_KEY in ctx.stale else "p", _ATOM, True)
    if node.op is Op.GRAD:
        return _Piece(("g_1" if ctx.initial else "g_t") if ctx.latex else "g", _ATOM, True)
    if node.op is Op.INPUT:
        return _Piece(_input_symbol(str(node.value), ctx), _ATOM, True)
    return _shape_leaf(node, ctx)


def _input_symbol(name: str, ctx: _Context) -> str:
    if ctx.spec is not None and name in ctx.spec.input_names:
        declared = next(i for i in ctx.spec.inputs if i.name == name)
        return declared.latex_symbol if ctx.latex else declared.text_symbol
    return _mathrm(name) if ctx.latex else name


def _shape_leaf(node: Expr, ctx: _Context) -> _Piece:
    r"""``numel(p)``, ``ndim(p)``, ``size(p, −1)``, ``eps(dtype)`` (LaTeX: ``\operatorname{numel}(\theta)``, ...)."""
    target = r"\theta" if ctx.latex else "p"
    if node.op is Op.SIZE:
        axis = _number(float(node.value or 0.0), ctx.latex).text
        text = rf"\operatorname{{size}}_{{{axis}}}(\theta)" if ctx.latex else f"size(p, {axis})"
    elif node.op is Op.FINFO:
        text = rf"\operatorname{{{node.value}}}(\mathrm{{dtype}})" if ctx.latex else f"{node.value}(dtype)"
    else:
        text = rf"\operatorname{{{node.op.value}}}({target})" if ctx.latex else f"{node.op.value}({target})"
    return _Piece(text, _ATOM, True)


def _shared_symbol(number: int, latex: bool) -> str:
    """The name of an automatically named shared subexpression: ``e3`` (LaTeX ``e_{3}``)."""
    return f"e_{{{number}}}" if latex else f"e{number}"


def _reference(key: _Key, ctx: _Context) -> _Piece:
    kind, what = key
    if kind == "state":
        return _Piece(_new_state(str(what), ctx), _ATOM, True)
    if kind == "auto":
        return _Piece(_shared_symbol(int(str(what)), ctx.latex), _ATOM, True)
    assert isinstance(what, Expr)
    assert what.label is not None
    return _Piece(what.label.latex if ctx.latex else what.label.text, _ATOM, True)


# expressions ------------------------------------------------------------------------
def _wrap(piece: _Piece, needed: bool, latex: bool) -> str:
    if not needed:
        return piece.text
    if latex and (r"\frac" in piece.text or r"\begin" in piece.text):
        return rf"\left({piece.text}\right)"
    return f"({piece.text})"


def _where_rows(node: Expr, ctx: _Context) -> tuple[list[tuple[Expr, Expr]], Expr]:
    """``where(c1, a, where(c2, b, c))`` -> ``[(c1, a), (c2, b)]`` and ``c``: one case expression."""
    rows: list[tuple[Expr, Expr]] = []
    while node.op is Op.WHERE and (not rows or node not in ctx.refs):
        cond, if_true, node = node.args
        rows.append((cond, if_true))
    return rows, node


def _is_clamp(node: Expr, ctx: _Context) -> bool:
    return node.op is Op.MINIMUM and node.args[0].op is Op.MAXIMUM and node.args[0] not in ctx.refs


def _needs(node: Expr, ctx: _Context) -> tuple[Expr, ...]:
    """The nodes whose renderings ``node``'s rendering is made of."""
    if node.op is Op.WHERE:
        rows, otherwise = _where_rows(node, ctx)
        return (*(x for row in rows for x in row), otherwise)
    if _is_clamp(node, ctx):
        return (*node.args[0].args, node.args[1])
    return node.args


def _render(root: Expr, ctx: _Context) -> _Piece:
    """Render ``root``; below it, references print as their symbol.

    Iterative and memoised: each node is rendered once from the renderings of the nodes it
    needs (no recursion, whatever the depth; a shared node is not rendered twice).
    """
    pieces: dict[Expr, _Piece] = {}
    pending: list[tuple[Expr, bool]] = [(root, False)]
    while pending:
        node, ready = pending.pop()
        if node in pieces:
            continue
        if node is not root and node in ctx.refs:
            pieces[node] = _reference(ctx.refs[node], ctx)
            continue
        needs = _needs(node, ctx)
        if not ready and any(n not in pieces for n in needs):
            pending.append((node, True))
            pending.extend((n, False) for n in reversed(needs) if n not in pieces)
            continue
        pieces[node] = _piece(node, ctx, pieces.__getitem__, node is root)
    return pieces[root]


def _piece(node: Expr, ctx: _Context, get: Callable[[Expr], _Piece], root: bool) -> _Piece:
    """One node's rendering, given its operands' (``get``)."""
    op, args = node.op, node.args
    if not args:
        return _leaf(node, ctx)
    if op in (Op.ADD, Op.SUB):
        symbol = "+" if op is Op.ADD else ("-" if ctx.latex else _TEXT_MINUS)
        return _infix(get(args[0]), get(args[1]), symbol, _ADD, ctx)
    if op is Op.MUL:
        return _product(get(args[0]), get(args[1]), ctx)
    if op is Op.DIV:
        return _quotient(get(args[0]), get(args[1]), ctx)
    if op is Op.RSQRT:
        return _quotient(_number(1.0, ctx.latex), _sqrt(get(args[0]), ctx), ctx)
    if op is Op.SQRT:
        return _sqrt(get(args[0]), ctx)
    if op is Op.POW:
        return _power(get(args[0]), get(args[1]), ctx)
    if op is Op.SQUARE:
        return _power(get(args[0]), _number(2.0, ctx.latex), ctx)
    if op is Op.NEG:
        operand = get(args[0])
        sign = "-" if ctx.latex else _TEXT_MINUS
        return _Piece(sign + _wrap(operand, operand.prec <= _NEG, ctx.latex), _NEG)
    if op in _COMPARE_TEXT:
        symbol = (_COMPARE_LATEX if ctx.latex else _COMPARE_TEXT)[op]
        left, right = get(args[0]), get(args[1])
        return _Piece(
            f"{_wrap(left, left.prec <= _CMP, ctx.latex)} {symbol} {_wrap(right, right.prec <= _CMP, ctx.latex)}", _CMP
        )
    if op in (Op.AND, Op.OR):
        prec = _AND if op is Op.AND else _OR
        symbol = (r"\land" if op is Op.AND else r"\lor") if ctx.latex else ("∧" if op is Op.AND else "∨")
        return _infix(get(args[0]), get(args[1]), symbol, prec, ctx)
    if op is Op.NOT:
        operand = get(args[0])
        sign = r"\lnot " if ctx.latex else "¬"
        return _Piece(sign + _wrap(operand, operand.prec < _ATOM, ctx.latex), _NOT)
    if op is Op.WHERE:
        return _cases(node, ctx, root, get)
    if op is Op.FLOOR:
        inner = get(args[0]).text
        return _Piece(rf"\lfloor {inner} \rfloor" if ctx.latex else f"⌊{inner}⌋", _ATOM, True)
    if op is Op.ABS:
        inner = get(args[0]).text
        return _Piece(rf"\lvert {inner} \rvert" if ctx.latex else f"|{inner}|", _ATOM, True)
    if op is Op.NORM:
        inner = get(args[0]).text
        return _Piece(rf"\lVert {inner} \rVert" if ctx.latex else f"‖{inner}‖", _ATOM, True)
    if op is Op.MAX_ABS:
        inner = get(args[0]).text
        return _Piece(rf"\max\lvert {inner} \rvert" if ctx.latex else f"max|{inner}|", _ATOM)
    if _is_clamp(node, ctx):
        # clamp(x, lo, hi) is built as min(max(x, lo), hi): print it as written.
        return _call(r"\operatorname{clamp}" if ctx.latex else "clamp", [get(a) for a in _needs(node, ctx)], ctx)
    name = (_FUNCTION_LATEX if ctx.latex else _FUNCTION_TEXT)[op]
    return _call(name, [get(a) for a in args], ctx)


def _infix(left: _Piece, right: _Piece, symbol: str, prec: int, ctx: _Context, *, spaced: bool = True) -> _Piece:
    left_text = _wrap(left, left.prec < prec, ctx.latex)
    right_text = _wrap(right, right.prec <= prec or right.prec == _NEG, ctx.latex)
    joiner = f" {symbol} " if spaced else symbol
    return _Piece(left_text + joiner + right_text, prec)


def _product(left: _Piece, right: _Piece, ctx: _Context) -> _Piece:
    if not ctx.latex:
        return _infix(left, right, "·", _MUL, ctx, spaced=False)
    left_text = _wrap(left, left.prec < _MUL, True)
    right_text = _wrap(right, right.prec <= _MUL or right.prec == _NEG, True)
    # Juxtapose as a paper does (β_1 m_{t-1}); a dot only where two numbers would touch.
    joiner = r" \cdot " if right_text[:1].isdigit() else " "
    return _Piece(left_text + joiner + right_text, _MUL)


def _quotient(num: _Piece, den: _Piece, ctx: _Context) -> _Piece:
    if ctx.latex:
        return _Piece(rf"\frac{{{num.text}}}{{{den.text}}}", _ATOM)
    num_text = _wrap(num, num.prec < _MUL, False)
    den_text = _wrap(den, den.prec <= _MUL or den.prec == _NEG, False)
    return _Piece(f"{num_text}/{den_text}", _MUL)


def _sqrt(operand: _Piece, ctx: _Context) -> _Piece:
    if ctx.latex:
        return _Piece(rf"\sqrt{{{operand.text}}}", _ATOM)
    return _Piece("√" + _wrap(operand, operand.prec < _ATOM, False), _ROOT)


def _power(base: _Piece, exponent: _Piece, ctx: _Context) -> _Piece:
    if ctx.latex:
        base_text = _wrap(base, not base.base_safe, True)
        if base.base_safe and ("^" in base_text or "'" in base_text):
            base_text = f"{{{base_text}}}"  # v^{\max}_t or g'_t already carry a superscript
        return _Piece(f"{base_text}^{{{exponent.text}}}", _POW)
    base_text = _wrap(base, base.prec <= _POW or not base.base_safe, False)
    return _Piece(f"{base_text}^{_wrap(exponent, exponent.prec < _ATOM, False)}", _POW)


def _call(name: str, args: Sequence[_Piece], ctx: _Context) -> _Piece:
    inner = _Piece(", ".join(a.text for a in args), _OR)
    return _Piece(name + _wrap(inner, True, ctx.latex), _ATOM, True)


def _cases(node: Expr, ctx: _Context, root: bool, get: Callable[[Expr], _Piece]) -> _Piece:
    """``where(c1, a, where(c2, b, c))`` as one case expression with three rows."""
    chain, last = _where_rows(node, ctx)
    rows = [(get(if_true).text, get(cond).text) for cond, if_true in chain]
    otherwise = get(last).text
    if not ctx.latex:
        body = "; ".join(f"{value} if {cond}" for value, cond in rows)
        return _Piece(f"{{{body}; {otherwise} otherwise}}", _ATOM)
    lines = [rf"{value} & \text{{if }} {cond}" for value, cond in rows]
    lines.append(rf"{otherwise} & \text{{otherwise}}")
    cases = r"\begin{cases} " + r" \\ ".join(lines) + r" \end{cases}"
    # As an operand the right side of the brace is open: parenthesise it.
    return _Piece(cases if root else rf"\left({cases}\right)", _ATOM)


# equations --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Equation:
    key: _Key
    root: Expr
    deps: tuple[_Key, ...]  # equations whose left-hand side it uses, in order of first use
    reads: frozenset[_Key]  # states (and p) whose value before the step it reads


def _new_value_refs(spec: Spec) -> dict[Expr, _Key]:
    """Each state's new value, as a node: a leaf (``b ← g``) stays itself."""
    refs: dict[Expr, _Key] = {}
    for name, value in spec.updates:
        if value.args and value not in refs:
            refs[value] = ("state", name)
    return refs


def _scan(root: Expr, refs: dict[Expr, _Key]) -> tuple[list[_Key], set[_Key], list[Expr]]:
    """References used by ``root``'s equation, old values it reads, and new labelled nodes.

    A depth-first walk (operands left to right, each node once) that stops at references.
    """
    deps: dict[_Key, None] = {}
    reads: set[_Key] = set()
    labelled: list[Expr] = []
    seen: set[Expr] = set()
    pending: list[tuple[Expr, bool]] = [(root, True)]
    while pending:
        node, is_root = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if not is_root and (node in refs or node.label is not None):
            if node not in refs:
                refs[node] = ("label", node)
                labelled.append(node)
            deps.setdefault(refs[node])
            continue
        if node.op is Op.STATE:
            reads.add(("state", str(node.value)))
        elif node.op is Op.PARAM:
            reads.add(_PARAM_KEY)
        pending.extend((arg, False) for arg in reversed(node.args))
    return list(deps), reads, labelled


def _shared_names(roots: Sequence[Expr], refs: Mapping[Expr, _Key]) -> dict[Expr, _Key]:
    """Unnamed subexpressions to print as equations of their own (``e1 = ...``).

    A node used more than once whose text would spell out more than :data:`_SHARED_SIZE`
    nodes is named, so an equation never repeats a large shared subexpression: without it
    ``x + x`` nested 30 deep would print 2^30 terms. So is any node that would spell out more
    than :data:`_LONG_SIZE`: an equation stays readable (and building its text stays linear)
    however deep the expression. Sizes count a reference as one node.
    """
    order = walk(list(roots))
    uses = Counter(a for node in order for a in node.args)
    size: dict[Expr, int] = {}
    named: dict[Expr, _Key] = {}

    def cut(node: Expr) -> bool:
        return node in refs or node in named or node.label is not None

    for node in order:
        size[node] = 1 + sum(1 if cut(a) else size[a] for a in node.args)
        large = size[node] > (_SHARED_SIZE if uses[node] > 1 else _LONG_SIZE)
        if large and not cut(node) and uses[node] > 0:
            named[node] = ("auto", len(named) + 1)
    return named


def _equations(spec: Spec) -> tuple[list[_Equation], dict[Expr, _Key]]:
    """Every equation of ``spec``, in reading order, and the reference of each named node."""
    refs = _new_value_refs(spec)
    # A state kept as it is in the step (one that only a method updates) has no equation here.
    roots: dict[_Key, Expr] = {
        ("state", name): value for name, value in spec.updates if not (value.op is Op.STATE and value.value == name)
    }
    roots[_PARAM_KEY] = spec.param_update
    natural_roots = list(roots)
    shared = _shared_names(list(roots.values()), refs)
    refs.update(shared)
    roots.update({key: node for node, key in shared.items()})
    table: dict[_Key, _Equation] = {}
    natural: list[_Key] = []
    # Depth-first over equations, each after the equations it uses (no recursion).
    pending: list[tuple[_Key, bool]] = [(key, False) for key in reversed(natural_roots)]
    while pending:
        key, done = pending.pop()
        if done:
            natural.append(key)
            continue
        if key in table:
            continue
        deps, reads, labelled = _scan(roots[key], refs)
        for node in labelled:
            roots[("label", node)] = node
        table[key] = _Equation(key, roots[key], tuple(deps), frozenset(reads))
        pending.append((key, True))
        pending.extend((dep, False) for dep in reversed(deps) if dep not in table)
    return _schedule(table, natural), refs


def _schedule(table: dict[_Key, _Equation], natural: list[_Key]) -> list[_Equation]:
    """Definitions before uses; among the ready ones, an overwrite waits for the old value's readers.

    Of the equations whose definitions are all written, the first in natural order that no
    other pending equation reads the old value of (only states and ``p`` have old values);
    if every ready one is read, the first ready one.
    """
    rank = {key: i for i, key in enumerate(natural)}
    waiting = {key: len(table[key].deps) for key in natural}
    users: dict[_Key, list[_Key]] = {key: [] for key in natural}
    readers: Counter[_Key] = Counter()
    for key in natural:
        for dep in table[key].deps:
            users[dep].append(key)
        readers.update(r for r in table[key].reads if r != key)
    ready = [rank[key] for key in natural if waiting[key] == 0]
    heapq.heapify(ready)
    ordered: list[_Equation] = []
    while ready:
        passed: list[int] = []
        while ready and readers[natural[ready[0]]] > 0:
            passed.append(heapq.heappop(ready))
        chosen = natural[heapq.heappop(ready) if ready else passed.pop(0)]
        for waiting_rank in passed:
            heapq.heappush(ready, waiting_rank)
        ordered.append(table[chosen])
        for r in table[chosen].reads:
            if r != chosen:
                readers[r] -= 1
        for user in users[chosen]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, rank[user])
    return ordered


def _lhs(key: _Key, ctx: _Context) -> str:
    kind, what = key
    if kind == "state":
        return _new_state(str(what), ctx)
    if kind == "param":
        return r"\theta_t" if ctx.latex else "p"
    if kind == "auto":
        return _shared_symbol(int(str(what)), ctx.latex)
    assert isinstance(what, Expr)
    assert what.label is not None
    return what.label.latex if ctx.latex else what.label.text


def _equation_lines(spec: Spec, latex: bool) -> list[str]:
    equations, refs = _equations(spec)
    lines = []
    written: set[_Key] = set()
    for eq in equations:
        ctx = _Context(latex, spec, refs, frozenset(written))
        arrow = "=" if eq.key[0] in ("label", "auto") else (r"\leftarrow" if latex else "←")
        rhs = _render(eq.root, ctx).text
        lhs = _lhs(eq.key, ctx)
        if eq.key[0] == "label" and lhs == rhs:
            continue  # a label that reads exactly as its definition (‖p‖ = ‖p‖) adds nothing
        lines.append(f"{lhs} &{arrow} {rhs}" if latex else f"{lhs} {arrow} {rhs}")
        if eq.key[0] not in ("label", "auto"):
            written.add(eq.key)
    return lines


# header -----------------------------------------------------------------------------
def _constraint(r: Range, symbol: str, latex: bool) -> str:
    """``β1`` in ``[0, 1)`` -> ``0 ≤ β1 < 1``; ``lr ≥ 0``; empty when any real number is accepted."""
    le, ge = (r"\le", r"\ge") if latex else ("≤", "≥")
    low, high = _number(r.low, latex).text, _number(r.high, latex).text
    if r.low != -math.inf and r.high != math.inf:
        return f"{low} {le if r.low_inclusive else '<'} {symbol} {le if r.high_inclusive else '<'} {high}"
    if r.low != -math.inf:
        return f"{symbol} {ge if r.low_inclusive else '>'} {low}"
    if r.high != math.inf:
        return f"{symbol} {le if r.high_inclusive else '<'} {high}"
    return ""


def _option_text(options: tuple[tuple[str, OptionValue], ...]) -> str:
    return "".join(f", {k}={v}" for k, v in options)


def _header(spec: Spec, latex: bool) -> list[str]:
    ctx = _Context(latex, spec, {}, initial=True)
    hypers = []
    for h in spec.hyperparameters:
        symbol = (h.latex or _mathrm(h.name)) if latex else h.text_symbol
        notes = [h.name] if (latex or symbol != h.name) else []
        constraint = _constraint(h.constraint, symbol, latex)
        notes += [constraint] if constraint else []
        hypers.append(f"{symbol} = {_number(h.default, latex).text}" + (f" ({', '.join(notes)})" if notes else ""))
    states = []
    for s in spec.states:
        symbol = _subscript(s.latex_symbol, "0") if latex else s.symbol
        notes = [s.name] + ([_LAYOUT_WORDS[s.layout]] if s.layout in _LAYOUT_WORDS else [])
        if s.when is not None:
            notes.append(("if " if not latex else r"\text{if } ") + _inline(s.when, ctx))
        states.append(f"{symbol} = {_inline(s.init, ctx)} ({', '.join(notes)})")
    lines = [
        f"{spec.title} ({spec.name}{_option_text(spec.options)})",
        f"hyperparameters: {'; '.join(hypers) or 'none'}",
        f"state: {'; '.join(states) or 'none'}",
    ]
    if spec.inputs:
        inputs = []
        for i in spec.inputs:
            symbol = i.latex_symbol if latex else i.text_symbol
            inputs.append(f"{symbol} = {_number(i.default, latex).text} (step({i.name}=...))")
        lines.append(f"inputs: {'; '.join(inputs)}")
    return lines


def _method_lines(spec: Spec, latex: bool) -> list[str]:
    """Each method as ``update_hessian(): h ← β2·h + (1 − β2)·g²`` (and its cadence)."""
    lines = []
    for m in spec.methods:
        ctx = _Context(latex, spec, {})
        arrow = r"\leftarrow" if latex else "←"
        parts = []
        for name, expr in m.updates:
            lhs = _new_state(name, ctx) if latex else _state_symbol(name, ctx)
            parts.append(f"{lhs} {arrow} {_inline(expr, ctx)}")
        due = "" if m.due is None else (f" (after steps where {_inline(m.due, _Context(latex, spec, {}))})")
        escaped = m.name.replace("_", r"\_")
        head = rf"\text{{{escaped}()}}" if latex else f"{m.name}()"
        lines.append(f"{head}: {'; '.join(parts)}{due}")
    return lines


# public -----------------------------------------------------------------------------
def render_text(spec: Spec, *, header: bool = True) -> str:
    """The spec as plain text: a header (title, hyperparameters, states), then one equation per line."""
    return "\n".join(
        [
            *(_header(spec, latex=False) if header else []),
            *_equation_lines(spec, latex=False),
            *_method_lines(spec, False),
        ]
    )


def render_latex(spec: Spec, *, header: bool = True) -> str:
    """The spec as a LaTeX ``aligned`` block; the header (and the methods after the block), if asked for, as
    ``%`` comment lines."""
    comments = [f"% {line}" for line in _header(spec, latex=True)] if header else []
    body = " \\\\\n".join(_equation_lines(spec, latex=True))
    methods = [f"% {line}" for line in _method_lines(spec, latex=True)] if header else []
    return "\n".join([*comments, r"\begin{aligned}", body, r"\end{aligned}", *methods])


def render_expr(expr: Expr, spec: Spec | None = None, *, latex: bool = False) -> str:
    """One expression; with ``spec``, symbols come from its declarations and named nodes print by name."""
    refs: dict[Expr, _Key] = {}
    if spec is not None:
        refs = _new_value_refs(spec)
    _scan(expr, refs)  # labelled nodes below the root become references
    return _inline(expr, _Context(latex, spec, refs))


def _inline(root: Expr, ctx: _Context) -> str:
    """``root`` as one expression; large shared subexpressions are named and defined after it.

    ``p − lr·e2, where e1 = ..., e2 = ...`` (see :func:`_shared_names`).
    """
    shared = _shared_names([root], ctx.refs)
    if not shared:
        return _render(root, ctx).text
    ctx = replace(ctx, refs={**ctx.refs, **shared})
    definitions = [f"{_shared_symbol(int(str(k[1])), ctx.latex)} = {_render(n, ctx).text}" for n, k in shared.items()]
    where = r" \quad\text{where } " if ctx.latex else ", where "
    return _render(root, ctx).text + where + ", ".join(definitions)
