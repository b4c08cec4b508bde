"""Input checks shared by the front end and every backend: a step validates, then writes.

:func:`check_step_inputs` looks at everything a step of one param group will read
(hyperparameter values, gradients, existing states) and raises before anything is
written, with a message that names the parameter, the value and what is accepted. The
front end runs it over *every* group before the first group is stepped, so a bad group
leaves the whole optimizer unchanged; a backend may run it again when called directly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from portopt.lowering.backend import Hypers, ParamState, with_inputs
from portopt.lowering.interpreter import state_shape, tensor_facts
from portopt.precision.quantize import Q8State
from portopt.spec.analysis import Kind
from portopt.spec.definition import Spec
from portopt.spec.errors import HyperparameterError
from portopt.spec.expr import walk
from portopt.spec.symbols import Hyperparameter, Layout


class StepInputError(ValueError):
    """The inputs of a step are inconsistent with each other or with the spec."""


class SparseGradientError(StepInputError, RuntimeError):
    """A sparse gradient reached a dense-only step (a RuntimeError too, as torch.optim raises)."""


def check_hyperparameter_value(spec: Spec, h: Hyperparameter, value: object) -> None:
    """``value`` is a number or a 1-element tensor inside the range of ``h``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise HyperparameterError(
                f"{spec.name}: hyperparameter {h.name!r} must be a number or a 1-element tensor, "
                f"got a tensor of shape {tuple(value.shape)}"
            )
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HyperparameterError(
            f"{spec.name}: hyperparameter {h.name!r} must be a number or a 1-element tensor, "
            f"got {value!r} ({type(value).__name__})"
        )
    h.check(value, spec.name)  # type: ignore[arg-type]  # printed as given, like torch's messages


def check_hyperparameter_values(spec: Spec, hypers: Mapping[str, object]) -> None:
    """Every hyperparameter of ``spec`` has a value (a number or a 1-element tensor) inside its range, and so
    has every input given (the others take their defaults)."""
    for h in spec.hyperparameters:
        if h.name not in hypers:
            raise HyperparameterError(
                f"{spec.name}: no value for hyperparameter {h.name!r} (given: {', '.join(sorted(hypers)) or 'none'})"
            )
        check_hyperparameter_value(spec, h, hypers[h.name])
    for i in spec.inputs:
        if i.name not in hypers:
            continue
        value = hypers[i.name]
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HyperparameterError(
                f"{spec.name}: input {i.name!r} must be a number or a 1-element tensor, got {value!r} "
                f"({type(value).__name__})"
            )
        i.check(value, spec.name)


@functools.lru_cache(maxsize=256)
def needs_matrices(spec: Spec) -> bool:
    """Whether the spec factors anything by rows or columns (then every parameter needs >= 2 dims)."""
    if any(s.layout in (Layout.ROW, Layout.COL) for s in spec.states):
        return True
    return any(spec.kind(node) in (Kind.ROW, Kind.COL, Kind.SLICE) for node in walk(list(spec.roots)))


def check_step_inputs(
    spec: Spec,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[ParamState],
    hypers: Hypers,
    *,
    allow_quantized: bool = False,
) -> None:
    """Raise :class:`StepInputError` (or :class:`HyperparameterError`) unless a step can run.

    Checked: list lengths; hyperparameter values; each gradient dense, floating point, of
    the parameter's shape and device; each parameter real floating point; each existing
    state complete (every declared state and ``step``), of the declared storage shape, on
    the parameter's device; parameters with >= 2 dims where the spec factors by rows/columns.
    A state may be an 8-bit :class:`~portopt.precision.quantize.Q8State` only with
    ``allow_quantized`` (a step that stores states as a precision policy says).
    """
    if not len(params) == len(grads) == len(states):
        raise StepInputError(
            f"{spec.name}: got {len(params)} parameters, {len(grads)} gradients and {len(states)} state dicts; "
            "pass one gradient and one state dict per parameter"
        )
    check_hyperparameter_values(spec, with_inputs(spec, hypers))
    general = spec
    for index, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
        spec = general.specialize(tensor_facts(param)) if general.shape_dependent else general
        matrices = needs_matrices(spec)
        # Cheap test first; the detailed checks below only run to say what is wrong.
        if not _param_fits(param, grad, matrices):
            _check_param(spec, index, param, grad, matrices)
        if state and not _state_fits(spec, param, state, allow_quantized):
            _check_state(spec, index, param, state, allow_quantized)
            raise StepInputError(f"{spec.name}: the state of parameter {index} does not fit it")  # not reached


