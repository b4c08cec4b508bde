"""Whole-algorithm rules for torch's vendor fused kernels, chosen by equivalence, never by name.

torch ships one-pass optimizer kernels for four algorithms: ``torch._fused_adam_``,
``torch._fused_adamw_``, ``torch._fused_sgd_`` and ``torch._fused_adagrad_`` (CPU and
CUDA). Each configuration of each kernel (its boolean flags) is written below as a
:class:`~portopt.spec.Spec` of what the kernel computes, read off its source
(``aten/src/ATen/native/cpu/Fused*Kernel.cpp``), conventions included:

* **step counting**: the caller increments ``state_steps`` *before* the call; the kernel
  reads it as a float (``t``) and computes ``1 − β^t`` in double. SGD has no counter:
  the caller passes ``is_first_step``, i.e. ``t = 1``, on which the buffer becomes the
  gradient;
* **hyperparameters**: plain doubles (``lr`` also as a tensor on CUDA); the kernel skips
  weight decay when it is 0 (same value); Adam decays in the gradient (``g + λ·p``),
  AdamW the parameter (``p·(1 − lr·λ)``, with ``1 − lr·λ`` in double); Adagrad's
  ``clr = lr / (1 + (t − 1)·lr_decay)``;
* **first moment**: Adam's ``exp_avg.lerp_(g, 1 − β1)``, the same number as ``β1·m +
  (1 − β1)·g`` in exact arithmetic;
* **maximize** negates the gradient inside the kernel; ``grad_scale`` / ``found_inf``
  (GradScaler) are not used: the step-function contract has no loss scale (``None``).

A rule fires for a user's spec only when :func:`portopt.lowering.equivalence.find_binding`
shows the kernel's spec computes the same step (a randomized float64 identity test; see
that module). So ``adam(amsgrad=True)`` reaches ``_fused_adam_`` with ``amsgrad=True``,
``adamw().maximized()`` reaches ``_fused_adamw_`` with ``maximize=True``, and a near miss
(ε inside the square root, another bias correction, Lion, NAdam) reaches nothing.

Conventions the rule handles at run time (the kernel would silently compute something
else, or fail):

* every tensor of a call contiguous (the CPU kernels read ``grad`` through its data
  pointer, whatever its strides) and of one dtype; per-tensor step counters may differ
  (tensors are bucketed by ``t``, and SGD's ``is_first_step`` is per bucket);
* SGD with a momentum buffer needs ``momentum != 0`` (the kernel ignores the buffer at 0,
  and refuses a non-empty buffer list);
* **probes**: before a kernel is first used for a (device type, dtype), it runs once on
  a 67-element problem for two steps and is compared with its own spec in float64; a
  kernel that disagrees is not used for that dtype. This is how the rule learned that
  torch 2.13's CPU ``_fused_sgd_`` leaves bf16/fp16 parameters unchanged in its
  vectorized loop (only the tail elements move) — capabilities come from a check, not a
  list, and come back by themselves when torch fixes it.

A spec of more than :data:`MAX_MATCH_NODES` nodes is not tested (the test's time grows with
the spec; a 100,000-node chain equivalent to SGD took minutes). A spec that matches no kernel is not served (``unsupported_reason``; ``backend="auto"``
passes over it, naming the backend raises). A call the matched kernel cannot take (mixed
dtypes, strided tensors, a dtype its probe failed, ``momentum=0``) runs on the backend
``"auto"`` would choose below this one (``compiled`` for a large group, else ``torch``),
with the same state layout, so a run can move between them step by step.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from portopt.backends.torch_generic import TorchStep, build_graph_step
from portopt.lowering.backend import Backend, Hypers, ParamState, PreparedStep, StepFunction, no_step
from portopt.lowering.checks import check_hyperparameter_values, check_step_inputs
from portopt.lowering.equivalence import Binding, find_binding, sample_hyperparameters
from portopt.lowering.input_snapshot import InputSnapshot
from portopt.lowering.interpreter import Bindings, evaluate_step
from portopt.lowering.registry import register_backend
from portopt.lowering.step_counters import StepCounters
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, G, P, T, eq, hyper, maximum, sqrt, state, where
from portopt.spec.symbols import ANY, NON_NEGATIVE, UNIT_INTERVAL_OPEN_RIGHT, Hyperparameter, StateDecl

NAME = "torch_fused"
PRIORITY = 30
FUSED_DEVICE_TYPES = ("cpu", "cuda")
NEUTRAL = {"weight_decay": 0.0, "dampening": 0.0, "lr_decay": 0.0}
"""Kernel hyperparameters a user's spec may lack, held at the value that removes them."""

