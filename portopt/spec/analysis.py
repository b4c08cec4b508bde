"""Classify every subexpression by how often it must be computed.

* ``CONST``: a number known when the spec is built;
* ``SCALAR``: depends only on hyperparameters and the step ``t``: computed once per
  step on the host (float64), never per element;
* ``TENSOR``: one value per parameter tensor (a norm, a per-tensor state);
* ``ROW`` / ``COL``: one value per row / column of a matrix (factored states);
* ``ELEMENT``: one value per element of the parameter.

A lowering hoists ``CONST`` and ``SCALAR`` work out of the element loop and computes
``TENSOR`` work once per tensor. The kinds form a lattice whose join is the kind of an
element-wise combination (``ROW`` joined with ``COL`` broadcasts to ``ELEMENT``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from portopt.spec.errors import SpecError
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import BOOLEAN_FAMILIES, OP_INFO, Family, Op
from portopt.spec.symbols import Layout


class Kind(enum.IntEnum):
    """How often a value changes: per spec, per step, per tensor, per row/column, per element."""

    CONST = 0
    SCALAR = 1
    TENSOR = 2
    ROW = 3
    COL = 4
    ELEMENT = 5

    @property
    def is_step_scalar(self) -> bool:
        """Computable on the host once per step (no tensor data involved)."""
        return self <= Kind.SCALAR


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


@dataclass(frozen=True)
class NodeInfo:
    """What analysis knows of one node."""

    kind: Kind
    is_bool: bool


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
        return NodeInfo(_leaf_kind(node, state_layouts, algorithm), is_bool=False)
    if family is Family.REDUCE:
        if operands[0].kind <= Kind.TENSOR:
            raise SpecError(
                f"{algorithm}: {node.op.value}() is applied to a value that is already one number "
                f"per tensor ({operands[0].kind.name.lower()}); reduce an element-wise or factored value"
            )
        _require_numeric(node, operands, algorithm)
        return NodeInfo(Kind.TENSOR, is_bool=False)
    if family is Family.AXIS_REDUCE:
        if operands[0].kind is not Kind.ELEMENT:
            raise SpecError(
                f"{algorithm}: {node.op.value}() needs an element-wise operand, got a "
                f"{operands[0].kind.name.lower()} value; apply it to a gradient statistic such as g*g"
            )
        _require_numeric(node, operands, algorithm)
        return NodeInfo(Kind.ROW if node.op is Op.ROW_MEAN else Kind.COL, is_bool=False)
    kind = join(o.kind for o in operands)
    if family is Family.SELECT:
        if not operands[0].is_bool:
            raise SpecError(
                f"{algorithm}: the condition of where() must be a comparison or a logical "
                "combination of comparisons (e.g. rho > 5), not a number"
            )
        _require_numeric(node, operands[1:], algorithm)
        return NodeInfo(kind, is_bool=False)
    if family is Family.LOGICAL:
        if not all(o.is_bool for o in operands):
            raise SpecError(f"{algorithm}: {node.op.value} needs boolean operands (comparisons)")
        return NodeInfo(kind, is_bool=True)
    _require_numeric(node, operands, algorithm)
    return NodeInfo(kind, is_bool=family in BOOLEAN_FAMILIES)


def _leaf_kind(node: Expr, state_layouts: Mapping[str, Layout], algorithm: str) -> Kind:
    if node.op is Op.CONST:
        return Kind.CONST
    if node.op in (Op.HYPER, Op.STEP):
        return Kind.SCALAR
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
