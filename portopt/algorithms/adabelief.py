"""AdaBelief: adapt the step size by the belief in the observed gradient.

Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, "AdaBelief Optimizer:
Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020, arXiv:2010.07468
(Algorithm 2). torch.optim has no AdaBelief; this is the paper's algorithm::

    m_t = β1·m_{t−1} + (1 − β1)·g
    s_t = β2·s_{t−1} + (1 − β2)·(g − m_t)² + ε
    m̂_t = m_t / (1 − β1^t)          ŝ_t = s_t / (1 − β2^t)
    p_t = p_{t−1} − lr · m̂_t / (sqrt(ŝ_t) + ε)

Choices, stated once:

* **ε placement**: ε appears twice, as in the paper and in the authors' adabelief-pytorch
  (>= 0.1): it is added to the *stored* state ``s_t`` (so ``exp_avg_var`` carries the ε of
  every step) and again outside the square root. The root is evaluated as
  ``sqrt(s_t)/sqrt(1 − β2^t) + ε`` (torch.optim.Adam's form; equal to sqrt(ŝ_t) + ε).
  Typical ε is tiny (default 1e-16, the authors' recommendation ε_AdaBelief ≈ ε_Adam²).
* **Weight decay**: decoupled by default, ``p ← p·(1 − lr·λ)`` before the step, as
  adabelief-pytorch's ``weight_decouple=True`` (its default from 0.1; ``fixed_decay=False``).
  ``decoupled_weight_decay=False`` gives coupled L2 decay, ``g ← g + λ·p`` before the moments.
* No AMSGrad and no RAdam-style rectification (adabelief-pytorch's ``amsgrad=False``,
  ``rectify=False``); the paper's Algorithm 2 has neither.
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
from portopt.spec.expr import G, P, T, hyper, sqrt, square, state
from portopt.spec.symbols import StateDecl

REFERENCES = (
    "Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, AdaBelief Optimizer: Adapting Stepsizes "
    "by the Belief in Observed Gradients, NeurIPS 2020, arXiv:2010.07468",
    "Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019, arXiv:1711.05101",
)


def adabelief(*, decoupled_weight_decay: bool = True) -> Spec:
    """AdaBelief (paper's Algorithm 2); decoupled weight decay by default."""
    lr, b1, b2, eps = hyper("lr"), hyper("beta1"), hyper("beta2"), hyper("eps")
    g = G if decoupled_weight_decay else coupled_decay_gradient()
    m_t = (b1 * state("exp_avg") + (1 - b1) * g).named("m_t")
    s_t = (b2 * state("exp_avg_var") + (1 - b2) * square(g - m_t) + eps).named("s_t")
    denom = (sqrt(s_t) / sqrt(1 - b2**T) + eps).named("d", "d_t")
    step_size = (lr / (1 - b1**T)).named("α", r"\alpha_t")
    base = decoupled_decay(P) if decoupled_weight_decay else P
    return Spec(
        name="adabelief",
        title="AdaBelief",
        hyperparameters=(learning_rate(1e-3), beta(1, 0.9), beta(2, 0.999), epsilon(1e-16), weight_decay(0.0)),
        states=(
            StateDecl("exp_avg", "m", doc="first moment"),
            StateDecl("exp_avg_var", "s", doc="second moment of the prediction error g − m (ε included)"),
        ),
        updates=(("exp_avg", m_t), ("exp_avg_var", s_t)),
        param_update=base - step_size * (m_t / denom),
        options=(("decoupled_weight_decay", decoupled_weight_decay),),
        references=REFERENCES,
    )


ALGORITHMS = (Algorithm("adabelief", adabelief, class_name="AdaBelief", optimizer="portopt.optim.adabelief:AdaBelief"),)
