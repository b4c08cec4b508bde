"""Adan: adaptive Nesterov momentum.

Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models", TPAMI 2024, arXiv:2208.06677; the arithmetic of the authors' implementation
(sail-sg/Adan, adan.py), with ``g_0 = g_1`` (the difference is 0 at the first step)::

    m_t = β1·m + (1 − β1)·g                     Δ_t = g − g_{t−1}
    d_t = β2·d + (1 − β2)·Δ_t                   n_t = β3·n + (1 − β3)·(g + β2·Δ_t)²
    η_t = √n_t / √(1 − β3^t) + ε
    u_t = lr/(1 − β1^t)·m_t/η_t + lr·β2/(1 − β2^t)·d_t/η_t
    p_t = (p − u_t) / (1 + lr·λ)                (no_prox=False, the default)
    p_t = p·(1 − lr·λ) − u_t                    (no_prox=True)

The previous gradient is kept negated, as the reference keeps it (``neg_pre_grad``). The
reference's ``max_grad_norm`` (clipping by the global gradient norm over all parameters) scales
``g`` by the extra input ``grad_scale`` of the step, which :class:`portopt.Adan` computes.
"""

from __future__ import annotations

from portopt.algorithms.registry import Algorithm, CaseRow
from portopt.spec.definition import Spec
from portopt.spec.expr import G, P, T, hyper, sqrt, square, state, step_input
from portopt.spec.parts import beta, epsilon, learning_rate, weight_decay
from portopt.spec.symbols import Input, Range, StateDecl

REFERENCES = (
    "Xie, Zhou, Li, Lin & Yan, Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models, "
    "TPAMI 2024, arXiv:2208.06677 (implementation: sail-sg/Adan, adan.py)",
)


def adan(*, no_prox: bool = False) -> Spec:
    """Adan; ``no_prox=True`` applies the weight decay as ``p·(1 − lr·λ)`` before the step."""
    lr, b1, b2, b3, eps, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "beta3", "eps", "weight_decay"))
    g = (step_input("grad_scale") * G).named("g'", "g'_t")
    diff = (g + state("neg_pre_grad")).named("Δ_t", r"\Delta_t")
    m_t = b1 * state("exp_avg") + (1 - b1) * g
    d_t = b2 * state("exp_avg_diff") + (1 - b2) * diff
    n_t = b3 * state("exp_avg_sq") + (1 - b3) * square(g + b2 * diff)
    denom = (sqrt(n_t) / sqrt(1 - b3**T) + eps).named("η_t", r"\eta_t")
    update = (lr / (1 - b1**T)) * m_t / denom + (lr * b2 / (1 - b2**T)) * d_t / denom
    new_p = P * (1 - lr * wd) - update if no_prox else (P - update) / (1 + lr * wd)
    return Spec(
        name="adan",
        title="Adan",
        hyperparameters=(
            learning_rate(1e-3),
            beta(1, 0.98),
            beta(2, 0.92),
            beta(3, 0.99),
            epsilon(1e-8),
            weight_decay(0.0),
        ),
        states=(
            StateDecl("exp_avg", "m", doc="first moment"),
            StateDecl("exp_avg_sq", "n", doc="second moment of the Nesterov gradient"),
            StateDecl("exp_avg_diff", "d", doc="moving average of the gradient difference"),
            StateDecl("neg_pre_grad", "q", init=-g, doc="the previous gradient, negated"),
        ),
        updates=(("exp_avg", m_t), ("exp_avg_sq", n_t), ("exp_avg_diff", d_t), ("neg_pre_grad", -g)),
        param_update=new_p,
        options=(("no_prox", no_prox),),
        inputs=(Input("grad_scale", 1.0, Range(low=0.0), "c", "c", "gradient scale of max_grad_norm clipping"),),
        references=REFERENCES,
    )


ALGORITHMS = (
    Algorithm(
        "adan",
        adan,
        class_name="Adan",
        optimizer="portopt.optim.adan:Adan",
        cases=(
            CaseRow(hypers={"lr": 0.01, "weight_decay": 0.1}),
            CaseRow({"no_prox": True}, {"lr": 0.01, "weight_decay": 0.1}, maximize=True),
            CaseRow(hypers={"lr": 0.01, "eps": 1e-3}, quick=False, note="an ε large enough to matter"),
        ),
    ),
)
