"""Declarations of a spec's symbols: hyperparameters (with constraints) and states."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from portopt.spec.errors import HyperparameterError, HyperparameterOverflowError
from portopt.spec.expr import Expr, const


@dataclass(frozen=True)
class Range:
    """The accepted values of a hyperparameter: an interval, each end open or closed."""

    low: float = -math.inf
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below

    def describe(self, name: str) -> str:
        """Human form, e.g. ``0 <= beta1 < 1``."""
        parts = []
        if self.low != -math.inf:
            parts.append(f"{_num(self.low)} {'<=' if self.low_inclusive else '<'} ")
        parts.append(name)
        if self.high != math.inf:
            parts.append(f" {'<=' if self.high_inclusive else '<'} {_num(self.high)}")
        return "".join(parts) if len(parts) > 1 else f"{name} is any real number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


NON_NEGATIVE = Range(low=0.0)
POSITIVE = Range(low=0.0, low_inclusive=False)
UNIT_INTERVAL_OPEN_RIGHT = Range(low=0.0, high=1.0, high_inclusive=False)
UNIT_INTERVAL = Range(low=0.0, high=1.0)
ANY = Range()

ZERO = const(0.0)
"""The default initial value of a state."""


@dataclass(frozen=True)
class Hyperparameter:
    """A numeric hyperparameter of an algorithm.

    ``what`` is the phrase of torch.optim's error message ("learning rate" gives
    ``Invalid learning rate: -1.0``); ``group_key``/``group_index`` say where the value
    lives in a torch-style param group (``beta1`` is ``group["betas"][0]``).
    """

    name: str
    default: float
    constraint: Range = ANY
    symbol: str = ""
    latex: str = ""
    doc: str = ""
    what: str = ""
    group_key: str = ""
    group_index: int | None = None

    @property
    def text_symbol(self) -> str:
        return self.symbol or self.name

    @property
    def latex_symbol(self) -> str:
        return self.latex or rf"\mathrm{{{self.name}}}".replace("_", r"\_")

    @property
    def key(self) -> str:
        """The param-group key holding this hyperparameter."""
        return self.group_key or self.name

    def check(self, value: float, algorithm: str) -> None:
        """Raise :class:`HyperparameterError` if ``value`` violates the constraint (or is too large for a float)."""
        detach = getattr(value, "detach", None)  # a tensor (one that requires grad, too) is read as its value
        try:
            number = float(detach() if detach is not None else value)
        except OverflowError:
            digits = len(str(abs(int(value)))) if isinstance(value, int) else None
            shown = f"an integer of {digits} digits" if digits else repr(value)
            raise HyperparameterOverflowError(
                f"Invalid {self.what or self.name + ' value'}: {shown} is too large for a float "
                f"({algorithm}: {self.name} must be a finite number, {self.constraint.describe(self.name)})"
            ) from None
        if not self.constraint.contains(number):
            what = self.what or f"{self.name} value"
            raise HyperparameterError(
                f"Invalid {what}: {value} ({algorithm}: {self.name} must satisfy {self.constraint.describe(self.name)})"
            )


class Layout(enum.Enum):
    """How a state is stored relative to its parameter."""

    ELEMENTWISE = "elementwise"  # same shape as the parameter
    TENSOR = "tensor"  # one scalar per parameter tensor
    ROW = "row"  # factored: one value per row, shape (..., rows, 1)
    COL = "col"  # factored: one value per column, shape (..., 1, cols)


@dataclass(frozen=True)
class StateDecl:
    """A declared optimizer state.

    ``name`` is the key in the optimizer's per-parameter state (torch.optim's name
    where torch has the algorithm, e.g. ``exp_avg``); ``init`` is its value before the
    first step: an expression of constants, hyperparameters, ``P`` or ``G``. ``when``, a
    condition on the tensor's shape and dtype only (``ndim() >= 2``), says for which
    tensors the state exists (``None``: for all): Adafactor keeps row and column factors for
    matrices and a full second moment for vectors, in one spec.
    """

    name: str
    symbol: str
    latex: str = ""
    init: Expr = ZERO
    layout: Layout = Layout.ELEMENTWISE
    doc: str = ""
    when: Expr | None = None

    @property
    def latex_symbol(self) -> str:
        return self.latex or self.symbol


@dataclass(frozen=True)
class Input:
    """A declared extra input of the step: a number passed per call, ``step(bs=5120)``.

    Unlike a hyperparameter (a param-group setting), an input belongs to one call of
    ``step``; ``default`` is used when a call does not pass it. ``constraint`` is checked
    like a hyperparameter's.
    """

    name: str
    default: float
    constraint: Range = ANY
    symbol: str = ""
    latex: str = ""
    doc: str = ""

    @property
    def text_symbol(self) -> str:
        return self.symbol or self.name

    @property
    def latex_symbol(self) -> str:
        return self.latex or rf"\mathrm{{{self.name}}}".replace("_", r"\_")

    def check(self, value: float, algorithm: str) -> None:
        """Raise :class:`HyperparameterError` if ``value`` violates the constraint."""
        if not self.constraint.contains(float(value)):
            raise HyperparameterError(
                f"Invalid {self.name} value: {value} ({algorithm}: input {self.name} must satisfy "
                f"{self.constraint.describe(self.name)})"
            )


@dataclass(frozen=True)
class Method:
    """A named update of some states that runs between steps (SophiaG's ``update_hessian()``).

    ``updates`` pair state names with new values, read from ``p``, ``g`` (the gradient present
    when the method is called), the states before the call, hyperparameters and ``t`` (the
    steps taken so far); the parameter and the step counter are left alone. ``due``, a
    boolean of ``t`` and hyperparameters (``eq(mod(T, hyper("k")), 0)``), is the cadence the
    algorithm is meant to be run at: :meth:`portopt.Optimizer.method_due` evaluates it.
    """

    name: str
    updates: tuple[tuple[str, Expr], ...]
    due: Expr | None = None
    doc: str = ""
