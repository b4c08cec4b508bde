"""``portopt.LAMB`` (torch.optim has no LAMB)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue


class LAMB(NamedOptimizer):
    """LAMB (You et al., ICLR 2020): Adam's direction scaled per tensor by the trust ratio ‖p‖/‖u‖.

    Arguments in torch.optim's style: ``lr`` (float or 1-element tensor), ``betas``,
    ``eps`` (default 1e-6), ``weight_decay`` (decoupled, inside the trust ratio),
    ``bias_correction`` (default True), ``maximize``, ``differentiable`` (autograd through the step, as torch.optim's). States: ``exp_avg``, ``exp_avg_sq``.
    """

    algorithm = "lamb"
    option_defaults: ClassVar[dict[str, Any]] = {"maximize": False, "bias_correction": True}
    check_order = ("lr", "eps", "beta1", "beta2", "weight_decay")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0,
        bias_correction: bool = True,
        *,
        maximize: bool = False,
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
            "bias_correction": bias_correction,
            "maximize": maximize,
        }
        if differentiable:
            defaults["differentiable"] = True
        self._setup(params, defaults, backend, precision, skip_nonfinite)

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {"bias_correction": bool(group["bias_correction"])}
