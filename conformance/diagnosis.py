"""Diagnosis of a failing run: where it first diverged, and what the implementation computes instead.

The implementation is run again in lock-step (re-synced to the reference chain before
every step) and, at every step, its outputs are compared with each known variant of the
spec (:mod:`portopt.conformance.variants`) evaluated by the reference *on the same
inputs*, with the same tolerance (a variant is dropped at its first miss, so a score above
1 is a lower bound). A variant that stays within tolerance at every step and for every
tensor is what the implementation computes: "torch.optim.Adam computes adam with
ε inside the square root". A mismatch confined to a few elements is reported as such, and
as "not updated" when those elements kept their previous value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from portopt.conformance.candidates import Implementation, Instance
from portopt.conformance.cases import Case
from portopt.conformance.chain import Outcome, StepRecord, Trajectory
from portopt.conformance.precision import Precision
from portopt.conformance.problems import GRAD_EVERY_STEP, Layout, TensorSpec
from portopt.conformance.results import LOCKSTEP, Diagnosis, RunResult, VariantScore
from portopt.conformance.runner import new_trajectory
from portopt.conformance.session import device_grads, new_instance, sync
from portopt.conformance.tolerance import Tolerance, allowed_error, compare, error_ratio
from portopt.conformance.variants import Variant, known_variants
from portopt.spec.definition import Spec

F64 = torch.float64
LOCALIZED_FRACTION = 0.01
"""A mismatch on at most this fraction of a tensor's elements (or 3 elements) is "localised"."""


def _worst_per_tensor(
    instance: Instance,
    outcomes: list[Outcome],
    current: list[dict[str, Tensor]],
    param_dtype: torch.dtype,
    tol: Tolerance,
) -> list[float]:
    """The worst normalised error of each tensor against ``outcomes`` (parameter and shared states)."""
    worst: list[float] = []
    for i, o in enumerate(outcomes):
        allowed = allowed_error(o.param.error, o.param.value, param_dtype, tol.bound_factor)
        cmp = compare(instance.params[i], o.param.value, allowed, tol.lockstep_mismatch)
        here = cmp.worst if cmp.passed else max(cmp.worst, 1.0 + 1e-9)
        for name, b in (o.states or {}).items():
            got = current[i].get(name)
            if got is None or tuple(got.shape) != tuple(b.value.shape):
                continue
            allowed = allowed_error(b.error, b.value, got.dtype, tol.bound_factor)
            cmp = compare(got, b.value, allowed, tol.lockstep_mismatch)
            here = max(here, cmp.worst if cmp.passed else max(cmp.worst, 1.0 + 1e-9))
        worst.append(here)
    return worst


def _worst(
    instance: Instance,
    outcomes: list[Outcome],
    current: list[dict[str, Tensor]],
    param_dtype: torch.dtype,
    tol: Tolerance,
) -> float:
    return max(_worst_per_tensor(instance, outcomes, current, param_dtype, tol), default=0.0)


def _tensor_properties(tensors: tuple[TensorSpec, ...]) -> list[tuple[str, set[int]]]:
    """Named sets of tensors that a layout- or size-specific bug would hit."""

    def members(pred: Callable[[TensorSpec], bool]) -> set[int]:
        return {i for i, t in enumerate(tensors) if pred(t)}

    named = [
        ("strided (a view of every other row of a larger buffer)", members(lambda t: t.layout is Layout.STRIDED)),
        ("transposed (a permuted view)", members(lambda t: t.layout is Layout.TRANSPOSED)),
        ("non-contiguous", members(lambda t: t.layout is not Layout.CONTIGUOUS)),
        ("0-dimensional", members(lambda t: len(t.shape) == 0)),
        ("with fewer than 2 elements", members(lambda t: t.numel < 2)),
        ("without a gradient at some steps", members(lambda t: t.grads != GRAD_EVERY_STEP)),
    ]
    for group in sorted({t.group for t in tensors}):
        named.append((f"of param group {group}", {i for i, t in enumerate(tensors) if t.group == group}))
    return named


def _tensor_pattern(tensors: tuple[TensorSpec, ...], failing: set[int], labels: list[str]) -> str | None:
    """ "only the strided tensors differ" when the failures share a property the passing tensors lack."""
    if not failing:
        return None
    fitting = [(len(m), text, m) for text, m in _tensor_properties(tensors) if failing <= m and len(m) < len(tensors)]
    if not fitting:
        return None
    _, text, _ = min(fitting, key=lambda f: f[0])
    names = ", ".join(labels[i] for i in sorted(failing))
    return f"only tensors {text} differ ({names}); every other tensor matches the spec"


def _localized(
    instance: Instance,
    outcomes: list[Outcome],
    before: tuple[Tensor, ...],
    labels: list[str],
    tol: Tolerance,
    dtype: torch.dtype,
) -> str | None:
    """A description of a mismatch confined to a few parameter elements, or ``None``."""
    parts: list[str] = []
    skipped_everywhere = True
    for i, o in enumerate(outcomes):
        allowed = allowed_error(o.param.error, o.param.value, dtype, tol.bound_factor)
        ratio = error_ratio(instance.params[i], o.param.value, allowed.expand(o.param.value.shape))
        over = (ratio > 1.0).reshape(-1)
        count = int(over.sum())
        if count == 0:
            continue
        numel = over.numel()
        if count > max(3, LOCALIZED_FRACTION * numel):
            return None
        got = instance.params[i].detach().to(device="cpu", dtype=F64).reshape(-1)
        unchanged = bool((got[over] == before[i].reshape(-1)[over]).all())
        moved = bool((o.param.value.reshape(-1)[over] != before[i].reshape(-1)[over]).all())
        skipped_everywhere = skipped_everywhere and unchanged and moved
        index = [int(k) for k in torch.nonzero(over).reshape(-1)[:5]]
        parts.append(f"tensor {labels[i]}: {count} of {numel} element(s) at flat index {index}")
    if not parts:
        return None
    what = "the update is skipped on" if skipped_everywhere else "the result differs only on"
    return f"{what} " + "; ".join(parts)


