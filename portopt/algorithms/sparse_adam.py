"""SparseAdam: Adam for sparse gradients, as torch.optim.SparseAdam.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, arXiv:1412.6980
(torch.optim.SparseAdam's "lazy" variant).

Arithmetic as torch.optim.SparseAdam (``torch/optim/_functional.py``): the moments move
toward the gradient, ``m_t = m + (g − m)·(1 − β1)`` and ``v_t = v + (g² − v)·(1 − β2)``, and
ε is added to ``sqrt(v_t)`` *before* the bias correction, which is folded into the step size::

    p_t = p − (lr·sqrt(1 − β2^t)/(1 − β1^t)) · m_t/(sqrt(v_t) + ε)

(Adam adds ε after it: ``m̂/(sqrt(v̂) + ε)``). No weight decay. With a sparse gradient only
the entries it holds are updated (:class:`portopt.SparseAdam`); the step counter counts every
step, so the bias correction of an entry is the step's, not the entry's.
"""

from __future__ import annotations

from portopt.algorithms.common import beta
from portopt.algorithms.registry import Algorithm
from portopt.spec.definition import Spec
from portopt.spec.expr import G, P, T, hyper, sqrt, square, state
from portopt.spec.symbols import POSITIVE, Hyperparameter, StateDecl

REFERENCES = ("Kingma & Ba, Adam: A Method for Stochastic Optimization, ICLR 2015, arXiv:1412.6980",)


def sparse_adam() -> Spec:
    """torch.optim.SparseAdam's update (dense form; the front end applies it to a sparse gradient's rows)."""
    lr, b1, b2, eps = (hyper(n) for n in ("lr", "beta1", "beta2", "eps"))
    m, v = state("exp_avg"), state("exp_avg_sq")
    m_t = m + (G - m) * (1 - b1)
    v_t = v + (square(G) - v) * (1 - b2)
    step_size = (lr * sqrt(1 - b2**T) / (1 - b1**T)).named("α", r"\alpha_t")
    return Spec(
        name="sparse_adam",
        title="SparseAdam",
        hyperparameters=(
            Hyperparameter("lr", 1e-3, POSITIVE, "lr", r"\eta", "learning rate", what="learning rate"),
            beta(1, 0.9),
            beta(2, 0.999),
            Hyperparameter(
                "eps", 1e-8, POSITIVE, "ε", r"\epsilon", "term added for numerical stability", what="epsilon value"
            ),
        ),
        states=(StateDecl("exp_avg", "m", doc="first moment"), StateDecl("exp_avg_sq", "v", doc="second moment")),
        updates=(("exp_avg", m_t), ("exp_avg_sq", v_t)),
        param_update=P + (-step_size) * (m_t / (sqrt(v_t) + eps)),
        references=REFERENCES,
    )


# torch_class stays empty: torch.optim.SparseAdam (like portopt.SparseAdam) takes only sparse gradients,
# which the conformance suite's dense gradient streams are not; its tests compare the two directly.
ALGORITHMS = (
    Algorithm("sparse_adam", sparse_adam, class_name="SparseAdam", optimizer="portopt.optim.sparse_adam:SparseAdam"),
)
