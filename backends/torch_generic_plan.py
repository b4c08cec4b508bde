"""The generic backend's plans: a list of parameters stepped again and again, checked in full once.

A training run hands the generic backend the same parameters, state dicts and states at every step,
with gradients of the same dtype, shape and device. Checking all of them
(:func:`~portopt.lowering.checks.check_step_inputs`), bucketing them (device, dtypes, shape class,
step value) and reading every step counter costs microseconds per parameter and step. A
:class:`StepPlan` does that work once for a list of parameters:

* its **groups** are the buckets without the step value (the same device, dtypes and shape class):
  each with its parameters, state dicts and the lists of every state, ready for the executor;
* its **step counters** are the elements of one tensor
  (:class:`~portopt.lowering.step_counters.StepCounters`): one increment per step, one read of all
  the step values (parameters at different step values still get their own buckets);
* its **snapshot** (:class:`~portopt.lowering.input_snapshot.InputSnapshot`, one per shape class)
  records the objects and tensor properties the checks passed on.

:meth:`StepPlans.prepare` confirms a later call against the snapshot (identities, and each tensor's
dtype, device, shape and strides) and checks the hyperparameter values; anything else (a new
gradient dtype or shape, a state replaced, a parameter added) takes the full checks, which raise the
same error as on the first step and leave everything unchanged. A plan is built only for inputs seen
twice (a caller that hands in new objects at every step, such as the local pieces of sharded
parameters, keeps the unplanned step).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from portopt.lowering.backend import Hypers, ParamState, no_step, with_inputs
from portopt.lowering.checks import check_hyperparameter_values
from portopt.lowering.input_snapshot import InputSnapshot
from portopt.lowering.step_counters import StepCounters
from portopt.spec.definition import Spec

TensorList = list[Tensor]


@dataclass
class PlannedGroup:
    """Parameters of one plan that share device, dtypes and shape class (a bucket but for the step value)."""

    spec: Spec
    dtype: torch.dtype
    device: torch.device
    members: list[int] = field(default_factory=list)
    """Positions in the plan's parameter list."""
    params: TensorList = field(default_factory=list)
    states: list[ParamState] = field(default_factory=list)
    storage: dict[str | None, TensorList] = field(default_factory=dict)
    """Each state's tensors (``None``: the parameters), in member order."""
    numbers: list[int] = field(default_factory=list)
    whole: bool = False
    """Whether the members are the whole parameter list, in order (the caller's gradient list is the group's)."""
    flat: dict[str, Tensor] | None = None
    """For a group run flat (:func:`adopt_flat_states`): each state's one buffer, of which the states are views."""
    sizes: list[int] = field(default_factory=list)
    """A flat group's element counts, in member order."""
    vectors: bool = False
    """Whether a flat group's parameters are all 1-d (concatenated as they are)."""

    def select(self, ks: Sequence[int]) -> tuple[TensorList, list[ParamState], dict[str | None, TensorList], list[int]]:
        """The parameters, states, storage and numbers of members ``ks`` (positions within the group)."""
        storage = {name: [column[k] for k in ks] for name, column in self.storage.items()}
        return [self.params[k] for k in ks], [self.states[k] for k in ks], storage, [self.numbers[k] for k in ks]


class PlanOwner(Protocol):
    """What a plan asks of the step function that owns it (:class:`~portopt.backends.torch_generic.TorchStep`)."""

    spec: Spec
    per_tensor: bool

    def variant(self, param: Tensor) -> Spec: ...

    def flat_eligible(self, spec: Spec) -> bool: ...

    def state_names(self, spec: Spec) -> tuple[str, ...]: ...

    def bucket_key(
        self, param: Tensor, grad: Tensor, state: ParamState, spec: Spec
    ) -> tuple[tuple[object, ...], torch.dtype]: ...

    def run_group(
        self,
        group: PlannedGroup,
        t: float,
        grads: TensorList,
        members: Sequence[int] | None,
        hypers: Mapping[str, float],
    ) -> None: ...


def step_values(states: Sequence[ParamState]) -> list[float]:
    """Every state's step count as a Python float."""
    return [float(s["step"]) for s in states]


