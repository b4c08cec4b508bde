"""The optimizer step under ``torch.compile``: traced into the caller's graph, with no graph break.

``torch.compile(train_step)`` with ``opt.step()`` inside traces the step with dynamo. Dynamo
treats any ``torch.optim.Optimizer`` specially (``torch/_dynamo/variables/optimizer.py``): it
runs a method called ``_init_group`` eagerly, in plain Python, instead of tracing it, marks
parameters and states as static, and guards on the param groups and the state layout. portopt
uses that protocol as torch.optim does:

* :func:`init_group` (``Optimizer._init_group``, run eagerly at trace time) does everything a
  tracer should not see: it checks the group (hyperparameter values, gradients, states),
  chooses the backend (``backend="auto"`` and its fused-kernel equivalence proof included),
  creates the states of parameters stepped for the first time, and fills the lists of tensors
  the traced code steps; it returns a handle (an int) to a :class:`GraphRun`;
* :class:`GraphRun` is the traced part: it reads the hyperparameters from the param group and
  runs the backend's :class:`~portopt.lowering.graph_step.GraphStep`, torch ops over the step
  tensors (no ``float(step)``, no float64 host scalar) that Inductor fuses into one-pass kernels.

Recompiles: dynamo guards on everything it reads, as for torch.optim. A float ``lr`` that an
LR scheduler changes is compiled as a constant first and, once it has changed, as an input
(dynamo's automatic dynamic floats: one recompile, as torch.optim has); ``lr=torch.tensor(...)``
(LR schedulers update it in place) never recompiles. The step counter is a tensor: no
recompile as it grows.

What the traced step does not take runs eagerly, outside the graph (an explicit graph break,
``torch._dynamo.disable``): a GradScaler's ``grad_scale``/``found_inf``, precision policies,
``skip_nonfinite``, sparse gradients, ``differentiable=True`` and backends without a graph step
(``reference``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from portopt.lowering.backend import ParamState
from portopt.lowering.graph_step import GraphStep
from portopt.optim import amp, complex_params
from portopt.optim.groups import check_group_values, group_hypers
from portopt.optim.torch_flags import Mode
from portopt.spec.definition import Spec

if TYPE_CHECKING:
    from portopt.optim.optimizer import Optimizer

NO_GRADS = -1
"""The handle of a group without gradients: nothing to step."""
EAGER = -2
"""The handle of a group stepped eagerly, outside the traced graph."""


@dataclass(frozen=True)
class GraphRun:
    """The traced step of one param group: where its hyperparameters are, which parameters are complex."""

    step: GraphStep
    hyper_keys: tuple[tuple[str, str, int | None], ...]
    """(name, group key, index in the key's tuple): ``("beta1", "betas", 0)``."""
    complex_params: tuple[bool, ...]
    state_count: int

    def __call__(
        self,
        group: dict[str, Any],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        steps: Sequence[Tensor],
        states: Sequence[Tensor],
    ) -> None:
        hypers: dict[str, Any] = {}
        for name, key, index in self.hyper_keys:
            hypers[name] = group[key] if index is None else group[key][index]
        n = self.state_count
        views, grad_views, state_lists = [], [], []
        for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
            own = list(states[i * n : (i + 1) * n])
            if self.complex_params[i]:
                param, grad = torch.view_as_real(param), torch.view_as_real(grad)
                own = [torch.view_as_real(s) if s.is_complex() else s for s in own]
            views.append(param)
            grad_views.append(grad)
            state_lists.append(own)
        self.step.run(views, grad_views, steps, state_lists, hypers)


def traced_step(optimizer: Optimizer, inputs: Mapping[str, Any] | None = None) -> None:
    """The step of every group, as dynamo traces it (module docstring); a step given extra inputs
    (SophiaG's ``bs=``) runs eagerly."""
    if (
        inputs
        or getattr(optimizer, "grad_scale", None) is not None
        or getattr(optimizer, "found_inf", None) is not None
    ):
        _eager_step(optimizer, inputs)
        return
    optimizer.last_step_skipped = False  # an eager group (skip_nonfinite) may set it
    for index, group in enumerate(optimizer.param_groups):
        params: list[Tensor] = []
        grads: list[Tensor] = []
        steps: list[Tensor] = []
        states: list[Tensor] = []
        handle = optimizer._init_group(group, params, grads, steps, states)
        if handle == EAGER:
            _eager_group(optimizer, index)
        elif handle != NO_GRADS:
            optimizer._graph_runs[handle](group, params, grads, steps, states)


@torch._dynamo.disable
def _eager_step(optimizer: Optimizer, inputs: Mapping[str, Any] | None = None) -> None:
    optimizer._eager_step(inputs=inputs)


@torch._dynamo.disable
def _eager_group(optimizer: Optimizer, index: int) -> None:
    optimizer._eager_step(only=index)


def init_group(
    optimizer: Optimizer,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    states: list[Tensor],
) -> int:
    """Prepare one group's traced step, eagerly (module docstring); fill the lists, return the handle."""
    index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
    stepped = [p for p in group["params"] if p.grad is not None]
    if not stepped:
        return NO_GRADS
    spec = optimizer.group_spec(group)
    mode = optimizer._mode(group)
    policy = amp.resolve(group.get("precision"))
    eager = (
        policy is not amp.DEFAULT
        or bool(group.get("skip_nonfinite", False))
        or mode is Mode.DIFFERENTIABLE
        or any(p.grad is not None and p.grad.layout != torch.strided for p in stepped)
        or not optimizer.dense_gradients
    )
    graph_step = None if eager else _graph_step(optimizer, spec, stepped, mode)
    if graph_step is None:
        return EAGER
    check_group_values(spec, group, optimizer.check_order)
    hypers = group_hypers(spec, group)
    param_grads = [p.grad for p in stepped]
    fresh: list[tuple[Tensor, ParamState]] = []
    own: list[ParamState] = []
    for param in stepped:
        state = optimizer.state.get(param)
        if state is None:
            state = {}
            fresh.append((param, state))
        own.append(state)
    views, grad_views, view_states = list(stepped), list(param_grads), list(own)
    restore = None
    if any(p.is_complex() for p in stepped):
        complex_params.check(spec, policy, index)
        views, grad_views, view_states, restore = complex_params.real_views(stepped, param_grads, own)
    graph_step.prepare(views, grad_views, view_states, hypers, device_steps=bool(group.get("capturable", False)))
    if restore is not None:
        restore()
    for param, state in fresh:
        optimizer.state[param] = state
    params.extend(stepped)
    grads.extend(param_grads)
    steps.extend(s["step"] for s in own)
    states.extend(s[name] for s in own for name in spec.state_names)
    return _handle(optimizer, graph_step, spec, tuple(p.is_complex() for p in stepped))


def _graph_step(optimizer: Optimizer, spec: Spec, params: Sequence[Tensor], mode: Mode) -> GraphStep | None:
    """The graph step of the backend each device's parameters would run on, or ``None`` (run eagerly)."""
    devices = {p.device for p in params}
    chosen = [
        optimizer._backend_for(spec, d, sum(p.numel() for p in params if p.device == d), None, mode) for d in devices
    ]
    if any(b.build_graph is None for b in chosen):
        return None
    key = ("graph", chosen[0].name, spec)
    cached = optimizer._graph_steps.get(key)
    if cached is None:
        build = chosen[0].build_graph
        assert build is not None
        cached = optimizer._graph_steps[key] = build(spec)
    return cached


def _handle(optimizer: Optimizer, graph_step: GraphStep, spec: Spec, complex_flags: tuple[bool, ...]) -> int:
    """A stable handle of the :class:`GraphRun` for this group layout (the traced code holds it as a constant)."""
    keys = tuple((h.name, h.key, h.group_index) for h in spec.hyperparameters)
    run = GraphRun(graph_step, keys, complex_flags, len(spec.state_names))
    for handle, known in optimizer._graph_runs.items():
        if known == run:
            return handle
    handle = len(optimizer._graph_runs)
    optimizer._graph_runs[handle] = run
    return handle