Launch = Callable[..., None]
"""``launch(params, grads, states, t, hypers, steps=None)``: one kernel call over lists of tensors at step
``t``; ``steps`` are the (already incremented) per-parameter step counters, where the kernel reads them."""


# --------------------------------------------------------------------------------------
# The kernels' semantics, as specs.


def _hypers(*names: str) -> tuple[Hyperparameter, ...]:
    """The kernel's scalar arguments, with the ranges torch.optim accepts for them."""
    ranges = {"beta1": UNIT_INTERVAL_OPEN_RIGHT, "beta2": UNIT_INTERVAL_OPEN_RIGHT, "dampening": ANY}
    return tuple(Hyperparameter(n, 0.0, ranges.get(n, NON_NEGATIVE)) for n in names)


def _gradient(maximize: bool) -> Expr:
    return -G if maximize else G


def fused_adam_spec(*, decoupled: bool, amsgrad: bool, maximize: bool) -> Spec:
    """``torch._fused_adam_`` (``decoupled=False``) / ``torch._fused_adamw_`` on one tensor."""
    lr, b1, b2, eps, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    g, p = _gradient(maximize), P
    if decoupled:
        p = P * (1 - lr * wd)  # param_vec * (1 - lr * weight_decay)
    else:
        g = g + P * wd  # grad_vec += param_vec * weight_decay
    m, v = state("exp_avg"), state("exp_avg_sq")
    m_new = m + (1 - b1) * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v_new = v * b2 + (1 - b2) * g * g
    states = [StateDecl("exp_avg", "m"), StateDecl("exp_avg_sq", "v")]
    updates = [("exp_avg", m_new), ("exp_avg_sq", v_new)]
    second = v_new
    if amsgrad:
        second = maximum(state("max_exp_avg_sq"), v_new)
        states.append(StateDecl("max_exp_avg_sq", "vmax"))
        updates.append(("max_exp_avg_sq", second))
    denom = sqrt(second) / sqrt(1 - b2**T) + eps
    step_size = lr / (1 - b1**T)
    kernel = "_fused_adamw_" if decoupled else "_fused_adam_"
    return Spec(
        name=f"torch.{kernel}",
        title=f"torch.{kernel}(amsgrad={amsgrad}, maximize={maximize})",
        hyperparameters=_hypers("lr", "beta1", "beta2", "eps", "weight_decay"),
        states=tuple(states),
        updates=tuple(updates),
        param_update=p + (-step_size) * m_new / denom,
        options=(("amsgrad", amsgrad), ("maximize", maximize)),
    )


def fused_sgd_spec(*, momentum: bool, nesterov: bool, maximize: bool) -> Spec:
    """``torch._fused_sgd_`` on one tensor; ``is_first_step`` is ``t = 1``."""
    lr, wd = hyper("lr"), hyper("weight_decay")
    g = P * wd + _gradient(maximize)  # fmadd(param, weight_decay, grad)
    names = ["lr", "weight_decay"]
    states: tuple[StateDecl, ...] = ()
    updates: tuple[tuple[str, Expr], ...] = ()
    if momentum:
        mu, damp = hyper("momentum"), hyper("dampening")
        names += ["momentum", "dampening"]
        buf = where(eq(T, 1), g, state("momentum_buffer") * mu + (1 - damp) * g)
        states, updates = (StateDecl("momentum_buffer", "b"),), (("momentum_buffer", buf),)
        g = buf * mu + g if nesterov else buf
    return Spec(
        name="torch._fused_sgd_",
        title=f"torch._fused_sgd_(momentum={momentum}, nesterov={nesterov}, maximize={maximize})",
        hyperparameters=_hypers(*names),
        states=states,
        updates=updates,
        param_update=P + g * (-lr),
        options=(("momentum", momentum), ("nesterov", nesterov), ("maximize", maximize)),
    )


