"""``portopt.SophiaG``: the API of the reference implementation (Liuhong99/Sophia, ``SophiaG``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT
from portopt.optim.torch_flags import check_lr
from portopt.precision.policy import PrecisionPolicy


class SophiaG(NamedOptimizer):
    """SophiaG (Liu et al., ICLR 2024), as the authors' ``SophiaG``.

    Arguments as the reference: ``lr``, ``betas`` (moment, Hessian EMA), ``rho``, ``weight_decay``
    (decoupled), ``maximize``; ``capturable`` is recorded; ``hessian_interval`` (portopt's, default 10)
    is the cadence :meth:`method_due` reports. The training loop calls :meth:`update_hessian` after
    every k-th step with the gradient of the loss on labels sampled from the model, and passes the
    number of tokens of the batch to ``step(bs=...)``. States ``exp_avg`` and ``hessian``.
    """

    algorithm = "sophiag"
    check_order = ("lr", "beta1", "beta2", "rho", "weight_decay")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        maximize: bool = False,
        capturable: bool = False,
        hessian_interval: int = 10,
        backend: str = "auto",
        precision: PrecisionPolicy | str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        check_lr(lr)
        defaults = {
            "lr": lr,
            "betas": betas,
            "rho": rho,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "hessian_interval": hessian_interval,
        }
        self._setup(params, defaults, backend, precision, skip_nonfinite)

    @overload
    def step(self, closure: None = None, **inputs: float | Tensor) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], **inputs: float | Tensor) -> float: ...

    def step(self, closure: Callable[[], float] | None = None, **inputs: float | Tensor) -> float | None:
        """One step; ``bs=`` is the number of tokens of the batch (default 5120, the reference's)."""
        return super().step(closure, **inputs)

    def update_hessian(self) -> None:
        """``h ← β2·h + (1 − β2)·g²`` with the gradients present now (the GNB estimate)."""
        self.run_method("update_hessian")
