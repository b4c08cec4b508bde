"""Adamax: Adam with the infinity norm, as torch.optim.Adamax.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, arXiv:1412.6980
(Section 7.1, Algorithm 2).

With ``g' = g + λ·p`` (coupled L2 weight decay)::

    m_t = β1·m_{t−1} + (1 − β1)·g'
    u_t = max(β2·u_{t−1}, |g'| + ε)
    p_t = p_{t−1} − lr/(1 − β1^t) · m_t/u_t

torch adds ε inside the maximum (the paper has no ε), which keeps ``u_t > 0`` for a
zero gradient.
"""

from __future__ import annotations

from portopt.algorithms.common import beta, coupled_decay_gradient, epsilon, learning_rate, weight_decay
from portopt.algorithms.registry import Algorithm
from portopt.spec.definition import Spec
from portopt.spec.expr import P, T, hyper, maximum, state
from portopt.spec.symbols import StateDecl

REFERENCES = ("Kingma & Ba, Adam: A Method for Stochastic Optimization, ICLR 2015, arXiv:1412.6980 (Adamax)",)


def adamax() -> Spec:
    """Adamax with torch's ε placement."""
    lr, b1, b2, eps = hyper("lr"), hyper("beta1"), hyper("beta2"), hyper("eps")
    g = coupled_decay_gradient()
    m_t = b1 * state("exp_avg") + (1 - b1) * g
    u_t = maximum(b2 * state("exp_inf"), abs(g) + eps).named("u_t")
    step_size = (lr / (1 - b1**T)).named("α", r"\alpha_t")
    return Spec(
        name="adamax",
        title="Adamax",
        hyperparameters=(learning_rate(2e-3), beta(1, 0.9), beta(2, 0.999), epsilon(1e-8), weight_decay(0.0)),
        states=(
            StateDecl("exp_avg", "m", doc="first moment"),
            StateDecl("exp_inf", "u", doc="exponentially weighted infinity norm"),
        ),
        updates=(("exp_avg", m_t), ("exp_inf", u_t)),
        param_update=P - step_size * (m_t / u_t),
        references=REFERENCES,
    )


ALGORITHMS = (
    Algorithm("adamax", adamax, class_name="Adamax", optimizer="portopt.optim.adamax:Adamax", torch_class="Adamax"),
)
