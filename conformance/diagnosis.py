"""Diagnosis of a failing run: where it diverged, which elements differ, and what it computes instead.

The implementation is run again in lock-step (re-synced to the reference chain before
every step). At every step:

* its outputs are compared, element by element, with the spec (the reference), and the
  elements that differ feed :class:`~portopt.conformance.patterns.Evidence`: the *element
  pattern* (a float32 overflow in the huge-gradient regime, a fixed subset of elements,
  strided tensors only, SIMD-block bodies or tails, the smallest gradients only) is
  reported separately from the algebra, since a kernel can compute the right formula on
  the wrong elements;
* they are compared with each known variant of the spec
  (:mod:`portopt.conformance.variants`) evaluated by the reference *on the same inputs*,
  with the same tolerance; a variant is dropped at its first miss (so a score above 1 is
  a lower bound). A variant that stays within tolerance at every step and for every
  tensor is what the implementation computes: "torch.optim.Adam computes adam with ε
  inside the square root".

When no single variant matches and the element pattern does not already name a
structural cause (a layout, SIMD blocks, an overflow: no formula computes those), every
pair of variants is tried on the recorded steps
(:func:`~portopt.conformance.variants.variant_pairs`), and a pair that matches is
reported with both differences ("RAdam rectified when ρ_t > 4, and an uncorrected
second moment"). Problems above :data:`PAIR_SEARCH_ELEMENTS` elements skip the pair search
(their steps are not kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from portopt.conformance.bounds import Bounded
from portopt.conformance.candidates import Implementation
from portopt.conformance.cases import Case
from portopt.conformance.chain import Outcome, StepRecord, Trajectory
from portopt.conformance.patterns import Evidence, Pattern, analyse
from portopt.conformance.precision import OP_BY_OP_HINT, Precision
from portopt.conformance.problems import memory_order
from portopt.conformance.results import LOCKSTEP, Diagnosis, RunResult, VariantScore
from portopt.conformance.runner import new_trajectory
from portopt.conformance.session import device_grads, new_instance, sync
from portopt.conformance.tolerance import Tolerance, allowed_error, compare, error_ratio
from portopt.conformance.variants import Variant, difference_count, known_variants, variant_pairs
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr

F64 = torch.float64
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
PAIR_SEARCH_ELEMENTS = 200_000
"""Problems up to this many elements keep every step of the re-run for the search of variant pairs."""
_COMPUTE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", F64: "float64"}


@dataclass
class Observed:
    """One step of the re-run: the chain's record, the implementation's own states before the step
    (for states the chain does not hold), and its parameters and states after it."""

    record: StepRecord
    own: list[dict[str, Tensor]]
    params: list[Tensor]
    states: list[dict[str, Tensor]]
    worst_first: list[int] = field(default_factory=list)


def _over(got: Tensor, expected: Tensor, allowed: Tensor) -> Tensor:
    return error_ratio(got, expected, allowed.expand(expected.shape)) > 1.0


def _worst_tensor(
    param: Tensor, o: Outcome, current: dict[str, Tensor], param_dtype: torch.dtype, tol: Tolerance
) -> float:
    """The worst normalised error of one tensor against outcome ``o`` (parameter and shared states)."""
    allowed = allowed_error(o.param.error, o.param.value, param_dtype, tol.bound_factor)
    cmp = compare(param, o.param.value, allowed, tol.lockstep_mismatch)
    worst = cmp.worst if cmp.passed else max(cmp.worst, 1.0 + 1e-9)
    for name, b in (o.states or {}).items():
        got = current.get(name)
        if got is None or tuple(got.shape) != tuple(b.value.shape):
            continue
        allowed = allowed_error(b.error, b.value, got.dtype, tol.bound_factor)
        cmp = compare(got, b.value, allowed, tol.lockstep_mismatch)
        worst = max(worst, cmp.worst if cmp.passed else max(cmp.worst, 1.0 + 1e-9))
    return worst


def _observe(evidence: Evidence, seen: Observed, param_dtype: torch.dtype, tol: Tolerance) -> float:
    """Feed one step to ``evidence``; the step's worst normalised error against the spec. Sets
    ``seen.worst_first``: the tensors from the worst, the first a variant must explain."""
    record = seen.record
    per_tensor: list[float] = []
    for i, o in enumerate(record.outcomes):
        allowed = allowed_error(o.param.error, o.param.value, param_dtype, tol.bound_factor)
        over = _over(seen.params[i], o.param.value, allowed)
        for name, b in (o.states or {}).items():
            got = seen.states[i].get(name)
            if got is not None and tuple(got.shape) == tuple(b.value.shape) == tuple(o.param.value.shape):
                over = over | _over(got, b.value, allowed_error(b.error, b.value, got.dtype, tol.bound_factor))
        evidence.add(i, over, seen.params[i], record.before.params[i], o.param.value, allowed, record.grads[i])
        per_tensor.append(_worst_tensor(seen.params[i], o, seen.states[i], param_dtype, tol))
    seen.worst_first = sorted(range(len(per_tensor)), key=lambda i: -per_tensor[i])
    return max(per_tensor, default=0.0)


class _Rerun:
    """The lock-step re-run of one implementation: element evidence, variant scores, kept steps."""

    def __init__(
        self, case: Case, spec: Spec, impl: Implementation, precision: Precision, device: str, trajectory: Trajectory
    ) -> None:
        self.case, self.precision, self.device, self.trajectory = case, precision, device, trajectory
        reference = trajectory.reference
        self.source = reference.source
        self.n = len(self.source.tensors)
        self.variants = known_variants(case, spec, reference.group_hypers)
        self.instance = new_instance(case, spec, impl, self.source, reference.group_hypers, precision, device)
        self.evidence = Evidence(self.source.tensors, [memory_order(p) for p in self.instance.params])
        self.keep = sum(t.numel for t in self.source.tensors) <= PAIR_SEARCH_ELEMENTS
        self.steps: list[Observed] = []
        self.scores = {v.name: 0.0 for v in self.variants}
        self.as_specified = 0.0
        self.skipped_step: str | None = None

    def step(self, t: int, tol: Tolerance) -> None:
        record = self.trajectory.step(t)
        instance, n = self.instance, self.n
        if t > 1:
            sync(instance, record.before)
        own = [{k: v.detach().clone() for k, v in instance.read_state(i).items()} for i in range(n)]
        with torch.no_grad():
            instance.step(device_grads(record.grads, self.source, self.precision.param_dtype, self.device))
        seen = Observed(
            record,
            own,
            [p.detach().to(device="cpu").clone() for p in instance.params],
            [{k: v.detach().to(device="cpu").clone() for k, v in instance.read_state(i).items()} for i in range(n)],
        )
        worst = _observe(self.evidence, seen, self.precision.param_dtype, tol)
        self.as_specified = max(self.as_specified, worst)
        nonfinite = any(g is not None and not bool(torch.isfinite(g).all()) for g in record.grads)
        if worst > 1.0 and self.skipped_step is None and nonfinite and self.trajectory.reference.skip_nonfinite:
            self.skipped_step = (
                f"the step with inf/NaN gradients (step {t}) was not skipped: it changed parameters or states"
            )
        _score(self.trajectory, seen, self.variants, self.scores, self.precision.param_dtype, tol)
        if self.keep:
            self.steps.append(seen)

    def patterns(self) -> list[Pattern]:
        compute = _COMPUTE_NAMES.get(self.precision.compute_dtype, str(self.precision.compute_dtype))
        found = analyse(self.evidence, [self.source.label(i) for i in range(self.n)], compute)
        if self.skipped_step is not None:
            found.insert(0, Pattern("nonfinite-step", self.skipped_step))
        return found


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
    """Re-run ``impl`` in lock-step against the spec and every known variant, and explain the failure."""
    if not trajectory.keep_history:
        trajectory = new_trajectory(case, spec, precision, trajectory.reference.source)
    rerun = _Rerun(case, spec, impl, precision, device, trajectory)
    for t in range(1, case.steps + 1):
        rerun.step(t, tol)
    ranked = _ranked(rerun.variants, rerun.scores)
    matched = next((s for s in ranked if s.matched), None)
    found = rerun.patterns()
    structural = any(not p.kind.startswith("values:") for p in found)
    if matched is None and rerun.keep and rerun.as_specified > 1.0 and not structural:
        # Two differences at once; not when the elements that differ already say what is wrong
        # (a layout, SIMD blocks, an overflow), which no algebraic variant computes.
        pairs = _pair_scores(case, trajectory, rerun.variants, rerun.steps, precision.param_dtype, tol)
        if any(p.matched for p in pairs):
            matched = next(p for p in pairs if p.matched)
            ranked = sorted([*pairs[:3], *ranked], key=_rank_key)
    localized = "; ".join(p.text for p in found) or None
    return Diagnosis(
        summary=_summary(spec, impl, precision, result, matched, ranked, localized, rerun.as_specified),
        first_divergence=result.first_failure,
        localized=localized,
        matched=matched,
        scores=ranked,
        pattern=found[0].kind if found else None,
    )


def _score(
    trajectory: Trajectory,
    seen: Observed,
    variants: Sequence[Variant],
    scores: dict[str, float],
    param_dtype: torch.dtype,
    tol: Tolerance,
) -> None:
    """Each variant still in the running, compared tensor by tensor from the one the implementation
    got most wrong: a variant that misses a tensor is out, and its score so far is a lower bound."""
    order = seen.worst_first or list(range(len(seen.params)))
    for v in variants:
        if scores[v.name] > 1.0:
            continue  # no longer a match: its score so far is a lower bound, enough to rank it
        memo: dict[tuple[int, int], dict[Expr, Bounded]] = {}
        worst = 0.0
        for i in order:
            o = _variant_outcome(trajectory, seen, v, i, memo)
            here = math.inf if o is None else _worst_tensor(seen.params[i], o, seen.states[i], param_dtype, tol)
            worst = max(worst, here)
            if worst > 1.0:
                break
        scores[v.name] = max(scores[v.name], worst)


def _rank_key(s: VariantScore) -> float:
    return s.worst if math.isfinite(s.worst) else math.inf


def _ranked(variants: Sequence[Variant], scores: dict[str, float]) -> list[VariantScore]:
    return sorted(
        (VariantScore(v.name, v.description, scores[v.name], scores[v.name] <= 1.0) for v in variants), key=_rank_key
    )


def _pair_scores(
    case: Case,
    trajectory: Trajectory,
    singles: Sequence[Variant],
    steps: Sequence[Observed],
    param_dtype: torch.dtype,
    tol: Tolerance,
) -> list[VariantScore]:
    """Every pair of variants scored on the recorded steps, closest first."""
    pairs = variant_pairs(case, singles)
    scores = {v.name: 0.0 for v in pairs}
    for seen in steps:
        _score(trajectory, seen, pairs, scores, param_dtype, tol)
    return _ranked(pairs, scores)


def _variant_outcome(
    trajectory: Trajectory, seen: Observed, v: Variant, i: int, memo: dict[tuple[int, int], dict[Expr, Bounded]]
) -> Outcome | None:
    """The variant's step of tensor ``i`` from the chain's inputs (``None`` when the reference cannot
    evaluate it)."""
    record = seen.record
    try:
        return trajectory.reference.advance_tensor(
            record.before, record.grads, i, v.spec, v.group_hypers, seen.own, track_drift=False, scalars=memo
        )
    except (RuntimeError, ValueError, KeyError):
        return None


def _summary(
    spec: Spec,
    impl: Implementation,
    precision: Precision,
    result: RunResult,
    matched: VariantScore | None,
    ranked: list[VariantScore],
    localized: str | None,
    as_specified: float,
) -> str:
    first = result.first_failure.describe() if result.first_failure else "no comparison failed"
    structural = result.first_failure is not None and bool(result.first_failure.message)  # a missing state
    if structural and matched is None:
        return f"{impl.name}: {first}"
    pattern = f" Element pattern: {localized}." if localized and not structural else ""
    contract = _contract(precision)
    if matched is not None and difference_count(matched.name) > 1:
        count = difference_count(matched.name)
        return (
            f"{impl.name} computes {spec.title} with {_COUNT_WORDS.get(count, str(count))} differences: "
            f"{matched.description} [{matched.name}].{pattern} First divergence: {first}"
        )
    if matched is not None:
        return (
            f"{impl.name} computes {spec.title} with {matched.description} [{matched.name}].{pattern} "
            f"First divergence: {first}"
        )
    if localized:
        return (
            f"{impl.name}: {localized}. No known variant of {spec.title} computes this.{contract} "
            f"First divergence: {first}"
        )
    if as_specified <= 1.0 and result.first_failure is not None and result.first_failure.mode != LOCKSTEP:
        return (
            f"{impl.name} follows {spec.title} step by step but drifts away over many steps.{contract} "
            f"First divergence: {first}"
        )
    if as_specified <= 1.0:
        return f"{impl.name}: {first}{contract}"
    nearest = ranked[0] if ranked else None
    hint = (
        f"; the nearest known variant is {nearest.description} [{nearest.name}] "
        f"(worst error {nearest.worst:.3g} x the allowed)"
        if nearest is not None and math.isfinite(nearest.worst)
        else ""
    )
    return f"{impl.name} matches no known variant of {spec.title}{hint}.{contract} First divergence: {first}"


def _contract(precision: Precision) -> str:
    """The precision's contract, and the other one an implementation may follow, for a failure message."""
    hint = OP_BY_OP_HINT.get(precision.name)
    if hint is None:
        return ""
    return f" The precision contract is {precision.contract}; {hint}."
