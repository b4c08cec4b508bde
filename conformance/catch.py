"""Which cases catch which mutants: the measure of how discriminating a case set is.

A *mutant* is an implementation with one deliberate mistake. :func:`catalogue` lists, for
an algorithm:

* one mutant per known variant of its cases (:mod:`portopt.conformance.variants`: ε
  placements, bias corrections, weight-decay conventions, flipped options, ...), computed
  by the generic ``torch`` backend from the variant's spec (where a case has no such
  variant, the mutant computes the case's own spec there);
* element-level mistakes that only some problem features reveal (:data:`ELEMENT_MUTANTS`):
  an update skipped on one element, on full SIMD blocks or on tails, strides ignored,
  parameters without a gradient stepped with zeros, one step counter shared by a group,
  the first group's hyperparameters for every group, states never written back, inf/NaN
  gradients zeroed, elements beyond 2^20 left alone, and ``sqrt(x)`` evaluated as
  ``sqrt(sqrt(x²))`` (overflows float32 in the huge-gradient regime).

:func:`measure` runs every mutant on every case of its algorithm (one reference chain per
case, shared by all its mutants; optionally in worker processes) and records whether it
failed, at which step first, and on which tensors. A mutant is *caught* by a case set when
some case of its algorithm fails it; the *catch rate* is caught / all. A mutant no case
catches is listed: either the set has a gap or the mutant equals the spec on every case of
the set (``shared-step-counter`` on SGD without momentum).

Run it as ``python -m portopt.conformance.catch --out FILE.json [--quick] [--workers N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from portopt.backends import named_backend
from portopt.conformance.candidates import STEP, Instance, Setup, StepFunctionInstance, device_unavailable_reason
from portopt.conformance.cases import FOUND_INF, Case, build_cases
from portopt.conformance.precision import PRECISIONS, Precision
from portopt.conformance.results import ERROR, FAIL, LOCKSTEP, RunResult
from portopt.lowering.backend import Hypers, ParamState, StepFunction
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, sqrt, square
from portopt.spec.ops import Op

LARGE_PREFIX = 1 << 20
"""``large-tail-skipped`` leaves the elements at and beyond this flat index unchanged."""

MakeInstance = Callable[[Setup], Instance]


@dataclass(frozen=True)
class Mutant:
    """An implementation with one deliberate mistake (an :class:`~portopt.conformance.candidates.Implementation`)."""

    name: str
    description: str
    make: MakeInstance
    algorithm: str | None = None
    requires_step_counter: bool = True

    def unavailable_reason(self, case: Case, spec: Spec, precision: Precision, device: str) -> str | None:
        if self.algorithm is not None and case.algorithm != self.algorithm:
            return f"mutant {self.name} is for {self.algorithm}"
        if precision.needs_policy or case.requires == FOUND_INF:
            return f"mutant {self.name} is a bare step function: no master weights, no skipped steps"
        return device_unavailable_reason(device)

    def instantiate(self, setup: Setup) -> Instance:
        return self.make(setup)


def _torch_step(spec: Spec) -> StepFunction:
    return named_backend("torch").build(spec)


def _plain(setup: Setup, step: StepFunction, group_hypers: Sequence[Mapping[str, float]] | None = None) -> Instance:
    return StepFunctionInstance(step, setup.params, setup.groups, group_hypers or setup.group_hypers)


def variant_mutant(algorithm: str, name: str, description: str) -> Mutant:
    """The ``torch`` backend computing the case's variant ``name`` (the case's spec where it has none)."""
    from portopt.conformance.variants import known_variants

    def make(setup: Setup) -> Instance:
        found = [v for v in known_variants(setup.case, setup.spec, setup.group_hypers) if v.name == name]
        if not found:
            return _plain(setup, _torch_step(setup.spec))
        return _plain(setup, _torch_step(found[0].spec), found[0].group_hypers)

    return Mutant(f"variant:{name}", description, make, algorithm)


# --- element-level mutants ---------------------------------------------------------------


def _wrapped(wrap: Callable[[StepFunction], StepFunction]) -> MakeInstance:
    return lambda setup: _plain(setup, wrap(_torch_step(setup.spec)))


def _keep_elements(select: Callable[[Tensor], Tensor | None]) -> Callable[[StepFunction], StepFunction]:
    """A step after which the elements ``select(param)`` picks (flat indices) keep their values, states too."""
    from portopt.conformance.mutants import _put

    def wrap(inner: StepFunction) -> StepFunction:
        def step(
            params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers
        ) -> None:
            kept: list[list[tuple[Tensor, Tensor, Tensor]]] = []
            for p, st in zip(params, states, strict=True):
                where = select(p)
                tensors = [p, *(v for k, v in st.items() if k != STEP and v.shape == p.shape)]
                kept.append(
                    [] if where is None else [(t, where, t.detach().reshape(-1)[where].clone()) for t in tensors]
                )
            inner(params, grads, states, hypers)
            with torch.no_grad():
                for entries in kept:
                    for t, where, old in entries:
                        _put(t, where, old)
            # states created by this step are fresh tensors: keep their new values (an initial state)

        return step

    return wrap


def _blocks(block: int, body: bool) -> Callable[[Tensor], Tensor | None]:
    from portopt.conformance.problems import memory_order

    def select(p: Tensor) -> Tensor:
        order = memory_order(p)
        cut = (p.numel() // block) * block
        return order[:cut] if body else order[cut:]

    return select


def _one_element(p: Tensor) -> Tensor | None:
    from portopt.conformance.mutants import SKIPPED_INDEX

    return torch.tensor([SKIPPED_INDEX]) if p.dim() == 1 and p.numel() > 100 else None


def _large_tail(p: Tensor) -> Tensor | None:
    return torch.arange(LARGE_PREFIX, p.numel()) if p.numel() > LARGE_PREFIX else None


def _ignore_strides(inner: StepFunction) -> StepFunction:
    """As torch 2.13's CPU fused kernels: a non-dense parameter (or gradient) is read and written
    through its data pointer as if it were contiguous."""

    def alias(t: Tensor) -> Tensor:
        if t.is_contiguous() or _dense(t):
            return t
        contiguous = torch.empty(tuple(t.shape)).stride()
        return torch.as_strided(t, tuple(t.shape), contiguous, t.storage_offset())

    def step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers) -> None:
        inner([alias(p) for p in params], [alias(g) for g in grads], states, hypers)

    return step


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: a permutation of a contiguous buffer."""
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous() if t.dim() else True


