"""``portopt.Lion`` (torch.optim has no Lion)."""

from __future__ import annotations

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_lr
from portopt.precision.policy import PrecisionPolicy


class Lion(NamedOptimizer):
    """Lion (Chen et al., NeurIPS 2023): the sign of an interpolated momentum, decoupled decay.

    Arguments in torch.optim's style: ``lr`` (default 1e-4, typically 3-10x below AdamW's),
    ``betas`` (default (0.9, 0.99): interpolation and momentum), ``weight_decay``
    (decoupled), ``maximize``, ``differentiable`` (autograd through the step, as torch.optim's). State: ``exp_avg``.
    """

    algorithm = "lion"
    check_order = ("lr", "beta1", "beta2", "weight_decay")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        check_lr(lr)
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize}
        if differentiable:
            defaults["differentiable"] = True
        self._setup(params, defaults, backend, precision, skip_nonfinite)
