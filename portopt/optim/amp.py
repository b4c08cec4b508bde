"""Precision policies and loss scaling in the front end: master weights, unscaling, skipped steps.

A param group's ``precision`` entry (a :class:`~portopt.precision.policy.PrecisionPolicy`,
its text form, or ``None`` for torch.optim's behaviour) says how its numbers are stored;
``skip_nonfinite=True`` asks for a step to be skipped when a gradient is inf or NaN. The
parts a backend cannot see are done here, the same for every backend:

* **master weights**: a float16/bfloat16 parameter under ``master_weights`` is updated
  through a float32 copy kept in its state as ``state["master"]`` (created from the
  parameter at its first step, saved in checkpoints). The backend steps the master with
  float32 gradients; afterwards the master is rounded into the parameter, once, to nearest.
  The model keeps computing with its low-precision parameters; a value written into the
  parameter directly is overwritten by the master at the next step.
* **loss scaling**: ``torch.amp.GradScaler`` hands the step ``grad_scale`` ``S`` and
  ``found_inf`` (:mod:`portopt.precision.scaling`). With ``found_inf`` set, or with
  ``skip_nonfinite`` and a non-finite gradient in such a group, the *whole* step is
  skipped: no parameter, master, state or step counter changes, ``.grad`` keeps the
  scaled gradients, and GradScaler lowers its scale. Otherwise each gradient is unscaled
  as ``g / S`` in float32 (float64 for float64 gradients): full-precision gradients in
  place, low-precision ones into a float32 copy that the step uses and that is rounded
  back into ``.grad`` afterwards, so ``.grad`` holds unscaled gradients after a taken
  step, as with torch's fused optimizers.
* **state storage**: a policy whose states are what torch.optim would create for the
  stepped tensor (:func:`~portopt.precision.storage.stores_like_torch`) runs on any
  backend; otherwise the group needs a backend with
  :attr:`~portopt.lowering.backend.Backend.build_with_policy` (the generic ``"torch"``
  backend): a backend named explicitly that has none is refused with the reason, and
  ``backend="auto"`` falls back to the best usable backend that has one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from portopt.backends import auto_choice
from portopt.distributed.layout import agreed, carry_layout
from portopt.lowering.backend import Backend, ParamState, step_counter_dtype
from portopt.lowering.registry import registered_backends
from portopt.precision.policy import PolicyError, PrecisionPolicy, as_policy, preset_name
from portopt.precision.quantize import Q8State
from portopt.precision.scaling import LossScaling, any_nonfinite, unscale
from portopt.precision.signs import nonnegative_states
from portopt.precision.storage import allocate_state, create_master, encode, stores_like_torch
from portopt.spec.definition import Spec

MASTER = "master"
"""The state entry holding a parameter's float32 master copy."""
DEFAULT = PrecisionPolicy()
"""torch.optim's behaviour: states in the parameter dtype, no master."""
_FULL_PRECISION = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=256)
def _resolve_cached(value: PrecisionPolicy | str | None) -> PrecisionPolicy:
    policy = as_policy(value)
    return DEFAULT if policy == DEFAULT else policy


def resolve(value: object) -> PrecisionPolicy:
    """The policy of a param group's ``precision`` value (:data:`DEFAULT` itself when it is the default)."""
    if value is None:
        return DEFAULT
    if isinstance(value, (str, PrecisionPolicy)):
        return _resolve_cached(value)
    return as_policy(value)  # type: ignore[arg-type]  # raises PolicyError naming the value


def group_value(value: object) -> str | None:
    """What a param group stores for a ``precision=`` argument: ``None`` (the default), a preset's name,
    or the canonical text (checkpoints hold text, never objects)."""
    policy = resolve(value)
    if policy is DEFAULT:
        return None
    return preset_name(policy) or policy.to_text()