def _shared_counter(inner: StepFunction) -> StepFunction:
    """One step counter per group (the largest), instead of one per parameter."""

    def step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers) -> None:
        counters = [st[STEP] for st in states if STEP in st]
        if counters:
            top = max(float(c) for c in counters)
            for c in counters:
                c.fill_(top)
        inner(params, grads, states, hypers)

    return step


def _states_frozen(inner: StepFunction) -> StepFunction:
    """The parameter is updated, but existing states are never written back (the counter is)."""

    def step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers) -> None:
        saved = [{k: v.clone() for k, v in st.items() if k != STEP} for st in states]
        inner(params, grads, states, hypers)
        with torch.no_grad():
            for st, old in zip(states, saved, strict=True):
                for k, v in old.items():
                    st[k].copy_(v)

    return step


def _nonfinite_zeroed(inner: StepFunction) -> StepFunction:
    """inf and NaN gradients replaced by 0 before the step (the reference propagates them)."""

    def step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers) -> None:
        inner(params, [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads], states, hypers)

    return step


def _naive_sqrt(setup: Setup) -> Instance:
    """Every ``sqrt(x)`` of the spec computed as ``sqrt(sqrt(x²))``: exact in float64, an overflow
    of ``x²`` in float32 once ``x`` exceeds about 1.8e19 (a second moment of huge gradients)."""
    from portopt.conformance.variants import rewrite_spec

    def rewrite(node: Expr) -> Expr | None:
        return sqrt(sqrt(square(node.args[0]))) if node.op is Op.SQRT else None

    return _plain(setup, _torch_step(rewrite_spec(setup.spec, rewrite) or setup.spec))


