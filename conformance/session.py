"""One implementation judged step by step against the reference chain.

For each step ``t`` (see :mod:`portopt.conformance.chain` and
:mod:`portopt.conformance.tolerance`):

1. the lock-step instance is re-synced to ``X_{t−1}`` (parameters copied in place, states,
   step counters and a master copy overwritten in place) and takes one step;
2. parameters, every state of the spec, the master copy under master weights and the step
   counter of every tensor are compared with ``R_t`` (states must exist, be stored at
   least as precisely as the precision allows, and have the reference's shape; tensors
   without a gradient must not move);
3. the free-running instance takes its own step and is compared with ``R_t`` under the
   free-running allowance ``D_t``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from portopt.conformance.candidates import MASTER, STEP, Implementation, Instance, Setup
from portopt.conformance.cases import Case
from portopt.conformance.chain import PARAM, Outcome, ProblemSource, Snapshot, StepRecord, Trajectory
from portopt.conformance.precision import Precision, significand_bits
from portopt.conformance.problems import materialise
from portopt.conformance.results import DRIFT, FAIL, LOCKSTEP, Divergence, RunResult
from portopt.conformance.tolerance import Comparison, Tolerance, allowed_error, compare
from portopt.spec.definition import Spec

F64 = torch.float64


def device_grads(
    grads: Sequence[Tensor | None], source: ProblemSource, dtype: torch.dtype, device: str
) -> list[Tensor | None]:
    """Gradients laid out like their parameters (non-contiguous where the parameter is)."""
    return [None if g is None else materialise(g, source.tensors[i], dtype, device) for i, g in enumerate(grads)]


def new_instance(
    case: Case,
    spec: Spec,
    impl: Implementation,
    source: ProblemSource,
    group_hypers: Sequence[Mapping[str, float]],
    precision: Precision,
    device: str,
) -> Instance:
    params = [
        materialise(source.initial_param(i), t, precision.param_dtype, device) for i, t in enumerate(source.tensors)
    ]
    return impl.instantiate(Setup(case, spec, precision, params, [t.group for t in source.tensors], group_hypers))


def sync(instance: Instance, x: Snapshot) -> None:
    """Overwrite the instance's parameters and (existing) states with ``x`` (a master copy too)."""
    with torch.no_grad():
        for i, value in enumerate(x.params):
            instance.params[i].copy_(value.to(instance.params[i].dtype))
            held = x.states[i]
            if held is None:
                continue
            current = instance.read_state(i)
            values = {name: v for name, v in held.items() if name in current}
            if STEP in current:
                values[STEP] = torch.tensor(float(x.steps[i]), dtype=F64)
            if MASTER in current:
                values[MASTER] = value
            instance.write_state(i, values)


def state_dtypes(instance: Instance, n: int) -> list[dict[str, torch.dtype]]:
    return [{k: v.dtype for k, v in instance.read_state(i).items() if k != STEP} for i in range(n)]


