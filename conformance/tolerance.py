"""The tolerance model: when is an implementation's number "the same" as the reference's?

Every comparison is element by element, for the parameter, every state and the step
counter, against the float64 reference evaluated from *the same inputs*.

**Lock-step** (one step judged alone). Before step ``t`` the implementation under test is
re-synced to the reference chain: its parameters, states and step counters are overwritten
(in place, keeping its dtypes and memory layout) with the reference's values after step
``t − 1`` rounded to the precision's storage format (:mod:`portopt.conformance.chain`).
Both then take one step from identical inputs. For an element with reference value ``r``
(float64) and implementation value ``c`` stored in dtype ``s`` the allowed error is::

    allowed = K · E  +  ulp_s(r)  +  tiny_s

* ``E`` is the first-order rounding-error bound of the whole step expression computed
  alongside the reference (:mod:`portopt.conformance.bounds`) with the unit roundoff ``u``
  of the compute dtype (float32: 2^-24). For a parameter update ``p − Δ`` it is
  ``u·|p| + κ·u·|Δ|``: the error is normalised by the value *and* by the size of the
  update, with the condition number ``κ`` of the update's formula computed, not guessed
  (centred RMSprop's ``v − m²`` cancellation gets a large ``κ``; Adam's ``1 − β2^t`` in
  float32 gets ``~1/(1 − β2)``).
* ``ulp_s(r)`` is the spacing of the storage dtype at ``r``: one rounding on store (plus
  the case where a float32 result within ``E`` of a rounding boundary rounds the other way).
* ``tiny_s`` is the smallest normal number of the storage dtype, so a device that flushes
  subnormals to zero is not failed for it.
* ``K`` (``bound_factor``, 4 by default) absorbs evaluation orders that differ from the
  spec's (a fused multiply-add, ``lerp`` instead of ``β·m + (1 − β)·g``).

The *normalised error* is ``|c − r| / allowed``; an element passes when it is <= 1, and a
case is *borderline* when its worst normalised error exceeds 0.75 (a correct rounding
alone reaches 0.5). Where the reference is not finite the implementation must not be
finite either, and vice versa; NaN and ±inf are not told apart, since evaluation orders
that are equal for finite numbers (``β·m + (1 − β)·g`` and ``lerp``) give inf or NaN for
an infinite input.

**Free-running drift** (many steps). The implementation also runs on its own from the
initial state, and after step ``t`` its values are compared with ``R_t`` under an
allowance that grows with the step count::

    D_t = prop(D_{t−1}) + K · E_t + 2 · ulp_s(R_t) + tiny_s,     allowed = drift_factor · D_t

``prop`` carries the previous allowances of the parameter and the states through the
step's equations (first-order, exact arithmetic: the same bound evaluator with the inputs'
allowances as their errors), so a parameter that drifted by one ulp moves a state through
coupled weight decay by exactly as much as the algorithm amplifies it; ``K·E_t`` is the
step's own rounding allowance and the ulps cover the implementation's rounding on store
and the chain's. Gradients do not depend on the parameters, so the allowance grows about
linearly for the contracting recurrences of the library's algorithms. ``drift_factor`` (2)
absorbs second-order terms.

**Discontinuous ops.** A ``sign`` or an element-wise comparison whose input is within its
error bound of the jump is *uncertain*, and both outcomes are accepted in lock-step. Beyond
that, for specs with such ops (Lion's ``sign``), a fraction of elements may exceed the
allowance: ``lockstep_mismatch`` in lock-step, ``drift_mismatch`` in free-running mode,
where the inputs of the jump have drifted apart. Step-only branches (RAdam's ``ρ_t > 5``)
are decided on the host; when ``ρ_t`` is within its error bound of the threshold both
branches are accepted at that step.

**Overrides** loosen (or skip) one (case, implementation, precision) pattern, and each
carries a written reason that the report prints; :data:`OVERRIDES` is the whole list.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from portopt.conformance.precision import smallest_normal, ulp

BORDERLINE = 0.75
"""A passing comparison whose worst normalised error exceeds this is reported as borderline."""


@dataclass(frozen=True)
class Tolerance:
    """The knobs of the model for one precision (see the module docstring)."""

    bound_factor: float = 4.0
    drift_factor: float = 2.0
    lockstep_mismatch: float = 0.0
    drift_mismatch: float = 0.0


TOLERANCES: dict[str, Tolerance] = {
    "fp64": Tolerance(),
    "fp32": Tolerance(lockstep_mismatch=1e-3, drift_mismatch=1e-2),
    "bf16": Tolerance(lockstep_mismatch=1e-2, drift_mismatch=5e-2),
    # E is built with bfloat16's u = 2^-8 at every op (the precision's compute dtype).
    "bf16-native": Tolerance(lockstep_mismatch=1e-2, drift_mismatch=5e-2),
    "fp16+master": Tolerance(lockstep_mismatch=1e-3, drift_mismatch=1e-2),
    "bf16+master": Tolerance(lockstep_mismatch=1e-3, drift_mismatch=1e-2),
}


@dataclass(frozen=True)
class Override:
    """A scoped change of the tolerance, with the reason it is right.

    ``case``, ``implementation`` and ``precision`` are ``fnmatch`` patterns; ``factor``
    multiplies both ``bound_factor`` and ``drift_factor``; ``skip`` skips the combination.
    """

    case: str
    implementation: str
    precision: str
    reason: str
    factor: float = 1.0
    mismatch: float | None = None
    skip: bool = False

    def matches(self, case: str, implementation: str, precision: str) -> bool:
        return (
            fnmatch.fnmatchcase(case, self.case)
            and fnmatch.fnmatchcase(implementation, self.implementation)
            and fnmatch.fnmatchcase(precision, self.precision)
        )


OVERRIDES: tuple[Override, ...] = ()
"""Every tolerance override in force. None is needed by the built-in implementations."""


@dataclass(frozen=True)
class Resolved:
    """The tolerance in force for one run, the reasons of the overrides applied, and a skip."""

    tolerance: Tolerance
    reasons: tuple[str, ...] = ()
    skip_reason: str | None = None


def resolve(
    case: str,
    implementation: str,
    precision: str,
    discontinuous: bool,
    overrides: tuple[Override, ...] = OVERRIDES,
) -> Resolved:
    """The tolerance for (case, implementation, precision), with overrides applied in order."""
    tol = TOLERANCES.get(precision, Tolerance())
    if not discontinuous:
        tol = replace(tol, lockstep_mismatch=0.0, drift_mismatch=0.0)
    reasons: list[str] = []
    for o in overrides:
        if not o.matches(case, implementation, precision):
            continue
        if o.skip:
            return Resolved(tol, (*reasons, o.reason), skip_reason=o.reason)
        tol = replace(tol, bound_factor=tol.bound_factor * o.factor, drift_factor=tol.drift_factor * o.factor)
        if o.mismatch is not None:
            tol = replace(tol, lockstep_mismatch=o.mismatch, drift_mismatch=o.mismatch)
        reasons.append(o.reason)
    return Resolved(tol, tuple(reasons))


def allowed_error(bound: Tensor, expected: Tensor, storage: torch.dtype, bound_factor: float) -> Tensor:
    """``K·E + ulp_s(r) + tiny_s`` for every element (float64; nan where ``r`` is not finite)."""
    return bound_factor * bound + ulp(expected, storage) + smallest_normal(storage)


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing one tensor with the reference."""

    numel: int
    worst: float
    count_over: int
    allowed_count: int
    index: tuple[int, ...] | None = None
    got: float = 0.0
    expected: float = 0.0
    abs_error: float = 0.0
    allowed: float = 0.0

    @property
    def passed(self) -> bool:
        return self.count_over <= self.allowed_count

    @property
    def fraction_over(self) -> float:
        return self.count_over / self.numel if self.numel else 0.0