class _ZeroGradInstance(StepFunctionInstance):
    """A parameter without a gradient is stepped with a zero gradient (torch.optim skips it)."""

    def step(self, grads: Sequence[Tensor | None]) -> None:
        super().step([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)])


def _first_group(setup: Setup) -> Instance:
    """Every group stepped with the first group's hyperparameters."""
    return _plain(setup, _torch_step(setup.spec), [setup.group_hypers[0]] * len(setup.group_hypers))


ELEMENT_MUTANTS: tuple[tuple[str, str, MakeInstance], ...] = (
    ("skip-one-element", "element 17 of every 1-d tensor of more than 100 elements is not updated",
     _wrapped(_keep_elements(_one_element))),
    ("simd-tail-only", "only each tensor's tail (numel mod 16, memory order) is updated; full 16-blocks keep their values",
     _wrapped(_keep_elements(_blocks(16, body=True)))),
    ("simd-body-only", "the tail loop is missing: the last numel mod 16 elements are not updated",
     _wrapped(_keep_elements(_blocks(16, body=False)))),
    ("simd8-body-only", "the tail loop of an 8-wide kernel is missing: the last numel mod 8 elements are not updated",
     _wrapped(_keep_elements(_blocks(8, body=False)))),
    ("large-tail-skipped", f"elements at flat index >= {LARGE_PREFIX} are not updated (a chunking bug)",
     _wrapped(_keep_elements(_large_tail))),
    ("ignore-strides", "non-dense parameters and gradients are read through their data pointer as if contiguous",
     _wrapped(_ignore_strides)),
    ("zero-grad-stepped", "a parameter without a gradient is stepped with a zero gradient",
     lambda setup: _ZeroGradInstance(_torch_step(setup.spec), setup.params, setup.groups, setup.group_hypers)),
    ("shared-step-counter", "one step counter per param group (the largest) instead of one per parameter",
     _wrapped(_shared_counter)),
    ("first-group-hypers", "every param group is stepped with the first group's hyperparameters", _first_group),
    ("states-frozen", "the parameter moves but the states are never written back", _wrapped(_states_frozen)),
    ("nonfinite-zeroed", "inf and NaN gradients are replaced by 0", _wrapped(_nonfinite_zeroed)),
    ("naive-sqrt", "sqrt(x) evaluated as sqrt(sqrt(x²)): x² overflows float32 for huge second moments", _naive_sqrt),
)  # fmt: skip
"""(name, description, instance factory) of every element-level mutant; they apply to any algorithm."""


def catalogue(algorithm: str, cases: Sequence[Case]) -> list[Mutant]:
    """Every mutant of ``algorithm``: one per variant of its ``cases``, then the element-level ones."""
    from portopt.conformance.variants import known_variants

    described: dict[str, str] = {}
    for case in cases:
        if case.algorithm != algorithm:
            continue
        spec = case.spec()
        for v in known_variants(case, spec, case.group_hypers(spec)):
            described.setdefault(v.name, v.description)
    out = [variant_mutant(algorithm, name, text) for name, text in described.items()]
    out += [Mutant(name, text, make, algorithm) for name, text, make in ELEMENT_MUTANTS]
    return out


@dataclass
class Outcome:
    """One mutant on one case."""

    mutant: str
    case: str
    status: str
    caught: bool
    first_step: int | None = None
    lockstep: bool = False
    tensors: dict[str, int] = field(default_factory=dict)


def _outcome(result: RunResult) -> Outcome:
    caught = result.status in (FAIL, ERROR)
    first = min(result.failed_tensors.values(), default=None)
    lock = result.first_failure is not None and result.first_failure.mode == LOCKSTEP
    return Outcome(result.implementation, result.case, result.status, caught, first, lock, dict(result.failed_tensors))


