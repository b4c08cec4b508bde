"""``portopt.NAdam``: drop-in for :class:`torch.optim.NAdam`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_flags, check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue


class NAdam(NamedOptimizer):
    """NAdam (Adam with Nesterov momentum), as torch.optim.NAdam.

    Arguments as :class:`torch.optim.NAdam`: ``lr`` (float or 1-element tensor), ``betas``,
    ``eps``, ``weight_decay`` (coupled L2, or decoupled with ``decoupled_weight_decay=True``),
    ``momentum_decay``, ``maximize``, and torch's ``foreach``/``capturable``/``differentiable``,
    which choose the implementation as in torch (:mod:`portopt.optim.torch_flags`).
    ``mu_product`` is a per-tensor state,
    kept in at least float32 on the parameter's device.
    """

    algorithm = "nadam"
    option_defaults: ClassVar[dict[str, Any]] = {"maximize": False, "decoupled_weight_decay": False}
    check_order = ("lr", "eps", "beta1", "beta2", "weight_decay", "momentum_decay")
    capturable_tensors = "params, mu_products and state_steps"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        check_lr(lr)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)
        check_flags(foreach=foreach, differentiable=differentiable)

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {"decoupled_weight_decay": bool(group["decoupled_weight_decay"])}
