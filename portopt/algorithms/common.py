"""Hyperparameter declarations and decay terms shared by several algorithms (the public parts live in
:mod:`portopt.spec.parts`)."""

from __future__ import annotations

from portopt.spec.expr import Expr
from portopt.spec.parts import beta, coupled_decay, decoupled_decay, epsilon, learning_rate, weight_decay

__all__ = ["beta", "coupled_decay_gradient", "decoupled_decay", "epsilon", "learning_rate", "weight_decay"]


def coupled_decay_gradient() -> Expr:
    """``g + λ·p``: L2 regularisation folded into the gradient (torch's ``weight_decay``)."""
    return coupled_decay()
