"""Step scalars on the host: the float64 meaning of every op a ``CONST``/``SCALAR`` node can use.

Values that depend only on the step ``t`` and the hyperparameters (bias corrections,
RAdam's ρ_t, ``1 − β``) are computed once per step as Python floats (IEEE float64), never
per element and never in a storage dtype, which is also how torch.optim computes them.
Where Python raises (``1/0``, ``0 ** −1``, ``sqrt(−1)``, overflow) the rules return what
torch's float64 tensor rules return (``inf``, ``nan``), so a backend can hand the values
to any kernel.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence

from portopt.spec.expr import Expr
from portopt.spec.ops import Op
from portopt.spec.shapes import TensorFacts

HostValue = float | bool


def _is_odd_integer(x: float) -> bool:
    return math.isfinite(x) and x == math.floor(x) and int(x) % 2 == 1


def _div(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if math.isnan(a) or a == 0.0:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _pow(a: float, b: float) -> float:
    try:
        result = a**b
    except ZeroDivisionError:  # 0 ** negative
        return math.copysign(math.inf, a) if _is_odd_integer(b) else math.inf
    except OverflowError:
        if a < 0 and b != math.floor(b):
            return math.nan  # a negative base to a non-integer power
        return -math.inf if a < 0 and _is_odd_integer(b) else math.inf
    return math.nan if isinstance(result, complex) else float(result)


def _sqrt(a: float) -> float:
    return math.nan if a < 0 else math.sqrt(a)


def _exp(a: float) -> float:
    try:
        return math.exp(a)
    except OverflowError:
        return math.inf


def _log(a: float) -> float:
    if a > 0:
        return math.log(a)
    return -math.inf if a == 0 else math.nan


def _sign(a: float) -> float:
    return float((a > 0) - (a < 0))  # 0 for NaN, as torch.sign


def _mod(a: float, b: float) -> float:
    if b == 0 or math.isnan(a) or math.isnan(b) or math.isinf(a):
        return math.nan  # torch.remainder's float results
    if math.isinf(b):
        return a if (a >= 0) == (b > 0) or a == 0 else b
    return a % b


def _floor(a: float) -> float:
    return a if not math.isfinite(a) else float(math.floor(a))


def _nan_or(pick: Callable[[float, float], float]) -> Callable[[float, float], float]:
    def rule(a: float, b: float) -> float:
        return math.nan if math.isnan(a) or math.isnan(b) else pick(a, b)

    return rule


HOST_RULES: dict[Op, Callable[..., HostValue]] = {
    Op.ADD: operator.add,
    Op.SUB: operator.sub,
    Op.MUL: operator.mul,
    Op.DIV: _div,
    Op.NEG: operator.neg,
    Op.POW: _pow,
    Op.SQRT: _sqrt,
    Op.RSQRT: lambda a: _div(1.0, _sqrt(a)),
    Op.SQUARE: lambda a: a * a,
    Op.ABS: abs,
    Op.SIGN: _sign,
    Op.EXP: _exp,
    Op.LOG: _log,
    Op.MAXIMUM: _nan_or(max),
    Op.MINIMUM: _nan_or(min),
    Op.MOD: _mod,
    Op.FLOOR: _floor,
    Op.LT: operator.lt,
    Op.LE: operator.le,
    Op.GT: operator.gt,
    Op.GE: operator.ge,
    Op.EQ: operator.eq,
    Op.NE: operator.ne,
    Op.AND: lambda a, b: bool(a and b),
    Op.OR: lambda a, b: bool(a or b),
    Op.NOT: lambda a: not a,
    Op.WHERE: lambda c, a, b: a if c else b,
}
"""The float64 host meaning of every op that can be a step scalar (the reductions cannot)."""


def shape_leaf_value(node: Expr, facts: TensorFacts) -> float:
    """The value of a shape leaf (``numel``, ``ndim``, ``size``, ``finfo``) for a tensor."""
    op = node.op
    if op is Op.NUMEL:
        return float(facts.numel)
    if op is Op.NDIM:
        return float(facts.ndim)
    if op is Op.SIZE:
        return facts.size(int(float(node.value or 0.0)))
    if op is Op.FINFO:
        return facts.finfo(str(node.value))
    raise AssertionError(f"not a shape leaf: {op}")


def evaluate_host(
    nodes: Sequence[Expr],
    t: float,
    hypers: Mapping[str, float],
    values: dict[Expr, HostValue],
    facts: TensorFacts | None = None,
) -> None:
    """Fill ``values`` with the host value of each of ``nodes`` (operands first) not already there.

    Inputs are read from ``hypers`` (a step's inputs travel with its hyperparameter values);
    shape leaves from ``facts`` (needed only when ``nodes`` hold them).
    """
    for node in nodes:
        if node in values:
            continue
        op = node.op
        if op is Op.CONST:
            values[node] = float(node.value or 0.0)
        elif op is Op.HYPER or op is Op.INPUT:
            values[node] = hypers[str(node.value)]
        elif op is Op.STEP:
            values[node] = t
        elif not node.args:
            if facts is None:
                raise ValueError(f"the value of {op.value}() needs the tensor's shape and dtype")
            values[node] = shape_leaf_value(node, facts)
        else:
            values[node] = HOST_RULES[op](*(values[a] for a in node.args))
