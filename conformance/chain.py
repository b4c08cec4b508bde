"""The reference chain: the float64 reference trajectory, re-synced to the storage format.

With ``X_0`` the initial parameters rounded to the parameter dtype, each step computes
``R_t`` (and its error bound) from ``X_{t−1}`` in float64, and then ``X_t = round_s(R_t)``:
parameters rounded to the precision's parameter dtype, states to its state dtype. ``R_t``
is what an implementation must produce in lock-step (re-synced to ``X_{t−1}`` before the
step) and, within a growing allowance, in free-running mode. An implementation may store
states more precisely than the precision requires (the reference keeps float64); it is
still fed ``X_{t−1}`` in lock-step, so the chain does not depend on the implementation and
is computed once per (case, precision) and shared (:class:`Trajectory`). An initial state
is created in the storage format (rounded once) before its first update, as an
implementation does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from portopt.conformance.bounds import Bounded, bounded_step, initial_states
from portopt.conformance.precision import Precision, smallest_normal, ulp
from portopt.conformance.problems import TensorSpec
from portopt.lowering.interpreter import tensor_facts
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr
from portopt.spec.shapes import TensorFacts

F64 = torch.float64


class ProblemSource(Protocol):
    """Initial values and gradients of a problem (generated, or read from a golden file)."""

    @property
    def tensors(self) -> tuple[TensorSpec, ...]: ...

    def initial_param(self, index: int) -> Tensor: ...

    def gradient(self, index: int, step: int) -> Tensor | None: ...

    def label(self, index: int) -> str: ...


def round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype`` and back to float64 (a fresh tensor)."""
    return x.to(dtype).to(F64) if dtype != F64 else x.to(F64).clone()


PARAM = "param"
"""The key of the parameter among a tensor's quantities (the others are state names)."""


@dataclass(frozen=True)
class Snapshot:
    """``X_t``: every tensor's parameter, states (``None`` before its first gradient) and step count.

    ``drift`` holds ``D_t``, the free-running allowance of each quantity (``"param"`` and
    the state names): how far an implementation running on its own may be from ``X_t``.
    """

    params: tuple[Tensor, ...]
    states: tuple[dict[str, Tensor] | None, ...]
    steps: tuple[int, ...]
    drift: tuple[dict[str, Tensor], ...]


@dataclass
class Outcome:
    """The reference's result for one tensor at one step."""

    has_grad: bool
    param: Bounded
    states: dict[str, Bounded] | None  # None: no state yet (never had a gradient)
    step: int


