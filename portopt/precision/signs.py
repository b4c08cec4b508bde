"""Which states of a spec are provably non-negative (they get the unsigned 8-bit map).

A conservative interval analysis: each node gets bounds ``[lo, hi]`` from its operands
(constants are points, a hyperparameter is its declared :class:`~portopt.spec.symbols.Range`,
``t >= 1``, ``p`` and ``g`` are unbounded, ``square``/``abs``/``sqrt``/``exp``/norms are
``>= 0``, ``x·x`` of one node is ``>= 0``, ...). States are decided together, by induction
over steps: assume every state whose ``init`` is ``>= 0`` is non-negative, bound each
assumed state's update under that assumption, drop those whose update may be negative, and
repeat until nothing changes. What remains is non-negative at every step: its initial value
is, and its update keeps it so when all remaining states are. Floating-point rounding is
monotone, so the sign argument survives rounding. ``(1 − β2)·g²`` is non-negative because
``β2 <= 1`` is declared; ``β1·m + (1 − β1)·g`` is not (``g`` has no sign).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import Op

Interval = tuple[float, float]
UNBOUNDED: Interval = (-math.inf, math.inf)
NON_NEGATIVE: Interval = (0.0, math.inf)
_BOOLEAN: Interval = (0.0, 1.0)
_COMPARISONS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE, Op.AND, Op.OR, Op.NOT})


def _clean(lo: float, hi: float) -> Interval:
    """NaN bounds (from inf − inf) widen to unbounded."""
    return (-math.inf if math.isnan(lo) else lo, math.inf if math.isnan(hi) else hi)


def _product(a: float, b: float) -> float:
    return 0.0 if a == 0.0 or b == 0.0 else a * b  # 0·inf = 0 for bounds


def _mul(a: Interval, b: Interval) -> Interval:
    corners = [_product(x, y) for x in a for y in b]
    return _clean(min(corners), max(corners))


def _square(a: Interval) -> Interval:
    lo, hi = a
    if lo >= 0:
        return (lo * lo, hi * hi)
    if hi <= 0:
        return (hi * hi, lo * lo)
    return (0.0, max(lo * lo, hi * hi))


def _div(a: Interval, b: Interval) -> Interval:
    if b[0] > 0 or b[1] < 0:
        reciprocal = (1 / b[1], 1 / b[0])  # both ends of one sign: 1/x is monotone on it
        return _mul(a, reciprocal)
    return UNBOUNDED


def _unary(op: Op, a: Interval) -> Interval:
    lo, hi = a
    if op is Op.NEG:
        return (-hi, -lo)
    if op is Op.ABS:
        return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
    if op is Op.SQUARE:
        return _square(a)
    if op in (Op.SQRT, Op.RSQRT, Op.EXP, Op.NORM, Op.MAX_ABS):
        return NON_NEGATIVE
    if op is Op.SIGN:
        return (0.0 if lo >= 0 else -1.0, 0.0 if hi <= 0 else 1.0)
    if op in (Op.MEAN, Op.ROW_MEAN, Op.COL_MEAN, Op.ROW_MAX, Op.COL_MAX):
        return a
    if op is Op.FLOOR:
        return (math.floor(a[0]) if math.isfinite(a[0]) else a[0], math.floor(a[1]) if math.isfinite(a[1]) else a[1])
    if op in (Op.SUM, Op.ROW_SUM, Op.COL_SUM):
        return (0.0 if lo >= 0 else -math.inf, 0.0 if hi <= 0 else math.inf)
    return UNBOUNDED  # LOG


def _binary(op: Op, a: Interval, b: Interval, same_operand: bool) -> Interval:
    if op is Op.ADD:
        return _clean(a[0] + b[0], a[1] + b[1])
    if op is Op.SUB:
        return _clean(a[0] - b[1], a[1] - b[0])
    if op is Op.MUL:
        return _square(a) if same_operand else _mul(a, b)
    if op is Op.DIV:
        return _div(a, b)
    if op is Op.MAXIMUM:
        return (max(a[0], b[0]), max(a[1], b[1]))
    if op is Op.MINIMUM:
        return (min(a[0], b[0]), min(a[1], b[1]))
    if op is Op.POW and a[0] >= 1 and b[1] <= 0:
        return (0.0, 1.0)  # t^τ with τ <= 0 (Adafactor's 1 − β̂2_t)
    if op is Op.POW and a[0] >= 0:
        return NON_NEGATIVE
    return UNBOUNDED


def bounds(spec: Spec, root: Expr, state_bounds: Callable[[str], Interval]) -> Interval:
    """Bounds of ``root``; ``state_bounds(name)`` gives those assumed for ``state(name)``."""
    values: dict[Expr, Interval] = {}
    for node in walk([root]):
        op = node.op
        if op is Op.CONST:
            value = float(node.value)  # type: ignore[arg-type]
            values[node] = (value, value)
        elif op is Op.HYPER:
            constraint = spec.hyperparameter(str(node.value)).constraint
            values[node] = (constraint.low, constraint.high)
        elif op is Op.INPUT:
            declared = next(i for i in spec.inputs if i.name == node.value).constraint
            values[node] = (declared.low, declared.high)
        elif op in (Op.NUMEL, Op.NDIM, Op.SIZE, Op.FINFO):
            values[node] = NON_NEGATIVE
        elif op is Op.STEP:
            values[node] = (1.0, math.inf)
        elif op is Op.STATE:
            values[node] = state_bounds(str(node.value))
        elif op in (Op.PARAM, Op.GRAD):
            values[node] = UNBOUNDED
        elif op in _COMPARISONS:
            values[node] = _BOOLEAN
        elif op is Op.WHERE:
            (lo1, hi1), (lo2, hi2) = values[node.args[1]], values[node.args[2]]
            values[node] = (min(lo1, lo2), max(hi1, hi2))
        elif len(node.args) == 1:
            values[node] = _unary(op, values[node.args[0]])
        else:
            a, b = node.args
            values[node] = _binary(op, values[a], values[b], a == b)
    return values[root]


def _assuming(names: frozenset[str]) -> Callable[[str], Interval]:
    """State bounds when exactly the states ``names`` are assumed non-negative."""
    return lambda name: NON_NEGATIVE if name in names else UNBOUNDED


def nonnegative_states(spec: Spec) -> frozenset[str]:
    """Names of the states of ``spec`` that are ``>= 0`` at every step (see the module doc)."""
    updates = spec.update_map
    no_states = _assuming(frozenset())
    assumed = frozenset(decl.name for decl in spec.states if bounds(spec, decl.init, no_states)[0] >= 0)
    while True:
        kept = frozenset(name for name in assumed if bounds(spec, updates[name], _assuming(assumed))[0] >= 0)
        if kept == assumed:
            return assumed
        assumed = kept
