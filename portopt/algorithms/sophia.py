"""SophiaG: a scalable stochastic second-order optimizer (Gauss-Newton-Bartlett estimator).

Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training", ICLR 2024, arXiv:2305.14342; the arithmetic of the authors' implementation
(Liuhong99/Sophia, sophia.py, class SophiaG; PyPI: sophia-opt)::

    step(bs):          p' = p·(1 − lr·λ)
                       m_t = β1·m + (1 − β1)·g
                       p_t = p' − lr·sign(m_t)·min(|m_t| / (ρ·bs·h + 10⁻¹⁵), 1)
    update_hessian():  h ← β2·h + (1 − β2)·ĝ²        (ĝ: the gradient present when it is called)

``bs`` (the number of tokens of the batch, default 5120) is an extra input of ``step``. The
diagonal Hessian estimate ``h`` changes only in ``update_hessian()``, which the training loop
calls after every k-th step (``hessian_interval``, default 10) with the gradient of the loss on
labels sampled from the model (the GNB estimator); ``method_due("update_hessian")`` says when.
"""

from __future__ import annotations

from portopt.algorithms.registry import Algorithm, CaseRow
from portopt.spec.definition import Spec
from portopt.spec.expr import G, P, T, eq, hyper, minimum, mod, sign, square, state, step_input
from portopt.spec.parts import beta, learning_rate, weight_decay
from portopt.spec.symbols import NON_NEGATIVE, Hyperparameter, Input, Method, Range, StateDecl

REFERENCES = (
    "Liu, Li, Hall, Liang & Ma, Sophia: A Scalable Stochastic Second-order Optimizer for Language Model "
    "Pre-training, ICLR 2024, arXiv:2305.14342 (implementation: Liuhong99/Sophia, sophia.py)",
)


def sophiag() -> Spec:
    """SophiaG with its ``update_hessian()`` method and the ``bs`` input of ``step``."""
    lr, b1, b2, rho, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "rho", "weight_decay"))
    bs = step_input("bs")
    m_t = b1 * state("exp_avg") + (1 - b1) * G
    ratio = minimum(abs(m_t) / (rho * bs * state("hessian") + 1e-15), 1.0).named("r_t")
    hessian = b2 * state("hessian") + (1 - b2) * square(G)
    return Spec(
        name="sophiag",
        title="SophiaG",
        hyperparameters=(
            learning_rate(1e-4),
            beta(1, 0.965),
            beta(2, 0.99),
            Hyperparameter("rho", 0.04, NON_NEGATIVE, "ρ", r"\rho", "clipping scale", what="rho parameter at index 1"),
            weight_decay(1e-1),
            Hyperparameter(
                "hessian_interval",
                10.0,
                Range(low=1.0),
                "k",
                "k",
                "steps between Hessian estimates",
                what="hessian_interval value",
            ),
        ),
        states=(
            StateDecl("exp_avg", "m", doc="first moment"),
            StateDecl("hessian", "h", doc="moving average of the diagonal Hessian estimate"),
        ),
        updates=(("exp_avg", m_t),),
        param_update=P * (1 - lr * wd) - lr * sign(m_t) * ratio,
        inputs=(Input("bs", 5120.0, Range(low=0.0), "bs", r"\mathrm{bs}", "tokens per batch: step(bs=...)"),),
        methods=(
            Method(
                "update_hessian",
                (("hessian", hessian),),
                due=eq(mod(T, hyper("hessian_interval")), 0.0),
                doc="after every k-th step, with the gradient of the loss on sampled labels",
            ),
        ),
        references=REFERENCES,
    )


ALGORITHMS = (
    Algorithm(
        "sophiag",
        sophiag,
        class_name="SophiaG",
        optimizer="portopt.optim.sophia:SophiaG",
        cases=(
            CaseRow(hypers={"lr": 0.01, "weight_decay": 0.1}, note="h stays 0 without update_hessian()"),
            CaseRow(hypers={"lr": 0.01, "rho": 0.5}, maximize=True, quick=False),
        ),
    ),
)
