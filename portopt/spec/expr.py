"""Expressions: immutable, hashable DAG nodes built with operator overloading.

An expression never hides a Python callable: it is an :class:`Op` with operands and,
for leaves, a value (a constant's number, a hyperparameter's or state's name). That is
what lets one spec be printed, analysed, serialised and lowered to several targets.

Leaves:

* ``const(c)``: a number;
* ``hyper(name)``: a hyperparameter, read from the optimizer's param group each step;
* ``T``: the step counter ``t`` (1 at the first step, incremented before use);
* ``P`` and ``G``: the parameter and its gradient;
* ``state(name)``: a declared optimizer state, holding its value *before* this step;
* ``step_input(name)``: a declared extra input of the step (SophiaG's ``step(bs=...)``);
* ``numel()``, ``ndim()``, ``size(axis)``, ``finfo("eps")``: the stepped tensor's shape and
  dtype (:mod:`portopt.spec.shapes`), known per tensor without reading it.

Python's ``==`` keeps its structural meaning (expressions are dictionary keys); use
:func:`eq` and :func:`ne` to build comparisons. An expression cannot be used as a
Python ``bool``: write :func:`where` instead of ``if``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from portopt.spec.errors import SpecError
from portopt.spec.ops import FINFO_FIELDS, OP_INFO, Op

Number: TypeAlias = int | float
ExprLike: TypeAlias = "Expr | int | float"


@dataclass(frozen=True, eq=True)
class Label:
    """A display name for a subexpression: rendering prints it as its own equation."""

    text: str
    latex: str


@dataclass(frozen=True, eq=False, repr=False)
class Expr:
    """One node of an expression DAG.

    ``value`` holds the number of a ``CONST`` and the name of a ``HYPER`` or ``STATE``;
    ``label`` optionally names the node for rendering and has no effect on its value.

    Equality is structural and hashing is cached per node, both without recursion: ``a == b``
    compares each pair of nodes once (:func:`structurally_equal`), so a DAG that shares
    nodes (``x + x`` nested 30 deep) compares in time linear in its distinct nodes, not in
    the size of the tree it unfolds to.
    """

    op: Op
    args: tuple[Expr, ...] = ()
    value: float | str | None = None
    label: Label | None = None
    _hash: int = field(default=0, init=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            raise SpecError(f"an expression's op must be a portopt.spec.Op, got {self.op!r}")
        info = OP_INFO[self.op]
        if not isinstance(self.args, tuple):
            raise SpecError(
                f"{self.op.value}(): operands must be a tuple of expressions, got {type(self.args).__name__}"
            )
        if len(self.args) != info.arity:
            raise SpecError(f"op {self.op.value!r} takes {info.arity} operand(s), got {len(self.args)}")
        for position, arg in enumerate(self.args):
            if not isinstance(arg, Expr):
                raise SpecError(_operand_message(self.op, position, arg))
        _check_value(self.op, self.value)
        # Operands carry their own cached hash: hashing a node costs O(arity), never a walk.
        object.__setattr__(self, "_hash", hash((self.op, self.args, self.value, self.label)))

    def __hash__(self) -> int:
        return self._hash

    def __getstate__(self) -> dict[str, object]:
        # A string's hash (an op's name, a state's) differs between processes: an unpickled node
        # computes its own (__setstate__), or it would neither hash nor compare equal to the same node.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)  # operands are unpickled first, with their own hashes
        object.__setattr__(self, "_hash", hash((self.op, self.args, self.value, self.label)))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Expr):
            return NotImplemented
        if not _same_node(self, other):
            return False
        return not self.args or structurally_equal(self, other)

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __repr__(self) -> str:
        # Bounded: one level of operands, whatever the depth or sharing below.
        def head(node: Expr) -> str:
            parts = [node.op.name]
            if node.value is not None:
                parts.append(f"value={node.value!r}")
            if node.label is not None:
                parts.append(f"label={node.label.text!r}")
            return " ".join(parts)

        inner = ", ".join(f"<{head(a)}>" for a in self.args)
        return f"Expr({head(self)}{', args=(' + inner + ')' if self.args else ''})"

    def __bool__(self) -> bool:
        raise SpecError(
            "an expression has no truth value while the spec is built; "
            "use where(condition, if_true, if_false) instead of Python's if/and/or"
        )

    def named(self, text: str, latex: str | None = None) -> Expr:
        """Return this expression labelled ``text`` (``latex`` in LaTeX) for rendering."""
        return Expr(self.op, self.args, self.value, Label(text, latex if latex is not None else text))

    def unlabelled(self) -> Expr:
        """The same node without its display label."""
        return self if self.label is None else Expr(self.op, self.args, self.value)

    # arithmetic -------------------------------------------------------------
    def __add__(self, other: ExprLike) -> Expr:
        return Expr(Op.ADD, (self, as_expr(other)))

    def __radd__(self, other: ExprLike) -> Expr:
        return Expr(Op.ADD, (as_expr(other), self))

    def __sub__(self, other: ExprLike) -> Expr:
        return Expr(Op.SUB, (self, as_expr(other)))

    def __rsub__(self, other: ExprLike) -> Expr:
        return Expr(Op.SUB, (as_expr(other), self))

    def __mul__(self, other: ExprLike) -> Expr:
        return Expr(Op.MUL, (self, as_expr(other)))

    def __rmul__(self, other: ExprLike) -> Expr:
        return Expr(Op.MUL, (as_expr(other), self))

    def __truediv__(self, other: ExprLike) -> Expr:
        return Expr(Op.DIV, (self, as_expr(other)))

    def __rtruediv__(self, other: ExprLike) -> Expr:
        return Expr(Op.DIV, (as_expr(other), self))

    def __pow__(self, other: ExprLike) -> Expr:
        return Expr(Op.POW, (self, as_expr(other)))

    def __rpow__(self, other: ExprLike) -> Expr:
        return Expr(Op.POW, (as_expr(other), self))

    def __neg__(self) -> Expr:
        return Expr(Op.NEG, (self,))

    def __abs__(self) -> Expr:
        return Expr(Op.ABS, (self,))

    # comparisons (== stays structural; see eq/ne) -----------------------------
    def __lt__(self, other: ExprLike) -> Expr:
        return Expr(Op.LT, (self, as_expr(other)))

    def __le__(self, other: ExprLike) -> Expr:
        return Expr(Op.LE, (self, as_expr(other)))

    def __gt__(self, other: ExprLike) -> Expr:
        return Expr(Op.GT, (self, as_expr(other)))

    def __ge__(self, other: ExprLike) -> Expr:
        return Expr(Op.GE, (self, as_expr(other)))

    def __and__(self, other: Expr) -> Expr:
        return Expr(Op.AND, (self, other))

    def __or__(self, other: Expr) -> Expr:
        return Expr(Op.OR, (self, other))

    def __invert__(self) -> Expr:
        return Expr(Op.NOT, (self,))


def _operand_message(op: Op, position: int, arg: object) -> str:
    what = f"operand {position + 1} of {op.value}()" if op is not Op.WHERE or position else "the condition of where()"
    if isinstance(arg, bool):
        return (
            f"{what} is the Python bool {arg}, not an expression: `==` and `!=` on expressions compare their "
            "structure (expressions are dictionary keys); build a comparison with eq(a, b) or ne(a, b), "
            "e.g. where(eq(T, 1), ...)"
        )
    return f"{what} is {arg!r} ({type(arg).__name__}), not an expression; use a number or an expression"


def _check_value(op: Op, value: object) -> None:
    """A leaf's value has the type its op needs (a name, an axis, a dtype field), else :class:`SpecError`."""
    if op in (Op.HYPER, Op.STATE, Op.INPUT):
        if not isinstance(value, str) or not value:
            raise SpecError(f"{op.value}(): the name must be a non-empty string, got {value!r}")
    elif op is Op.CONST:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"const(): the value must be a number, got {value!r}")
    elif op is Op.SIZE:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise SpecError(f"size(): the axis must be an integer (negative from the end), got {value!r}")
        if not -8 <= int(value) < 8:
            raise SpecError(f"size(): axis {int(value)} is out of range; a tensor has at most 8 dims here (-8..7)")
    elif op is Op.FINFO:
        if value not in FINFO_FIELDS:
            raise SpecError(f"finfo(): field {value!r} is not one of {', '.join(FINFO_FIELDS)}")
    elif value is not None:
        raise SpecError(f"op {op.value!r} takes no value, got {value!r}")


