"""Implementations under test: portopt backends, torch.optim-style classes, bare step functions.

An :class:`Implementation` says whether it can run a case here (and if not, why), and
builds an :class:`Instance` that holds the problem's parameters, steps on a list of
gradients, and exposes its per-parameter state *in the spec's names* so that the runner
can compare it and re-sync it (lock-step).

* :class:`BackendImplementation`: any registered portopt backend, through the
  :class:`~portopt.lowering.backend.StepFunction` contract. Every backend in the
  registry is covered without being named here.
* :class:`OptimizerAdapter`: a ``torch.optim.Optimizer``-style class (torch.optim's own,
  portopt's front end, a vendor's) for one algorithm, with constructor flags
  (``fused=True``, ``foreach=False``, ...). Hyperparameters map to the class's arguments
  through the spec (``beta1`` is ``betas[0]``: :attr:`Hyperparameter.group_key`), spec
  options to keyword arguments of the same name (``amsgrad``, ``nesterov``, ``centered``,
  ``decoupled_weight_decay``, ``maximize``), and state names through ``state_names``
  (identity by default: the specs use torch.optim's names).
* :class:`OptimizerFamily`: a module with one such class per algorithm (``torch.optim``,
  ``portopt``, ``onnx.preview``: ONNX's preview-training ops), so ``--impl torch.optim`` covers
  every algorithm torch has.
* :class:`StepFunctionImplementation`: a callable ``build(spec) -> StepFunction`` (a fused
  kernel wrapped in the step-function contract).

:func:`parse_implementation` turns a command-line string into one of these:
``torch.optim``, ``torch.optim:fused=True``, ``portopt``, ``pkg.mod:Class@adamw:flag=1``,
``pkg.mod:build_fn@adam``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from portopt.algorithms import ALGORITHMS, REGISTRY
from portopt.conformance.cases import FOUND_INF, Case
from portopt.conformance.precision import Precision, frontend_accepts, policy_unavailable_reason
from portopt.lowering.backend import Backend, ParamState, StepFunction
from portopt.spec.definition import Spec

STEP = "step"
"""The step counter's key in a per-parameter state."""
MASTER = "master"
"""The front end's key of a parameter's float32 master copy (master weights)."""


class Instance(Protocol):
    """An implementation holding a problem's parameters."""

    params: list[Tensor]

    def step(self, grads: Sequence[Tensor | None]) -> None:
        """One optimizer step; ``None`` marks a parameter without a gradient."""

    def read_state(self, index: int) -> dict[str, Tensor]:
        """The state of parameter ``index`` in the spec's names (``"step"`` included when kept)."""

    def write_state(self, index: int, values: Mapping[str, Tensor]) -> None:
        """Overwrite the given entries of parameter ``index``'s state, keeping their dtype and device."""


@dataclass(frozen=True)
class Setup:
    """What an implementation needs to hold a problem: the case, its spec and precision, the
    parameters (``groups[i]`` is the param group of ``params[i]``) and each group's values."""

    case: Case
    spec: Spec
    precision: Precision
    params: list[Tensor]
    groups: list[int]
    group_hypers: Sequence[Mapping[str, float]]

    @property
    def skip_nonfinite(self) -> bool:
        """The case asks for a step with an inf/NaN gradient to be skipped whole."""
        return self.case.requires == FOUND_INF

    @property
    def needs_front_end(self) -> bool:
        """Master weights and skipped steps live in the front end, not in a step function."""
        return self.precision.needs_policy or self.skip_nonfinite

    def param_groups(self) -> list[dict[str, Any]]:
        """torch-style param groups (empty groups dropped)."""
        groups = [
            {
                "params": [p for p, grp in zip(self.params, self.groups, strict=True) if grp == g],
                **group_arguments(self.spec, h),
            }
            for g, h in enumerate(self.group_hypers)
        ]
        return [g for g in groups if g["params"]]


