"""LAMB: layer-wise adaptive moments, for large-batch training.

You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer & Hsieh, "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020,
arXiv:1904.00962 (Algorithm 2). torch.optim has no LAMB; this is the paper's algorithm,
with the scaling function φ the identity::

    m_t = β1·m_{t−1} + (1 − β1)·g          v_t = β2·v_{t−1} + (1 − β2)·g²
    m̂_t = m_t / (1 − β1^t)                 v̂_t = v_t / (1 − β2^t)     (bias_correction=True)
    r_t = m̂_t / (sqrt(v̂_t) + ε)
    u_t = r_t + λ·p_{t−1}                                             (decoupled weight decay)
    τ_t = ‖p_{t−1}‖ / ‖u_t‖   if ‖p_{t−1}‖ > 0 and ‖u_t‖ > 0, else 1   (per tensor, L2 norms)
    p_t = p_{t−1} − lr·τ_t·u_t

The zero-norm guards keep a freshly zero-initialised tensor (‖p‖ = 0) or a zero update
(‖u‖ = 0) from stalling or dividing by zero: the trust ratio is then 1. With
``bias_correction=False`` the moments are used uncorrected (m̂ = m, v̂ = v), as some
implementations (e.g. NVIDIA Apex's ``bias_correction`` flag) allow.
"""

from __future__ import annotations

from portopt.algorithms.common import beta, epsilon, learning_rate, weight_decay
from portopt.algorithms.registry import Algorithm
from portopt.spec.definition import Spec
from portopt.spec.expr import G, P, T, hyper, norm, sqrt, square, state, where
from portopt.spec.symbols import StateDecl

REFERENCES = (
    "You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer & Hsieh, Large Batch Optimization for "
    "Deep Learning: Training BERT in 76 minutes, ICLR 2020, arXiv:1904.00962",
)


def lamb(*, bias_correction: bool = True) -> Spec:
    """LAMB with the per-tensor trust ratio ‖p‖/‖u‖ and its zero-norm guards."""
    lr, b1, b2, eps, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    m_t = b1 * state("exp_avg") + (1 - b1) * G
    v_t = b2 * state("exp_avg_sq") + (1 - b2) * square(G)
    m_hat = (m_t / (1 - b1**T)).named("m̂_t", r"\hat{m}_t") if bias_correction else m_t
    v_hat = (v_t / (1 - b2**T)).named("v̂_t", r"\hat{v}_t") if bias_correction else v_t
    r_t = (m_hat / (sqrt(v_hat) + eps)).named("r_t")
    u_t = (r_t + wd * P).named("u_t")
    p_norm = norm(P).named("‖p‖", r"\lVert p \rVert")
    u_norm = norm(u_t).named("‖u‖", r"\lVert u_t \rVert")
    trust = where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0).named("τ_t", r"\tau_t")
    return Spec(
        name="lamb",
        title="LAMB",
        hyperparameters=(learning_rate(1e-3), beta(1, 0.9), beta(2, 0.999), epsilon(1e-6), weight_decay(0.0)),
        states=(StateDecl("exp_avg", "m", doc="first moment"), StateDecl("exp_avg_sq", "v", doc="second moment")),
        updates=(("exp_avg", m_t), ("exp_avg_sq", v_t)),
        param_update=P - lr * trust * u_t,
        options=(("bias_correction", bias_correction),),
        references=REFERENCES,
    )


ALGORITHMS = (Algorithm("lamb", lamb, class_name="LAMB", optimizer="portopt.optim.lamb:LAMB"),)
