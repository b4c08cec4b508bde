"""A param group's checked structure, kept between steps: the per-step host work of the front end.

Preparing a group's step (:meth:`portopt.Optimizer._prepare`) walks every parameter: its
gradient, its state, the checks of gradients and states, sparse and complex gradients, the
backend's choice. On a training run the answers are the same at every step, so after a step
whose group needed nothing special (no new states, no sparse or complex gradients, no master
weights, a backend step function that can check its own inputs cheaply) the group's structure is
recorded in a :class:`GroupCache`, and the next step only confirms it (:meth:`GroupCache.prepare`):

* the same parameter objects in ``group["params"]``, each with a gradient;
* the same state-dict objects, looked up in ``optimizer.state``;
* the same state-dict objects: looked up only when ``optimizer.state`` changed since (it is a
  :class:`VersionedState`, which counts its changes), else known;
* the same spec, precision policy and implementation mode, and valid hyperparameter values;
* each backend step function's plan takes the parameters, gradients and states unchanged
  (``prepare(..., only_if_planned=True)``: identities, and every tensor's dtype, device, shape and
  strides, checked by :class:`~portopt.lowering.input_snapshot.InputSnapshot`; a sparse, complex or
  reshaped gradient is a change): it returns its step, before any group is written.

Anything that differs takes the full path again, which checks everything and says what is wrong.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from operator import is_
from typing import TYPE_CHECKING, Any

from torch import Tensor

from portopt.lowering.backend import ParamState
from portopt.lowering.checks import check_hyperparameter_values
from portopt.optim import amp
from portopt.optim.groups import check_group_tuples, group_hypers
from portopt.optim.torch_flags import Mode
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import Spec

if TYPE_CHECKING:
    from portopt.optim.optimizer import Optimizer

Run = tuple[Callable[..., Any], list[int]]


def cacheable(item: amp.GroupStep, mode: Mode) -> bool:
    """Whether a prepared group step can be confirmed cheaply next time (module docstring)."""
    if item.fresh or item.after or mode.graph:
        return False
    if any(item.policy.needs_master(p.dtype) for p in item.params):
        return False
    return all(callable(getattr(step, "prepare", None)) for step, _ in item.runs)


class GroupCache:
    """One group's structure after a step that needed nothing special (module docstring)."""

    def __init__(self, group: Mapping[str, Any], item: amp.GroupStep, spec: Spec, mode: Mode) -> None:
        self.group_params = list(group["params"])
        self.params = item.params
        self.states = item.states
        self.spec = spec
        self.policy: PrecisionPolicy = item.policy
        self.precision = group.get("precision")
        self.mode = mode
        self.runs: list[Run] = item.runs
        self.numbers = item.numbers
        self.skip_nonfinite = item.skip_nonfinite
        self.policy_step = item.policy_step
        self.all_have_grads = len(item.params) == len(self.group_params)
        self.table: object = None
        self.version: int | None = None

    def prepare(
        self, optimizer: Optimizer, group: Mapping[str, Any], spec: Spec, mode: Mode, inputs: Mapping[str, Any]
    ) -> amp.GroupStep | None:
        """The group's step with each backend's prepared step, or ``None`` if anything changed; ``inputs``:
        the values of the spec's declared inputs given to this step."""
        members = group["params"]
        if not (self.all_have_grads and len(members) == len(self.group_params)):
            return None
        if not all(map(is_, members, self.group_params)):
            return None
        if spec is not self.spec or mode is not self.mode or group.get("precision") is not self.precision:
            return None
        if bool(group.get("skip_nonfinite", False)) is not self.skip_nonfinite:
            return None
        grads: list[Any] = [p.grad for p in self.params]
        if any(g is None for g in grads):  # (`None in grads` would call Tensor.__eq__)
            return None
        table = optimizer.state
        if table is not self.table or getattr(table, "version", None) != self.version:
            # optimizer.state changed (an entry added, replaced or removed): look each state up
            states: list[ParamState] = [table.get(p) for p in self.params]  # type: ignore[misc]
            if not all(map(is_, states, self.states)):
                return None
            self.table, self.version = table, getattr(table, "version", None)
        states = self.states
        hypers: dict[str, Any] = group_hypers(spec, group)
        hypers.update(inputs)
        check_group_tuples(spec, group)
        check_hyperparameter_values(spec, hypers)
        prepared = []
        for step, indices in self.runs:
            run = self._prepare_run(step, indices, grads, hypers)
            if run is None:  # the backend's plan does not take these inputs: the full path checks them
                return None
            prepared.append(run)
        return amp.GroupStep(
            spec,
            self.policy,
            self.params,
            grads,
            states,
            hypers,
            [],
            self.numbers,
            self.runs,
            self.policy_step,
            self.skip_nonfinite,
            prepared=prepared,
        )

    def _prepare_run(
        self, step: Callable[..., Any], indices: list[int], grads: Sequence[Tensor], hypers: dict[str, Any]
    ) -> Callable[[], None] | None:
        whole = len(indices) == len(self.params)
        params = self.params if whole else [self.params[i] for i in indices]
        these = list(grads) if whole else [grads[i] for i in indices]
        states = self.states if whole else [self.states[i] for i in indices]
        prepare = step.prepare  # type: ignore[attr-defined]
        if not self.policy_step:
            run: Callable[[], None] | None = prepare(params, these, states, hypers, only_if_planned=True)
            return run
        numbers = self.numbers if whole else [self.numbers[i] for i in indices]
        dtypes = [p.dtype for p in params]
        run = prepare(params, these, states, hypers, param_dtypes=dtypes, indices=numbers, only_if_planned=True)
        return run


class VersionedState(defaultdict):  # type: ignore[type-arg]
    """``optimizer.state`` (torch's ``defaultdict(dict)``) counting its changes in :attr:`version`, so
    that a step can tell without a lookup per parameter that no state dict was added, replaced or
    removed since its last step."""

    version: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.version = 0

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, key: Any, value: Any) -> None:
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._changed()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._changed()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._changed()
        return super().popitem()

    def clear(self) -> None:
        self._changed()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._changed()
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._changed()
        return super().setdefault(key, default)

    def __ior__(self, other: Any) -> VersionedState:  # type: ignore[misc]
        self._changed()
        super().__ior__(other)
        return self

    def __reduce__(self) -> Any:
        return (defaultdict, (self.default_factory,), None, None, iter(self.items()))


def versioned(table: Any) -> VersionedState:
    """``table`` (a state dict) as a :class:`VersionedState` holding the same entries."""
    if isinstance(table, VersionedState):
        return table
    factory = table.default_factory if isinstance(table, defaultdict) else dict
    return VersionedState(factory, table)