class Implementation(Protocol):
    """Something that computes an optimizer step and can be put under test."""

    @property
    def name(self) -> str:
        """The name reports use."""

    @property
    def requires_step_counter(self) -> bool:
        """Whether a missing ``"step"`` state is a failure (the step-function contract) or not (torch.optim.SGD)."""

    def unavailable_reason(self, case: Case, spec: Spec, precision: Precision, device: str) -> str | None:
        """Why this case cannot run on this implementation here, or ``None``."""

    def instantiate(self, setup: Setup) -> Instance:
        """An instance holding ``setup.params``."""


def front_end_reason(case: Case, precision: Precision) -> str | None:
    """Why the front end cannot run what ``case`` and ``precision`` ask beyond a step function."""
    if precision.needs_policy:
        reason = policy_unavailable_reason(precision)
        if reason:
            return reason
    if case.requires == FOUND_INF and not frontend_accepts("skip_nonfinite"):
        return "found_inf step skipping not available (issue 5): portopt.Optimizer has no skip_nonfinite"
    return None


def device_type_of(device: str) -> str:
    """The device type of a device string (``"npu:1"`` -> ``"npu"``), without asking torch: torch parses
    ``"npu"`` only once torch_npu is imported."""
    return device.split(":", 1)[0].strip()


def device_unavailable_reason(device: str) -> str | None:
    """Why ``device`` cannot be used here, or ``None``."""
    from portopt.backends import device_unavailable_reason as type_reason

    reason = type_reason(device_type_of(device))  # imports a vendor device package (torch_npu) first
    if reason is not None:
        return reason
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        return f"invalid device {device!r}: {exc}"
    index: int | None = dev.index
    if index is None:
        return None
    module: Any = getattr(torch, dev.type, None)
    count = int(getattr(module, "device_count", lambda: 1)())
    if index >= count:
        return f"device {device} does not exist: {count} {dev.type} device(s) here"
    return None


def _overwrite(old: Tensor | None, value: Tensor) -> Tensor:
    """``old`` overwritten in place with ``value`` (its dtype, device, strides and identity kept:
    an implementation may hold on to its state tensors), or a fresh copy of ``value``."""
    if old is not None and tuple(old.shape) == tuple(value.shape):
        with torch.no_grad():
            old.copy_(value)
        return old
    return value.detach().clone()


class StepFunctionInstance:
    """Parameters and torch-style states driven by a step function, one call per param group."""

    def __init__(
        self,
        step_fn: StepFunction,
        params: list[Tensor],
        groups: list[int],
        group_hypers: Sequence[Mapping[str, float]],
    ) -> None:
        self.step_fn = step_fn
        self.params = params
        self.groups = groups
        self.group_hypers = group_hypers
        self.states: list[ParamState] = [{} for _ in params]

    def step(self, grads: Sequence[Tensor | None]) -> None:
        for g, hypers in enumerate(self.group_hypers):
            idx = [i for i, grp in enumerate(self.groups) if grp == g and grads[i] is not None]
            if not idx:
                continue
            self.step_fn(
                [self.params[i] for i in idx],
                [grads[i] for i in idx],  # type: ignore[misc]  # None filtered above
                [self.states[i] for i in idx],
                hypers,
            )

    def read_state(self, index: int) -> dict[str, Tensor]:
        return dict(self.states[index])

    def write_state(self, index: int, values: Mapping[str, Tensor]) -> None:
        state = self.states[index]
        for name, value in values.items():
            state[name] = _overwrite(state.get(name), value)


@dataclass(frozen=True)
class BackendImplementation:
    """A registered portopt backend."""

    backend: Backend
    requires_step_counter: bool = True

    @property
    def name(self) -> str:
        label = self.backend.label
        return f"{self.backend.name} ({label})" if label else self.backend.name

    def unavailable_reason(self, case: Case, spec: Spec, precision: Precision, device: str) -> str | None:
        reason = self.backend.unavailable_reason()
        if reason:
            return f"backend {self.backend.name} unavailable: {reason}"
        dev_type = device_type_of(device)
        if dev_type not in self.backend.device_types:
            return f"backend {self.backend.name} does not run on {dev_type} (runs on: {', '.join(self.backend.device_types)})"
        unsupported = self.backend.unsupported_reason(spec)
        if unsupported is not None:
            return f"backend {self.backend.name} does not lower this spec: {unsupported}"
        # A backend without build_with_policy still serves master-weight precisions: the front
        # end steps the fp32 master with it (it refuses, with a PolicyError, what it cannot serve).
        return device_unavailable_reason(device) or front_end_reason(case, precision)

    def instantiate(self, setup: Setup) -> Instance:
        if setup.needs_front_end:
            return front_end_instance(setup, backend=self.backend.name)
        return StepFunctionInstance(self.backend.build(setup.spec), setup.params, setup.groups, setup.group_hypers)


