"""``portopt.AdaBelief`` (torch.optim has no AdaBelief)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue


class AdaBelief(NamedOptimizer):
    """AdaBelief (Zhuang et al., NeurIPS 2020): the step adapts to the belief ``(g − m)²``.

    Arguments in torch.optim's style: ``lr`` (float or 1-element tensor), ``betas``,
    ``eps`` (default 1e-16, added to the state and outside the root, as in the paper),
    ``weight_decay``, ``decoupled_weight_decay`` (default True: ``p ← p·(1 − lr·λ)``;
    False: coupled L2), ``maximize``, ``differentiable`` (autograd through the step, as torch.optim's). States: ``exp_avg``, ``exp_avg_var``.
    """

    algorithm = "adabelief"
    option_defaults: ClassVar[dict[str, Any]] = {"maximize": False, "decoupled_weight_decay": True}
    check_order = ("lr", "eps", "beta1", "beta2", "weight_decay")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = True,
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
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
        }
        if differentiable:
            defaults["differentiable"] = True
        self._setup(params, defaults, backend, precision, skip_nonfinite)

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {"decoupled_weight_decay": bool(group["decoupled_weight_decay"])}