class StepPlan:
    """One list of parameters, planned (module docstring). Built after the full checks passed."""

    def __init__(
        self,
        owner: PlanOwner,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        numbers: Sequence[int] | None,
    ) -> None:
        self.counters = StepCounters(states) if StepCounters.can_adopt(states) else None
        if self.counters is not None:
            self.counters.adopt(states)
        self.states = list(states)
        self.numbers = None if numbers is None else list(numbers)
        count = len(params)
        groups: dict[tuple[object, ...], PlannedGroup] = {}
        classes: dict[Spec, list[int]] = {}
        for i, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
            spec = owner.variant(param)
            shared, dtype = owner.bucket_key(param, grad, state, spec)
            key = (*shared, i if owner.per_tensor else 0)
            group = groups.get(key)
            if group is None:
                group = groups[key] = PlannedGroup(spec, dtype, param.device)
                group.storage = {None: [], **{name: [] for name in owner.state_names(spec)}}
            group.members.append(i)
            group.params.append(param)
            group.states.append(state)
            group.numbers.append(i if numbers is None else numbers[i])
            for name, column in group.storage.items():
                column.append(param if name is None else state[name])
            classes.setdefault(spec, []).append(i)
        self.groups: list[PlannedGroup] = []
        for group in groups.values():
            if owner.flat_eligible(group.spec):
                self.groups += split_flat(group)
            else:
                self.groups.append(group)
        for group in self.groups:
            group.whole = group.members == list(range(count))
        self.snapshots: list[tuple[list[int] | None, InputSnapshot]] = []
        for spec, members in classes.items():
            if len(members) == count:
                self.snapshots.append((None, InputSnapshot(owner.state_names(spec), params, grads, states)))
            else:
                chosen = (
                    [params[i] for i in members],
                    [grads[i] for i in members],
                    [states[i] for i in members],
                )
                self.snapshots.append((members, InputSnapshot(owner.state_names(spec), *chosen)))

    def matches(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        numbers: Sequence[int] | None,
    ) -> bool:
        """Whether a call with these inputs can run on this plan unchecked (module docstring)."""
        if len(params) != len(self.states) or len(grads) != len(params) or len(states) != len(params):
            return False
        if numbers is not None and (self.numbers is None or list(numbers) != self.numbers):
            return False
        for members, snapshot in self.snapshots:
            if members is None:
                if not snapshot.matches(params, grads, states):
                    return False
            elif not snapshot.matches(
                [params[i] for i in members], [grads[i] for i in members], [states[i] for i in members]
            ):
                return False
        return True

    def run(self, owner: PlanOwner, grads: TensorList, hypers: Hypers) -> None:
        """The step: each group's buckets (one per step value), then every step counter incremented."""
        with torch.no_grad():
            values = with_inputs(owner.spec, hypers)
            host_hypers = {name: float(value) for name, value in values.items()}
            counts = self.counters.values() if self.counters is not None else step_values(self.states)
            uniform = counts.count(counts[0]) == len(counts)
            for group in self.groups:
                chosen = grads if group.whole else [grads[i] for i in group.members]
                if uniform:
                    owner.run_group(group, counts[0] + 1.0, chosen, None, host_hypers)
                    continue
                by_t: dict[float, list[int]] = {}
                for k, i in enumerate(group.members):
                    by_t.setdefault(counts[i], []).append(k)
                for count, ks in by_t.items():
                    owner.run_group(group, count + 1.0, [chosen[k] for k in ks], ks, host_hypers)
            if self.counters is not None:
                self.counters.increment()
            else:
                torch._foreach_add_([s["step"] for s in self.states], 1.0)


FLAT_MAX_NUMEL = 1024
"""The largest tensor a flat group takes: below it a foreach call's per-tensor cost exceeds the copies."""


def flat_member(param: Tensor, state: ParamState, names: Sequence[str]) -> bool:
    """Whether a parameter can join a flat group: small and contiguous, its states plain tensors of its shape."""
    if param.numel() > FLAT_MAX_NUMEL or not param.is_contiguous():
        return False
    return all(isinstance(state[n], Tensor) and state[n].shape == param.shape for n in names)


