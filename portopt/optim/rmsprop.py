"""``portopt.RMSprop``: drop-in for :class:`torch.optim.RMSprop`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_flags, check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue, Spec


class RMSprop(NamedOptimizer):
    """RMSprop, as torch.optim.RMSprop (plain, centered, with momentum, or both).

    Arguments as :class:`torch.optim.RMSprop`: ``lr`` (float or 1-element tensor),
    ``alpha``, ``eps``, ``weight_decay`` (coupled L2), ``momentum`` (``!= 0`` adds the
    momentum buffer), ``centered``, ``maximize``, and torch's ``foreach``/``capturable``/
    ``differentiable``, which choose the implementation as in torch
    (:mod:`portopt.optim.torch_flags`).
    """

    algorithm = "rmsprop"
    option_defaults: ClassVar[dict[str, Any]] = {"maximize": False, "centered": False}
    check_order = ("lr", "eps", "momentum", "weight_decay", "alpha")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        check_lr(lr)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)
        check_flags(foreach=foreach, differentiable=differentiable)

    @classmethod
    def spec(cls, **options: Any) -> Spec:
        """The spec for these options (``momentum=0.9`` selects the momentum variant)."""
        return super().spec(**{"momentum": 0.0, **options})

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {"centered": bool(group["centered"]), "momentum": bool(group["momentum"] != 0)}