class Session:
    """The step loop of one run (see the module docstring)."""

    def __init__(
        self,
        case: Case,
        spec: Spec,
        impl: Implementation,
        precision: Precision,
        device: str,
        trajectory: Trajectory,
        tolerance: Tolerance,
        drift: bool,
    ) -> None:
        self.case, self.spec, self.impl, self.precision = case, spec, impl, precision
        self.device, self.trajectory, self.tol = device, trajectory, tolerance
        self.source = trajectory.reference.source
        self.n = len(self.source.tensors)
        hypers = trajectory.reference.group_hypers
        self.lock = new_instance(case, spec, impl, self.source, hypers, precision, device)
        self.free = new_instance(case, spec, impl, self.source, hypers, precision, device) if drift else None
        self.noted_no_counter = False

    def step(self, result: RunResult, t: int, record: StepRecord) -> None:
        """Step ``t`` in lock-step and free-running mode, judged against ``record``."""
        dtype = self.precision.param_dtype
        if t > 1:
            sync(self.lock, record.before)
        _step(self.lock, device_grads(record.grads, self.source, dtype, self.device), LOCKSTEP, t)
        allowed = self._allowances(record.outcomes, state_dtypes(self.lock, self.n))
        self._judge(result, LOCKSTEP, self.lock, record.outcomes, allowed, t)
        if self.free is None:
            return
        _step(self.free, device_grads(record.grads, self.source, dtype, self.device), DRIFT, t)
        drift = [self._drift_allowances(o, per) for o, per in zip(record.outcomes, record.after.drift, strict=True)]
        self._judge(result, DRIFT, self.free, record.outcomes, drift, t)

    def _drift_allowances(self, outcome: Outcome, drift: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``drift_factor · D_t``; under master weights the parameter itself is the master rounded once more."""
        out = {q: self.tol.drift_factor * d for q, d in drift.items()}
        if self.precision.needs_policy:
            out[MASTER] = out[PARAM]
            out[PARAM] = out[PARAM] + allowed_error(
                torch.zeros(()), outcome.param.value, self.precision.param_dtype, 0.0
            )
        return out

    def _allowances(self, outcomes: list[Outcome], dtypes: list[dict[str, torch.dtype]]) -> list[dict[str, Tensor]]:
        """The lock-step allowance of every tensor and quantity: ``K·E + ulp + tiny`` in the
        implementation's own storage dtype."""
        out: list[dict[str, Tensor]] = []
        k = self.tol.bound_factor
        for i, o in enumerate(outcomes):
            per = {PARAM: allowed_error(o.param.error, o.param.value, self.precision.param_dtype, k)}
            if self.precision.needs_policy:
                per[MASTER] = allowed_error(o.param.error, o.param.value, dtypes[i].get(MASTER, F64), k)
            for name, b in (o.states or {}).items():
                per[name] = allowed_error(b.error, b.value, dtypes[i].get(name, F64), k)
            out.append(per)
        return out

    def _judge(
        self,
        result: RunResult,
        mode: str,
        instance: Instance,
        outcomes: list[Outcome],
        allowances: list[dict[str, Tensor]],
        t: int,
    ) -> None:
        mismatch = self.tol.lockstep_mismatch if mode == LOCKSTEP else self.tol.drift_mismatch
        curves = result.lockstep_curves if mode == LOCKSTEP else result.drift_curves
        for i, o in enumerate(outcomes):
            label = self.source.label(i)
            cmp = compare(instance.params[i], o.param.value, allowances[i][PARAM], mismatch)
            self._record(result, curves, mode, t, label, PARAM, cmp)
            current = instance.read_state(i)
            self._judge_counter(result, curves, mode, t, label, o, current)
            if o.states is None:
                continue
            if self.precision.needs_policy:  # the master copy holds the update (R_t) before rounding
                got = current.get(MASTER)
                problem = self._structural_problem(MASTER, got, o.param.value)
                if problem:
                    self._fail(result, curves, mode, t, label, MASTER, problem)
                else:
                    assert got is not None
                    cmp = compare(got, o.param.value, allowances[i][MASTER], mismatch)
                    self._record(result, curves, mode, t, label, MASTER, cmp)
            for name, b in o.states.items():
                got = current.get(name)
                problem = self._structural_problem(name, got, b.value)
                if problem:
                    self._fail(result, curves, mode, t, label, name, problem)
                    continue
                assert got is not None
                cmp = compare(got, b.value, allowances[i][name], mismatch)
                self._record(result, curves, mode, t, label, name, cmp)

    def _structural_problem(self, name: str, got: Tensor | None, expected: Tensor) -> str | None:
        if got is None:
            return f"state {name!r} is missing"
        if not got.is_floating_point():
            return f"state {name!r} has dtype {got.dtype}, not a floating-point dtype"
        if significand_bits(got.dtype) < significand_bits(self.precision.state_dtype):
            return (
                f"state {name!r} is stored in {got.dtype}, less precise than the {self.precision.state_dtype} "
                f"that precision {self.precision.name} requires"
            )
        if tuple(got.shape) != tuple(expected.shape):
            return f"state {name!r} has shape {tuple(got.shape)}, the reference's is {tuple(expected.shape)}"
        return None

    def _judge_counter(
        self,
        result: RunResult,
        curves: dict[str, list[float]],
        mode: str,
        t: int,
        label: str,
        o: Outcome,
        current: Mapping[str, Tensor],
    ) -> None:
        counter = current.get(STEP)
        if counter is None:
            if o.states is not None and self.impl.requires_step_counter:
                self._fail(result, curves, mode, t, label, STEP, "the step counter 'step' is missing")
            elif o.states is not None and not self.noted_no_counter:
                self.noted_no_counter = True
                result.notes.append(f"{self.impl.name} keeps no step counter; it is not compared")
            return
        value = float(counter)
        if value != float(o.step):
            self._fail(result, curves, mode, t, label, STEP, f"the step counter is {value:g}, expected {o.step}")
        else:
            _bump(curves, STEP, t, 0.0)

    def _record(
        self,
        result: RunResult,
        curves: dict[str, list[float]],
        mode: str,
        t: int,
        label: str,
        quantity: str,
        cmp: Comparison,
    ) -> None:
        _bump(curves, quantity, t, cmp.worst)
        if mode == LOCKSTEP:
            result.worst_lockstep = max(result.worst_lockstep, cmp.worst if cmp.passed else max(cmp.worst, 1.0))
        else:
            result.worst_drift = max(result.worst_drift, cmp.worst if cmp.passed else max(cmp.worst, 1.0))
        if not cmp.passed:
            div = Divergence(
                mode, t, label, quantity, list(cmp.index or ()), cmp.got, cmp.expected, cmp.abs_error,
                cmp.allowed, cmp.worst, cmp.count_over, cmp.numel,
            )  # fmt: skip
            self._set_failure(result, div)

    def _fail(
        self,
        result: RunResult,
        curves: dict[str, list[float]],
        mode: str,
        t: int,
        label: str,
        quantity: str,
        message: str,
    ) -> None:
        _bump(curves, quantity, t, float("inf"))
        div = Divergence(mode, t, label, quantity, [], 0.0, 0.0, 0.0, 0.0, float("inf"), 0, 0, message=message)
        self._set_failure(result, div)

    @staticmethod
    def _set_failure(result: RunResult, div: Divergence) -> None:
        result.status = FAIL
        result.failed_tensors[div.tensor] = min(div.step, result.failed_tensors.get(div.tensor, div.step))
        current = result.first_failure
        # Lock-step failures come first: they judge one step alone.
        if current is None or (current.mode == DRIFT and div.mode == LOCKSTEP):
            result.first_failure = div
            result.reason = div.describe()


def _step(instance: Instance, grads: list[Tensor | None], mode: str, t: int) -> None:
    try:
        with torch.no_grad():
            instance.step(grads)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise RuntimeError(f"{mode} step {t} raised {type(exc).__name__}: {exc}") from exc


def _bump(curves: dict[str, list[float]], quantity: str, t: int, value: float) -> None:
    curve = curves.setdefault(quantity, [])
    while len(curve) < t:
        curve.append(0.0)
    curve[t - 1] = max(curve[t - 1], value)