def as_expr(x: ExprLike) -> Expr:
    """Wrap a Python number as a constant; pass expressions through."""
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise SpecError(f"cannot use {x!r} ({type(x).__name__}) in a spec; use a number or an expression")
    return Expr(Op.CONST, value=float(x))


def const(value: Number) -> Expr:
    """A numeric constant."""
    return as_expr(value)


def hyper(name: str) -> Expr:
    """A reference to the hyperparameter ``name`` (declared in the spec)."""
    return Expr(Op.HYPER, value=name)


def state(name: str) -> Expr:
    """A reference to the declared state ``name``, holding its value before this step."""
    return Expr(Op.STATE, value=name)


def step_input(name: str) -> Expr:
    """A reference to the declared extra input ``name`` (a number passed to ``step(name=...)``)."""
    return Expr(Op.INPUT, value=name)


def numel() -> Expr:
    """The number of elements of the stepped tensor (a per-tensor number known from its shape)."""
    return Expr(Op.NUMEL)


def ndim() -> Expr:
    """The number of dims of the stepped tensor: ``where(ndim() >= 2, factored, full)`` picks a layout."""
    return Expr(Op.NDIM)


def size(axis: int) -> Expr:
    """The size of ``axis`` of the stepped tensor (``size(-1)``: columns); 1 for an axis it lacks."""
    value: object = axis
    return Expr(Op.SIZE, value=float(axis) if type(value) is int else axis)


