"""``portopt.Adamax``: drop-in for :class:`torch.optim.Adamax`."""

from __future__ import annotations

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_flags, check_lr
from portopt.precision.policy import PrecisionPolicy


class Adamax(NamedOptimizer):
    """Adamax (Adam with the infinity norm), as torch.optim.Adamax.

    Arguments as :class:`torch.optim.Adamax`: ``lr`` (float or 1-element tensor), ``betas``,
    ``eps``, ``weight_decay`` (coupled L2), ``maximize``; torch's ``foreach``, ``capturable``
    and ``differentiable`` choose the implementation as in torch (:mod:`portopt.optim.torch_flags`).
    """

    algorithm = "adamax"
    check_order = ("lr", "eps", "beta1", "beta2", "weight_decay")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
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
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)
        check_flags(foreach=foreach, differentiable=differentiable)
