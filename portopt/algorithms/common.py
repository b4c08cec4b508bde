"""Hyperparameter declarations shared by several algorithms, with torch.optim's wording."""

from __future__ import annotations

from portopt.spec.expr import Expr, G, P, hyper
from portopt.spec.symbols import NON_NEGATIVE, UNIT_INTERVAL_OPEN_RIGHT, Hyperparameter


def learning_rate(default: float = 1e-3) -> Hyperparameter:
    """``lr >= 0``; torch's message: ``Invalid learning rate: ...``."""
    return Hyperparameter("lr", default, NON_NEGATIVE, "lr", r"\eta", "learning rate", what="learning rate")


def beta(index: int, default: float) -> Hyperparameter:
    """``0 <= beta_i < 1``, stored in ``group["betas"][index - 1]``."""
    return Hyperparameter(
        f"beta{index}",
        default,
        UNIT_INTERVAL_OPEN_RIGHT,
        f"β{index}",
        rf"\beta_{index}",
        f"decay rate of moment {index}",
        what=f"beta parameter at index {index - 1}",
        group_key="betas",
        group_index=index - 1,
    )


def epsilon(default: float) -> Hyperparameter:
    """``eps >= 0``; torch's message: ``Invalid epsilon value: ...``."""
    return Hyperparameter(
        "eps", default, NON_NEGATIVE, "ε", r"\epsilon", "term added for numerical stability", what="epsilon value"
    )


def weight_decay(default: float = 0.0) -> Hyperparameter:
    """``weight_decay >= 0``; torch's message: ``Invalid weight_decay value: ...``."""
    return Hyperparameter(
        "weight_decay", default, NON_NEGATIVE, "λ", r"\lambda", "weight decay coefficient", what="weight_decay value"
    )


def coupled_decay_gradient() -> Expr:
    """``g + λ·p``: L2 regularisation folded into the gradient (torch's ``weight_decay``)."""
    return (G + hyper("weight_decay") * P).named("g'", "g'_t")


def decoupled_decay(param: Expr) -> Expr:
    """``p·(1 − lr·λ)``: decoupled weight decay applied before the step (AdamW)."""
    return param * (1 - hyper("lr") * hyper("weight_decay"))
