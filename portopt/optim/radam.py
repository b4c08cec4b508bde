"""``portopt.RAdam``: drop-in for :class:`torch.optim.RAdam`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_flags, check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue


class RAdam(NamedOptimizer):
    """RAdam (rectified Adam), as torch.optim.RAdam: rectified when ρ_t > 5.

    Arguments as :class:`torch.optim.RAdam`: ``lr`` (float or 1-element tensor), ``betas``,
    ``eps``, ``weight_decay`` (coupled L2, or decoupled with ``decoupled_weight_decay=True``),
    ``maximize``, and torch's ``foreach``/``capturable``/``differentiable``, which choose the
    implementation as in torch (:mod:`portopt.optim.torch_flags`). The paper's ρ_t > 4 is
    ``portopt.Optimizer(params, portopt.algorithms.radam(threshold=4.0))``.
    """

    algorithm = "radam"
    option_defaults: ClassVar[dict[str, Any]] = {"maximize": False, "decoupled_weight_decay": False}
    check_order = ("lr", "eps", "beta1", "beta2", "weight_decay")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
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
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)
        check_flags(foreach=foreach, differentiable=differentiable)

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {"decoupled_weight_decay": bool(group["decoupled_weight_decay"])}