def check_group_precision(spec: Spec, group: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for an invalid ``precision`` or ``skip_nonfinite`` in ``group``."""
    policy = resolve(group.get("precision"))
    policy.check_states(spec.state_names, spec.name)
    if policy.master_weights and MASTER in spec.state_names:
        raise PolicyError(f"{spec.name} has a state named {MASTER!r}, which master weights would overwrite")
    skip = group.get("skip_nonfinite", False)
    if not isinstance(skip, bool):
        raise ValueError(f"Invalid skip_nonfinite value: {skip!r} (True or False)")


def check_params(policy: PrecisionPolicy, params: Sequence[Tensor], where: str) -> None:
    """Each parameter has the dtype ``policy`` expects (if it names one)."""
    if policy.param_dtype is None:
        return
    for index, param in enumerate(params):
        policy.check_param(param, f"{where}, parameter {index} (shape {tuple(param.shape)})")


def needs_policy_backend(policy: PrecisionPolicy, spec: Spec, params: Sequence[Tensor], states: Sequence[Any]) -> bool:
    """Whether stepping ``params`` under ``policy`` needs a backend with ``build_with_policy``."""
    if policy is DEFAULT:
        return False
    dtypes = {p.dtype for p in params}
    if not all(_stores_like_torch(policy, spec, dtype) for dtype in dtypes):
        return True
    return any(isinstance(value, Q8State) for state in states for value in state.values())


@functools.lru_cache(maxsize=256)
def _stores_like_torch(policy: PrecisionPolicy, spec: Spec, dtype: torch.dtype) -> bool:
    return stores_like_torch(policy, spec, dtype)


def policy_backend(
    device: torch.device, chosen: Backend, named: bool, policy: PrecisionPolicy, spec: Spec, numel: int
) -> Backend:
    """For ``chosen``, a backend without ``build_with_policy``: the one ``"auto"`` would choose among those
    that have one, for ``spec`` and a group of ``numel`` elements (the compiled kernel only where the group
    repays compiling), or a ``PolicyError`` naming the backend and the policy (a named backend)."""
    if not named:
        found = auto_choice(device.type, spec, numel, accept=lambda b: b.build_with_policy is not None)
        if found is not None:
            return found
    capable = [
        b
        for b in registered_backends().values()
        if b.build_with_policy is not None and device.type in b.device_types and b.unavailable_reason() is None
    ]
    others = ", ".join(sorted(b.name for b in capable)) or "none usable here"
    raise PolicyError(
        f"backend {chosen.name!r} cannot store states as precision policy {policy.to_text()!r} asks "
        f"(it keeps them in the parameter's dtype: no bf16 or 8-bit states, no stochastic rounding); "
        f"backends that can: {others} (or backend='auto')"
    )


@dataclass
class GroupStep:
    """One param group's step, prepared (checked, step functions chosen) before anything is written."""

    spec: Spec
    policy: PrecisionPolicy
    params: list[Tensor]
    grads: list[Tensor]
    states: list[ParamState]
    hypers: dict[str, Any]
    fresh: list[tuple[Tensor, ParamState]]
    numbers: list[int]
    runs: list[tuple[Callable[..., None], list[int]]]
    policy_step: bool
    skip_nonfinite: bool
    after: list[Callable[[], None]] = field(default_factory=list)
    """What to do once the group is stepped: write gathered sparse rows back, complex states."""
    prepared: list[Callable[[], None]] | None = None
    """The backends' steps, already checked (:mod:`portopt.optim.group_cache`): what runs when the
    gradients need no unscaling; ``None``: call the step functions."""

    def run_plain(self) -> None:
        """The step as torch.optim would take it: parameters and gradients as they are."""
        for step, indices in self.runs:
            step(
                [self.params[i] for i in indices],
                [self.grads[i] for i in indices],
                [self.states[i] for i in indices],
                self.hypers,
            )


def should_skip(work: Sequence[GroupStep], scaling: LossScaling) -> bool:
    """Whether this step is skipped: GradScaler's ``found_inf``, or a non-finite gradient in a group with
    ``skip_nonfinite`` (one host synchronisation each, and only when asked)."""
    if scaling.found_inf_set():
        return True
    checked = [g for w in work if w.skip_nonfinite for g in w.grads]
    if not checked:
        return False
    return agreed(  # sharded pieces: every rank decides the same
        any_nonfinite(checked), [p for w in work if w.skip_nonfinite for p in w.params]
    )


def unscale_gradients(grads: Sequence[Tensor], grad_scale: Tensor) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The gradients divided by ``grad_scale`` (module doc), and the (``.grad``, float32 value) pairs
    to write back after the step."""
    used = list(grads)
    widened: list[tuple[Tensor, Tensor]] = []
    in_place: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for index, grad in enumerate(grads):
        if grad.dtype in _FULL_PRECISION:
            in_place.setdefault((grad.device, grad.dtype), []).append(grad)
        else:
            used[index] = unscale(grad, grad_scale)
            widened.append((grad, used[index]))
    for (device, dtype), tensors in in_place.items():
        torch._foreach_div_(tensors, grad_scale.to(device=device, dtype=dtype))
    return used, widened


def run_group(work: GroupStep, scaling: LossScaling) -> None:
    """One group's step under its policy and the loss scale (module doc): unscale, step the masters,
    round them into the parameters, leave unscaled gradients in ``.grad``."""
    grads: list[Tensor] = list(work.grads)
    widened: list[tuple[Tensor, Tensor]] = []
    if scaling.grad_scale is not None:
        grads, widened = unscale_gradients(grads, scaling.grad_scale)
    policy = work.policy
    stepped = list(work.params)
    masters: list[int] = []
    if policy.master_weights:
        for i, (param, state) in enumerate(zip(work.params, work.states, strict=True)):
            if policy.needs_master(param.dtype):
                master = state.get(MASTER)
                stepped[i] = carry_layout(param, create_master(param) if master is None else master)
                grads[i] = grads[i].to(stepped[i].dtype)
                masters.append(i)
    for step, indices in work.runs:
        args = (
            [stepped[i] for i in indices],
            [grads[i] for i in indices],
            [work.states[i] for i in indices],
            work.hypers,
        )
        if work.policy_step:
            step(
                *args, param_dtypes=[work.params[i].dtype for i in indices], indices=[work.numbers[i] for i in indices]
            )
        else:
            step(*args)
    if masters:
        torch._foreach_copy_([work.params[i] for i in masters], [stepped[i] for i in masters])
        for i in masters:
            work.states[i][MASTER] = stepped[i]
    for grad, value in widened:
        grad.copy_(value)


def drop_stale_masters(policy: PrecisionPolicy, states: Sequence[ParamState | None], params: Sequence[Tensor]) -> None:
    """Delete the master copies ``policy`` does not keep (a group whose policy changed): a stale copy
    must not overwrite the parameter if master weights are switched on again later."""
    for state, param in zip(states, params, strict=True):
        if state is not None and MASTER in state and not policy.needs_master(param.dtype):
            del state[MASTER]


def eager_state(spec: Spec, policy: PrecisionPolicy, values: Mapping[str, float], param: Tensor) -> dict[str, Any]:
    """States before any step, stored as ``policy`` says, filled with ``values[name]``, and ``step`` = 0."""
    nonnegative = nonnegative_states(spec)
    state: dict[str, Any] = {"step": torch.tensor(0.0, dtype=step_counter_dtype())}
    compute = policy.compute_dtype_for(param.dtype)
    for decl in spec.states:
        stored = allocate_state(decl, param, policy, nonnegative=decl.name in nonnegative)
        encode(torch.full(tuple(stored.shape), values[decl.name], dtype=compute, device=param.device), stored)
        state[decl.name] = stored
    return state
