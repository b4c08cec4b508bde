"""``portopt.Adan``: the API of the reference implementation (sail-sg/Adan, ``adan.Adan``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, overload

import torch
from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue


class Adan(NamedOptimizer):
    """Adan (Xie et al.), as sail-sg/Adan's ``Adan``.

    Arguments as the reference: ``lr``, ``betas`` (three), ``eps``, ``weight_decay``, ``max_grad_norm``
    (> 0: gradients scaled by ``min(max_grad_norm / (‖g‖ + eps), 1)``, ``‖g‖`` the norm of every
    gradient of every group and ``eps`` the last group's, as the reference reads them), ``no_prox``
    (how weight decay is applied), ``maximize``; ``foreach`` as torch.optim's (``None``, the default: the
    backend decides; sail-sg's default ``True`` would pin the foreach lowering, so it is not copied). The reference counts the bias
    correction's ``t`` per param group; portopt per parameter (the same where every parameter has a
    gradient at every step).
    """

    algorithm = "adan"
    check_order = ("lr", "eps", "beta1", "beta2", "beta3")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        no_prox: bool = False,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if not max_grad_norm >= 0.0:
            raise ValueError(f"Invalid Max grad norm: {max_grad_norm}")
        check_lr(lr)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
            "no_prox": no_prox,
            "foreach": foreach,
            "maximize": maximize,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {"no_prox": bool(group.get("no_prox", False))}

    def clip_coefficient(self) -> float:
        """The factor of global gradient-norm clipping (1 without ``max_grad_norm``)."""
        max_norm = float(self.defaults["max_grad_norm"])
        if max_norm <= 0:
            return 1.0
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        total = math.sqrt(sum(float(torch.linalg.vector_norm(x.double()) ** 2) for x in grads))
        return min(max_norm / (total + float(self.param_groups[-1]["eps"])), 1.0)

    @overload
    def step(self, closure: None = None, **inputs: float | Tensor) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], **inputs: float | Tensor) -> float: ...

    def step(self, closure: Callable[[], float] | None = None, **inputs: float | Tensor) -> float | None:
        """One step (gradients clipped by their global norm first, with ``max_grad_norm``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        super().step(None, **{"grad_scale": self.clip_coefficient(), **inputs})
        return loss
