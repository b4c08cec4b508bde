"""The primitive operations of the spec language and their static properties.

Every node of an expression carries one :class:`Op`. The table :data:`OP_INFO` says
how many operands it takes and which family it belongs to; analysis, rendering,
serialisation and every lowering read this table instead of keeping their own lists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Family(enum.Enum):
    """How an op relates its operands' shapes to its result's shape."""

    LEAF = "leaf"  # a symbol or a constant
    ELEMENTWISE = "elementwise"  # broadcasts its operands
    COMPARE = "compare"  # element-wise, result is boolean
    LOGICAL = "logical"  # element-wise on booleans
    SELECT = "select"  # where(cond, a, b)
    REDUCE = "reduce"  # whole tensor -> per-tensor scalar
    AXIS_REDUCE = "axis_reduce"  # matrix -> row or column vector (factored states)


class Op(enum.Enum):
    """Primitive operations. The value is the stable name used in JSON."""

    # leaves
    CONST = "const"
    HYPER = "hyper"
    STEP = "step"
    PARAM = "param"
    GRAD = "grad"
    STATE = "state"
    # element-wise arithmetic
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    NEG = "neg"
    POW = "pow"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    SQUARE = "square"
    ABS = "abs"
    SIGN = "sign"
    EXP = "exp"
    LOG = "log"
    MAXIMUM = "maximum"
    MINIMUM = "minimum"
    # comparisons and logic
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    AND = "and"
    OR = "or"
    NOT = "not"
    WHERE = "where"
    # per-tensor reductions
    SUM = "sum"
    MEAN = "mean"
    NORM = "norm"
    MAX_ABS = "max_abs"
    # axis reductions for factored second moments (Adafactor-style)
    ROW_MEAN = "row_mean"
    COL_MEAN = "col_mean"


@dataclass(frozen=True)
class OpInfo:
    """Static facts about an op: operand count and family."""

    arity: int
    family: Family


_UNARY = (Op.NEG, Op.SQRT, Op.RSQRT, Op.SQUARE, Op.ABS, Op.SIGN, Op.EXP, Op.LOG)
_BINARY = (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAXIMUM, Op.MINIMUM)
_COMPARE = (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE)
_REDUCE = (Op.SUM, Op.MEAN, Op.NORM, Op.MAX_ABS)
_AXIS_REDUCE = (Op.ROW_MEAN, Op.COL_MEAN)
_LEAVES = (Op.CONST, Op.HYPER, Op.STEP, Op.PARAM, Op.GRAD, Op.STATE)

OP_INFO: dict[Op, OpInfo] = {
    **{op: OpInfo(0, Family.LEAF) for op in _LEAVES},
    **{op: OpInfo(1, Family.ELEMENTWISE) for op in _UNARY},
    **{op: OpInfo(2, Family.ELEMENTWISE) for op in _BINARY},
    **{op: OpInfo(2, Family.COMPARE) for op in _COMPARE},
    Op.AND: OpInfo(2, Family.LOGICAL),
    Op.OR: OpInfo(2, Family.LOGICAL),
    Op.NOT: OpInfo(1, Family.LOGICAL),
    Op.WHERE: OpInfo(3, Family.SELECT),
    **{op: OpInfo(1, Family.REDUCE) for op in _REDUCE},
    **{op: OpInfo(1, Family.AXIS_REDUCE) for op in _AXIS_REDUCE},
}

BOOLEAN_FAMILIES = frozenset({Family.COMPARE, Family.LOGICAL})