def fused_adagrad_spec(*, maximize: bool) -> Spec:
    """``torch._fused_adagrad_`` on one tensor."""
    lr, lr_decay, wd, eps = (hyper(n) for n in ("lr", "lr_decay", "weight_decay", "eps"))
    g = _gradient(maximize) + P * wd
    clr = lr / (1 + (T - 1) * lr_decay)
    total = state("sum") + g * g
    return Spec(
        name="torch._fused_adagrad_",
        title=f"torch._fused_adagrad_(maximize={maximize})",
        hyperparameters=_hypers("lr", "lr_decay", "weight_decay", "eps"),
        states=(StateDecl("sum", "s"),),
        updates=(("sum", total),),
        param_update=P - clr * g / (sqrt(total) + eps),
        options=(("maximize", maximize),),
    )


# --------------------------------------------------------------------------------------
# Calling the kernels.


def _steps(t: float, params: list[Tensor], steps: list[Tensor] | None = None) -> list[Tensor]:
    if steps is not None:
        return steps
    counter = torch.tensor(t, dtype=torch.float32, device=params[0].device)
    return [counter] * len(params)


def _adam_launch(decoupled: bool, amsgrad: bool, maximize: bool) -> Launch:
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_

    def launch(
        params: list[Tensor],
        grads: list[Tensor],
        states: list[list[Tensor]],
        t: float,
        h: Mapping[str, float],
        steps: list[Tensor] | None = None,
    ) -> None:
        kernel(
            params,
            grads,
            states[0],
            states[1],
            states[2] if amsgrad else [],
            _steps(t, params, steps),
            lr=h["lr"],
            beta1=h["beta1"],
            beta2=h["beta2"],
            weight_decay=h["weight_decay"],
            eps=h["eps"],
            amsgrad=amsgrad,
            maximize=maximize,
        )

    return launch


def _sgd_launch(momentum: bool, nesterov: bool, maximize: bool) -> Launch:
    def launch(
        params: list[Tensor],
        grads: list[Tensor],
        states: list[list[Tensor]],
        t: float,
        h: Mapping[str, float],
        steps: list[Tensor] | None = None,
    ) -> None:
        torch._fused_sgd_(
            params,
            grads,
            states[0] if momentum else [],
            weight_decay=h["weight_decay"],
            momentum=h["momentum"] if momentum else 0.0,
            lr=h["lr"],
            dampening=h["dampening"] if momentum else 0.0,
            nesterov=nesterov,
            maximize=maximize,
            is_first_step=t == 1.0,
        )

    return launch


def _adagrad_launch(maximize: bool) -> Launch:
    def launch(
        params: list[Tensor],
        grads: list[Tensor],
        states: list[list[Tensor]],
        t: float,
        h: Mapping[str, float],
        steps: list[Tensor] | None = None,
    ) -> None:
        torch._fused_adagrad_(
            params,
            grads,
            states[0],
            _steps(t, params, steps),
            lr=h["lr"],
            lr_decay=h["lr_decay"],
            weight_decay=h["weight_decay"],
            eps=h["eps"],
            maximize=maximize,
        )

    return launch


def _momentum_nonzero(h: Mapping[str, float]) -> str | None:
    if h["momentum"] == 0.0:
        return "torch._fused_sgd_ ignores the momentum buffer when momentum == 0"
    return None


@dataclass(frozen=True)
class FusedKernel:
    """One configuration of a torch fused kernel: its semantics as a spec, and how to call it.

    ``refuses(values)`` says why the kernel cannot serve these (kernel) hyperparameter
    values, or ``None``.
    """

    spec: Spec
    launch: Launch = field(compare=False)
    refuses: Callable[[Mapping[str, float]], str | None] = field(default=lambda _: None, compare=False)
    hypers_in_opmath: bool = True
    """False where the kernel rounds lr, ε and weight decay to a bf16/fp16 parameter's dtype."""

    @property
    def name(self) -> str:
        return self.spec.title


