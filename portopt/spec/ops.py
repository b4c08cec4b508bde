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
    AXIS_REDUCE = "axis_reduce"  # one axis of each trailing 2-D slice -> row or column vector (factored states)


class Op(enum.Enum):
    """Primitive operations. The value is the stable name used in JSON."""

    # leaves
    CONST = "const"
    HYPER = "hyper"
    STEP = "step"
    PARAM = "param"
    GRAD = "grad"
    STATE = "state"
    INPUT = "input"  # a declared extra input of the step (step(bs=...)): one number per step
    # the tensor's own metadata: known per tensor before its data is read
    NUMEL = "numel"
    NDIM = "ndim"
    SIZE = "size"  # value: the axis (an integer, negative from the end)
    FINFO = "finfo"  # value: "eps", "tiny" or "max" of the stepped tensor's dtype
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
    MOD = "mod"  # floored remainder (sign of the divisor), as Python's % and torch.remainder
    FLOOR = "floor"
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
    # axis reductions for factored second moments (Adafactor-style), per trailing 2-D slice:
    # ROW_* reduce the last axis (keeping it as size 1), COL_* the second-to-last
    ROW_MEAN = "row_mean"
    COL_MEAN = "col_mean"
    ROW_SUM = "row_sum"
    COL_SUM = "col_sum"
    ROW_MAX = "row_max"
    COL_MAX = "col_max"


@dataclass(frozen=True)
class OpInfo:
    """Static facts about an op: operand count and family."""

    arity: int
    family: Family


_UNARY = (Op.NEG, Op.SQRT, Op.RSQRT, Op.SQUARE, Op.ABS, Op.SIGN, Op.EXP, Op.LOG, Op.FLOOR)
_BINARY = (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAXIMUM, Op.MINIMUM, Op.MOD)
_COMPARE = (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE)
_REDUCE = (Op.SUM, Op.MEAN, Op.NORM, Op.MAX_ABS)
ROW_REDUCTIONS = frozenset({Op.ROW_MEAN, Op.ROW_SUM, Op.ROW_MAX})
"""Axis reductions over the last axis (one value per row of each trailing 2-D slice)."""
COL_REDUCTIONS = frozenset({Op.COL_MEAN, Op.COL_SUM, Op.COL_MAX})
"""Axis reductions over the second-to-last axis (one value per column of each trailing 2-D slice)."""
_AXIS_REDUCE = (Op.ROW_MEAN, Op.COL_MEAN, Op.ROW_SUM, Op.COL_SUM, Op.ROW_MAX, Op.COL_MAX)
SHAPE_LEAVES = frozenset({Op.NUMEL, Op.NDIM, Op.SIZE, Op.FINFO})
"""Leaves read from the stepped tensor's shape and dtype (never its values)."""
_LEAVES = (Op.CONST, Op.HYPER, Op.STEP, Op.PARAM, Op.GRAD, Op.STATE, Op.INPUT, Op.NUMEL, Op.NDIM, Op.SIZE, Op.FINFO)

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
FINFO_FIELDS = ("eps", "tiny", "max")
"""What :attr:`Op.FINFO` reads of the stepped tensor's dtype (``torch.finfo``'s attributes)."""