class Reference:
    """The reference step of one spec over a problem, in one storage format.

    Free-running allowance: ``D_t = prop(D_{t−1}) + K·E_t + 2·ulp_s(R_t) + tiny_s``, where
    ``prop`` carries the inputs' allowances through the step with exact arithmetic
    (first-order, :mod:`portopt.conformance.bounds`), ``K·E_t`` is the step's own rounding
    allowance, and the ulps cover the implementation's rounding on store and the chain's.
    """

    def __init__(
        self,
        spec: Spec,
        source: ProblemSource,
        group_hypers: Sequence[Mapping[str, float]],
        precision: Precision,
        bound_factor: float,
        skip_nonfinite: bool = False,
    ) -> None:
        self.spec = spec
        self.source = source
        self.group_hypers = group_hypers
        self.grad_dtype = precision.param_dtype
        self.param_dtype = precision.update_dtype  # the master copy's dtype under master weights
        self.state_dtype = precision.state_dtype
        self.u = precision.unit_roundoff
        self.bound_factor = bound_factor
        self.skip_nonfinite = skip_nonfinite

    def start(self) -> Snapshot:
        n = len(self.source.tensors)
        # The model's parameters are in the parameter dtype; a master copy starts from them.
        params = tuple(round_to(self.source.initial_param(i), self.grad_dtype) for i in range(n))
        drift = tuple({PARAM: torch.zeros_like(p)} for p in params)
        return Snapshot(params, (None,) * n, (0,) * n, drift)

    def gradients(self, step: int) -> list[Tensor | None]:
        """The gradients of ``step`` as an implementation receives them (rounded to the parameter dtype)."""
        out: list[Tensor | None] = []
        for i in range(len(self.source.tensors)):
            g = self.source.gradient(i, step)
            out.append(None if g is None else round_to(g, self.grad_dtype))
        return out

    def advance(
        self,
        x: Snapshot,
        grads: Sequence[Tensor | None],
        spec: Spec | None = None,
        group_hypers: Sequence[Mapping[str, float]] | None = None,
        extra_states: Sequence[Mapping[str, Tensor]] | None = None,
        track_drift: bool = True,
    ) -> list[Outcome]:
        """``R_t`` for every tensor from ``x = X_{t−1}``.

        ``spec``/``group_hypers`` replace the reference's own (a variant evaluated on the
        same inputs); a state that ``x`` does not hold is taken from ``extra_states`` (the
        implementation's own value) or created from its initial value. With
        ``track_drift`` the inputs' free-running allowances are propagated. With
        ``skip_nonfinite``, a step with an inf/NaN gradient anywhere changes nothing.
        """
        spec = spec or self.spec
        group_hypers = group_hypers or self.group_hypers
        scalars: dict[tuple[int, int], dict[Expr, Bounded]] = {}
        outcomes: list[Outcome] = []
        skipped = self.skip_nonfinite and any(g is not None and not bool(torch.isfinite(g).all()) for g in grads)
        for i, grad in enumerate(grads):
            held = x.states[i]
            if grad is None or skipped:
                states = None if held is None else {k: Bounded.exact(v) for k, v in held.items()}
                outcomes.append(Outcome(False, Bounded.exact(x.params[i]), states, x.steps[i]))
                continue
            group = self.source.tensors[i].group
            hypers = group_hypers[group]
            t = x.steps[i] + 1
            extra = None if extra_states is None else extra_states[i]
            drift = x.drift[i] if track_drift else None
            facts = tensor_facts(x.params[i], self.param_dtype)
            tensor_spec = spec.specialize(facts)  # its shape class's states (Adafactor's factors for matrices)
            inputs = self._inputs(tensor_spec, x.params[i], grad, hypers, held, extra, drift, facts)
            memo = scalars.setdefault((group, t), {})
            param_drift = None if drift is None else drift[PARAM]
            new_states, new_param = bounded_step(
                tensor_spec, self.u, x.params[i], grad, float(t), hypers, inputs, memo, param_drift, facts
            )
            outcomes.append(Outcome(True, new_param, new_states, t))
        return outcomes

    def _inputs(
        self,
        spec: Spec,
        param: Tensor,
        grad: Tensor,
        hypers: Mapping[str, float],
        held: Mapping[str, Tensor] | None,
        extra: Mapping[str, Tensor] | None,
        drift: Mapping[str, Tensor] | None,
        facts: TensorFacts | None = None,
    ) -> dict[str, Bounded]:
        if held is None:
            return self._fresh(spec, param, grad, hypers, drift is not None, facts)
        inputs: dict[str, Bounded] = {}
        for name in spec.state_names:
            if name in held:
                inputs[name] = Bounded.exact(held[name], None if drift is None else drift[name])
            elif extra is not None and name in extra:
                inputs[name] = Bounded.exact(extra[name].detach().to(device="cpu", dtype=F64))
            else:
                inputs[name] = self._fresh(spec, param, grad, hypers, drift is not None, facts)[name]
        return inputs

    def _fresh(
        self,
        spec: Spec,
        param: Tensor,
        grad: Tensor,
        hypers: Mapping[str, float],
        track_drift: bool,
        facts: TensorFacts | None = None,
    ) -> dict[str, Bounded]:
        """Initial states rounded to the storage format; the rounding is an input error in both
        bounds, since an implementation may create them more (or less) precisely."""
        out: dict[str, Bounded] = {}
        for name, b in initial_states(spec, self.u, param, grad, hypers, facts).items():
            stored = round_to(b.value, self.state_dtype)
            rounding = (stored - b.value).abs() + b.error
            out[name] = Bounded(stored, rounding, rounding if track_drift else None)
        return out

    def commit(self, x: Snapshot, outcomes: Sequence[Outcome]) -> Snapshot:
        """``X_t = round_s(R_t)`` and the free-running allowances ``D_t``."""
        params, states, steps, drift = list(x.params), list(x.states), list(x.steps), list(x.drift)
        for i, out in enumerate(outcomes):
            if not out.has_grad:
                continue
            assert out.states is not None
            params[i] = round_to(out.param.value, self.param_dtype)
            states[i] = {name: round_to(b.value, self.state_dtype) for name, b in out.states.items()}
            steps[i] = out.step
            drift[i] = {PARAM: self._allowance(out.param, self.param_dtype)}
            drift[i].update({name: self._allowance(b, self.state_dtype) for name, b in out.states.items()})
        return Snapshot(tuple(params), tuple(states), tuple(steps), tuple(drift))

    def _allowance(self, b: Bounded, dtype: torch.dtype) -> Tensor:
        propagated = b.drift if b.drift is not None else torch.zeros_like(b.value)
        rounding = 2 * ulp(b.value, dtype) + smallest_normal(dtype)
        return torch.nan_to_num(propagated + self.bound_factor * b.error + rounding, nan=0.0, posinf=math.inf)


@dataclass
class StepRecord:
    """One step of a trajectory: inputs ``X_{t−1}``, gradients, outcomes ``R_t``, then ``X_t``."""

    before: Snapshot
    grads: list[Tensor | None]
    outcomes: list[Outcome]
    after: Snapshot


class Trajectory:
    """The reference chain of one (case, precision), computed lazily.

    With ``keep_history`` every step's record is kept, so implementations run one after
    another replay it; without, only the latest record is kept (problems of a million
    elements), and the steps must be asked for in order.
    """

    def __init__(self, reference: Reference, keep_history: bool = True) -> None:
        self.reference = reference
        self.keep_history = keep_history
        self.records: dict[int, StepRecord] = {}
        self._computed = 0
        self._current = reference.start()

    def step(self, t: int) -> StepRecord:
        """The record of step ``t`` (1-based), computing the steps up to it on first use."""
        while self._computed < t:
            grads = self.reference.gradients(self._computed + 1)
            outcomes = self.reference.advance(self._current, grads)
            after = self.reference.commit(self._current, outcomes)
            self._computed += 1
            self.records[self._computed] = StepRecord(self._current, grads, outcomes, after)
            if not self.keep_history:
                self.records.pop(self._computed - 1, None)
            self._current = after
        if t not in self.records:
            raise ValueError(f"step {t} of this trajectory was dropped (keep_history=False); ask for steps in order")
        return self.records[t]
