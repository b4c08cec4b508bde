"""torch.optim's implementation flags, and which portopt implementation each one selects.

torch.optim lets a user pin how a step is computed; portopt honours the same flags (they live
in the param group, as in torch, so checkpoints keep torch's layout):

* ``foreach=None, fused=None``: ``backend=`` decides (``"auto"``: the best usable backend, see
  :func:`portopt.backends.select_backend`);
* ``fused=True``: a fused implementation (:attr:`Backend.torch_flag
  <portopt.lowering.backend.Backend.torch_flag>` ``"fused"``): torch's fused kernel where one is
  proven equivalent (``torch_fused``), else the spec's compiled one-pass kernel (``compiled``);
  torch's ``RuntimeError`` for a parameter no fused implementation takes;
* ``foreach=True``: the foreach lowering (``torch``): one ``torch._foreach_*`` call per
  instruction over all tensors of a bucket;
* ``foreach=False`` or ``fused=False``: a per-tensor loop in torch.optim's single-tensor op order
  (``Backend.build_per_tensor``): one tensor's temporaries at a time (a group with a precision
  policy that stores states unlike torch runs the foreach program of ``build_with_policy``);
* ``capturable=True``: the step as device ops (:class:`~portopt.lowering.graph_step.GraphStep`),
  ``step`` on the parameter's device: no host synchronisation, so a CUDA graph can capture it; on a
  device that cannot capture, torch's error at the step;
* ``differentiable=True``: the same graph step with autograd on: gradients flow through the update
  to the parameters, the states and tensor hyperparameters.

Where several are set, ``differentiable`` decides first, then ``fused``, ``capturable`` and
``foreach`` (torch's fused kernels take ``capturable`` as well: ``fused=True, capturable=True``
on the CPU runs the fused kernel, as in torch).

``backend=`` stays the explicit choice: a named backend that cannot run what a flag asks for
(``backend="torch", fused=True``; ``backend="torch_fused", foreach=False``) is a ``ValueError``
at construction. Under ``torch.compile`` every group runs its backend's graph step, traced into
the caller's graph (Inductor fuses it into one-pass kernels), whatever the flags say.

Combinations torch.optim rejects are rejected with torch's exception type and message.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from portopt.lowering.backend import Backend
from portopt.lowering.checks import StepInputError


class Mode(enum.Enum):
    """How a param group is stepped, from its flags (module docstring)."""

    DEFAULT = "default"
    FUSED = "fused"
    FOREACH = "foreach"
    PER_TENSOR = "per tensor"
    CAPTURABLE = "capturable"
    DIFFERENTIABLE = "differentiable"

    @property
    def graph(self) -> bool:
        """Whether the group runs its backend's :class:`~portopt.lowering.graph_step.GraphStep`."""
        return self in (Mode.CAPTURABLE, Mode.DIFFERENTIABLE)


def group_mode(group: Mapping[str, Any]) -> Mode:
    """The mode a param group's flags ask for (``differentiable`` first, then ``fused``, ``capturable``,
    ``foreach``; ``False`` for ``fused`` or ``foreach`` means torch's for-loop)."""
    if group.get("differentiable"):
        return Mode.DIFFERENTIABLE
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        return Mode.FUSED
    if group.get("capturable"):
        return Mode.CAPTURABLE
    if foreach:
        return Mode.FOREACH
    if foreach is False or fused is False:
        return Mode.PER_TENSOR
    return Mode.DEFAULT


def serves(backend: Backend, mode: Mode) -> bool:
    """Whether ``backend`` has the implementation ``mode`` asks for."""
    if mode is Mode.FUSED:
        return backend.torch_flag == "fused"
    if mode is Mode.FOREACH:
        return backend.torch_flag == "foreach"
    if mode is Mode.PER_TENSOR:
        return backend.build_per_tensor is not None
    if mode.graph:
        return backend.build_graph is not None
    return True


