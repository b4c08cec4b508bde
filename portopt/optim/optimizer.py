"""``portopt.Optimizer``: any spec as a real :class:`torch.optim.Optimizer`.

::

    opt = portopt.Optimizer(model.parameters(), portopt.algorithms.adam(amsgrad=True), lr=1e-3, betas=(0.9, 0.99))

Hyperparameters live in the param groups under their torch-style keys (``lr``,
``betas``, ``eps``, ...; a name such as ``beta1=0.5`` is accepted too and stored as
``betas[0]``), so param groups, LR schedulers, ``zero_grad``, closures and step hooks
behave as in torch.optim, and values are read at every step. ``maximize=True`` ascends
the objective (``g → −g``).

A step first checks every group (hyperparameters, gradients, states), so a bad input
raises before anything is written; then each group is handed to the backend chosen
for its device (``backend="auto"``: the best usable one, see
:func:`portopt.backends.select_backend`). Parameters without a gradient are skipped:
their state and step counter stay as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, overload

import torch
from torch import Tensor

from portopt import backends
from portopt.algorithms import get_spec
from portopt.lowering.backend import Backend, ParamState, StepFunction, step_counter_dtype
from portopt.lowering.checks import check_step_inputs
from portopt.optim import state_dict as checkpoint
from portopt.optim.groups import check_group_values, check_known, fold_names, group_hypers, spec_defaults
from portopt.spec.definition import Spec
from portopt.spec.ops import Op
from portopt.spec.symbols import Layout

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


class Optimizer(torch.optim.Optimizer):
    """Run ``spec`` as a torch.optim optimizer.

    Args:
        params: parameters or param groups, as for any torch.optim optimizer.
        spec: a :class:`~portopt.spec.Spec`, or the name of one in :mod:`portopt.algorithms`.
        backend: ``"auto"`` (the best usable backend for each parameter's device) or a
            registered backend's name (``"torch"``, ``"reference"``, ...).
        maximize: ascend the objective instead of descending it.
        **hyperparameters: values by torch-style key (``betas=(0.9, 0.99)``) or by name
            (``beta1=0.9``); the rest take the spec's defaults.
    """

    option_defaults: ClassVar[dict[str, Any]] = {"maximize": False}
    """Structural options of a param group and their defaults (filled into old checkpoints)."""
    forced_options: ClassVar[dict[str, Any]] = {}
    """Options a class always has, whatever a loaded checkpoint says (AdamW's decoupled decay)."""
    check_order: ClassVar[tuple[str, ...]] = ()
    """Hyperparameter names in the order torch.optim checks them (which error comes first)."""
    torch_keeps_step: ClassVar[bool] = True
    """False where torch.optim keeps no ``step`` (SGD): a checkpoint without one is accepted."""
    eager_state: ClassVar[bool] = False
    """Create states when parameters are added, as torch.optim.Adagrad does."""

    def __init__(
        self,
        params: ParamsT,
        spec: Spec | str,
        backend: str = "auto",
        *,
        maximize: bool = False,
        **hyperparameters: Any,
    ) -> None:
        base = get_spec(spec) if isinstance(spec, str) else spec
        if not isinstance(base, Spec):
            raise TypeError(f"spec must be a portopt Spec or an algorithm name, got {type(spec).__name__}")
        check_known(base, hyperparameters)
        defaults = spec_defaults(base)
        fold_names(base, hyperparameters, defaults)
        defaults.update(hyperparameters)
        defaults["maximize"] = maximize
        self._fixed_spec = base
        self._setup(params, defaults, backend)

    # configuration -------------------------------------------------------------------
    def _setup(self, params: ParamsT, defaults: dict[str, Any], backend: str) -> None:
        """Check ``defaults`` as torch does (before building groups), then build the groups."""
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or 'auto', got {backend!r}")
        self.backend = backend
        self._reset_caches()
        self.check_group(defaults)
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._step_functions: dict[tuple[str, Spec], StepFunction] = {}

    def base_spec(self, group: Mapping[str, Any]) -> Spec:
        """The spec of a param group before ``maximize`` (named classes choose it by options)."""
        return self._fixed_spec

    def group_spec(self, group: Mapping[str, Any]) -> Spec:
        """The spec a param group runs: :meth:`base_spec`, maximized if ``group["maximize"]``."""
        base = self.base_spec(group)
        return _maximized(base) if group.get("maximize", False) else base

    def check_group(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` (torch's wording) for an invalid value or option in ``group``."""
        check_group_values(self.base_spec(group), group, self.check_order)

    # param groups --------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its values are checked first (torch.optim checks only the defaults)."""
        spec = self.base_spec({**self.defaults, **param_group})
        fold_names(spec, param_group, self.defaults)
        self.check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        if self.eager_state:
            group = self.param_groups[-1]
            for param in group["params"]:
                if not self.state.get(param):
                    self.state[param] = eager_state(self.base_spec(group), group, param)

    # the step ------------------------------------------------------------------------
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimization step over every param group (all groups checked before any is written)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [self._prepare(group) for group in self.param_groups]
        for spec, params, grads, states, hypers, fresh in work:
            for indices, device in _by_device(params):
                step = self._step_function(spec, device)
                step(
                    [params[i] for i in indices],
                    [grads[i] for i in indices],
                    [states[i] for i in indices],
                    hypers,
                )
            for param, state in fresh:
                self.state[param] = state
        return loss

    def _prepare(
        self, group: Mapping[str, Any]
    ) -> tuple[Spec, list[Tensor], list[Tensor], list[ParamState], dict[str, Any], list[tuple[Tensor, ParamState]]]:
        spec = self.group_spec(group)
        hypers = group_hypers(spec, group)
        params: list[Tensor] = []
        grads: list[Tensor] = []
        states: list[ParamState] = []
        fresh: list[tuple[Tensor, ParamState]] = []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state.get(param)
            if state is None:  # registered only once the step succeeded
                state = {}
                fresh.append((param, state))
            params.append(param)
            grads.append(param.grad)
            states.append(state)
        check_step_inputs(spec, params, grads, states, hypers)
        return spec, params, grads, states, hypers, fresh

    def _step_function(self, spec: Spec, device: torch.device) -> StepFunction:
        backend = self._backends.get(device.type)
        if backend is None:
            backend = self._backends[device.type] = backends.select_backend(device, self.backend)
        key = (backend.name, spec)
        step = self._step_functions.get(key)
        if step is None:
            step = self._step_functions[key] = backend.build(spec)
        return step

    # checkpoints ---------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this algorithm (from portopt or torch.optim), checked before anything changes.

        State names and layout are torch.optim's; each state is moved to its parameter's
        device and keeps its dtype (torch.optim would cast it to the parameter's dtype);
        ``step`` is kept on the host. A checkpoint of another algorithm or option set,
        or with other group sizes or state shapes, raises ``ValueError`` and changes nothing.
        """
        checkpoint.load(self, state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "backend"):
            self.backend = "auto"
        for group in self.param_groups:
            for key, value in self.option_defaults.items():
                group.setdefault(key, value)
            group.update(self.forced_options)
        self._reset_caches()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["backend"] = self.backend
        if hasattr(self, "_fixed_spec"):
            state["_fixed_spec"] = self._fixed_spec
        return state


@functools.lru_cache(maxsize=256)
def _maximized(spec: Spec) -> Spec:
    return spec.maximized()


def _by_device(params: list[Tensor]) -> list[tuple[list[int], torch.device]]:
    if not params:
        return []
    first = params[0].device
    if all(p.device == first for p in params):
        return [(list(range(len(params))), first)]
    groups: dict[torch.device, list[int]] = {}
    for index, p in enumerate(params):
        groups.setdefault(p.device, []).append(index)
    return [(indices, device) for device, indices in groups.items()]


def eager_state(spec: Spec, group: Mapping[str, Any], param: Tensor) -> dict[str, Tensor]:
    """States before any step, as torch.optim.Adagrad creates them (``step`` = 0).

    Only for specs whose initial states are constants or hyperparameters.
    """
    hypers = group_hypers(spec, group)
    state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=step_counter_dtype())}
    for decl in spec.states:
        init = decl.init
        if init.op is Op.CONST:
            value = float(init.value or 0.0)
        elif init.op is Op.HYPER:
            value = float(hypers[str(init.value)])
        else:
            raise ValueError(f"{spec.name}: state {decl.name!r} starts from p or g and cannot be created before a step")
        if decl.layout is not Layout.ELEMENTWISE:
            raise ValueError(f"{spec.name}: eager creation supports element-wise states, not {decl.name!r}")
        state[decl.name] = torch.full_like(param, value, memory_format=torch.preserve_format).detach()
    return state
