"""torch.optim's implementation flags, accepted for drop-in compatibility.

What portopt does with them (the named classes document this too):

* ``foreach``: recorded in the param group (checkpoints keep torch's layout). The
  backend decides how to batch: the generic torch backend always uses foreach ops where
  they help, whatever the flag says.
* ``fused``: recorded in the param group. The kernel is chosen by ``backend=`` ("auto"
  prefers a fused backend where one is registered and usable).
* ``capturable``: recorded in the param group (torch.optim then keeps ``step`` on the
  parameter's device when it loads a portopt checkpoint). portopt keeps ``step`` on the
  host and computes step scalars there, so a portopt step is not CUDA-graph capturable.
* ``differentiable``: only ``False`` is accepted; portopt's steps update tensors in place
  under ``torch.no_grad()`` and are not differentiable.

Combinations torch.optim rejects are rejected with torch's exception type and message.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def check_lr(lr: Any, *, foreach: bool | None = None, capturable: bool = False, foreach_limited: bool = False) -> None:
    """torch's checks of a tensor learning rate (before the value checks)."""
    if not isinstance(lr, Tensor):
        return
    if foreach_limited and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_betas(betas: Any, *, foreach: bool | None, capturable: bool) -> None:
    """torch.optim.Adam's checks of ``betas`` beyond their ranges (floats or 1-element tensors)."""
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
    """Reject what torch rejects (``fused`` with ``foreach``/``differentiable``) and ``differentiable=True``."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise ValueError(
            "differentiable=True is not supported: portopt updates parameters and states in place under "
            "torch.no_grad(); use differentiable=False (or torch.optim for a differentiable step)"
        )
