"""Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD.

Sutskever et al., "On the importance of initialization and momentum in deep learning",
ICML 2013. The momentum buffer starts as a copy of the first gradient (torch's first
momentum step: ``b_1 = g_1``, not ``(1 − τ)·g_1``); later ``b_t = μ·b_{t−1} + (1 − τ)·g_t``.
"""

from __future__ import annotations

from portopt.algorithms.common import coupled_decay_gradient, learning_rate, weight_decay
from portopt.algorithms.registry import Algorithm
from portopt.spec.definition import Spec
from portopt.spec.expr import P, T, eq, hyper, state, where
from portopt.spec.symbols import ANY, NON_NEGATIVE, Hyperparameter, StateDecl

REFERENCES = (
    "Robbins & Monro, A Stochastic Approximation Method, 1951",
    "Sutskever, Martens, Dahl & Hinton, On the importance of initialization and momentum in deep learning, ICML 2013",
)


def sgd(*, momentum: bool = False, nesterov: bool = False) -> Spec:
    """SGD; ``momentum=True`` adds the buffer (torch uses it when ``momentum != 0``)."""
    if nesterov and not momentum:
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    lr = hyper("lr")
    g = coupled_decay_gradient()
    hypers = [learning_rate(1e-3), weight_decay(0.0)]
    if not momentum:
        return Spec("sgd", "SGD", tuple(hypers), (), (), P - lr * g, references=REFERENCES)
    mu, tau = hyper("momentum"), hyper("dampening")
    hypers += [
        Hyperparameter("momentum", 0.0, NON_NEGATIVE, "μ", r"\mu", "momentum factor", what="momentum value"),
        Hyperparameter("dampening", 0.0, ANY, "τ", r"\tau", "dampening for momentum", what="dampening value"),
    ]
    buf_t = where(eq(T, 1), g, mu * state("momentum_buffer") + (1 - tau) * g)
    direction = g + mu * buf_t if nesterov else buf_t
    return Spec(
        name="sgd",
        title="SGD with Nesterov momentum" if nesterov else "SGD with momentum",
        hyperparameters=tuple(hypers),
        states=(StateDecl("momentum_buffer", "b", doc="momentum buffer"),),
        updates=(("momentum_buffer", buf_t),),
        param_update=P - lr * direction,
        options=(("momentum", True), ("nesterov", nesterov)),
        references=REFERENCES,
    )


ALGORITHMS = (Algorithm("sgd", sgd, class_name="SGD", optimizer="portopt.optim.sgd:SGD", torch_class="SGD"),)