def _param_fits(param: Tensor, grad: object, matrices: bool) -> bool:
    return (
        isinstance(grad, Tensor)
        and grad.layout == torch.strided
        and param.is_floating_point()
        and grad.is_floating_point()
        and grad.shape == param.shape
        and grad.device == param.device
        and (not matrices or param.dim() >= 2)
    )


def _state_fits(spec: Spec, param: Tensor, state: ParamState, allow_quantized: bool) -> bool:
    step: object = state.get("step")
    if not isinstance(step, Tensor) or step.numel() != 1 or not step.is_floating_point():
        return False
    shape, device = param.shape, param.device
    for decl in spec.states:
        value: object = state.get(decl.name)
        if allow_quantized and isinstance(value, Q8State):
            if value.device != device or value.shape != state_shape(decl, shape):
                return False
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != device:
            return False
        if decl.layout is Layout.ELEMENTWISE:
            if value.shape != shape:
                return False
        elif tuple(value.shape) != state_shape(decl, shape):
            return False
    return True


def _check_param(spec: Spec, index: int, param: Tensor, grad: Tensor, matrices: bool) -> None:
    where = f"{spec.name}: parameter {index} (shape {tuple(param.shape)})"
    if not isinstance(grad, Tensor):
        raise StepInputError(f"{where}: the gradient is a {type(grad).__name__}, not a tensor")
    if grad.layout != torch.strided:
        raise SparseGradientError(
            f"{spec.title} does not support sparse gradients ({where} has a {grad.layout} gradient); "
            "densify it with grad.to_dense(), or use torch.optim.SparseAdam"
        )
    if not param.is_floating_point():  # complex too
        raise StepInputError(
            f"{where} has dtype {param.dtype}; real floating-point parameters are supported "
            "(for complex parameters, optimize torch.view_as_real(p))"
        )
    if not grad.is_floating_point():
        raise StepInputError(f"{where}: the gradient has dtype {grad.dtype}; a real floating-point gradient is needed")
    if grad.shape != param.shape:
        raise StepInputError(f"{where}: the gradient has shape {tuple(grad.shape)}; it must match the parameter")
    if grad.device != param.device:
        raise StepInputError(f"{where}: the gradient is on {grad.device} but the parameter on {param.device}")
    if matrices and param.dim() < 2:
        raise StepInputError(
            f"{where}: {spec.name} factors its statistics by rows and columns and needs parameters with at least "
            "2 dims; put vectors and scalars in a param group of a non-factored algorithm"
        )


def _check_state(spec: Spec, index: int, param: Tensor, state: ParamState, allow_quantized: bool) -> None:
    where = f"{spec.name}: the state of parameter {index} (shape {tuple(param.shape)})"
    missing = [name for name in (*spec.state_names, "step") if name not in state]
    if missing:
        raise StepInputError(
            f"{where} lacks {', '.join(repr(m) for m in missing)} (has: {', '.join(map(repr, state)) or 'nothing'}); "
            "was it created by another algorithm or option set?"
        )
    step: object = state["step"]  # checkpoints and callers may hand in anything
    if not isinstance(step, Tensor) or step.numel() != 1 or not step.is_floating_point():
        raise StepInputError(f"{where}: 'step' must be a 1-element floating-point tensor, got {step!r}")
    for decl in spec.states:
        value: object = state[decl.name]
        expected = state_shape(decl, param.shape)
        if isinstance(value, Q8State) and not allow_quantized:
            raise StepInputError(
                f"{where}: state {decl.name!r} is 8-bit quantised; only a step that follows a precision policy "
                "reads it (give the param group a precision= policy, on a backend that supports policies)"
            )
        if not isinstance(value, (Tensor, Q8State)):
            raise StepInputError(f"{where}: state {decl.name!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != expected:
            raise StepInputError(
                f"{where}: state {decl.name!r} has shape {tuple(value.shape)}, expected {expected} "
                f"(layout {decl.layout.value!r})"
            )
        if value.device != param.device:
            raise StepInputError(
                f"{where}: state {decl.name!r} is on {value.device} but the parameter on {param.device}; "
                "move the state (load_state_dict does this)"
            )
        if isinstance(value, Tensor) and not value.is_floating_point():
            raise StepInputError(f"{where}: state {decl.name!r} has dtype {value.dtype}; a floating dtype is needed")
