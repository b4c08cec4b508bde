"""Lion: EvoLved Sign Momentum.

Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, "Symbolic Discovery of
Optimization Algorithms", NeurIPS 2023, arXiv:2302.06675 (Program 1 / Algorithm 2).
torch.optim has no Lion; this is the paper's algorithm::

    c_t = β1·m_{t−1} + (1 − β1)·g          (interpolation used for the update)
    p_t = p_{t−1} − lr·(sign(c_t) + λ·p_{t−1})     (decoupled weight decay)
    m_t = β2·m_{t−1} + (1 − β2)·g          (momentum tracked with β2)

``sign(0) = 0``, as torch.sign. The update has the same magnitude lr in every coordinate,
so the usual learning rate is 3–10x smaller than AdamW's.
"""

from __future__ import annotations

from portopt.algorithms.common import beta, learning_rate, weight_decay
from portopt.algorithms.registry import Algorithm
from portopt.spec.definition import Spec
from portopt.spec.expr import G, P, hyper, sign, state
from portopt.spec.symbols import StateDecl

REFERENCES = (
    "Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, Symbolic Discovery of Optimization "
    "Algorithms, NeurIPS 2023, arXiv:2302.06675",
)


def lion() -> Spec:
    """Lion with decoupled weight decay."""
    lr, b1, b2, wd = hyper("lr"), hyper("beta1"), hyper("beta2"), hyper("weight_decay")
    m = state("exp_avg")
    c_t = (b1 * m + (1 - b1) * G).named("c_t")
    update = (sign(c_t) + wd * P).named("u_t")
    return Spec(
        name="lion",
        title="Lion",
        hyperparameters=(learning_rate(1e-4), beta(1, 0.9), beta(2, 0.99), weight_decay(0.0)),
        states=(StateDecl("exp_avg", "m", doc="momentum"),),
        updates=(("exp_avg", b2 * m + (1 - b2) * G),),
        param_update=P - lr * update,
        references=REFERENCES,
    )


ALGORITHMS = (Algorithm("lion", lion, class_name="Lion", optimizer="portopt.optim.lion:Lion"),)
