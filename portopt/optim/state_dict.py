"""Loading checkpoints: torch.optim's layout, checked before anything changes.

A portopt optimizer's ``state_dict()`` is torch.optim's (the inherited method): the same
param-group keys and, per parameter, the same state names (``step``, ``exp_avg``, ...),
so checkpoints move both ways between ``torch.optim.X`` and ``portopt.X``.

:func:`load` differs from ``torch.optim.Optimizer.load_state_dict`` in three ways:

* everything is checked first (group count and sizes with torch's messages; each group's
  keys, options and values, and that its precision policy fits its parameters' dtypes;
  each parameter's state names, shapes and dtypes, and its step count, a whole number
  from 0 to 2**53), and any mismatch raises ``ValueError`` naming the group/parameter,
  before the optimizer changes (a checkpoint is data from elsewhere: a value that cannot
  occur, such as ``step = -1``, is refused rather than turned into NaN parameters later);
* a state keeps its dtype (torch casts every state to its parameter's dtype, which would
  turn an fp32 moment of a bf16 parameter into bf16) and moves to its parameter's device;
* ``step`` is kept on the host as a 0-d floating tensor; where torch.optim keeps no step
  counter (SGD), a state without one is taken as "at least one step done" (``step = 1``).

Precision policies (:mod:`portopt.optim.amp`): a group's ``precision`` is saved as text
(:func:`saveable`), an 8-bit state as the plain dict of
:meth:`~portopt.precision.quantize.Q8State.to_dict` (codes, absmax, the map and its name,
the block size), and a master copy as ``state["master"]``; all load back bit-exactly, so
``torch.load(..., weights_only=True)`` reads the checkpoint and a run resumes as if never
interrupted. A checkpoint without ``precision``/``skip_nonfinite`` (torch.optim's, or a
plain portopt run's) keeps the optimizer's own settings.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from copy import deepcopy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from portopt.lowering.backend import step_counter_dtype
from portopt.lowering.interpreter import state_shape
from portopt.optim.amp import DEFAULT, MASTER, check_params, group_value, resolve
from portopt.precision.policy import PrecisionPolicy
from portopt.precision.quantize import Q8State
from portopt.precision.storage import state_format
from portopt.spec.definition import Spec

if TYPE_CHECKING:
    from portopt.optim.optimizer import Optimizer


class CheckpointError(ValueError):
    """A checkpoint does not fit this optimizer (another algorithm, other groups or shapes)."""


def load(optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Load ``state_dict`` into ``optimizer`` (see the module docstring); all or nothing."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"not an optimizer state dict: a {type(state_dict).__name__}")
    state_dict = dict(state_dict)
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    if not {"state", "param_groups"} <= set(state_dict):
        raise CheckpointError(
            f"not an optimizer state dict: it has keys {sorted(map(str, state_dict))}, "
            "expected 'state' and 'param_groups'"
        )
    _check_layout(state_dict)
    groups = optimizer.param_groups
    saved_groups = deepcopy(state_dict["param_groups"])
    if len(groups) != len(saved_groups):
        raise CheckpointError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups, strict=True)):
        raise CheckpointError(
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
        )

    specs: dict[Any, tuple[Spec, Tensor, str, PrecisionPolicy]] = {}
    new_groups = []
    for index, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        for key, value in optimizer.option_defaults.items():
            saved.setdefault(key, value)
        for key in _OPTIMIZER_SETTINGS:
            if key in group and key not in saved:
                saved[key] = group[key]
        saved.update(optimizer.forced_options)
        spec = _group_spec(optimizer, saved, index)
        policy = _group_policy(saved, group["params"], index)
        for position, (saved_id, param) in enumerate(zip(saved["params"], group["params"], strict=True)):
            where = f"param group {index}, parameter {position} (shape {tuple(param.shape)})"
            specs[saved_id] = (spec, param, where, policy)
        saved["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            saved["param_names"] = group["param_names"]
        new_groups.append(saved)

    state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
    for key, value in state_dict["state"].items():
        if key not in specs:
            state[key] = value  # state of no parameter of ours: kept as is, as torch does
            continue
        spec, param, where, policy = specs[key]
        converted = convert_state(spec, value, param, where, optimizer.torch_keeps_step, policy)
        if converted:
            state[param] = converted

    optimizer.__setstate__({"state": state, "param_groups": new_groups})
    for post_hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        post_hook(optimizer)


def _check_layout(state_dict: Mapping[str, Any]) -> None:
    """The containers torch's layout has: ``state`` a dict, ``param_groups`` a list of dicts with ``params`` lists."""
    if not isinstance(state_dict["state"], Mapping):
        raise CheckpointError(f"the checkpoint's 'state' is a {type(state_dict['state']).__name__}, not a dict")
    groups = state_dict["param_groups"]
    if not isinstance(groups, (list, tuple)):
        raise CheckpointError(f"the checkpoint's 'param_groups' is a {type(groups).__name__}, not a list")
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
            raise CheckpointError(
                f"checkpoint param group {index} is not a dict with a 'params' list (got {type(group).__name__})"
            )