def check_backend_serves(backend: Backend, mode: Mode) -> None:
    """``ValueError`` when the named ``backend`` contradicts the group's flags."""
    if serves(backend, mode):
        return
    ask = {
        Mode.FUSED: "fused=True asks for a fused implementation (backend 'torch_fused' or 'compiled')",
        Mode.FOREACH: "foreach=True asks for the foreach lowering (backend 'torch')",
        Mode.PER_TENSOR: "foreach=False/fused=False ask for torch's per-tensor loop (backend 'torch')",
        Mode.CAPTURABLE: "capturable=True asks for a step without host synchronisation (backend 'torch')",
        Mode.DIFFERENTIABLE: "differentiable=True asks for a step autograd can go through (backend 'torch')",
    }[mode]
    raise ValueError(
        f"backend={backend.name!r} contradicts the param group's flags: {ask}, which {backend.name!r} does not "
        "provide; drop the flag, or use backend='auto'"
    )


def check_lr(lr: Any, *, foreach: bool | None = None, capturable: bool = False, foreach_limited: bool = False) -> None:
    """torch's checks of a tensor learning rate (before the value checks)."""
    if not isinstance(lr, Tensor):
        return
    if foreach_limited and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_betas(betas: Any, *, foreach: bool | None, capturable: bool) -> None:
    """torch.optim.Adam's checks of ``betas`` beyond their ranges (floats or 1-element tensors).

    Run after the value checks (which refuse anything but a pair) and before the param groups
    are built, as torch does."""
    b1, b2 = betas
    if not ((isinstance(b1, float) and isinstance(b2, float)) or (isinstance(b1, Tensor) and isinstance(b2, Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, b in enumerate((b1, b2)):
        if isinstance(b, Tensor):
            if not capturable and foreach:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")


def check_flags(*, foreach: bool | None, differentiable: bool, fused: bool | None = None) -> None:
    """Reject what torch rejects (``fused`` with ``foreach``/``differentiable``) and what cannot be kept
    (``differentiable`` with ``foreach=True``: the foreach ops have no autograd, torch fails at the step)."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable and foreach:
        raise ValueError(
            "foreach=True and differentiable=True cannot be combined: torch's foreach ops do not support autograd "
            "(torch.optim fails at the step with an AssertionError); leave foreach=None"
        )


class CapturableDeviceError(StepInputError, AssertionError):
    """``capturable=True`` for a parameter on a device that cannot capture a step: an AssertionError,
    as torch.optim raises, and a ValueError like every bad step input."""


def capturable_devices() -> list[str]:
    """The device types torch.optim accepts for ``capturable=True`` (torch's own list, so that the message
    is torch's on every version)."""
    try:
        from torch.optim.optimizer import _get_capturable_supported_devices
    except ImportError:  # a torch without the helper: its list as of torch 2.13
        return ["cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name(), "xla"]
    return list(_get_capturable_supported_devices())


def check_capturable(params: Sequence[Tensor], what: str = "params and state_steps") -> None:
    """torch.optim's step-time check of ``capturable=True`` (same type, same message; ``what`` names the
    tensors as the class's message does: NAdam's ``"params, mu_products and state_steps"``)."""
    supported = capturable_devices()
    for param in params:
        if param.device.type not in supported:
            raise CapturableDeviceError(f"If capturable=True, {what} must be on supported devices: {supported}.")


def fused_devices() -> list[str]:
    """The device types torch.optim names in its ``fused=True`` error (torch's own list where it has one)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the helper: its list as of torch 2.13
        return ["mps", "cuda", "xpu", "hpu", "cpu", "mtia", torch._C._get_privateuse1_backend_name()]
    return list(_get_fused_kernels_supported_devices())


def check_fused_param(param: Tensor, served: Sequence[str]) -> None:
    """torch.optim's ``RuntimeError`` for ``fused=True`` and a parameter no fused implementation takes
    (not floating point, or on a device where none of ``served`` runs)."""
    supported = fused_devices()
    if param.is_floating_point() and param.device.type in supported and param.device.type in served:
        return
    message = (
        "`fused=True` requires all the params to be floating point Tensors of "
        f"supported devices: {supported} but {param.dtype} and {param.device.type}"
    )
    if param.is_floating_point() and param.device.type in supported:
        message += f" (portopt's fused implementations run on: {', '.join(served) or 'no device here'})"
    raise RuntimeError(message)
