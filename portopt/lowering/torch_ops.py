"""The meaning of every primitive in torch terms: one rule per :class:`Op`.

This table is the living definition of the element-wise and reduction ops. The float64
reference interprets specs with it; the generic torch backend applies the same rules
to float32 ("opmath") tensors. Reductions of an empty tensor give 0 (a mean over no
elements included), so a zero-size parameter never produces NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from portopt.spec.ops import Op

Rule = Callable[..., Tensor]


def _mean(x: Tensor) -> Tensor:
    return x.sum() / max(x.numel(), 1)


def _max_abs(x: Tensor) -> Tensor:
    return x.abs().amax() if x.numel() else x.new_zeros(())


def _axis(reduce: str, dim: int) -> Rule:
    """A reduction over axis ``dim`` of each trailing 2-D slice, kept as size 1 (0 over an empty axis)."""

    def rule(x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(
                f"a factored (row/column) value needs a parameter with at least 2 dims, got shape {tuple(x.shape)}"
            )
        if reduce == "sum":
            return x.sum(dim=dim, keepdim=True)
        if x.shape[dim] == 0:
            return x.sum(dim=dim, keepdim=True)  # zeros of the reduced shape
        return x.mean(dim=dim, keepdim=True) if reduce == "mean" else x.amax(dim=dim, keepdim=True)

    return rule


TORCH_RULES: dict[Op, Rule] = {
    Op.ADD: torch.add,
    Op.SUB: torch.sub,
    Op.MUL: torch.mul,
    Op.DIV: torch.div,
    Op.NEG: torch.neg,
    Op.POW: torch.pow,
    Op.SQRT: torch.sqrt,
    Op.RSQRT: torch.rsqrt,
    Op.SQUARE: torch.square,
    Op.ABS: torch.abs,
    Op.SIGN: torch.sign,
    Op.EXP: torch.exp,
    Op.LOG: torch.log,
    Op.MAXIMUM: torch.maximum,
    Op.MINIMUM: torch.minimum,
    Op.MOD: torch.remainder,
    Op.FLOOR: torch.floor,
    Op.LT: torch.lt,
    Op.LE: torch.le,
    Op.GT: torch.gt,
    Op.GE: torch.ge,
    Op.EQ: torch.eq,
    Op.NE: torch.ne,
    Op.AND: torch.logical_and,
    Op.OR: torch.logical_or,
    Op.NOT: torch.logical_not,
    Op.WHERE: torch.where,
    Op.SUM: torch.sum,
    Op.MEAN: _mean,
    Op.NORM: torch.linalg.vector_norm,
    Op.MAX_ABS: _max_abs,
    Op.ROW_MEAN: _axis("mean", -1),
    Op.COL_MEAN: _axis("mean", -2),
    Op.ROW_SUM: _axis("sum", -1),
    Op.COL_SUM: _axis("sum", -2),
    Op.ROW_MAX: _axis("max", -1),
    Op.COL_MAX: _axis("max", -2),
}