def front_end_instance(setup: Setup, backend: str) -> Instance:
    """``portopt.Optimizer`` on ``backend`` with the precision policy and step skipping the setup asks."""
    import portopt

    kwargs: dict[str, Any] = {"backend": backend}
    if setup.precision.needs_policy:
        kwargs["precision"] = setup.precision.policy
    if setup.skip_nonfinite:
        kwargs["skip_nonfinite"] = True
    optimizer = portopt.Optimizer(setup.param_groups(), setup.spec, **kwargs)
    return OptimizerInstance(optimizer, setup.params, {})


@dataclass(frozen=True)
class UnloadableBackend:
    """A backend whose entry point failed to load: every case is skipped with the reason."""

    name: str
    reason: str
    requires_step_counter: bool = True

    def unavailable_reason(self, case: Case, spec: Spec, precision: Precision, device: str) -> str | None:
        return f"backend {self.name} unavailable: {self.reason}"

    def instantiate(self, setup: Setup) -> Instance:
        raise NotImplementedError(self.reason)


@dataclass(frozen=True)
class StepFunctionImplementation:
    """A ``build(spec) -> StepFunction`` callable (for example a fused kernel), optionally for one algorithm."""

    name: str
    build: Callable[[Spec], StepFunction]
    algorithm: str | None = None
    requires_step_counter: bool = True

    def unavailable_reason(self, case: Case, spec: Spec, precision: Precision, device: str) -> str | None:
        if self.algorithm is not None and case.algorithm != self.algorithm:
            return f"{self.name} implements {self.algorithm}, not {case.algorithm}"
        if precision.needs_policy or case.requires == FOUND_INF:
            return f"{self.name} is a bare step function: no master weights, no skipped steps"
        return device_unavailable_reason(device)

    def instantiate(self, setup: Setup) -> Instance:
        return StepFunctionInstance(self.build(setup.spec), setup.params, setup.groups, setup.group_hypers)


class OptimizerInstance:
    """A torch.optim-style optimizer over the problem's parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[Tensor], state_names: Mapping[str, str]) -> None:
        self.optimizer = optimizer
        self.params = params
        self.state_names = state_names

    def _theirs(self, ours: str) -> str:
        return self.state_names.get(ours, ours)

    def step(self, grads: Sequence[Tensor | None]) -> None:
        for param, grad in zip(self.params, grads, strict=True):
            param.grad = grad
        self.optimizer.step()

    def read_state(self, index: int) -> dict[str, Tensor]:
        state = self.optimizer.state.get(self.params[index], {})
        reverse = {theirs: ours for ours, theirs in self.state_names.items()}
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            if isinstance(value, (int, float)):
                value = torch.tensor(float(value))
            if isinstance(value, Tensor):
                out[reverse.get(key, key)] = value
        return out

    def write_state(self, index: int, values: Mapping[str, Tensor]) -> None:
        state = self.optimizer.state[self.params[index]]
        for ours, value in values.items():
            key = self._theirs(ours)
            old = state.get(key)
            state[key] = _overwrite(old if isinstance(old, Tensor) else None, value)


IMPLIED_BY_HYPERPARAMETER: dict[str, str] = {"momentum": "momentum"}
"""Spec options that torch-style classes express by a hyperparameter's value (momentum != 0)."""


class _Anything(set[str]):
    """The accepted arguments of a callable taking ``**kwargs``: every name."""

    def __contains__(self, name: object) -> bool:
        return True