def diagnose(
    case: Case,
    spec: Spec,
    impl: Implementation,
    precision: Precision,
    device: str,
    trajectory: Trajectory,
    tol: Tolerance,
    result: RunResult,
) -> Diagnosis:
    """Re-run ``impl`` in lock-step against every known variant and explain the failure."""
    if not trajectory.keep_history:
        trajectory = new_trajectory(case, spec, precision, trajectory.reference.source)
    reference = trajectory.reference
    source = reference.source
    n = len(source.tensors)
    variants = known_variants(case, spec, reference.group_hypers)
    instance = new_instance(case, spec, impl, source, reference.group_hypers, precision, device)
    scores = {v.name: 0.0 for v in variants}
    as_specified = 0.0
    failing: set[int] = set()
    localized: str | None = None
    labels = [source.label(i) for i in range(n)]
    for t in range(1, case.steps + 1):
        record = trajectory.step(t)
        if t > 1:
            sync(instance, record.before)
        own = [{k: v.detach().clone() for k, v in instance.read_state(i).items()} for i in range(n)]
        with torch.no_grad():
            instance.step(device_grads(record.grads, source, precision.param_dtype, device))
        current = [instance.read_state(i) for i in range(n)]
        per_tensor = _worst_per_tensor(instance, record.outcomes, current, precision.param_dtype, tol)
        failing |= {i for i, w in enumerate(per_tensor) if w > 1.0}
        worst_here = max(per_tensor, default=0.0)
        as_specified = max(as_specified, worst_here)
        nonfinite = any(g is not None and not bool(torch.isfinite(g).all()) for g in record.grads)
        if worst_here > 1.0 and localized is None and nonfinite and reference.skip_nonfinite:
            localized = f"the step with inf/NaN gradients (step {t}) was not skipped: it changed parameters or states"
        if worst_here > 1.0 and localized is None:
            localized = (
                _localized(instance, record.outcomes, record.before.params, labels, tol, precision.param_dtype) or ""
            )
        for v in variants:
            if scores[v.name] > 1.0:
                continue  # no longer a match: its score so far is a lower bound, enough to rank it
            outcomes = _variant_outcomes(trajectory, record, v, own)
            worst = math.inf if outcomes is None else _worst(instance, outcomes, current, precision.param_dtype, tol)
            scores[v.name] = max(scores[v.name], worst)
    ranked = sorted(
        (VariantScore(v.name, v.description, scores[v.name], scores[v.name] <= 1.0) for v in variants),
        key=lambda s: s.worst if math.isfinite(s.worst) else math.inf,
    )
    matched = next((s for s in ranked if s.matched), None)
    localized = localized or _tensor_pattern(source.tensors, failing, labels)
    return Diagnosis(
        summary=_summary(case, spec, impl, result, matched, ranked, localized or None, as_specified),
        first_divergence=result.first_failure,
        localized=localized or None,
        matched=matched,
        scores=ranked,
    )


def _variant_outcomes(
    trajectory: Trajectory, record: StepRecord, v: Variant, own: list[dict[str, Tensor]]
) -> list[Outcome] | None:
    """The variant's step from the chain's inputs (``None`` when the reference cannot evaluate it)."""
    try:
        return trajectory.reference.advance(
            record.before, record.grads, spec=v.spec, group_hypers=v.group_hypers, extra_states=own, track_drift=False
        )
    except (RuntimeError, ValueError, KeyError):
        return None


def _summary(
    case: Case,
    spec: Spec,
    impl: Implementation,
    result: RunResult,
    matched: VariantScore | None,
    ranked: list[VariantScore],
    localized: str | None,
    as_specified: float,
) -> str:
    first = result.first_failure.describe() if result.first_failure else "no comparison failed"
    if result.first_failure is not None and result.first_failure.message:  # a missing state, a wrong counter
        return f"{impl.name}: {first}"
    if matched is not None:
        return (
            f"{impl.name} computes {spec.title} with {matched.description} [{matched.name}]. First divergence: {first}"
        )
    if localized:
        return f"{impl.name}: {localized}. First divergence: {first}"
    if as_specified <= 1.0 and result.first_failure is not None and result.first_failure.mode != LOCKSTEP:
        return (
            f"{impl.name} follows {spec.title} step by step but drifts away over many steps. First divergence: {first}"
        )
    if as_specified <= 1.0:
        return f"{impl.name}: {first}"
    nearest = ranked[0] if ranked else None
    hint = (
        f"; the nearest known variant is {nearest.description} [{nearest.name}] "
        f"(worst error {nearest.worst:.3g} x the allowed)"
        if nearest is not None and math.isfinite(nearest.worst)
        else ""
    )
    return f"{impl.name} matches no known variant of {spec.title}{hint}. First divergence: {first}"