def _kernels() -> tuple[FusedKernel, ...]:
    kernels: list[FusedKernel] = []
    flags = (False, True)
    for decoupled, amsgrad, maximize in itertools.product(flags, flags, flags):
        kernels.append(
            FusedKernel(
                fused_adam_spec(decoupled=decoupled, amsgrad=amsgrad, maximize=maximize),
                _adam_launch(decoupled, amsgrad, maximize),
            )
        )
    for maximize in flags:
        kernels.append(
            FusedKernel(
                fused_sgd_spec(momentum=False, nesterov=False, maximize=maximize),
                _sgd_launch(False, False, maximize),
                hypers_in_opmath=False,
            )
        )
        for nesterov in flags:
            kernels.append(
                FusedKernel(
                    fused_sgd_spec(momentum=True, nesterov=nesterov, maximize=maximize),
                    _sgd_launch(True, nesterov, maximize),
                    _momentum_nonzero,
                    hypers_in_opmath=False,
                )
            )
        kernels.append(
            FusedKernel(fused_adagrad_spec(maximize=maximize), _adagrad_launch(maximize), hypers_in_opmath=False)
        )
    return tuple(kernels)


KERNELS: tuple[FusedKernel, ...] = _kernels()


@dataclass(frozen=True)
class Match:
    """A kernel that computes a spec's step, and where its inputs come from."""

    kernel: FusedKernel
    binding: Binding


MAX_MATCH_NODES = 512
"""Largest spec (distinct nodes) tested for equivalence with a kernel: the identity test costs time in
proportion to the spec, and every kernel's spec is under 40 nodes (a spec from a file can hold 10,000)."""


@functools.lru_cache(maxsize=128)
def match_fused_kernel(spec: Spec) -> Match | None:
    """The fused kernel equivalent to ``spec``, or ``None`` (see :func:`no_match_reason`)."""
    if len(spec.node_kinds) > MAX_MATCH_NODES:
        return None
    for kernel in KERNELS:
        binding, _ = find_binding(spec, kernel.spec, NEUTRAL)
        if binding is not None:
            return Match(kernel, binding)
    return None


def no_match_reason(spec: Spec) -> str | None:
    """``None`` if a fused kernel computes ``spec``, else why none does (closest attempts)."""
    if match_fused_kernel(spec) is not None:
        return None
    if len(spec.node_kinds) > MAX_MATCH_NODES:
        return (
            f"no fused kernel is matched to {spec.name}: it has {len(spec.node_kinds)} nodes, more than the "
            f"{MAX_MATCH_NODES} (MAX_MATCH_NODES) that the equivalence test takes"
        )
    reasons = [(k.name, find_binding(spec, k.spec, NEUTRAL)[1]) for k in KERNELS]
    # Closest first: kernels that could be bound but compute something else.
    reasons.sort(key=lambda r: "differs" not in r[1])
    return f"no matching fused kernel for {spec.name}: " + "; ".join(f"{k}: {why}" for k, why in reasons[:2])


# --------------------------------------------------------------------------------------
# Probes: does the kernel compute its spec on this device and dtype?

PROBE_SIZE = 67  # more than a vector of any width, plus a tail
PROBE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}


