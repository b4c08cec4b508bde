"""RMSprop, as torch.optim.RMSprop (plain, centered, with momentum, or both).

Tieleman & Hinton, "Lecture 6.5 - RMSProp", COURSERA: Neural Networks for Machine
Learning (2012); the centered variant is Graves, "Generating Sequences With Recurrent
Neural Networks", arXiv:1308.0850 (2013).

With ``g' = g + λ·p`` (coupled L2 weight decay)::

    v_t = α·v_{t−1} + (1 − α)·g'²
    ḡ_t = α·ḡ_{t−1} + (1 − α)·g'                         (centered only)
    d_t = sqrt(v_t − ḡ_t²) + ε   (centered)   |   sqrt(v_t) + ε
    b_t = μ·b_{t−1} + g'/d_t;   p_t = p_{t−1} − lr·b_t    (momentum)
    p_t = p_{t−1} − lr·g'/d_t                             (no momentum)

ε is added outside the square root; the momentum buffer starts at zero (unlike SGD's).
torch keeps the buffer only when ``momentum > 0``: build with ``momentum=True`` exactly then.
"""

from __future__ import annotations

from portopt.algorithms.common import coupled_decay_gradient, epsilon, learning_rate, weight_decay
from portopt.algorithms.registry import Algorithm
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, P, hyper, sqrt, square, state
from portopt.spec.symbols import NON_NEGATIVE, Hyperparameter, StateDecl

REFERENCES = (
    "Tieleman & Hinton, Lecture 6.5 - RMSProp, COURSERA: Neural Networks for Machine Learning, 2012",
    "Graves, Generating Sequences With Recurrent Neural Networks, arXiv:1308.0850, 2013 (centered)",
)


def rmsprop(*, centered: bool = False, momentum: bool = False) -> Spec:
    """RMSprop; ``centered`` subtracts the squared mean gradient, ``momentum`` adds a buffer."""
    lr, alpha, eps = hyper("lr"), hyper("alpha"), hyper("eps")
    g = coupled_decay_gradient()
    v_t = alpha * state("square_avg") + (1 - alpha) * square(g)
    states = [StateDecl("square_avg", "v", doc="running average of squared gradients")]
    updates: list[tuple[str, Expr]] = [("square_avg", v_t)]
    hypers = [
        learning_rate(1e-2),
        # torch accepts any alpha >= 0 (no upper bound); keep its contract.
        Hyperparameter("alpha", 0.99, NON_NEGATIVE, "α", r"\alpha", "smoothing constant", what="alpha value"),
        epsilon(1e-8),
        weight_decay(0.0),
    ]
    if centered:
        gbar_t = alpha * state("grad_avg") + (1 - alpha) * g
        states.append(StateDecl("grad_avg", "ḡ", r"\bar{g}", doc="running average of gradients"))
        updates.append(("grad_avg", gbar_t))
        denom = sqrt(v_t - square(gbar_t)) + eps
    else:
        denom = sqrt(v_t) + eps
    denom = denom.named("d", "d_t")
    if momentum:
        hypers.append(
            Hyperparameter("momentum", 0.0, NON_NEGATIVE, "μ", r"\mu", "momentum factor", what="momentum value")
        )
        buf_t = hyper("momentum") * state("momentum_buffer") + g / denom
        states.append(StateDecl("momentum_buffer", "b", doc="momentum buffer"))
        updates.append(("momentum_buffer", buf_t))
        param_update = P - lr * buf_t
    else:
        param_update = P - lr * g / denom
    title = "RMSprop" + (" (centered)" if centered else "") + (" with momentum" if momentum else "")
    return Spec(
        name="rmsprop",
        title=title,
        hyperparameters=tuple(hypers),
        states=tuple(states),
        updates=tuple(updates),
        param_update=param_update,
        options=(("centered", centered), ("momentum", momentum)),
        references=REFERENCES,
    )


ALGORITHMS = (
    Algorithm(
        "rmsprop", rmsprop, class_name="RMSprop", optimizer="portopt.optim.rmsprop:RMSprop", torch_class="RMSprop"
    ),
)
