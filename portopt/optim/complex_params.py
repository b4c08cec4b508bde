"""Complex parameters, stepped as torch.optim steps them: as ``torch.view_as_real``.

torch.optim treats a complex parameter as two real ones, its real and imaginary parts, each
updated by the algorithm's real arithmetic (``torch.view_as_real`` of the parameter, gradient
and states). So does portopt, for every algorithm whose states are element-wise or per tensor:
the step function sees real views of shape ``(..., 2)``, writes through them, and the states
stay complex tensors in ``optimizer.state`` (a per-tensor state such as NAdam's ``mu_product``
stays real), so checkpoints have torch.optim's layout. Norms (LAMB's trust ratio) therefore
run over both parts, the complex 2-norm; ``sign`` (Lion) takes each part's sign.

Refused with a clear error: row/column-factored states (a factor of a complex matrix has no
``view_as_real`` meaning) and precision policies (states are kept as torch keeps them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from portopt.lowering.backend import ParamState
from portopt.lowering.checks import StepInputError
from portopt.optim import amp
from portopt.precision.policy import PolicyError, PrecisionPolicy
from portopt.spec.definition import Spec
from portopt.spec.symbols import Layout


def check(spec: Spec, policy: PrecisionPolicy, group: int) -> None:
    """Raise unless complex parameters of ``spec`` can be stepped as real views."""
    if policy is not amp.DEFAULT:
        raise PolicyError(
            f"param group {group}: complex parameters are stepped as stored (torch.view_as_real); "
            f"a precision policy ({policy.to_text()!r}) is not supported for them: use precision=None"
        )
    factored = [s.name for s in spec.states if s.layout in (Layout.ROW, Layout.COL)]
    if factored:
        raise StepInputError(
            f"{spec.name}: param group {group} has complex parameters, but state(s) {', '.join(map(repr, factored))} "
            "are factored by rows/columns, which has no view_as_real meaning; optimize torch.view_as_real(p) instead"
        )


def real_views(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState]
) -> tuple[list[Tensor], list[Tensor], list[ParamState], Callable[[], None]]:
    """``params``, ``grads`` and ``states`` with each complex entry replaced by its real view, and
    the function that stores, after the step, the states the step created as complex tensors."""
    new_params, new_grads, new_states = list(params), list(grads), list(states)
    proxies: list[tuple[ParamState, ParamState, dict[str, Tensor], torch.Size]] = []
    for i, param in enumerate(params):
        if not param.is_complex():
            continue
        grad = grads[i]
        if not grad.is_complex():
            raise StepInputError(
                f"parameter {i} (shape {tuple(param.shape)}) is complex ({param.dtype}) but its gradient is "
                f"{grad.dtype}; a complex parameter needs a complex gradient"
            )
        views = {k: torch.view_as_real(v) for k, v in states[i].items() if _complex_tensor(v)}
        proxy: ParamState = {**states[i], **views}
        new_params[i] = torch.view_as_real(param)
        new_grads[i] = torch.view_as_real(grad.resolve_conj())
        new_states[i] = proxy
        proxies.append((states[i], proxy, views, new_params[i].shape))

    def restore() -> None:
        for original, proxy, views, shape in proxies:
            for key, value in proxy.items():
                if views.get(key) is value or original.get(key) is value:
                    continue  # written in place (through its view), or not a tensor we made
                original[key] = _as_complex(value) if _real_view_like(value, shape) else value

    return new_params, new_grads, new_states, restore


def _complex_tensor(value: object) -> bool:
    return isinstance(value, Tensor) and value.is_complex()


def _real_view_like(value: object, shape: torch.Size) -> bool:
    """Whether ``value`` is a real tensor of a complex parameter's real-view shape (an element-wise state)."""
    return isinstance(value, Tensor) and value.is_floating_point() and value.shape == shape


def _as_complex(real: Tensor) -> Tensor:
    """``torch.view_as_complex`` of a ``(..., 2)`` tensor, made contiguous first where its strides do not allow it."""
    try:
        return torch.view_as_complex(real)
    except RuntimeError:
        return torch.view_as_complex(real.contiguous())
