"""AdaGrad, as torch.optim.Adagrad (dense gradients).

Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
Optimization", JMLR 12 (2011).

With ``g' = g + λ·p`` (coupled L2 weight decay)::

    η_t = lr / (1 + (t − 1)·lr_decay)          (a step-only scalar)
    s_t = s_{t−1} + g'²                       (s_0 = initial_accumulator_value)
    p_t = p_{t−1} − η_t · g' / (sqrt(s_t) + ε)

ε is added outside the square root, as torch does.
"""

from __future__ import annotations

from portopt.algorithms.common import coupled_decay_gradient, epsilon, learning_rate, weight_decay
from portopt.algorithms.registry import Algorithm
from portopt.spec.definition import Spec
from portopt.spec.expr import P, T, hyper, sqrt, square, state
from portopt.spec.symbols import NON_NEGATIVE, Hyperparameter, StateDecl

REFERENCES = (
    "Duchi, Hazan & Singer, Adaptive Subgradient Methods for Online Learning and Stochastic Optimization, "
    "JMLR 12 (2011)",
)


def adagrad() -> Spec:
    """AdaGrad with torch's learning-rate decay and initial accumulator value."""
    lr, lr_decay, eps = hyper("lr"), hyper("lr_decay"), hyper("eps")
    g = coupled_decay_gradient()
    sum_t = state("sum") + square(g)
    clr = (lr / (1 + (T - 1) * lr_decay)).named("η_t", r"\eta_t")
    denom = (sqrt(sum_t) + eps).named("d", "d_t")
    return Spec(
        name="adagrad",
        title="Adagrad",
        hyperparameters=(
            learning_rate(1e-2),
            Hyperparameter("lr_decay", 0.0, NON_NEGATIVE, "κ", r"\kappa", "learning rate decay", what="lr_decay value"),
            weight_decay(0.0),
            Hyperparameter(
                "initial_accumulator_value",
                0.0,
                NON_NEGATIVE,
                "s0",
                "s_0",
                "initial value of the sum of squared gradients",
                what="initial_accumulator_value value",
            ),
            epsilon(1e-10),
        ),
        states=(
            StateDecl("sum", "s", init=hyper("initial_accumulator_value"), doc="running sum of squared gradients"),
        ),
        updates=(("sum", sum_t),),
        param_update=P - clr * g / denom,
        references=REFERENCES,
    )


ALGORITHMS = (
    Algorithm(
        "adagrad", adagrad, class_name="Adagrad", optimizer="portopt.optim.adagrad:Adagrad", torch_class="Adagrad"
    ),
)
