"""Loss scaling inside the step: torch.amp.GradScaler's protocol, and a plain non-finite check.

**The protocol.** An optimizer whose class sets ``_step_supports_amp_scaling = True`` is not
unscaled by ``GradScaler.step(optimizer)``. Instead GradScaler checks the (still scaled)
gradients for inf/NaN itself, then sets two attributes on the optimizer for the duration of
``optimizer.step()`` and deletes them afterwards:

* ``optimizer.grad_scale``: the 0-d float32 scale ``S`` the loss was multiplied by, or
  ``None`` when the user already called ``scaler.unscale_(optimizer)`` (for clipping);
* ``optimizer.found_inf``: a 0-d float32 tensor, non-zero when some gradient is inf/NaN.

GradScaler later lowers its scale from its own record of ``found_inf`` (``scaler.update()``);
the optimizer only has to honour it. This is what torch's fused Adam/AdamW/SGD do
(``torch/optim/adam.py``, ``_fused_adam``): the kernel divides each gradient by ``S`` in
float32 and skips the update when ``found_inf`` is set, and the step counter is decremented
by ``found_inf`` afterwards; on a taken step the unscaled gradients are written back to
``.grad``.

**Skip semantics** (:func:`prepare_gradients`): a step with ``found_inf`` set (or, with
``skip_nonfinite=True``, with any non-finite gradient) is decided *before* anything is
written, so it changes nothing at all: parameters, master weights, states and the step
counter keep their values bit for bit, and ``.grad`` keeps the scaled gradients, as with
torch's fused optimizers. The decision reads ``found_inf`` on the host (one synchronisation
per step). Gradients are unscaled as ``g / S`` in float32, never in the gradient's own dtype
(an fp16 gradient divided in fp16 would underflow).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossScaling:
    """What GradScaler passed to this step: ``grad_scale`` ``S`` (``None``: already unscaled) and
    ``found_inf`` (``None``: no GradScaler)."""

    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None

    @classmethod
    def of(cls, optimizer: object) -> LossScaling:
        """Read the attributes GradScaler sets on an optimizer with ``_step_supports_amp_scaling``."""
        return cls(getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None))

    def found_inf_set(self) -> bool:
        """True when GradScaler saw an inf/NaN gradient (reads ``found_inf`` on the host)."""
        return self.found_inf is not None and bool(self.found_inf.item() != 0)


def any_nonfinite(tensors: Sequence[Tensor]) -> bool:
    """True when some element of ``tensors`` is inf or NaN (one host synchronisation)."""
    flags = [torch.logical_not(torch.isfinite(t)).any() for t in tensors if t.numel()]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).any().item()) if flags else False


def unscale(grad: Tensor, grad_scale: Tensor | None) -> Tensor:
    """``grad / S`` computed in float32 (float64 for a float64 gradient); ``grad`` itself is not modified."""
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    value = grad.to(compute)
    if grad_scale is None:
        return value
    return value / grad_scale.to(device=grad.device, dtype=compute)


def prepare_gradients(
    grads: Sequence[Tensor], scaling: LossScaling | None = None, *, skip_nonfinite: bool = False
) -> list[Tensor] | None:
    """The unscaled gradients at compute precision, or ``None``: skip this step, write nothing.

    ``None`` when ``scaling.found_inf`` is set (``scaling=None``: no GradScaler), or when ``skip_nonfinite`` and some gradient is
    non-finite (the check runs on the raw gradients: scaling never makes a finite value inf
    for a scale ``S >= 1``, which GradScaler's scales are unless it backed off 17 times).
    """
    scaling = scaling or LossScaling()
    if scaling.found_inf_set():
        return None
    if skip_nonfinite and any_nonfinite(grads):
        return None
    return [unscale(g, scaling.grad_scale) for g in grads]


def write_back_unscaled(grads: Sequence[Tensor], unscaled: Sequence[Tensor]) -> None:
    """Leave the unscaled gradients in ``.grad`` after a taken step, as torch's fused optimizers do."""
    with torch.no_grad():
        for grad, value in zip(grads, unscaled, strict=True):
            if value is not grad:
                grad.copy_(value)
