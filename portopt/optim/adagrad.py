"""``portopt.Adagrad``: drop-in for :class:`torch.optim.Adagrad`."""

from __future__ import annotations

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_flags, check_lr
from portopt.precision.policy import PrecisionPolicy


class Adagrad(NamedOptimizer):
    """AdaGrad, as torch.optim.Adagrad (dense gradients).

    Arguments as :class:`torch.optim.Adagrad`: ``lr`` (float or 1-element tensor),
    ``lr_decay``, ``weight_decay`` (coupled L2), ``initial_accumulator_value``, ``eps``,
    ``maximize``, and torch's ``foreach``/``fused``/``differentiable``, which choose the
    implementation as in torch (:mod:`portopt.optim.torch_flags`). A sparse gradient updates
    only the entries it holds, as in torch (:mod:`portopt.optim.sparse`). As torch does, the
    states (``sum`` and ``step`` = 0)
    are created when parameters are added, so checkpoints hold every parameter's state;
    unlike torch, this includes parameters added later with ``add_param_group``.
    """

    algorithm = "adagrad"
    check_order = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    eager_state = True
    sparse_gradients = "rows"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        check_lr(lr)
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)
        check_flags(foreach=foreach, differentiable=differentiable, fused=fused)
