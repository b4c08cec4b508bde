"""What a step's inputs looked like when they were checked: compare a later call cheaply.

:func:`~portopt.lowering.checks.check_step_inputs` costs microseconds per parameter (every
state's shape, dtype and device, read attribute by attribute). A backend that steps the same
parameters over and over checks them fully once, records an :class:`InputSnapshot`, and on the
next call only asks :meth:`InputSnapshot.matches`: the same parameter, state-dict and state
objects (identity: a state replaced by ``load_state_dict`` or by hand is a new object), and the
same properties (type, dtype, device, shape, strides, ``requires_grad``, ...) of every parameter,
gradient and state tensor (step counters: identity only), checked by dynamo's C++ ``TensorGuards`` (about 0.1 µs a tensor;
a Python comparison where this torch has none). Anything that differs sends the caller back to
the full checks, so a bad input raises the same error on every call, the first or the
thousandth.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_
from typing import Any

import torch
from torch import Tensor

from portopt.lowering.backend import ParamState
from portopt.precision.quantize import Q8State


class _PythonGuards:
    """What ``TensorGuards`` checks, in Python (a torch without dynamo's C++ guards)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.expected = [_properties(t) for t in tensors]

    def check(self, *tensors: Tensor) -> bool:
        return len(tensors) == len(self.expected) and all(
            _properties(t) == e for t, e in zip(tensors, self.expected, strict=True)
        )


def _properties(t: Tensor) -> tuple[object, ...]:
    return (type(t), t.dtype, t.device, t.layout, t.shape, t.stride(), t.requires_grad)


def tensor_guards(tensors: Sequence[Tensor]) -> Any:
    """A checker (``.check(*tensors) -> bool``) of ``tensors``' type, dtype, device, shape, strides and
    ``requires_grad``: dynamo's C++ ``TensorGuards`` where this torch has it."""
    if any(t.layout != torch.strided for t in tensors):
        return _PythonGuards(tensors)  # TensorGuards reads strides, which a sparse tensor lacks
    try:
        from torch._C._dynamo.guards import TensorGuards

        return TensorGuards(
            *tensors,
            dynamic_dims_sizes=[list(t.shape) for t in tensors],  # type: ignore[misc]
            dynamic_dims_strides=[list(t.stride()) for t in tensors],  # type: ignore[misc]
        )
    except (ImportError, TypeError, RuntimeError):
        return _PythonGuards(tensors)


class InputSnapshot:
    """The objects and tensor properties of one step's inputs (module docstring).

    ``names`` are the spec's state names; each state dict must hold them and ``step``. ``holders``
    are the dict objects a later call passes (default ``states``): a step that creates the states of
    new parameters records the values it will put into the caller's (still empty) dicts.
    """

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        holders: Sequence[ParamState] | None = None,
    ) -> None:
        self.keys = (*names, "step")
        self.params = list(params)
        self.states = list(states if holders is None else holders)
        self.entries: list[list[Any]] = [[s[name] for s in states] for name in self.keys]
        tensors: list[Tensor] = []
        self.q8: list[tuple[Q8State, Tensor, Tensor]] = []
        for column in self.entries[:-1]:  # the step counters: identity is enough (0-d, never resized)
            for value in column:
                if isinstance(value, Q8State):
                    self.q8.append((value, value.codes, value.absmax))
                    tensors += [value.codes, value.absmax]
                else:
                    tensors.append(value)
        self.state_tensors = tensors
        self._params = tensor_guards(params)
        self._grads = tensor_guards(grads)
        self._states = tensor_guards(tensors)

    def matches(self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState]) -> bool:
        """Whether these inputs are the recorded ones, unchanged (module docstring)."""
        if len(params) != len(self.params) or len(grads) != len(params) or len(states) != len(params):
            return False
        if not (all(map(is_, params, self.params)) and all(map(is_, states, self.states))):
            return False
        try:
            for name, column in zip(self.keys, self.entries, strict=True):
                if not all(map(is_, [s[name] for s in states], column)):
                    return False
        except KeyError:
            return False
        if not all(q.codes is c and q.absmax is a for q, c, a in self.q8):
            return False
        try:
            return bool(
                self._grads.check(*grads) and self._params.check(*params) and self._states.check(*self.state_tensors)
            )
        except (TypeError, RuntimeError):  # a gradient TensorGuards cannot read (sparse): not the recorded inputs
            return False
