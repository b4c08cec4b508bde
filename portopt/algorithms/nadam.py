"""NAdam: Adam with Nesterov momentum, as torch.optim.NAdam.

Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 Workshop.
Momentum decay schedule from the same report; decoupled decay ("NAdamW") as
Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, arXiv:1711.05101.

With ``g' = g + λ·p`` (coupled decay; ``g' = g`` and ``p ← p·(1 − lr·λ)`` when decoupled)
and ψ = momentum_decay::

    μ_t     = β1·(1 − ½·0.96^(t·ψ))          μ_{t+1} = β1·(1 − ½·0.96^((t+1)·ψ))
    Π_t     = Π_{t−1}·μ_t                    (mu_product, one number per tensor, Π_0 = 1)
    m_t     = β1·m_{t−1} + (1 − β1)·g'
    v_t     = β2·v_{t−1} + (1 − β2)·g'²
    d_t     = sqrt(v_t / (1 − β2^t)) + ε
    p_t     = p_{t−1} − lr·(1 − μ_t)/(1 − Π_t) · g'/d_t − lr·μ_{t+1}/(1 − Π_t·μ_{t+1}) · m_t/d_t

Unlike Adam, torch bias-corrects v *inside* the square root here; ε stays outside.
"""

from __future__ import annotations

from portopt.algorithms.common import (
    beta,
    coupled_decay_gradient,
    decoupled_decay,
    epsilon,
    learning_rate,
    weight_decay,
)
from portopt.algorithms.registry import Algorithm
from portopt.spec.definition import Spec
from portopt.spec.expr import G, P, T, const, hyper, sqrt, square, state
from portopt.spec.symbols import NON_NEGATIVE, Hyperparameter, Layout, StateDecl

REFERENCES = (
    "Dozat, Incorporating Nesterov Momentum into Adam, ICLR 2016 Workshop",
    "Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019, arXiv:1711.05101",
)


def nadam(*, decoupled_weight_decay: bool = False) -> Spec:
    """NAdam (coupled L2 decay), or with ``decoupled_weight_decay=True`` AdamW-style decay."""
    lr, b1, b2, eps, psi = (hyper(n) for n in ("lr", "beta1", "beta2", "eps", "momentum_decay"))
    g = G if decoupled_weight_decay else coupled_decay_gradient()
    mu_t = (b1 * (1 - 0.5 * const(0.96) ** (T * psi))).named("μ_t", r"\mu_t")
    mu_next = (b1 * (1 - 0.5 * const(0.96) ** ((T + 1) * psi))).named("μ_{t+1}", r"\mu_{t+1}")
    mu_product_t = (state("mu_product") * mu_t).named("Π_t", r"\Pi_t")
    m_t = b1 * state("exp_avg") + (1 - b1) * g
    v_t = b2 * state("exp_avg_sq") + (1 - b2) * square(g)
    denom = (sqrt(v_t / (1 - b2**T)) + eps).named("d", "d_t")
    grad_coef = lr * (1 - mu_t) / (1 - mu_product_t)
    momentum_coef = lr * mu_next / (1 - mu_product_t * mu_next)
    base = decoupled_decay(P) if decoupled_weight_decay else P
    return Spec(
        name="nadam",
        title="NAdamW" if decoupled_weight_decay else "NAdam",
        hyperparameters=(
            learning_rate(2e-3),
            beta(1, 0.9),
            beta(2, 0.999),
            epsilon(1e-8),
            weight_decay(0.0),
            Hyperparameter(
                "momentum_decay", 4e-3, NON_NEGATIVE, "ψ", r"\psi", "momentum decay", what="momentum_decay value"
            ),
        ),
        states=(
            StateDecl("exp_avg", "m", doc="first moment"),
            StateDecl("exp_avg_sq", "v", doc="second moment"),
            StateDecl(
                "mu_product", "Π", r"\Pi", init=const(1.0), layout=Layout.TENSOR, doc="product of the μ_t so far"
            ),
        ),
        updates=(("exp_avg", m_t), ("exp_avg_sq", v_t), ("mu_product", mu_product_t)),
        param_update=base - grad_coef * (g / denom) - momentum_coef * (m_t / denom),
        options=(("decoupled_weight_decay", decoupled_weight_decay),),
        references=REFERENCES,
    )


ALGORITHMS = (
    Algorithm("nadam", nadam, class_name="NAdam", optimizer="portopt.optim.nadam:NAdam", torch_class="NAdam"),
)