def finfo(field: str = "eps") -> Expr:
    """``torch.finfo(dtype).eps`` (or ``tiny``, ``max``) of the stepped tensor's dtype: a dtype-aware constant."""
    return Expr(Op.FINFO, value=field)


T = Expr(Op.STEP)
"""The step counter t: 1 at the first step, incremented before use."""
P = Expr(Op.PARAM)
"""The parameter, before this step's update."""
G = Expr(Op.GRAD)
"""The gradient of the parameter."""


def _unary(op: Op, x: ExprLike) -> Expr:
    return Expr(op, (as_expr(x),))


def _binary(op: Op, a: ExprLike, b: ExprLike) -> Expr:
    return Expr(op, (as_expr(a), as_expr(b)))


def sqrt(x: ExprLike) -> Expr:
    """Square root."""
    return _unary(Op.SQRT, x)


def rsqrt(x: ExprLike) -> Expr:
    """Reciprocal square root, 1 / sqrt(x)."""
    return _unary(Op.RSQRT, x)


def square(x: ExprLike) -> Expr:
    """x * x."""
    return _unary(Op.SQUARE, x)


def sign(x: ExprLike) -> Expr:
    """-1, 0 or +1 (0 at 0, as torch.sign)."""
    return _unary(Op.SIGN, x)


def exp(x: ExprLike) -> Expr:
    """Natural exponential."""
    return _unary(Op.EXP, x)


def log(x: ExprLike) -> Expr:
    """Natural logarithm."""
    return _unary(Op.LOG, x)


def floor(x: ExprLike) -> Expr:
    """The largest integer not above ``x``."""
    return _unary(Op.FLOOR, x)


def mod(a: ExprLike, b: ExprLike) -> Expr:
    """``a mod b``, floored (the sign of ``b``), as Python's ``%``: ``eq(mod(T, k), 1)`` is every k-th step."""
    return _binary(Op.MOD, a, b)


def maximum(a: ExprLike, b: ExprLike) -> Expr:
    """Element-wise maximum (NaN-propagating, as torch.maximum)."""
    return _binary(Op.MAXIMUM, a, b)


def minimum(a: ExprLike, b: ExprLike) -> Expr:
    """Element-wise minimum (NaN-propagating, as torch.minimum)."""
    return _binary(Op.MINIMUM, a, b)


def clamp(x: ExprLike, lo: ExprLike, hi: ExprLike) -> Expr:
    """min(max(x, lo), hi)."""
    return minimum(maximum(x, lo), hi)


def eq(a: ExprLike, b: ExprLike) -> Expr:
    """a == b, as a boolean expression."""
    return _binary(Op.EQ, a, b)


def ne(a: ExprLike, b: ExprLike) -> Expr:
    """a != b, as a boolean expression."""
    return _binary(Op.NE, a, b)


def where(cond: Expr, if_true: ExprLike, if_false: ExprLike) -> Expr:
    """Select ``if_true`` where ``cond`` holds, else ``if_false``.

    With a condition that depends only on the step and hyperparameters (RAdam's
    ``rho_t > 5``), a lowering picks the branch once per step on the host.
    """
    if not isinstance(cond, Expr):
        raise SpecError(_operand_message(Op.WHERE, 0, cond))
    return Expr(Op.WHERE, (cond, as_expr(if_true), as_expr(if_false)))


