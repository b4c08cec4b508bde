"""``portopt.Optimizer``: any spec as a real :class:`torch.optim.Optimizer`.

::

    opt = portopt.Optimizer(model.parameters(), portopt.algorithms.adam(amsgrad=True), lr=1e-3, betas=(0.9, 0.99))

Hyperparameters live in the param groups under their torch-style keys (``lr``,
``betas``, ``eps``, ...; a name such as ``beta1=0.5`` is accepted too and stored as
``betas[0]``), so param groups, LR schedulers, ``zero_grad``, closures and step hooks
behave as in torch.optim, and values are read at every step. ``maximize=True`` ascends
the objective (``g → −g``).

A step first checks every group (hyperparameters, gradients, states, precision policy)
and chooses its step functions, so a bad input raises before anything is written; then
each group is handed to the backend chosen for its device (``backend="auto"``: the best
usable one, see :func:`portopt.backends.select_backend`). Parameters without a gradient
are skipped: their state and step counter stay as they are.

Precision (:mod:`portopt.optim.amp`, :mod:`portopt.precision`): ``precision=`` (per param
group, like any hyperparameter) chooses master weights and the storage of each state
(``"mixed-bf16"``, ``"q8-states"``, ``"mixed-fp16,exp_avg_sq=bf16"``, a
:class:`~portopt.precision.policy.PrecisionPolicy`, ...; ``None``: torch.optim's
behaviour). ``torch.amp.GradScaler`` unscales inside the step (also for float16
gradients) and an overflowing step is skipped whole; ``skip_nonfinite=True`` skips a step
with an inf/NaN gradient without a GradScaler (``last_step_skipped`` tells).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, overload

import torch
from torch import Tensor

from portopt import backends
from portopt.algorithms import get_spec
from portopt.lowering.backend import Backend, ParamState, step_counter_dtype
from portopt.lowering.checks import check_step_inputs
from portopt.optim import amp
from portopt.optim import state_dict as checkpoint
from portopt.optim.groups import check_group_values, check_known, fold_names, group_hypers, spec_defaults
from portopt.precision.policy import PrecisionPolicy
from portopt.precision.scaling import LossScaling
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
        precision: a precision policy (module doc); ``None``: torch.optim's behaviour.
        skip_nonfinite: skip a step (change nothing) when a gradient is inf or NaN.
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
    _step_supports_amp_scaling: ClassVar[bool] = True
    """GradScaler hands ``grad_scale``/``found_inf`` to the step instead of unscaling (:mod:`portopt.optim.amp`)."""
    last_step_skipped: bool = False
    """Whether the last call of :meth:`step` was skipped (GradScaler's ``found_inf``, or ``skip_nonfinite``)."""

    def __init__(
        self,
        params: ParamsT,
        spec: Spec | str,
        backend: str = "auto",
        *,
        maximize: bool = False,
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
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
        self._setup(params, defaults, backend, precision, skip_nonfinite)

    # configuration -------------------------------------------------------------------
    def _setup(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        backend: str,
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        """Check ``defaults`` as torch does (before building groups), then build the groups.

        ``precision`` and ``skip_nonfinite`` enter the defaults only when they are not the
        defaults, so that a plain optimizer's param groups are torch.optim's.
        """
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or 'auto', got {backend!r}")
        self.backend = backend
        self._reset_caches()
        policy = amp.group_value(precision)
        if policy is not None:
            defaults["precision"] = policy
        if skip_nonfinite is not False:
            defaults["skip_nonfinite"] = skip_nonfinite
        self.check_group(defaults)
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        self._backends: dict[tuple[Any, ...], Backend] = {}
        self._step_functions: dict[tuple[str, Spec, PrecisionPolicy | None], Callable[..., None]] = {}
        self._policies: dict[int, PrecisionPolicy] = {}
        self._auto_thresholds: set[int] | None = None

    def base_spec(self, group: Mapping[str, Any]) -> Spec:
        """The spec of a param group before ``maximize`` (named classes choose it by options)."""
        return self._fixed_spec

    def group_spec(self, group: Mapping[str, Any]) -> Spec:
        """The spec a param group runs: :meth:`base_spec`, maximized if ``group["maximize"]``."""
        base = self.base_spec(group)
        return _maximized(base) if group.get("maximize", False) else base

    def check_group(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` (torch's wording) for an invalid value or option in ``group``."""
        spec = self.base_spec(group)
        check_group_values(spec, group, self.check_order)
        amp.check_group_precision(spec, group)
        if self.backend != "auto":  # a named backend must lower the group's spec (devices are checked per step)
            reason = backends.named_backend(self.backend).unsupported_reason(self.group_spec(group))
            if reason is not None:
                raise ValueError(f"backend {self.backend!r} cannot run this param group: {reason}")

    # param groups --------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its values are checked first (torch.optim checks only the defaults)."""
        spec = self.base_spec({**self.defaults, **param_group})
        fold_names(spec, param_group, self.defaults)
        if "precision" in param_group:
            param_group["precision"] = amp.group_value(param_group["precision"])
        self.check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            amp.check_params(
                amp.resolve(group.get("precision")), group["params"], f"param group {len(self.param_groups) - 1}"
            )
        except ValueError:
            self.param_groups.pop()  # not added after all
            raise
        if self.eager_state:
            for param in group["params"]:
                if not self.state.get(param):
                    self.state[param] = eager_state(self.base_spec(group), group, param)

    # the step ------------------------------------------------------------------------
    @overload
    def step(self, closure: None = None, **inputs: float | Tensor) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], **inputs: float | Tensor) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, **inputs: float | Tensor) -> float | None:
        """One optimization step over every param group (all groups checked before any is written).

        ``inputs`` are the values of the spec's declared extra inputs for this step (SophiaG's
        ``bs=``); an input not given takes its declared default.
        """
        self._check_inputs(inputs)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[amp.GroupStep] = []
        offset = 0
        for index, group in enumerate(self.param_groups):
            work.append(self._prepare(group, index, offset, inputs))
            offset += len(group["params"])
        scaling = LossScaling.of(self)
        self.last_step_skipped = amp.should_skip(work, scaling)
        if self.last_step_skipped:
            return loss
        for index, (group, item) in enumerate(zip(self.param_groups, work, strict=True)):
            if self._policies.get(index) is not item.policy:  # first step, or the group's policy changed
                amp.drop_stale_masters(item.policy, [self.state.get(p) for p in group["params"]], group["params"])
                self._policies[index] = item.policy
            if item.policy is amp.DEFAULT and scaling.grad_scale is None:
                item.run_plain()
            else:
                amp.run_group(item, scaling)
            for param, state in item.fresh:
                self.state[param] = state
        return loss

    def _check_inputs(self, inputs: Mapping[str, object]) -> None:
        if not inputs:
            return
        declared = {name for group in self.param_groups for name in self.group_spec(group).input_names}
        unknown = sorted(set(inputs) - declared)
        if unknown:
            raise TypeError(
                f"step() got unexpected input(s) {', '.join(map(repr, unknown))}; this optimizer's inputs: "
                f"{', '.join(sorted(declared)) or 'none'}"
            )

    def _prepare(
        self, group: Mapping[str, Any], index: int, offset: int, inputs: Mapping[str, Any] | None = None
    ) -> amp.GroupStep:
        """Check one group and choose its step functions; nothing is written."""
        spec = self.group_spec(group)
        hypers: dict[str, Any] = group_hypers(spec, group)
        hypers.update({k: v for k, v in (inputs or {}).items() if k in spec.input_names})
        policy = amp.resolve(group.get("precision"))
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
        plain = policy is amp.DEFAULT
        check_step_inputs(spec, params, grads, states, hypers, allow_quantized=not plain)
        numbers: list[int] = []  # optimizer-wide parameter numbers: the noise keys of stochastic rounding
        if not plain:
            amp.check_params(policy, params, f"param group {index}")
            numbers = [offset + i for i, p in enumerate(group["params"]) if p.grad is not None]
        policy_step = amp.needs_policy_backend(policy, spec, params, states)
        runs = [
            (self._step_function(spec, device, policy if policy_step else None, numel), indices)
            for indices, device, numel in _by_device(params)
        ]
        skip = bool(group.get("skip_nonfinite", False))
        return amp.GroupStep(spec, policy, params, grads, states, hypers, fresh, numbers, runs, policy_step, skip)

    def _step_function(
        self, spec: Spec, device: torch.device, policy: PrecisionPolicy | None = None, numel: int = 0
    ) -> Callable[..., None]:
        """The step function for ``spec`` on ``device`` for a group of ``numel`` elements there; with a
        ``policy``, one that stores states as it says."""
        backend = self._backend_for(spec, device, numel, policy)
        key = (backend.name, spec, policy)
        step = self._step_functions.get(key)
        if step is None:
            if policy is None:
                step = backend.build(spec)
            else:
                assert backend.build_with_policy is not None
                step = backend.build_with_policy(spec, policy)
            self._step_functions[key] = step
        return step

    def chosen_backends(self) -> list[dict[str, str]]:
        """Per param group, the backend that steps it on each device, e.g. ``[{"cpu": "torch_fused"}]``.

        As a step with a gradient for every parameter chooses: ``backend="auto"`` decides per
        spec, device and number of elements (a torch fused kernel proven equivalent to the
        spec, else the compiled kernel for groups large enough to repay compiling, else the
        generic torch backend); a precision policy storing states other than torch does moves
        to a backend that can.
        """
        chosen = []
        for group in self.param_groups:
            spec = self.group_spec(group)
            policy = amp.resolve(group.get("precision"))
            params = list(group["params"])
            needs_policy = amp.needs_policy_backend(policy, spec, params, [self.state.get(p, {}) for p in params])
            chosen.append(
                {
                    str(device): self._backend_for(spec, device, numel, policy if needs_policy else None).name
                    for _, device, numel in _by_device(params)
                }
            )
        return chosen

    def _backend_for(
        self, spec: Spec, device: torch.device, numel: int, policy: PrecisionPolicy | None = None
    ) -> Backend:
        """The backend chosen (``self.backend``, or ``"auto"``'s choice for this spec and group size);
        with a ``policy``, one that can store states as it says."""
        backend = self._selected(spec, device, numel)
        if policy is None or backend.build_with_policy is not None:
            return backend
        fallback = self._backends.get((device.type, "+policy"))
        if fallback is None:
            fallback = amp.policy_backend(device, backend, self.backend != "auto", policy)
            self._backends[(device.type, "+policy")] = fallback
        return fallback

    def _selected(self, spec: Spec, device: torch.device, numel: int) -> Backend:
        """The backend named, or ``"auto"``'s choice for this spec and group size."""
        # "auto" depends on the group size only through the backends' thresholds: key on the largest reached.
        reached = 0
        if self.backend == "auto":
            if self._auto_thresholds is None:  # read once per optimizer, not on every step
                self._auto_thresholds = backends.auto_thresholds()
            reached = max((n for n in self._auto_thresholds if n <= numel), default=0)
        key = (device.type, spec, reached)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = backends.select_backend(device, self.backend, spec, numel)
        return backend

    # methods (SophiaG's update_hessian) ---------------------------------------------------
    @torch.no_grad()
    def run_method(self, name: str) -> None:
        """Run the spec's method ``name`` on every parameter with a gradient (states it updates change; the
        parameters and step counters do not). Every group is checked before any is written."""
        runs = []
        for index, group in enumerate(self.param_groups):
            spec = self.group_spec(group)
            method = spec.method_spec(name)
            if amp.resolve(group.get("precision")) is not amp.DEFAULT:
                raise ValueError(
                    f"{spec.name}.{name}(): param group {index} has a precision policy; methods run "
                    "only on groups without one"
                )
            params = [p for p in group["params"] if p.grad is not None]
            states = [self.state.get(p, {}) for p in params]
            hypers = group_hypers(method, group)
            check_step_inputs(method, params, [p.grad for p in params], states, hypers)
            for indices, device, numel in _by_device(params):
                runs.append((self._step_function(method, device, None, numel), params, indices, states, hypers))
        for step, params, indices, states, hypers in runs:
            chosen = [params[i] for i in indices]
            chosen_states = [states[i] for i in indices]
            steps = [s["step"].clone() if s else None for s in chosen_states]
            step(chosen, [p.grad for p in chosen], chosen_states, hypers)
            for param, state, before in zip(chosen, chosen_states, steps, strict=True):
                state["step"].copy_(before if before is not None else torch.zeros_like(state["step"]))
                self.state[param] = state

    def method_due(self, name: str) -> bool:
        """Whether the method's cadence (``due=``, e.g. every k-th step) asks for it now, after the steps taken
        so far (the most any parameter has taken)."""
        from portopt.lowering.host import evaluate_host
        from portopt.spec.expr import walk

        group = self.param_groups[0]
        spec = self.group_spec(group)
        due = spec.method(name).due
        if due is None:
            return True
        taken = max((float(s["step"]) for s in self.state.values() if "step" in s), default=0.0)
        values: dict[Any, Any] = {}
        evaluate_host(walk([due]), taken, {k: float(v) for k, v in group_hypers(spec, group).items()}, values)
        return bool(values[due])

    # checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict; 8-bit states as plain dicts of tensors (:meth:`Q8State.to_dict
        <portopt.precision.quantize.Q8State.to_dict>`) and policies as text, so that
        ``torch.load(weights_only=True)`` reads it back."""
        return checkpoint.saveable(super().state_dict())

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


def _by_device(params: list[Tensor]) -> list[tuple[list[int], torch.device, int]]:
    """The parameters' indices per device, with their element count there."""
    if not params:
        return []
    first = params[0].device
    if all(p.device == first for p in params):
        return [(list(range(len(params))), first, sum(p.numel() for p in params))]
    groups: dict[torch.device, list[int]] = {}
    for index, p in enumerate(params):
        groups.setdefault(p.device, []).append(index)
    return [(indices, device, sum(params[i].numel() for i in indices)) for device, indices in groups.items()]


def eager_state(spec: Spec, group: Mapping[str, Any], param: Tensor) -> dict[str, Tensor]:
    """States before any step, as torch.optim.Adagrad creates them (``step`` = 0), stored as the
    group's precision policy says.

    Only for specs whose initial states are constants or hyperparameters.
    """
    hypers = group_hypers(spec, group)
    values: dict[str, float] = {}
    for decl in spec.states:
        init = decl.init
        if init.op is Op.CONST:
            values[decl.name] = float(init.value or 0.0)
        elif init.op is Op.HYPER:
            values[decl.name] = float(hypers[str(init.value)])
        else:
            raise ValueError(f"{spec.name}: state {decl.name!r} starts from p or g and cannot be created before a step")
        if decl.layout is not Layout.ELEMENTWISE:
            raise ValueError(f"{spec.name}: eager creation supports element-wise states, not {decl.name!r}")
    policy = amp.resolve(group.get("precision"))
    if policy is not amp.DEFAULT:
        return amp.eager_state(spec, policy, values, param)
    state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=step_counter_dtype())}
    for name, value in values.items():
        state[name] = torch.full_like(param, value, memory_format=torch.preserve_format).detach()
    return state
