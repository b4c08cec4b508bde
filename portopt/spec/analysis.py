"""Classify every subexpression by how often it must be computed.

* ``CONST``: a number known when the spec is built;
* ``SCALAR``: depends only on hyperparameters, extra inputs and the step ``t``: computed
  once per step on the host (float64), never per element;
* ``SHAPE``: also depends on the tensor's shape or dtype (``numel``, ``ndim``, ``finfo``):
  one number per tensor, computed on the host without reading the tensor;
* ``TENSOR``: one value per parameter tensor (a norm, a per-tensor state);
* ``SLICE``: one value per trailing 2-D slice, shape ``(..., 1, 1)`` (the mean of a factor);
* ``ROW`` / ``COL``: one value per row / column of each trailing 2-D slice (factored states);
* ``ELEMENT``: one value per element of the parameter.

A lowering hoists ``CONST`` and ``SCALAR`` work out of the element loop and computes
``SHAPE`` and ``TENSOR`` work once per tensor. The kinds form a lattice whose join is the
kind of an element-wise combination (``ROW`` joined with ``COL`` broadcasts to ``ELEMENT``).

A node is *static* when it depends only on constants and the tensor's shape and dtype (not
on ``t``, hyperparameters or data): a ``where`` with a static condition (``ndim() >= 2``) is
resolved per tensor before anything runs (:meth:`portopt.spec.Spec.specialize`), and the
per-tensor reductions are explicit nodes (``norm``, ``row_mean``, ...) so that they can be
computed from partial results over shards.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from portopt.spec.errors import SpecError
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import BOOLEAN_FAMILIES, OP_INFO, ROW_REDUCTIONS, SHAPE_LEAVES, Family, Op
from portopt.spec.symbols import Layout


class Kind(enum.IntEnum):
    """How often a value changes: per spec, per step, per tensor, per row/column, per element."""

    CONST = 0
    SCALAR = 1
    SHAPE = 2
    TENSOR = 3
    SLICE = 4
    ROW = 5
    COL = 6
    ELEMENT = 7

    @property
    def is_step_scalar(self) -> bool:
        """Computable on the host once per step (no tensor data involved)."""
        return self <= Kind.SCALAR

    @property
    def is_per_tensor(self) -> bool:
        """One number per tensor (or per step): no element-wise storage."""
        return self <= Kind.TENSOR


LAYOUT_KIND: dict[Layout, Kind] = {
    Layout.ELEMENTWISE: Kind.ELEMENT,
    Layout.TENSOR: Kind.TENSOR,
    Layout.ROW: Kind.ROW,
    Layout.COL: Kind.COL,
}


def join(kinds: Iterable[Kind]) -> Kind:
    """The kind of an element-wise combination of values of the given kinds."""
    result = Kind.CONST
    for kind in kinds:
        result = Kind.ELEMENT if {result, kind} == {Kind.ROW, Kind.COL} else max(result, kind)
    return result


def fits(kind: Kind, target: Kind) -> bool:
    """Whether a value of ``kind`` broadcasts to storage of ``target`` (a per-slice value into a row factor)."""
    return join([kind, target]) == target


@dataclass(frozen=True)
class NodeInfo:
    """What analysis knows of one node (``static``: see the module docstring)."""

    kind: Kind
    is_bool: bool
    static: bool = False


def classify(
    roots: Iterable[Expr], state_layouts: Mapping[str, Layout], algorithm: str = "spec"
) -> dict[Expr, NodeInfo]:
    """Kind and boolean-ness of every node reachable from ``roots``.

    Raises :class:`SpecError` for operations that make no sense on their operands:
    a reduction of a value that is already a scalar, an axis reduction of anything but
    an element-wise value, arithmetic on booleans, or a non-boolean condition.
    """
    info: dict[Expr, NodeInfo] = {}
    for node in walk(list(roots)):
        info[node] = _classify_node(node, [info[a] for a in node.args], state_layouts, algorithm)
    return info


def _classify_node(
    node: Expr, operands: list[NodeInfo], state_layouts: Mapping[str, Layout], algorithm: str
) -> NodeInfo:
    family = OP_INFO[node.op].family
    if family is Family.LEAF:
        kind = _leaf_kind(node, state_layouts, algorithm)
        return NodeInfo(kind, is_bool=False, static=node.op is Op.CONST or kind is Kind.SHAPE)
    static = all(o.static for o in operands)
    if family is Family.REDUCE:
        if operands[0].kind <= Kind.TENSOR:
            raise SpecError(
                f"{algorithm}: {node.op.value}() is applied to a value that is already one number "
                f"per tensor ({operands[0].kind.name.lower()}); reduce an element-wise or factored value"
            )
        _require_numeric(node, operands, algorithm)
        return NodeInfo(Kind.TENSOR, is_bool=False)
    if family is Family.AXIS_REDUCE:
        _require_numeric(node, operands, algorithm)
        return NodeInfo(_axis_kind(node, operands[0].kind, algorithm), is_bool=False)
    kind = join(o.kind for o in operands)
    if family is Family.SELECT:
        if not operands[0].is_bool:
            raise SpecError(
                f"{algorithm}: the condition of where() must be a comparison or a logical "
                "combination of comparisons (e.g. rho > 5), not a number"
            )
        cond = operands[0]
        if cond.kind is Kind.SHAPE and not cond.static:
            raise SpecError(
                f"{algorithm}: a where() condition that depends on the tensor's shape or dtype may not also depend "
                "on t, hyperparameters or inputs (it is resolved per tensor before the step); nest the two "
                "conditions: where(ndim() >= 2, where(T > 1, a, b), c)"
            )
        _require_numeric(node, operands[1:], algorithm)
        return NodeInfo(kind, is_bool=False, static=static)
    if family is Family.LOGICAL:
        if not all(o.is_bool for o in operands):
            raise SpecError(f"{algorithm}: {node.op.value} needs boolean operands (comparisons)")
        return NodeInfo(kind, is_bool=True, static=static)
    _require_numeric(node, operands, algorithm)
    return NodeInfo(kind, is_bool=family in BOOLEAN_FAMILIES, static=static)


_AXIS_RESULT: dict[tuple[bool, Kind], Kind] = {
    (True, Kind.ELEMENT): Kind.ROW,
    (True, Kind.COL): Kind.SLICE,
    (False, Kind.ELEMENT): Kind.COL,
    (False, Kind.ROW): Kind.SLICE,
}


def _axis_kind(node: Expr, operand: Kind, algorithm: str) -> Kind:
    """ROW_* of an element-wise value is a row factor, of a column factor one value per slice; COL_* alike."""
    rows = node.op in ROW_REDUCTIONS
    result = _AXIS_RESULT.get((rows, operand))
    if result is None:
        accepted = "an element-wise value or a column factor" if rows else "an element-wise value or a row factor"
        raise SpecError(
            f"{algorithm}: {node.op.value}() needs {accepted}, got a {operand.name.lower()} value; "
            "apply it to a gradient statistic such as g*g"
        )
    return result


def _leaf_kind(node: Expr, state_layouts: Mapping[str, Layout], algorithm: str) -> Kind:
    if node.op is Op.CONST:
        return Kind.CONST
    if node.op in (Op.HYPER, Op.STEP, Op.INPUT):
        return Kind.SCALAR
    if node.op in SHAPE_LEAVES:
        return Kind.SHAPE
    if node.op in (Op.PARAM, Op.GRAD):
        return Kind.ELEMENT
    name = str(node.value)
    if name not in state_layouts:
        raise SpecError(
            f"{algorithm}: unknown state {name!r}; declare it in states= "
            f"(declared: {', '.join(sorted(state_layouts)) or 'none'})"
        )
    return LAYOUT_KIND[state_layouts[name]]


def _require_numeric(node: Expr, operands: list[NodeInfo], algorithm: str) -> None:
    if any(o.is_bool for o in operands):
        raise SpecError(
            f"{algorithm}: {node.op.value} is applied to a boolean; wrap the comparison in "
            "where(condition, 1.0, 0.0) to turn it into a number"
        )
