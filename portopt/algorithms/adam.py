"""Adam and AdamW.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, arXiv:1412.6980.
Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, arXiv:1711.05101.
Reddi et al., "On the Convergence of Adam and Beyond", ICLR 2018 (AMSGrad).

Arithmetic as torch.optim.Adam: ``denom = sqrt(v)/sqrt(1 − β2^t) + ε`` (ε outside the
square root, after bias correction), step size ``lr/(1 − β1^t)``; AMSGrad keeps the
running maximum of ``v`` (not of the bias-corrected ``v``).
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
from portopt.spec.expr import G, P, T, hyper, maximum, sqrt, square, state
from portopt.spec.symbols import StateDecl

REFERENCES = (
    "Kingma & Ba, Adam: A Method for Stochastic Optimization, ICLR 2015, arXiv:1412.6980",
    "Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019, arXiv:1711.05101",
    "Reddi, Kale & Kumar, On the Convergence of Adam and Beyond, ICLR 2018 (amsgrad)",
)


def adam(*, amsgrad: bool = False, decoupled_weight_decay: bool = False) -> Spec:
    """Adam (coupled L2 weight decay), or AdamW with ``decoupled_weight_decay=True``."""
    lr, b1, b2, eps = (hyper(n) for n in ("lr", "beta1", "beta2", "eps"))
    g = G if decoupled_weight_decay else coupled_decay_gradient()
    m_t = b1 * state("exp_avg") + (1 - b1) * g
    v_t = b2 * state("exp_avg_sq") + (1 - b2) * square(g)
    states = [StateDecl("exp_avg", "m", doc="first moment"), StateDecl("exp_avg_sq", "v", doc="second moment")]
    updates = [("exp_avg", m_t), ("exp_avg_sq", v_t)]
    second = v_t
    if amsgrad:
        second = maximum(state("max_exp_avg_sq"), v_t)
        states.append(StateDecl("max_exp_avg_sq", "v_max", r"v^{\max}", doc="running maximum of v"))
        updates.append(("max_exp_avg_sq", second))
    denom = (sqrt(second) / sqrt(1 - b2**T) + eps).named("d", "d_t")
    step_size = (lr / (1 - b1**T)).named("α", r"\alpha_t")
    base = decoupled_decay(P) if decoupled_weight_decay else P
    name, title = ("adamw", "AdamW") if decoupled_weight_decay else ("adam", "Adam")
    return Spec(
        name=name,
        title=title,
        hyperparameters=(
            learning_rate(1e-3),
            beta(1, 0.9),
            beta(2, 0.999),
            epsilon(1e-8),
            weight_decay(1e-2 if decoupled_weight_decay else 0.0),
        ),
        states=tuple(states),
        updates=tuple(updates),
        param_update=base - step_size * m_t / denom,
        options=(("amsgrad", amsgrad),),
        references=REFERENCES,
    )


def adamw(*, amsgrad: bool = False) -> Spec:
    """AdamW: Adam with decoupled weight decay ``p ← p·(1 − lr·λ)`` (torch.optim.AdamW)."""
    return adam(amsgrad=amsgrad, decoupled_weight_decay=True)


ALGORITHMS = (
    Algorithm("adam", adam, class_name="Adam", optimizer="portopt.optim.adam:Adam", torch_class="Adam"),
    Algorithm("adamw", adamw, class_name="AdamW", optimizer="portopt.optim.adam:AdamW", torch_class="AdamW"),
)
