"""``portopt.SGD``: drop-in for :class:`torch.optim.SGD`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_flags, check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue, Spec

NESTEROV_ERROR = "Nesterov momentum requires a momentum and zero dampening"


class SGD(NamedOptimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD.

    Arguments as :class:`torch.optim.SGD`: ``lr`` (float or 1-element tensor),
    ``momentum``, ``dampening``, ``weight_decay`` (L2, coupled), ``nesterov``,
    ``maximize``, and torch's ``foreach``/``fused``/``differentiable``, which choose the
    implementation as in torch (:mod:`portopt.optim.torch_flags`). A sparse gradient is stepped
    as its dense form, which is what torch.optim.SGD computes (:mod:`portopt.optim.sparse`;
    the momentum buffer is dense). ``momentum != 0``
    selects the spec with a momentum buffer, whose first value is the first gradient.
    torch.optim.SGD keeps no ``step``; portopt does (torch ignores it), and a torch
    checkpoint without one loads with ``step = 1``.
    """

    algorithm = "sgd"
    option_defaults: ClassVar[dict[str, Any]] = {"maximize": False, "nesterov": False}
    check_order = ("lr", "momentum", "weight_decay")
    torch_keeps_step = False
    sparse_gradients = "dense"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        check_lr(lr)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)
        check_flags(foreach=foreach, differentiable=differentiable, fused=fused)

    @classmethod
    def spec(cls, **options: Any) -> Spec:
        """The spec for these options (``momentum=0.9`` selects the momentum variant)."""
        return super().spec(**{"momentum": 0.0, **options})

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {"momentum": bool(group["momentum"] != 0), "nesterov": bool(group["nesterov"])}

    def check_group(self, group: Mapping[str, Any]) -> None:
        super().check_group(group)  # the spec factory itself refuses nesterov without momentum
        if group.get("nesterov") and (group["momentum"] <= 0 or group.get("dampening", 0) != 0):
            raise ValueError(NESTEROV_ERROR)