def _accepted_arguments(cls: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return _Anything(params)
    return set(params)


def _factory_defaults(algorithm: str) -> dict[str, object]:
    params = inspect.signature(ALGORITHMS[algorithm]).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def group_arguments(spec: Spec, hypers: Mapping[str, float]) -> dict[str, Any]:
    """A torch-style param group's entries for ``hypers``: ``beta1``, ``beta2`` become ``betas``."""
    out: dict[str, Any] = {}
    tuples: dict[str, dict[int, float]] = {}
    for h in spec.hyperparameters:
        if h.name not in hypers:
            continue
        if h.group_index is None:
            out[h.key] = hypers[h.name]
        else:
            tuples.setdefault(h.key, {})[h.group_index] = hypers[h.name]
    for key, items in tuples.items():
        out[key] = tuple(items.get(i) for i in range(max(items) + 1))  # an unread entry is None (Adafactor's eps)
    return out


@dataclass(frozen=True)
class OptimizerAdapter:
    """A torch.optim-style class put under test as ``algorithm``."""

    algorithm: str
    cls: Callable[..., torch.optim.Optimizer]
    flags: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    state_names: Mapping[str, str] = field(default_factory=dict)
    requires_step_counter: bool = False

    @property
    def name(self) -> str:
        base = self.label or f"{self.cls.__module__}.{getattr(self.cls, '__qualname__', repr(self.cls))}"
        flags = ", ".join(f"{k}={v!r}" for k, v in self.flags.items())
        return f"{base}({flags})" if flags else base

    def unavailable_reason(self, case: Case, spec: Spec, precision: Precision, device: str) -> str | None:
        if case.algorithm != self.algorithm:
            return f"{self.name} implements {self.algorithm}, not {case.algorithm}"
        accepted = _accepted_arguments(self.cls)
        for flag in self.flags:
            if flag not in accepted:
                return f"{self.name} has no argument {flag!r}"
        defaults = _factory_defaults(case.algorithm)
        for option, value in case.options:
            if option in IMPLIED_BY_HYPERPARAMETER:
                if value or defaults.get(option) == value:
                    continue
            elif option in accepted:
                continue
            if defaults.get(option) != value:
                return f"{self.name} has no option {option!r} (the case uses {option}={value})"
        if case.maximize and "maximize" not in accepted:
            return f"{self.name} has no maximize option"
        for key in group_arguments(spec, spec.defaults()):
            if key not in accepted:
                return f"{self.name} has no hyperparameter {key!r}"
        if precision.needs_policy and "precision" not in accepted:
            return f"{self.name} has no precision policy (master weights), which {precision.name} needs"
        if case.requires == FOUND_INF and "skip_nonfinite" not in accepted:
            return f"{self.name} has no skip_nonfinite (skipping a step with inf/NaN gradients)"
        return device_unavailable_reason(device) or front_end_reason(case, precision)

    def instantiate(self, setup: Setup) -> Instance:
        accepted = _accepted_arguments(self.cls)
        case, spec = setup.case, setup.spec
        # The first group's values also go to the constructor: some classes read a
        # hyperparameter only there (torch.optim.Adagrad's initial_accumulator_value).
        kwargs: dict[str, Any] = {
            k: v for k, v in group_arguments(spec, setup.group_hypers[0]).items() if k in accepted
        }
        kwargs.update(self.flags)
        kwargs.update({k: v for k, v in case.options if k in accepted and k not in IMPLIED_BY_HYPERPARAMETER})
        if case.maximize:
            kwargs["maximize"] = True
        if setup.precision.needs_policy:
            kwargs["precision"] = setup.precision.policy
        if setup.skip_nonfinite:
            kwargs["skip_nonfinite"] = True
        optimizer = self.cls(setup.param_groups(), **kwargs)
        return OptimizerInstance(optimizer, setup.params, self.state_names)


def _torch_optim_classes() -> dict[str, str]:
    import torch.optim

    return {a.name: a.torch_class for a in REGISTRY.values() if a.torch_class and hasattr(torch.optim, a.torch_class)}


TORCH_OPTIM_CLASSES: dict[str, str] = _torch_optim_classes()
"""torch.optim's class for each of our algorithms that torch has (the registry's ``torch_class``, where this
torch provides it: torch.optim.Adafactor is new in torch 2.5)."""
PORTOPT_CLASSES: dict[str, str] = {a.name: a.class_name for a in REGISTRY.values() if a.class_name}


@dataclass(frozen=True)
class OptimizerFamily:
    """A module with one torch.optim-style class per algorithm, with shared flags."""

    module: str
    class_names: Mapping[str, str]
    flags: Mapping[str, Any] = field(default_factory=dict)
    requires_step_counter: bool = False

    @property
    def name(self) -> str:
        flags = ", ".join(f"{k}={v!r}" for k, v in self.flags.items())
        return f"{self.module}({flags})" if flags else self.module

    def adapter(self, algorithm: str) -> OptimizerAdapter | str:
        """The adapter for ``algorithm``, or why there is none."""
        class_name = self.class_names.get(algorithm)
        try:
            module = importlib.import_module(MODULE_ALIASES.get(self.module, self.module))
        except ImportError as exc:
            return f"cannot import {self.module}: {exc}"
        cls = getattr(module, class_name, None) if class_name else None
        if cls is None:
            return f"{self.module} has no {algorithm} optimizer"
        return OptimizerAdapter(
            algorithm, cls, self.flags, label=f"{self.module}.{class_name}", requires_step_counter=False
        )

    def unavailable_reason(self, case: Case, spec: Spec, precision: Precision, device: str) -> str | None:
        adapter = self.adapter(case.algorithm)
        if isinstance(adapter, str):
            return adapter
        return adapter.unavailable_reason(case, spec, precision, device)

    def instantiate(self, setup: Setup) -> Instance:
        adapter = self.adapter(setup.case.algorithm)
        if isinstance(adapter, str):
            raise ValueError(adapter)
        return adapter.instantiate(setup)


ONNX_PREVIEW_CLASSES: dict[str, str] = {"adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad", "sgd": "Momentum"}
"""ONNX's preview-training ops (:mod:`portopt.conformance.onnx_preview`) for the algorithms they compute."""
FAMILIES: dict[str, Mapping[str, str]] = {
    "torch.optim": TORCH_OPTIM_CLASSES,
    "portopt": PORTOPT_CLASSES,
    "onnx.preview": ONNX_PREVIEW_CLASSES,
}
MODULE_ALIASES: dict[str, str] = {"onnx.preview": "portopt.conformance.onnx_preview"}
"""Short module names accepted by ``--impl`` (``onnx.preview:Adam@adam``)."""


def _parse_flags(text: str) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(f"flag {item!r} must look like name=value (e.g. fused=True)")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            flags[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            flags[key] = raw
    return flags


def parse_implementation(text: str) -> Implementation:
    """An implementation from its command-line form.

    * ``torch.optim`` or ``portopt`` (optionally ``:flag=value,...``): the class of each
      algorithm in that module;
    * ``pkg.module:Name@algorithm`` (optionally ``:flag=value,...``): ``Name`` is a
      torch.optim-style class, or a callable ``build(spec) -> StepFunction``.
    """
    head, _, flag_text = text.partition(":") if "@" not in text else (text, "", "")
    if head in FAMILIES:
        return OptimizerFamily(head, FAMILIES[head], _parse_flags(flag_text))
    module_name, sep, rest = text.partition(":")
    if not sep or "@" not in rest:
        raise ValueError(
            f"cannot read implementation {text!r}; use 'torch.optim', 'torch.optim:fused=True', 'portopt', "
            "or 'package.module:Name@algorithm[:flag=value,...]'"
        )
    target, _, tail = rest.partition("@")
    algorithm, _, flag_text = tail.partition(":")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r} in {text!r}; known: {', '.join(sorted(ALGORITHMS))}")
    try:
        obj = getattr(importlib.import_module(MODULE_ALIASES.get(module_name, module_name)), target)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {module_name}:{target}: {exc}") from None
    flags = _parse_flags(flag_text)
    if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer):
        return OptimizerAdapter(algorithm, obj, flags, label=f"{module_name}.{target}")
    if flags:
        raise ValueError(f"{text!r}: flags are only for optimizer classes; {target} is a step-function builder")
    return StepFunctionImplementation(f"{module_name}.{target}", obj, algorithm)