def tensor_sum(x: ExprLike) -> Expr:
    """Sum over every element of the tensor: a per-tensor scalar."""
    return _unary(Op.SUM, x)


def tensor_mean(x: ExprLike) -> Expr:
    """Mean over every element of the tensor (0 for an empty tensor)."""
    return _unary(Op.MEAN, x)


def norm(x: ExprLike) -> Expr:
    """L2 norm over every element of the tensor."""
    return _unary(Op.NORM, x)


def max_abs(x: ExprLike) -> Expr:
    """max |x| over every element of the tensor (0 for an empty tensor)."""
    return _unary(Op.MAX_ABS, x)


def row_mean(x: ExprLike) -> Expr:
    """Mean over the last axis, kept as a size-1 axis: a (..., rows, 1) factor of each trailing 2-D slice.

    Of a column factor (..., 1, cols) it is one value per slice, (..., 1, 1). The mean of an
    empty axis is 0.
    """
    return _unary(Op.ROW_MEAN, x)


def col_mean(x: ExprLike) -> Expr:
    """Mean over the second-to-last axis, kept as a size-1 axis: a (..., 1, cols) factor.

    Of a row factor (..., rows, 1) it is one value per trailing 2-D slice, (..., 1, 1)
    (Adafactor's normaliser ``mean_rows(R)``). The mean of an empty axis is 0.
    """
    return _unary(Op.COL_MEAN, x)


def row_sum(x: ExprLike) -> Expr:
    """Sum over the last axis, kept as a size-1 axis (see :func:`row_mean`)."""
    return _unary(Op.ROW_SUM, x)


def col_sum(x: ExprLike) -> Expr:
    """Sum over the second-to-last axis, kept as a size-1 axis (see :func:`col_mean`)."""
    return _unary(Op.COL_SUM, x)


def row_max(x: ExprLike) -> Expr:
    """Maximum over the last axis, kept as a size-1 axis (NaN-propagating; 0 over an empty axis)."""
    return _unary(Op.ROW_MAX, x)


def col_max(x: ExprLike) -> Expr:
    """Maximum over the second-to-last axis, kept as a size-1 axis (NaN-propagating; 0 over an empty axis)."""
    return _unary(Op.COL_MAX, x)


def structurally_equal(a: Expr, b: Expr) -> bool:
    """Whether ``a`` and ``b`` are the same expression (ops, values, labels, operands), iteratively.

    Each pair of nodes is compared once (pairs already known equal are remembered), and
    cached hashes reject most differing pairs at once.
    """
    known: set[tuple[int, int]] = set()
    pending = [(a, b)]
    while pending:
        x, y = pending.pop()
        if x is y:
            continue
        pair = (id(x), id(y))
        if pair in known:
            continue
        if not _same_node(x, y):
            return False
        known.add(pair)
        pending.extend(zip(x.args, y.args, strict=True))
    return True


def _same_node(x: Expr, y: Expr) -> bool:
    """Whether two nodes agree on everything but their operands' identity (cached hash first)."""
    return (
        x._hash == y._hash
        and x.op is y.op
        and len(x.args) == len(y.args)
        and (x.value is y.value or x.value == y.value)
        and x.label == y.label
    )


def walk(roots: tuple[Expr, ...] | list[Expr]) -> list[Expr]:
    """Every distinct node reachable from ``roots``, operands before their users."""
    order: list[Expr] = []
    seen: set[Expr] = set()
    stack: list[tuple[Expr, bool]] = [(r, False) for r in reversed(list(roots))]
    while stack:
        node, expanded = stack.pop()
        if node in seen:
            continue
        if expanded:
            seen.add(node)
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((a, False) for a in reversed(node.args) if a not in seen)
    return order


def substitute(root: Expr, mapping: dict[Expr, Expr]) -> Expr:
    """Replace every occurrence of a key of ``mapping`` in ``root`` (labels are kept)."""
    memo: dict[Expr, Expr] = {}
    for node in walk([root]):
        if node in mapping:
            memo[node] = mapping[node]
        elif node.args:
            new_args = tuple(memo[a] for a in node.args)
            memo[node] = node if new_args == node.args else Expr(node.op, new_args, node.value, node.label)
        else:
            memo[node] = node
    return memo[root]