def split_flat(group: PlannedGroup) -> list[PlannedGroup]:
    """``group`` as a flat group of its small contiguous members (if there are two or more) and the rest."""
    names = [name for name in group.storage if name is not None]
    chosen = [k for k, (p, s) in enumerate(zip(group.params, group.states, strict=True)) if flat_member(p, s, names)]
    if len(chosen) < 2:
        return [group]
    rest = [k for k in range(len(group.members)) if k not in set(chosen)]
    parts = []
    for ks, flat in ((chosen, True), (rest, False)):
        if not ks:
            continue
        params, states, storage, numbers = group.select(ks)
        part = PlannedGroup(group.spec, group.dtype, group.device, [group.members[k] for k in ks], params, states)
        part.storage, part.numbers = storage, numbers
        if flat:
            part.flat = adopt_flat_states(part, names)
            part.sizes = [p.numel() for p in params]
            part.vectors = all(p.dim() == 1 for p in params)
        parts.append(part)
    return parts


def adopt_flat_states(group: PlannedGroup, names: Sequence[str]) -> dict[str, Tensor]:
    """Each state of ``group`` moved into one buffer per state name (values, dtype and device kept):
    ``state[name]`` becomes a view of it, so a flat step updates the states where they are."""
    sizes = [p.numel() for p in group.params]
    buffers: dict[str, Tensor] = {}
    for name in names:
        column = group.storage[name]
        buffer = torch.cat([x.reshape(-1) for x in column])
        views = [v.view(x.shape) for v, x in zip(buffer.split(sizes), column, strict=True)]
        for state, view in zip(group.states, views, strict=True):
            state[name] = view
        group.storage[name] = views
        buffers[name] = buffer
    return buffers


_MAX_PLANS = 8
"""Plans (parameter lists) a step function keeps: several param groups may share one step function."""


class StepPlans:
    """The plans of one step function, by parameter list (module docstring)."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple[int, int, int], StepPlan] = OrderedDict()
        self._seen: OrderedDict[tuple[int, int, int], tuple[Tensor, ParamState]] = OrderedDict()

    def prepare(
        self,
        owner: PlanOwner,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        numbers: Sequence[int] | None,
        only_if_planned: bool,
        check: Callable[[], None],
        unplanned: Callable[[], Callable[[], None]],
    ) -> Callable[[], None] | None:
        """The checked step of these inputs: a plan's, confirmed or built, or ``unplanned()``, after
        ``check()`` (every check of the inputs); with ``only_if_planned``, ``None`` unless a plan takes them
        as they are. ``numbers``: the parameters' numbers, where the step reads them (a plan keeps them)."""
        if not params:
            check()
            return no_step
        key = (len(params), id(params[0]), id(states[0]))
        plan = self._plans.get(key)
        if plan is not None and plan.matches(params, grads, states, numbers):
            check_hyperparameter_values(owner.spec, with_inputs(owner.spec, hypers))
            self._plans.move_to_end(key)
            return functools.partial(plan.run, owner, list(grads), hypers)
        if only_if_planned:
            return None
        check()
        if not (self._seen_before(key, params[0], states[0]) and all(states)):  # new states: created by the step
            return unplanned()
        self._plans.pop(key, None)
        with torch.no_grad():
            plan = StepPlan(owner, params, grads, states, numbers)
        self._plans[key] = plan
        while len(self._plans) > _MAX_PLANS:
            self._plans.popitem(last=False)
        return functools.partial(plan.run, owner, list(grads), hypers)

    def _seen_before(self, key: tuple[int, int, int], param: Tensor, state: ParamState) -> bool:
        """Whether a call began with these objects before (then it is likely to again: worth a plan)."""
        seen = self._seen.get(key)
        self._seen[key] = (param, state)
        self._seen.move_to_end(key)
        while len(self._seen) > _MAX_PLANS:
            self._seen.popitem(last=False)
        return seen is not None and seen[0] is param and seen[1] is state
