"""Precisions as data: parameter dtype, optional master copy, state storage, compute dtype.

A precision says how an implementation under test stores its numbers *and in what it
computes* (its contract); the conformance
suite builds the problem in that format and judges the result with the tolerance model
of :mod:`portopt.conformance.tolerance`. ``fp32`` and ``bf16`` need nothing but a step
function (the generic backend stores states in the parameter dtype and computes in
float32); the ``+master`` precisions run through the front end's precision policy
(``portopt.Optimizer(..., precision="mixed-fp16")``: float32 master copy in
``state["master"]``, float32 states, the parameter rewritten once per step), and are
reported skipped where that API is absent.

Numbers of the floating-point formats, for a format with ``d`` significand bits
(implicit bit included): the unit roundoff is ``u = 2^-d`` (half the spacing at 1), and
the spacing ("ULP") of a value ``x`` is ``2^(e - d)`` for ``2^(e-1) <= |x| < 2^e``,
floored at the subnormal spacing below the smallest normal number.

**The two bfloat16 contracts.** ``bf16`` is what fused kernels and portopt's backends
promise: bfloat16 parameters and states, every element's step computed in float32 and
rounded *once*, when stored. Its tolerance is built with float32's unit roundoff, so an
implementation that rounds every operation to bfloat16 (torch.optim on bfloat16 tensors:
each ``mul_``, ``add_``, ``lerp_`` rounds its result) fails it, and the failure message says
so. ``bf16-native`` is the contract of such implementations: the same storage, arithmetic
op by op in bfloat16; its tolerance comes from the same error analysis with bfloat16's unit
roundoff ``2^-8`` at every operation of the spec (``compute_dtype``), so it is as strict for
bfloat16 arithmetic as ``bf16`` is for float32 arithmetic.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

SIGNIFICAND_BITS: dict[torch.dtype, int] = {
    torch.float64: 53,
    torch.float32: 24,
    torch.bfloat16: 8,
    torch.float16: 11,
}


@dataclass(frozen=True)
class Precision:
    """How parameters and states are stored, and in what the arithmetic runs.

    ``state_dtype`` is the least precise storage the policy allows for a state (an
    implementation may store more precisely: the reference keeps float64); ``master_dtype``
    is the dtype of the master copy of low-precision parameters (``None``: no master).
    """

    name: str
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    compute_dtype: torch.dtype = torch.float32
    master_dtype: torch.dtype | None = None
    summary: str = ""
    policy: str | None = None
    """The front end's ``precision=`` value that asks for this (a :mod:`portopt.precision` preset)."""

    @property
    def contract(self) -> str:
        """What an implementation run in this precision promises, in one sentence."""
        return f"{self.name}: {self.summary}" if self.summary else self.name

    @property
    def needs_policy(self) -> bool:
        """True when a bare step function cannot express it (master weights)."""
        return self.master_dtype is not None

    @property
    def update_dtype(self) -> torch.dtype:
        """The dtype the update is written in: the master copy's, else the parameter's."""
        return self.master_dtype or self.param_dtype

    @property
    def unit_roundoff(self) -> float:
        """Unit roundoff of the compute dtype: the relative error of one rounded operation."""
        return unit_roundoff(self.compute_dtype)

    @property
    def scalar_roundoff(self) -> float:
        """Unit roundoff of hyperparameters and step-only scalars: float32's at worst (host numbers
        or float32 device scalars), even when the element-wise arithmetic is bfloat16."""
        return min(self.unit_roundoff, unit_roundoff(torch.float32))

    def huge_gradient(self) -> float:
        """A gradient scale that is huge for the parameter format, yet whose squares summed over a
        million elements stay finite in the state format (norms and second moments must not overflow)."""
        return float(min(torch.finfo(self.param_dtype).max / 16.0, torch.finfo(self.state_dtype).max ** 0.5 / 1e6))


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32, torch.float32, summary="float32 parameters and states"),
        Precision(
            "bf16",
            torch.bfloat16,
            torch.bfloat16,
            summary="bfloat16 parameters and states, float32 arithmetic, rounded once on store",
        ),
        Precision(
            "bf16-native",
            torch.bfloat16,
            torch.bfloat16,
            compute_dtype=torch.bfloat16,
            summary="bfloat16 parameters and states, bfloat16 arithmetic: every operation rounded to bfloat16 "
            "(torch.optim on bfloat16 tensors)",
        ),
        Precision(
            "fp16+master",
            torch.float16,
            torch.float32,
            master_dtype=torch.float32,
            summary="float16 parameters with a float32 master copy and float32 states",
            policy="mixed-fp16",
        ),
        Precision(
            "bf16+master",
            torch.bfloat16,
            torch.float32,
            master_dtype=torch.float32,
            summary="bfloat16 parameters with a float32 master copy and float32 states",
            policy="mixed-bf16",
        ),
        Precision(
            "fp64",
            torch.float64,
            torch.float64,
            compute_dtype=torch.float64,
            summary="float64 parameters, states and arithmetic",
        ),
    )
}
DEFAULT_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16+master")
"""The precisions a run covers unless told otherwise (the issue's matrix)."""
OP_BY_OP_HINT = {
    "bf16": "an implementation that rounds every operation to bfloat16 (torch.optim on bfloat16 tensors) "
    "does not meet this contract; check it against its own with --precision bf16-native",
}
"""For a failure in these precisions, the contract the implementation may follow instead."""