_OPTIMIZER_SETTINGS = ("precision", "skip_nonfinite")
"""Group entries that a checkpoint without them leaves as the optimizer has them."""


def saveable_policy(policy: PrecisionPolicy | None) -> str:
    """A policy as a checkpoint names it (``"torch"`` for the default)."""
    return group_value(policy) or "torch" if policy is not None else "torch"


def saveable(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (torch's, freshly packed) with 8-bit states as dicts and policies as text."""
    state = state_dict["state"]
    for key, value in state.items():
        # Hooks and user code may keep other entries in optimizer.state (state["x"] = 1): kept as torch keeps them.
        if isinstance(value, Mapping) and any(isinstance(v, Q8State) for v in value.values()):
            state[key] = {k: v.to_dict() if isinstance(v, Q8State) else v for k, v in value.items()}
    for group in state_dict["param_groups"]:
        if isinstance(group.get("precision"), PrecisionPolicy):
            group["precision"] = group_value(group["precision"])
    return state_dict


def _group_policy(saved: Mapping[str, Any], params: list[Tensor], index: int) -> PrecisionPolicy:
    """The checkpointed group's precision policy, refused unless it fits this group's parameters
    (a ``mixed-fp16`` checkpoint cannot drive bf16 parameters: every step would fail)."""
    try:
        policy = resolve(saved.get("precision"))
        check_params(policy, params, f"param group {index}")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint param group {index}: {exc}") from exc
    return policy


def _group_spec(optimizer: Optimizer, saved: dict[str, Any], index: int) -> Spec:
    keys = ", ".join(sorted(str(k) for k in saved if k != "params"))
    try:
        spec = optimizer.group_spec(saved)
    except KeyError as exc:
        missing = repr(exc.args[0])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint param group {index}: {exc}") from exc
    else:
        absent = dict.fromkeys(h.key for h in spec.hyperparameters if h.key not in saved)
        if not absent:
            try:
                optimizer.check_group(saved)
            except ValueError as exc:
                raise CheckpointError(f"checkpoint param group {index}: {exc}") from exc
            return spec
        missing = ", ".join(map(repr, absent))
    raise CheckpointError(
        f"checkpoint param group {index} has no {missing} (its keys: {keys}); "
        f"is it a checkpoint of another algorithm than {type(optimizer).__name__}?"
    )


def convert_state(
    spec: Spec,
    value: Any,
    param: Tensor,
    where: str,
    torch_keeps_step: bool = True,
    policy: PrecisionPolicy | None = None,
) -> dict[str, Any]:
    """One parameter's checkpointed state, checked and moved to ``param``'s device (dtypes kept;
    8-bit states rebuilt as :class:`~portopt.precision.quantize.Q8State`, bit-exactly).

    Refused: a step that is not a non-negative integer (``-1``, ``1.5``, NaN), a state of
    another shape or a non-floating dtype, and an 8-bit state where ``policy`` stores that
    state as a plain tensor (the group's step could not read it)."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: the checkpoint's state is a {type(value).__name__}, not a dict")
    entries = {k: v for k, v in value.items() if v is not None}  # old torch SGD stored momentum_buffer=None
    if not entries:
        return {}
    expected = set(spec.state_names)
    unknown, missing = set(entries) - expected - {"step", MASTER}, expected - set(entries)
    if unknown or missing:
        raise CheckpointError(
            f"{where}: the checkpoint has state {sorted(entries)}, but {spec.title} keeps {sorted(expected | {'step'})}"
            f"{' (unexpected: ' + ', '.join(sorted(unknown)) + ')' if unknown else ''}"
            f"{' (missing: ' + ', '.join(sorted(missing)) + ')' if missing else ''}; "
            "is it a checkpoint of another algorithm or option set?"
        )
    converted: dict[str, Any] = {"step": _step(entries.get("step"), where, torch_keeps_step)}
    if MASTER in entries:
        converted[MASTER] = _master(entries[MASTER], param, where)
    for decl in spec.states:
        tensor = entries[decl.name]
        shape = state_shape(decl, param.shape)
        if isinstance(tensor, Mapping):
            fmt = state_format(policy or DEFAULT, decl, param.shape, param.dtype)
            if fmt.quantized is None:
                raise CheckpointError(
                    f"{where}: state {decl.name!r} is 8-bit in the checkpoint, but this group's precision policy "
                    f"({saveable_policy(policy)}) stores it as a {fmt.dtype} tensor; load it into an optimizer "
                    "with the checkpoint's precision"
                )
            converted[decl.name] = _quantized(tensor, shape, param, f"{where}: state {decl.name!r}")
            continue
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"{where}: state {decl.name!r} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{where}: state {decl.name!r} has shape {tuple(tensor.shape)}, the parameter needs {shape}"
            )
        if not (tensor.is_floating_point() or (tensor.is_complex() and param.is_complex())):
            raise CheckpointError(f"{where}: state {decl.name!r} has dtype {tensor.dtype}; a floating dtype is needed")
        # torch.optim.SGD keeps a sparse momentum buffer for sparse gradients; portopt's are dense (same values).
        converted[decl.name] = (tensor.to_dense() if tensor.layout != torch.strided else tensor).to(device=param.device)
    return converted


def _quantized(data: Mapping[str, Any], shape: tuple[int, ...], param: Tensor, where: str) -> Q8State:
    try:
        stored = Q8State.from_dict(dict(data), param.device)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    if tuple(stored.shape) != shape:
        raise CheckpointError(f"{where}: the 8-bit state has shape {tuple(stored.shape)}, the parameter needs {shape}")
    return stored


def _master(master: Any, param: Tensor, where: str) -> Tensor:
    if not isinstance(master, Tensor) or not master.is_floating_point() or master.shape != param.shape:
        described = (
            f"a {master.dtype} tensor of shape {tuple(master.shape)}" if isinstance(master, Tensor) else repr(master)
        )
        raise CheckpointError(
            f"{where}: the master weights are {described}; a floating tensor of shape {tuple(param.shape)} is needed"
        )
    return master.detach().to(device=param.device)


MAX_STEP = 2**53
"""The largest step count accepted from a checkpoint (every integer up to it is a float64)."""


def _step(step: Any, where: str, torch_keeps_step: bool) -> Tensor:
    if step is None:
        if torch_keeps_step:
            raise CheckpointError(f"{where}: the checkpoint's state has no 'step'")
        return torch.tensor(1.0, dtype=step_counter_dtype())
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise CheckpointError(f"{where}: 'step' has shape {tuple(step.shape)}; a single number is needed")
        if step.is_complex() or step.dtype == torch.bool:
            raise CheckpointError(f"{where}: 'step' has dtype {step.dtype}; a real number is needed")
        dtype = step.dtype if step.is_floating_point() else step_counter_dtype()
        counter = step.detach().to(device="cpu", dtype=dtype).reshape(())
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        if isinstance(step, int) and abs(step) > MAX_STEP:
            raise CheckpointError(f"{where}: 'step' is {step}; at most {MAX_STEP} steps are accepted")
        counter = torch.tensor(float(step), dtype=step_counter_dtype())
    else:
        raise CheckpointError(f"{where}: 'step' is {step!r}; a number or a 1-element tensor is needed")
    value = float(counter)
    if not (math.isfinite(value) and value >= 0 and value == math.floor(value) and value <= MAX_STEP):
        raise CheckpointError(
            f"{where}: 'step' is {value!r}; a step count is a whole number from 0 to {MAX_STEP} "
            "(a negative, fractional or non-finite count would give wrong bias corrections)"
        )
    return counter
