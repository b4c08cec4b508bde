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

torch.optim's flags (:mod:`portopt.optim.torch_flags`): ``foreach``, ``fused``, ``capturable``
and ``differentiable`` choose the implementation as in torch; complex parameters are stepped as
``torch.view_as_real`` (:mod:`portopt.optim.complex_params`); sparse gradients are taken where the
class says how (:attr:`Optimizer.sparse_gradients`, :mod:`portopt.optim.sparse`). Under
``torch.compile`` the step is traced into the caller's graph (:mod:`portopt.optim.graph`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, overload

import torch
from torch import Tensor

from portopt import backends, distributed
from portopt.algorithms import get_spec
from portopt.lowering.backend import Backend, ParamState, step_counter_dtype
from portopt.lowering.checks import check_step_inputs
from portopt.lowering.graph_step import GraphStep
from portopt.optim import amp, complex_params, graph, sparse
from portopt.optim import state_dict as checkpoint
from portopt.optim.group_cache import GroupCache, cacheable, versioned
from portopt.optim.groups import (
    check_group_tuples,
    check_group_values,
    check_known,
    fold_names,
    group_hypers,
    spec_defaults,
)
from portopt.optim.initial_state import eager_state
from portopt.optim.torch_flags import (
    Mode,
    check_backend_serves,
    check_capturable,
    check_flags,
    check_fused_param,
    group_mode,
    serves,
)
from portopt.precision.policy import PolicyError, PrecisionPolicy
from portopt.precision.scaling import LossScaling
from portopt.spec.definition import Spec

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
        differentiable: let autograd run through the step, as torch.optim's ``differentiable=True``.
        foreach, fused: torch.optim's implementation flags (:mod:`portopt.optim.torch_flags`):
            ``fused=True`` runs torch's fused kernel or the spec's compiled one-pass kernel,
            ``foreach=False`` a per-tensor loop.
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
    sparse_gradients: ClassVar[str | None] = None
    """How a sparse gradient is taken (:mod:`portopt.optim.sparse`): ``None`` refuses it with torch's
    ``RuntimeError``; ``"dense"`` steps the densified gradient (torch.optim.SGD's result); ``"rows"``
    updates only the entries the gradient holds (torch.optim.Adagrad, SparseAdam)."""
    sparse_hint: ClassVar[str] = ""
    """What torch's refusal of a sparse gradient adds (Adam: ``", please consider SparseAdam instead"``)."""
    dense_gradients: ClassVar[bool] = True
    """False where torch.optim refuses dense gradients (SparseAdam)."""
    capturable_tensors: ClassVar[str] = "params and state_steps"
    """What torch's ``capturable=True`` device error names (NAdam: ``"params, mu_products and state_steps"``)."""

    def __init__(
        self,
        params: ParamsT,
        spec: Spec | str,
        backend: str = "auto",
        *,
        maximize: bool = False,
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
        differentiable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
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
        flags = {"differentiable": differentiable or None, "foreach": foreach, "fused": fused}
        defaults.update({k: v for k, v in flags.items() if v is not None})  # a plain group stays torch's
        self._fixed_spec = base
        check_flags(foreach=foreach, differentiable=differentiable, fused=fused)
        self._setup(params, defaults, backend, precision, skip_nonfinite)

    # configuration -------------------------------------------------------------------
    def _setup(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        backend: str,
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
        before_groups: Callable[[], None] | None = None,
    ) -> None:
        """Check ``defaults`` as torch does (before building groups), then build the groups.

        ``precision`` and ``skip_nonfinite`` enter the defaults only when they are not the
        defaults, so that a plain optimizer's param groups are torch.optim's.
        ``before_groups`` runs after the value checks and before the groups are built (where
        torch.optim.Adam checks the types of its betas).
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
        self._check_backend_flags(defaults)
        if before_groups is not None:
            before_groups()
        super().__init__(params, defaults)
        self.state = versioned(self.state)

    def _reset_caches(self) -> None:
        self._backends: dict[tuple[Any, ...], Backend] = {}
        self._step_functions: dict[tuple[str, Spec, PrecisionPolicy | None, Mode], Callable[..., None]] = {}
        self._policies: dict[int, PrecisionPolicy] = {}
        self._auto_thresholds: set[int] | None = None
        self._graph_runs: dict[int, graph.GraphRun] = {}
        self._graph_steps: dict[tuple[Any, ...], GraphStep] = {}
        self._fused_types: list[str] | None = None
        self._group_caches: dict[int, GroupCache] = {}

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
        mode = group_mode(group)
        if mode.graph and amp.resolve(group.get("precision")) is not amp.DEFAULT:
            raise PolicyError(
                f"{mode.value}=True steps parameters and states as they are stored: it takes no precision policy "
                f"(got precision={group.get('precision')!r}); use precision=None"
            )
        if self.backend != "auto":  # a named backend must lower the group's spec (devices are checked per step)
            reason = backends.named_backend(self.backend).unsupported_reason(self.group_spec(group))
            if reason is not None:
                raise ValueError(f"backend {self.backend!r} cannot run this param group: {reason}")

    def _check_backend_flags(self, group: Mapping[str, Any]) -> None:
        """A named backend must provide what the group's torch flags ask for (``ValueError``)."""
        if self.backend != "auto":
            check_backend_serves(backends.named_backend(self.backend), group_mode(group))

    # param groups --------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its values are checked first (torch.optim checks only the defaults)."""
        spec = self.base_spec({**self.defaults, **param_group})
        fold_names(spec, param_group, self.defaults)
        if "precision" in param_group:
            param_group["precision"] = amp.group_value(param_group["precision"])
        self.check_group({**self.defaults, **param_group})
        self._check_backend_flags({**self.defaults, **param_group})
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

    def step(self, closure: Callable[[], float] | None = None, **inputs: float | Tensor) -> float | None:
        """One optimization step over every param group (all groups checked before any is written).

        ``inputs`` are the values of the spec's declared extra inputs for this step (SophiaG's
        ``bs=``); an input not given takes its declared default. Autograd is off during the step,
        as in torch.optim, unless ``differentiable=True``; under ``torch.compile`` the step is
        traced into the caller's graph (:mod:`portopt.optim.graph`), a step given inputs runs eagerly.
        """
        self._check_inputs(inputs)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            if torch.compiler.is_compiling():
                graph.traced_step(self, inputs)
            else:
                self._eager_step(inputs=inputs)
        return loss

    def _eager_step(self, only: int | None = None, inputs: Mapping[str, Any] | None = None) -> None:
        """The step of every group (or of group ``only``: under torch.compile, a group the traced step
        cannot take), all checked before any is written."""
        work: list[tuple[int, amp.GroupStep]] = []
        offset = 0
        for index, group in enumerate(self.param_groups):
            if only is None or index == only:
                work.append((index, self._prepare(group, index, offset, inputs)))
            offset += len(group["params"])
        scaling = LossScaling.of(self)
        skipped = amp.should_skip([item for _, item in work], scaling)
        if only is None or skipped:
            self.last_step_skipped = skipped
        if skipped:
            return
        for index, item in work:
            group = self.param_groups[index]
            if self._policies.get(index) is not item.policy:  # first step, or the group's policy changed
                amp.drop_stale_masters(item.policy, [self.state.get(p) for p in group["params"]], group["params"])
                self._policies[index] = item.policy
            if item.prepared is not None and scaling.grad_scale is None:
                for run in item.prepared:
                    run()
            elif item.policy is amp.DEFAULT and scaling.grad_scale is None:
                item.run_plain()
            else:
                amp.run_group(item, scaling)
            for finish in item.after:
                finish()
            for param, state in item.fresh:
                self.state[param] = state

    @torch._dynamo.disable
    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        steps: list[Tensor],
        states: list[Tensor],
    ) -> int:
        """Under torch.compile: prepare one group's traced step (dynamo runs this method eagerly, as it
        does torch.optim's ``_init_group``; disabled so that it is never traced as a frame of its own
        either); see :func:`portopt.optim.graph.init_group`."""
        return graph.init_group(self, group, params, grads, steps, states)

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
        """Check one group and choose its step functions; nothing is written. A group whose structure
        is as at its last step is only confirmed (:mod:`portopt.optim.group_cache`)."""
        spec = self.group_spec(group)
        mode = self._mode(group)
        given = {k: v for k, v in (inputs or {}).items() if k in spec.input_names}
        cache = self._group_caches.pop(index, None)
        if cache is not None:
            fast = cache.prepare(self, group, spec, mode, given)
            if fast is not None:
                self._group_caches[index] = cache
                return fast
        item = self._prepare_fully(group, index, offset, spec, mode, given)
        # Sharded groups re-derive their local pieces and layouts every step (portopt.distributed).
        if cacheable(item, mode) and not distributed.is_distributed(group["params"]):
            self._group_caches[index] = GroupCache(group, item, spec, mode)
        return item

    def _prepare_fully(
        self, group: Mapping[str, Any], index: int, offset: int, spec: Spec, mode: Mode, inputs: Mapping[str, Any]
    ) -> amp.GroupStep:
        """:meth:`_prepare` walking every parameter: gradients, states, checks, backends."""
        hypers: dict[str, Any] = group_hypers(spec, group)
        hypers.update(inputs)
        policy = amp.resolve(group.get("precision"))
        params: list[Tensor] = []
        grads: list[Tensor] = []
        states: list[ParamState] = []
        fresh: list[tuple[Tensor, ParamState]] = []
        after: list[Callable[[], None]] = []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state.get(param)
            if state is None:  # registered only once the step succeeded
                state = {}
                fresh.append((param, state))
            elif "step" not in state and not self.torch_keeps_step:
                state = _with_step_counter(state, after)
            params.append(param)
            grads.append(param.grad)
            states.append(state)
        plain = policy is amp.DEFAULT
        check_group_tuples(spec, group)
        if mode is Mode.FUSED:
            served = self._fused_device_types()
            for param in params:
                check_fused_param(param, served, self.torch_class_name())
        if mode is Mode.CAPTURABLE:
            check_capturable(params, self.capturable_tensors)
        numbers: list[int] = []  # optimizer-wide parameter numbers: the noise keys of stochastic rounding
        if not plain:
            amp.check_params(policy, params, f"param group {index}")
            numbers = [offset + i for i, p in enumerate(group["params"]) if p.grad is not None]
        if any(g.layout != torch.strided for g in grads) or not self.dense_gradients:
            where = sparse.Where(
                type(self).__name__, self.sparse_gradients, self.sparse_hint, self.dense_gradients, index
            )
            params, grads, states, scatter = sparse.take(
                where, spec, group, hypers, params, grads, states, mode, policy
            )
            after.extend(scatter)
        elif any(p.is_complex() for p in params):
            complex_params.check(spec, policy, index)
            params, grads, states, restore = complex_params.real_views(params, grads, states)
            after.append(restore)
        sharded = distributed.is_distributed(params)
        if sharded:  # FSDP2 / tensor parallel: step the local pieces, reduce over the mesh (portopt.distributed)
            layouts = {s.name: s.layout for s in spec.states}
            params, grads, states, keep = distributed.local_views(params, grads, states, layouts)
            after.append(keep)
        check_step_inputs(spec, params, grads, states, hypers, allow_quantized=not plain)
        policy_step = amp.needs_policy_backend(policy, spec, params, states)
        runs = [
            (self._step_function(spec, device, policy if policy_step else None, numel, mode, sharded), indices)
            for indices, device, numel in _by_device(params)
        ]
        skip = bool(group.get("skip_nonfinite", False))
        return amp.GroupStep(
            spec, policy, params, grads, states, hypers, fresh, numbers, runs, policy_step, skip, after
        )

    def _mode(self, group: Mapping[str, Any]) -> Mode:
        """The group's mode (:func:`~portopt.optim.torch_flags.group_mode`); a named backend that does not
        provide it (flags loaded from another optimizer's checkpoint) runs as itself."""
        mode = group_mode(group)
        if self.backend != "auto" and not serves(backends.named_backend(self.backend), mode):
            return Mode.DEFAULT
        return mode

    def torch_class_name(self) -> str:
        """The ``torch.optim`` class this optimizer is a drop-in for (empty: none)."""
        return ""

    def _fused_device_types(self) -> list[str]:
        """The device types a fused implementation of this optimizer's backend choice runs on here (read once)."""
        if self._fused_types is None:
            if self.backend != "auto":
                self._fused_types = list(backends.named_backend(self.backend).device_types)
            else:
                usable = backends.usable_backends()
                self._fused_types = sorted({t for b in usable if b.torch_flag == "fused" for t in b.device_types})
        return self._fused_types

    def _step_function(
        self,
        spec: Spec,
        device: torch.device,
        policy: PrecisionPolicy | None = None,
        numel: int = 0,
        mode: Mode = Mode.DEFAULT,
        sharded: bool = False,
    ) -> Callable[..., None]:
        """The step function for ``spec`` on ``device`` for a group of ``numel`` elements there in ``mode``;
        with a ``policy``, one that stores states as it says; ``sharded``: of local pieces of DTensors."""
        backend = self._backend_for(spec, device, numel, policy, mode, sharded)
        key = (backend.name, spec, policy, mode)
        step = self._step_functions.get(key)
        if step is None:
            step = self._step_functions[key] = _build(backend, spec, policy, mode)
        return step

    def chosen_backends(self) -> list[dict[str, str]]:
        """Per param group, the backend that steps it on each device, e.g. ``[{"cpu": "torch_fused"}]``.

        As a step with a gradient for every parameter chooses: ``backend="auto"`` decides per
        spec, device and number of elements (a torch fused kernel proven equivalent to the
        spec, else the compiled kernel for groups large enough to repay compiling, else the
        generic torch backend); a precision policy storing states other than torch does moves
        to a backend that can. A group whose torch flags ask for an implementation says it:
        ``"torch (per tensor)"`` for ``foreach=False``, ``"torch (differentiable)"``, ...
        """
        chosen = []
        for group in self.param_groups:
            spec = self.group_spec(group)
            policy = amp.resolve(group.get("precision"))
            mode = self._mode(group)
            params = list(group["params"])
            needs_policy = amp.needs_policy_backend(policy, spec, params, [self.state.get(p, {}) for p in params])
            suffix = "" if mode in (Mode.DEFAULT, Mode.FUSED, Mode.FOREACH) else f" ({mode.value})"
            sharded = distributed.is_distributed(params)
            chosen.append(
                {
                    str(device): self._backend_for(
                        spec, device, numel, policy if needs_policy else None, mode, sharded
                    ).name
                    + suffix
                    for _, device, numel in _by_device(params)
                }
            )
        return chosen

    def _backend_for(
        self,
        spec: Spec,
        device: torch.device,
        numel: int,
        policy: PrecisionPolicy | None = None,
        mode: Mode = Mode.DEFAULT,
        sharded: bool = False,
    ) -> Backend:
        """The backend chosen (``self.backend``, or ``"auto"``'s choice for this spec, group size and
        mode); with a ``policy``, one that can store states as it says."""
        backend = self._selected(spec, device, numel, mode, sharded)
        if policy is None or backend.build_with_policy is not None:
            return backend
        if self._auto_thresholds is None:
            self._auto_thresholds = backends.auto_thresholds()
        reached = max((n for n in self._auto_thresholds if n <= numel), default=0)
        key = (device.type, "+policy", spec, reached)
        fallback = self._backends.get(key)
        if fallback is None:
            named = self.backend != "auto" or mode is not Mode.DEFAULT
            fallback = amp.policy_backend(device, backend, named, policy, spec, reached)
            self._backends[key] = fallback
        return fallback

    def _selected(
        self, spec: Spec, device: torch.device, numel: int, mode: Mode = Mode.DEFAULT, sharded: bool = False
    ) -> Backend:
        """The backend named, or ``"auto"``'s choice for this spec, group size and mode; for the local pieces
        of sharded parameters (``sharded``) of a spec that reads whole tensors, one that
        :attr:`~portopt.lowering.backend.Backend.shards`."""
        # "auto" depends on the group size only through the backends' thresholds: key on the largest reached.
        reached = 0
        if self.backend == "auto" and mode in (Mode.DEFAULT, Mode.CAPTURABLE, Mode.DIFFERENTIABLE):
            if self._auto_thresholds is None:  # read once per optimizer, not on every step
                self._auto_thresholds = backends.auto_thresholds()
            reached = max((n for n in self._auto_thresholds if n <= numel), default=0)
        whole = sharded and distributed.reads_whole_tensor(spec)
        key = (device.type, spec, reached, mode, whole)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = self._select(spec, device, reached, mode, whole)
        return backend

    def _select(self, spec: Spec, device: torch.device, numel: int, mode: Mode, whole: bool = False) -> Backend:
        if whole:
            distributed.check_sharded_mode(spec, self.backend, mode)
        if self.backend != "auto":
            return backends.select_backend(device, self.backend, spec, numel)
        if mode is Mode.DEFAULT and not whole:
            return backends.select_backend(device, "auto", spec, numel)
        try:
            # An explicit fused=True compiles whatever the group size; the other modes follow auto's sizes.
            size = None if mode is Mode.FUSED else numel
            return backends.select_backend(
                device, "auto", spec, size, accept=lambda b: serves(b, mode) and (b.shards or not whole)
            )
        except ValueError as exc:
            if mode is Mode.FUSED:  # torch raises RuntimeError where no fused implementation runs
                raise RuntimeError(f"fused=True: no fused implementation of {spec.title} runs here: {exc}") from None
            raise

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
        distributed.check_checkpointable(self.state)
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
        self.state = versioned(self.state)
        if not hasattr(self, "backend"):
            self.backend = "auto"
        for group in self.param_groups:
            for key, value in self.option_defaults.items():
                group.setdefault(key, value)
            group.update(self.forced_options)
        self._reset_caches()

    def __getstate__(self) -> dict[str, Any]:
        """torch.optim's state (defaults, state, param groups), portopt's settings and every public
        attribute (``last_step_skipped``, ...); hooks and caches are not kept, as in torch.optim."""
        state = super().__getstate__()
        state.update({k: v for k, v in vars(self).items() if not k.startswith("_")})
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


def _with_step_counter(state: ParamState, after: list[Callable[[], None]]) -> ParamState:
    """A state torch.optim.SGD made (it keeps no ``step``: a user's or a hook's ``state["momentum_buffer"]``)
    seen with ``step`` = 1, as :func:`~portopt.optim.state_dict.load` takes it; kept once the step succeeded."""
    counted: ParamState = {**state, "step": torch.tensor(1.0, dtype=step_counter_dtype())}

    def keep() -> None:
        state["step"] = counted["step"]

    after.append(keep)
    return counted


def _build(backend: Backend, spec: Spec, policy: PrecisionPolicy | None, mode: Mode) -> Callable[..., None]:
    """``backend``'s step function of ``spec`` for ``mode`` (and ``policy``, when states need it)."""
    if policy is not None:
        assert backend.build_with_policy is not None
        return backend.build_with_policy(spec, policy)
    if mode is Mode.PER_TENSOR and backend.build_per_tensor is not None:
        return backend.build_per_tensor(spec)
    if mode.graph:
        assert backend.build_graph is not None
        return functools.partial(
            backend.build_graph(spec), differentiable=mode is Mode.DIFFERENTIABLE, device_steps=mode is Mode.CAPTURABLE
        )
    return backend.build(spec)
