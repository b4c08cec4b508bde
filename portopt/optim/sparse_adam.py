"""``portopt.SparseAdam``: drop-in for :class:`torch.optim.SparseAdam`."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from portopt.optim.named import NamedOptimizer
from portopt.optim.optimizer import ParamsT


class SparseAdam(NamedOptimizer):
    """Adam for sparse gradients, as torch.optim.SparseAdam: only the entries a gradient holds move.

    Arguments as :class:`torch.optim.SparseAdam`: ``lr`` (float or 1-element tensor, > 0),
    ``betas``, ``eps`` (> 0), ``maximize``. Every gradient must be sparse (COO) and every
    parameter dense and real, with torch's errors otherwise. The moments and the parameter are
    updated at the gradient's indices (duplicates summed) with the step counter of the whole
    parameter (:mod:`portopt.optim.sparse`); ``step`` is a tensor (torch keeps an int; both load
    either). GradScaler unscales the gradients itself, as for torch.optim.SparseAdam.
    """

    algorithm = "sparse_adam"
    check_order = ("lr", "eps", "beta1", "beta2")
    sparse_gradients = "rows"
    dense_gradients = False
    _step_supports_amp_scaling: ClassVar[bool] = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}
        self._setup(params, defaults, backend)
        sparse_params, complex_params = [], []
        for index, group in enumerate(self.param_groups):
            for position, param in enumerate(group["params"]):
                if param.is_sparse:
                    sparse_params.append([index, position])
                if param.is_complex():
                    complex_params.append([index, position])
        if sparse_params:
            raise ValueError(f"Sparse params at indices {sparse_params}: SparseAdam requires dense parameter tensors")
        if complex_params:
            raise ValueError(
                f"Complex params at indices {complex_params}: SparseAdam does not support complex parameters"
            )
