"""``portopt.Adafactor``: a drop-in for :class:`torch.optim.Adafactor`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_lr
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import OptionValue


class Adafactor(NamedOptimizer):
    """Adafactor, as torch.optim.Adafactor: factored second moments for tensors with 2 or more dims
    (per trailing 2-D slice), a full one for vectors.

    Arguments as :class:`torch.optim.Adafactor`: ``lr`` (caps the relative step size and scales the
    decoupled weight decay), ``beta2_decay``, ``eps=(eps1, eps2)`` (``eps1=None``: the machine epsilon
    of the parameter's dtype), ``d`` (update clipping threshold), ``weight_decay``, ``maximize``;
    ``foreach`` is recorded. States ``row_var``, ``col_var`` (matrices) or ``variance`` (vectors), as
    torch's. transformers' variant: ``portopt.Optimizer(params, portopt.algorithms.get_spec("adafactor",
    convention="transformers"))``.
    """

    algorithm = "adafactor"
    check_order = ("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        check_lr(lr)
        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": tuple(eps),
            "d": d,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        eps = group.get("eps", (None, 1e-3))
        return {"eps1_from_dtype": eps[0] is None}