def _measure_case(unit: tuple[Case, str]) -> list[Outcome]:
    """Every mutant of the case's algorithm on ``case``, in ``precision``, sharing one reference chain."""
    from portopt.conformance.runner import RunOptions, run_group

    case, precision = unit
    mutants = catalogue(case.algorithm, [case])
    members = [(m, "cpu") for m in mutants]
    results = run_group(case, members, PRECISIONS[precision], options=RunOptions(diagnose=False))
    return [_outcome(r) for r in results]


@dataclass
class CatchMatrix:
    """Outcomes of every (mutant, case) of a case set, and what they add up to."""

    precision: str
    case_set: str
    outcomes: list[Outcome]
    seconds: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)

    def mutants(self) -> dict[tuple[str, str], list[Outcome]]:
        """The outcomes of each (algorithm, mutant)."""
        algorithm = {o.case: o.case.split("[")[0].split("/")[0] for o in self.outcomes}
        out: dict[tuple[str, str], list[Outcome]] = {}
        for o in self.outcomes:
            out.setdefault((algorithm[o.case], o.mutant), []).append(o)
        return out

    def caught(self, max_step: int | None = None, cases: Callable[[str], bool] | None = None) -> dict[str, bool]:
        """Whether each ``algorithm/mutant`` is caught (within ``max_step`` steps, by the cases kept)."""
        out = {}
        for (algorithm, mutant), outcomes in self.mutants().items():
            out[f"{algorithm}/{mutant}"] = any(
                o.caught
                and (cases is None or cases(o.case))
                and (max_step is None or (o.first_step is not None and o.first_step <= max_step))
                for o in outcomes
            )
        return out

    def rate(self, **kw: Any) -> tuple[int, int]:
        caught = self.caught(**kw)
        return sum(caught.values()), len(caught)

    def to_dict(self) -> dict[str, Any]:
        caught, total = self.rate()
        return {
            "precision": self.precision,
            "case_set": self.case_set,
            "seconds": round(self.seconds, 1),
            "machine": self.machine,
            "caught": caught,
            "mutants": total,
            "uncaught": sorted(k for k, v in self.caught().items() if not v),
            "outcomes": [asdict(o) for o in self.outcomes],
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> CatchMatrix:
        outcomes = [Outcome(**o) for o in data["outcomes"]]
        return CatchMatrix(
            data["precision"], data["case_set"], outcomes, data.get("seconds", 0.0), data.get("machine", {})
        )


def measure(
    cases: Sequence[Case],
    precision: str = "fp32",
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    case_set: str = "",
) -> CatchMatrix:
    """Every mutant of :func:`catalogue` on every case of its algorithm among ``cases``."""
    from portopt.conformance.parallel import map_units
    from portopt.conformance.report import environment

    started = time.perf_counter()
    units = [(c, precision) for c in cases if c.requires != FOUND_INF]
    costs = [float(c.problem.total_elements * c.steps) for c, _ in units]
    outcomes: list[Outcome] = []
    done = 0

    def collect(index: int, found: list[Outcome]) -> None:
        nonlocal done
        outcomes.extend(found)
        done += 1
        if progress is not None:
            progress(done, len(units))

    map_units(_measure_case, units, workers, collect, costs=costs)
    outcomes.sort(key=lambda o: (o.case, o.mutant))
    return CatchMatrix(precision, case_set, outcomes, time.perf_counter() - started, environment())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portopt.conformance.catch", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--quick", action="store_true", help="the quick case set (default: the full one)")
    parser.add_argument("--algorithm", action="append", help="only these algorithms (repeatable)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    cases = build_cases(args.algorithm, quick=args.quick)

    def progress(done: int, total: int) -> None:
        print(f"catch: {done}/{total} cases", flush=True)

    matrix = measure(cases, args.precision, args.workers, progress, "quick" if args.quick else "full")
    with open(args.out, "w") as f:
        json.dump(matrix.to_dict(), f, indent=1)
    caught, total = matrix.rate()
    print(f"caught {caught} of {total} mutants ({100 * caught / max(total, 1):.1f}%) in {matrix.seconds:.0f} s")
    for name in matrix.to_dict()["uncaught"]:
        print(f"  not caught: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
