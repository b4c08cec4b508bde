"""``portopt.Adam`` and ``portopt.AdamW``: drop-ins for :class:`torch.optim.Adam` and :class:`torch.optim.AdamW`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_betas, check_flags, check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue

Betas = tuple[float | Tensor, float | Tensor]


class Adam(NamedOptimizer):
    """Adam, as torch.optim.Adam (AMSGrad and decoupled weight decay as options).

    Arguments as :class:`torch.optim.Adam`: ``lr`` (float or 1-element tensor), ``betas``,
    ``eps``, ``weight_decay`` (coupled L2, or decoupled with ``decoupled_weight_decay=True``),
    ``amsgrad``, ``maximize``, and torch's ``foreach``/``fused``/``capturable``/``differentiable``,
    which choose the implementation as in torch (:mod:`portopt.optim.torch_flags`). Sparse
    gradients are refused as torch refuses them (use :class:`portopt.SparseAdam`).
    """

    algorithm = "adam"
    option_defaults: ClassVar[dict[str, Any]] = {"maximize": False, "amsgrad": False, "decoupled_weight_decay": False}
    check_order = ("lr", "eps", "beta1", "beta2", "weight_decay")
    sparse_hint = ", please consider SparseAdam instead"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        check_lr(lr, foreach=foreach, capturable=capturable, foreach_limited=True)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        self._setup(
            params,
            {**defaults, **self.forced_options},
            backend,
            precision,
            skip_nonfinite,
            before_groups=lambda: check_betas(betas, foreach=foreach, capturable=capturable),
        )
        check_flags(foreach=foreach, differentiable=differentiable, fused=fused)

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {"amsgrad": bool(group["amsgrad"]), "decoupled_weight_decay": bool(group["decoupled_weight_decay"])}


class AdamW(Adam):
    """AdamW, as torch.optim.AdamW: Adam with decoupled weight decay ``p ← p·(1 − lr·λ)``.

    Arguments as :class:`torch.optim.AdamW` (``weight_decay`` defaults to 1e-2);
    ``decoupled_weight_decay`` is always True, also for a loaded Adam checkpoint, as in torch.
    """

    forced_options: ClassVar[dict[str, Any]] = {"decoupled_weight_decay": True}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            backend=backend,
            precision=precision,
            skip_nonfinite=skip_nonfinite,
        )