@functools.cache
def probe(kernel: FusedKernel, device_type: str, dtype: torch.dtype) -> str | None:
    """``None`` if ``kernel`` matches its spec on ``device_type``/``dtype`` (two steps), else what differs."""
    if dtype not in PROBE_TOLERANCE:
        return f"{dtype} is not a dtype the fused kernels take"
    device = torch.device(device_type)
    spec = kernel.spec
    gen = torch.Generator().manual_seed(0)
    values = sample_hyperparameters(spec, random.Random(0))
    if kernel.refuses(values) is not None:
        values["momentum"] = 0.5

    def rand(scale: float = 1.0) -> Tensor:
        return (torch.rand(PROBE_SIZE, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    param = rand(2.0) - 1.0
    states = [rand() for _ in spec.states]
    tol = PROBE_TOLERANCE[dtype]
    for t in (1.0, 2.0):
        grad = rand(2.0) - 1.0
        inputs = {s.name: x.double().cpu() for s, x in zip(spec.states, states, strict=True)}
        p64 = param.double().cpu()
        expected_states, expected_param = evaluate_step(
            spec, TORCH_RULES, Bindings(p64, grad.double().cpu(), t, values, inputs)
        )
        try:
            kernel.launch([param], [grad], [[x] for x in states], t, values)
        except RuntimeError as exc:
            return f"{kernel.name} fails on {device_type} {dtype}: {exc}"
        pairs = [("the parameter", param, expected_param)]
        pairs += [(f"state {s.name!r}", x, expected_states[s.name]) for s, x in zip(spec.states, states, strict=True)]
        for what, got, want in pairs:
            want = want.expand(PROBE_SIZE)
            gap = (got.double().cpu() - want).abs()
            if bool((gap > tol * (want.abs() + want.abs().mean())).any()):
                return (
                    f"{kernel.name} on {device_type} {dtype} does not compute its spec: {what} at t={t:g} is off by "
                    f"up to {float(gap.max()):.3g}"
                )
    return None


def dtype_reason(kernel: FusedKernel, device_type: str, dtype: torch.dtype) -> str | None:
    """``None`` if the rule hands ``dtype`` tensors on ``device_type`` to ``kernel``, else why not."""
    if device_type not in FUSED_DEVICE_TYPES:
        return f"no torch fused kernel for device type {device_type!r}"
    if dtype in (torch.bfloat16, torch.float16) and not kernel.hypers_in_opmath:
        # Seen by the conformance suite on torch 2.13's CPU _fused_adagrad_ (bf16): 3x over tolerance.
        return f"{kernel.name} rounds lr, eps and weight decay to {dtype}, not computed in float32"
    return probe(kernel, device_type, dtype)


# --------------------------------------------------------------------------------------
# The step function.


class FusedStep(PreparedStep):
    """Steps ``spec`` with a matched fused kernel; delegates what the kernel cannot take.

    The work for one list of parameters is planned once (:class:`_FusedPlan`: the kernel's tensor
    lists per device and dtype, the step counters as one tensor) and reused while the inputs keep
    their structure (:class:`~portopt.lowering.input_snapshot.InputSnapshot`), so a step costs the
    kernel calls, one counter increment and a check of the inputs, not a Python loop of checks and
    list building per parameter.
    """

    def __init__(self, spec: Spec, match: Match) -> None:
        self.spec = spec
        self.match = match
        self._initial = TorchStep(spec)  # state creation exactly as the generic backend's
        self._delegates: dict[tuple[str, str], StepFunction] = {}
        self._plans: OrderedDict[tuple[object, ...], _FusedPlan] = OrderedDict()
        self.last_delegation: str | None = None

    def prepare(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        only_if_planned: bool = False,
    ) -> Callable[[], None] | None:
        """Check the inputs and plan the step; nothing is written. Returns the step itself, or, with
        ``only_if_planned``, ``None`` when the inputs are not those of a plan already built."""
        if not params:
            check_step_inputs(self.spec, params, grads, states, hypers)
            return no_step
        values = {name: float(hypers[name]) for name in self.spec.hyper_names}
        kernel_values = self.match.binding.kernel_hypers(values)
        key = (len(params), id(params[0]), id(states[0]))
        plan = self._plans.get(key)
        if plan is not None and plan.snapshot.matches(params, grads, states):
            check_hyperparameter_values(self.spec, hypers)
            reason = self.match.kernel.refuses(kernel_values)
        elif only_if_planned:
            return None
        else:
            check_step_inputs(self.spec, params, grads, states, hypers)
            reason = self._refusal(params, grads, states, values)
            plan = None
            if reason is None:
                with torch.no_grad():
                    plan = _FusedPlan(self, params, grads, states, hypers)
                self._plans[key] = plan
                while len(self._plans) > _MAX_PLANS:
                    self._plans.popitem(last=False)
        self.last_delegation = reason
        if reason is not None or plan is None:
            delegate = self._delegate(params)
            ready = getattr(delegate, "prepare", None)
            if ready is not None:
                run: Callable[[], None] | None = ready(params, grads, states, hypers, only_if_planned=only_if_planned)
                return run
            return functools.partial(delegate, params, grads, states, hypers)
        return functools.partial(plan.run, list(grads), kernel_values)

    def _refusal(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        values: Mapping[str, float],
    ) -> str | None:
        """Why the matched kernel cannot take this call, or ``None``."""
        kernel = self.match.kernel
        refused = kernel.refuses(self.match.binding.kernel_hypers(values))
        if refused is not None:
            return refused
        names = [user for _, user in self.match.binding.states]
        for param, grad, param_state in zip(params, grads, states, strict=True):
            tensors = [param, grad, *(param_state[n] for n in names if param_state)]
            if any(t.dtype != param.dtype for t in tensors):
                return "the fused kernels need the gradient and states in the parameter's dtype"
            if not all(t.is_contiguous() for t in tensors):
                return "the fused kernels need contiguous parameters, gradients and states"
            failed = dtype_reason(kernel, param.device.type, param.dtype)
            if failed is not None:
                return failed
        return None

    def _delegate(self, params: Sequence[Tensor]) -> StepFunction:
        """The step of the backend ``"auto"`` would choose below this one, for this call."""
        from portopt.backends import auto_choice  # the package imports this module lazily

        device_type = params[0].device.type
        below = auto_choice(device_type, self.spec, sum(p.numel() for p in params), below_priority=PRIORITY)
        assert below is not None, "the generic torch backend runs every spec on the devices the fused kernels take"
        step = self._delegates.get((device_type, below.name))
        if step is None:
            step = self._delegates[(device_type, below.name)] = below.build(self.spec)
        return step


_MAX_PLANS = 8
"""Plans (parameter lists) a step function keeps: several param groups may share one step function."""


class _FusedPlan:
    """One list of parameters, planned for the fused kernel (see :class:`FusedStep`)."""

    def __init__(
        self,
        owner: FusedStep,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
    ) -> None:
        self.kernel = owner.match.kernel
        names = [user for _, user in owner.match.binding.states]
        self.fresh: list[tuple[ParamState, dict[str, Tensor]]] = []
        current: list[ParamState] = []
        for p, g, holder in zip(params, grads, states, strict=True):
            if holder:
                current.append(holder)
            else:
                new = owner._initial.initial_state(p, g, hypers)
                self.fresh.append((holder, new))
                current.append(new)
        self.counters = StepCounters(current) if StepCounters.can_adopt(current) else None
        if self.counters is not None:
            self.counters.adopt(current)
        self.steps = [s["step"] for s in current]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self.params = list(params)
        self.buckets = [
            (members, [params[i] for i in members], [[current[i][n] for i in members] for n in names])
            for members in groups.values()
        ]
        self.snapshot = InputSnapshot(owner.spec.state_names, params, grads, current, holders=states)

    def run(self, grads: list[Tensor], kernel_values: Mapping[str, float]) -> None:
        """Increment the counters, then one kernel call per device, dtype (and step count, where the
        kernel takes one for all its tensors)."""
        with torch.no_grad():
            if self.counters is not None:
                self.counters.increment()
                counts = self.counters.values()
            else:
                torch._foreach_add_(self.steps, 1.0)
                counts = [float(s) for s in self.steps]
            for members, params, states in self.buckets:
                mine = [counts[i] for i in members]
                by_t: dict[float, list[int]] = {}
                for k, t in enumerate(mine):
                    by_t.setdefault(t, []).append(k)
                if len(by_t) == 1:
                    self.kernel.launch(
                        params,
                        [grads[i] for i in members],
                        states,
                        mine[0],
                        kernel_values,
                        steps=[self.steps[i] for i in members],
                    )
                    continue
                for t, ks in by_t.items():
                    self.kernel.launch(
                        [params[k] for k in ks],
                        [grads[members[k]] for k in ks],
                        [[column[k] for k in ks] for column in states],
                        t,
                        kernel_values,
                        steps=[self.steps[members[k]] for k in ks],
                    )
            torch._C._increment_version(self.params)  # what autograd checks before reusing a saved tensor
            for holder, new in self.fresh:
                holder.update(new)
            self.fresh = []


def build_fused_step(spec: Spec) -> StepFunction:
    """A step function for ``spec`` on the torch fused kernel proven equivalent to it.

    Raises ``ValueError`` (with the closest attempts) when no kernel computes ``spec``."""
    match = match_fused_kernel(spec)
    if match is None:
        raise ValueError(no_match_reason(spec))
    return FusedStep(spec, match)


TORCH_FUSED = register_backend(
    Backend(
        name=NAME,
        summary=(
            "torch's fused kernels (_fused_adam_/_fused_adamw_/_fused_sgd_/_fused_adagrad_) for specs proven "
            "equivalent to one; a call the kernel cannot take runs on the next backend by priority"
        ),
        device_types=FUSED_DEVICE_TYPES,
        build=build_fused_step,
        priority=PRIORITY,
        unsupported_reason=no_match_reason,
        build_graph=build_graph_step,
        torch_flag="fused",
    )
)