def get_precision(name: str) -> Precision:
    """The precision called ``name``; the error lists the known ones."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; known precisions: {', '.join(PRECISIONS)}") from None


def policy_unavailable_reason(precision: Precision) -> str | None:
    """Why ``precision`` cannot be run here, or ``None``.

    A precision with a master copy needs the precision-policy API (issue 5): a front end
    that accepts ``precision=`` and knows the policy. It is looked up at run time, never
    assumed.
    """
    if not precision.needs_policy:
        return None
    if not frontend_accepts("precision"):
        return f"precision policy {precision.name} not available (issue 5)"
    try:
        from portopt.precision.policy import PRESETS
    except ImportError:
        return f"precision policy {precision.name} not available (issue 5): portopt.precision cannot be imported"
    if precision.policy not in PRESETS:
        return f"precision policy {precision.name}: portopt.precision has no preset {precision.policy!r}"
    return None


def frontend_accepts(argument: str) -> bool:
    """Whether ``portopt.Optimizer`` takes the keyword ``argument`` (``precision``, ``skip_nonfinite``)."""
    try:
        optimizer = getattr(importlib.import_module("portopt"), "Optimizer", None)
    except ImportError:
        return False
    if optimizer is None:
        return False
    try:
        return argument in inspect.signature(optimizer).parameters
    except (TypeError, ValueError):
        return False


def significand_bits(dtype: torch.dtype) -> int:
    """Significand bits of a floating dtype, implicit bit included."""
    try:
        return SIGNIFICAND_BITS[dtype]
    except KeyError:
        raise ValueError(f"no floating-point format known for dtype {dtype}") from None


def unit_roundoff(dtype: torch.dtype) -> float:
    """``2^-d``: the largest relative error of rounding to nearest in ``dtype``."""
    return 2.0 ** -significand_bits(dtype)


def smallest_normal(dtype: torch.dtype) -> float:
    """The smallest positive normal number of ``dtype``."""
    return float(torch.finfo(dtype).tiny)


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of ``dtype`` at each value of ``x`` (float64), subnormal spacing near 0.

    Non-finite values give ``nan`` (they are compared exactly, not with a tolerance).
    """
    x = x.to(torch.float64)
    _, exponent = torch.frexp(x.abs())
    _, min_exponent = torch.frexp(torch.tensor(smallest_normal(dtype), dtype=torch.float64))
    # frexp(0) has exponent 0: zero gets the subnormal spacing, like any value below the smallest normal.
    exponent = torch.where(x == 0, int(min_exponent), torch.clamp(exponent, min=int(min_exponent)))
    spacing = torch.ldexp(torch.ones_like(x), exponent - significand_bits(dtype))
    return torch.where(torch.isfinite(x), spacing, torch.full_like(x, float("nan")))
