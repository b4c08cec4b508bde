"""RAdam: Adam with a rectified adaptive learning rate, as torch.optim.RAdam.

Liu, Jiang, He, Chen, Liu, Gao & Han, "On the Variance of the Adaptive Learning Rate and
Beyond", ICLR 2020, arXiv:1908.03265.

With ``g' = g + λ·p`` (coupled decay; ``g' = g`` and ``p ← p·(1 − lr·λ)`` when decoupled)::

    m_t  = β1·m_{t−1} + (1 − β1)·g'          v_t = β2·v_{t−1} + (1 − β2)·g'²
    m̂_t  = m_t / (1 − β1^t)
    ρ_∞  = 2/(1 − β2) − 1                    ρ_t = ρ_∞ − 2·t·β2^t / (1 − β2^t)
    r_t  = sqrt((ρ_t − 4)(ρ_t − 2)·ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2)·ρ_t))
    l_t  = sqrt(1 − β2^t) / (sqrt(v_t) + ε)
    p_t  = p_{t−1} − lr·m̂_t·l_t·r_t    if ρ_t > threshold
    p_t  = p_{t−1} − lr·m̂_t            otherwise

ρ_t, r_t and the bias corrections depend only on t and the betas: they are step-only
scalars and the branch is taken once per step. torch uses ``threshold = 5``
(:data:`TORCH_THRESHOLD`, the default); the paper's Algorithm 2 uses ``ρ_t > 4``
(:data:`PAPER_THRESHOLD`). The two differ exactly at the steps with 4 < ρ_t ≤ 5.
"""

from __future__ import annotations

import math

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
from portopt.spec.expr import G, P, T, hyper, sqrt, square, state, where
from portopt.spec.symbols import StateDecl

TORCH_THRESHOLD = 5.0
"""torch.optim.RAdam rectifies when ρ_t > 5."""
PAPER_THRESHOLD = 4.0
"""Liu et al. (Algorithm 2) rectify when ρ_t > 4; below 4 the rectification term is undefined."""

REFERENCES = (
    "Liu, Jiang, He, Chen, Liu, Gao & Han, On the Variance of the Adaptive Learning Rate and Beyond, "
    "ICLR 2020, arXiv:1908.03265",
    "Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019, arXiv:1711.05101",
)


def radam(*, decoupled_weight_decay: bool = False, threshold: float = TORCH_THRESHOLD) -> Spec:
    """RAdam; ``threshold`` is the ρ_t above which the rectified adaptive step is taken."""
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold < PAPER_THRESHOLD:
        raise ValueError(
            f"radam: invalid threshold {threshold}: the rectification term needs rho_t >= 4, so threshold must be "
            f"a finite number >= {PAPER_THRESHOLD} (torch: {TORCH_THRESHOLD}, paper: {PAPER_THRESHOLD})"
        )
    lr, b1, b2, eps = hyper("lr"), hyper("beta1"), hyper("beta2"), hyper("eps")
    g = G if decoupled_weight_decay else coupled_decay_gradient()
    m_t = b1 * state("exp_avg") + (1 - b1) * g
    v_t = b2 * state("exp_avg_sq") + (1 - b2) * square(g)
    bias_correction2 = 1 - b2**T
    m_hat = (m_t / (1 - b1**T)).named("m̂_t", r"\hat{m}_t")
    rho_inf = (2 / (1 - b2) - 1).named("ρ_∞", r"\rho_\infty")
    rho_t = (rho_inf - 2 * T * b2**T / bias_correction2).named("ρ_t", r"\rho_t")
    rect = sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).named("r_t")
    adaptive_lr = (sqrt(bias_correction2) / (sqrt(v_t) + eps)).named("l_t")
    step = where(rho_t > threshold, m_hat * lr * adaptive_lr * rect, m_hat * lr)
    base = decoupled_decay(P) if decoupled_weight_decay else P
    return Spec(
        name="radam",
        title="RAdam" if threshold == TORCH_THRESHOLD else f"RAdam (rectified when ρ_t > {threshold:g})",
        hyperparameters=(learning_rate(1e-3), beta(1, 0.9), beta(2, 0.999), epsilon(1e-8), weight_decay(0.0)),
        states=(StateDecl("exp_avg", "m", doc="first moment"), StateDecl("exp_avg_sq", "v", doc="second moment")),
        updates=(("exp_avg", m_t), ("exp_avg_sq", v_t)),
        param_update=base - step,
        options=(("decoupled_weight_decay", decoupled_weight_decay), ("threshold", threshold)),
        references=REFERENCES,
    )


ALGORITHMS = (
    Algorithm("radam", radam, class_name="RAdam", optimizer="portopt.optim.radam:RAdam", torch_class="RAdam"),
)