def error_ratio(got: Tensor, expected: Tensor, allowed: Tensor) -> Tensor:
    """Element-wise ``|got − expected| / allowed``; non-finite values: 0 where both are, inf where one is.

    Never NaN: an infinite or NaN allowance (an error bound that cannot be computed) accepts
    anything finite, so a NaN cannot be reported as the worst element while not counted over."""
    got = got.detach().to(device="cpu", dtype=torch.float64)
    got_finite, expected_finite = torch.isfinite(got), torch.isfinite(expected)
    both_finite = got_finite & expected_finite
    diff = torch.where(both_finite, (got - expected).abs(), torch.zeros_like(expected))
    exact = ~torch.isfinite(allowed) | (diff == 0)  # accepted whatever the allowance, 0 included
    ratio = torch.where(exact, torch.zeros_like(diff), diff / torch.where(exact, 1.0, allowed))
    return torch.where(got_finite != expected_finite, torch.full_like(ratio, math.inf), ratio)


def compare(got: Tensor, expected: Tensor, allowed: Tensor, mismatch_fraction: float = 0.0) -> Comparison:
    """Judge ``got`` against ``expected`` (float64) with the element-wise ``allowed`` error."""
    if tuple(got.shape) != tuple(expected.shape):
        raise ValueError(f"shape {tuple(got.shape)} differs from the reference's {tuple(expected.shape)}")
    numel = expected.numel()
    allowed_count = math.floor(mismatch_fraction * numel)
    if numel == 0:
        return Comparison(0, 0.0, 0, 0)
    allowed = allowed.expand(expected.shape)
    ratio = error_ratio(got, expected, allowed)
    flat = ratio.reshape(-1)
    worst_at = int(torch.argmax(torch.nan_to_num(flat, nan=math.inf)))
    index = _unravel(worst_at, tuple(expected.shape))
    got64 = got.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    exp64 = expected.reshape(-1)
    return Comparison(
        numel=numel,
        worst=float(flat[worst_at]),
        count_over=int((flat > 1.0).sum()),
        allowed_count=allowed_count,
        index=index,
        got=float(got64[worst_at]),
        expected=float(exp64[worst_at]),
        abs_error=abs(float(got64[worst_at]) - float(exp64[worst_at])),
        allowed=float(allowed.reshape(-1)[worst_at]),
    )


def _unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index: list[int] = []
    for size in reversed(shape):
        flat_index, i = divmod(flat_index, size)
        index.append(i)
    return tuple(reversed(index))
