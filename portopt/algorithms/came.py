"""CAME: confidence-guided adaptive memory-efficient optimization.

Luo, Ren, Zheng, Jiang, Jiang & You, "CAME: Confidence-guided Adaptive Memory Efficient
Optimization", ACL 2023, arXiv:2307.02047; the arithmetic of the authors' implementation
(yangluo7/CAME, came_pytorch/CAME.py). For a tensor with ``ndim >= 2`` (factored, per trailing
2-D slice; rowmean averages the last axis, mean_rows the rows of a slice)::

    R_t = β2·R + (1 − β2)·rowmean(g² + ε1)        C_t = β2·C + (1 − β2)·colmean(g² + ε1)
    U_t = rsqrt(R_t / mean_rows(R_t))·rsqrt(C_t)·g        Û_t = U_t / max(1, RMS(U_t)/d)
    m_t = β1·m + (1 − β1)·Û_t
    S_t = (Û_t − m_t)² + ε2                               (instability)
    R'_t = β3·R' + (1 − β3)·rowmean(S_t)          C'_t = β3·C' + (1 − β3)·colmean(S_t)
    p_t = p − lr·λ·p − lr·rsqrt(R'_t / mean_rows(R'_t))·rsqrt(C'_t)·m_t

and for a vector or scalar ``V_t = β2·V + (1 − β2)·(g² + ε1)``, ``U_t = rsqrt(V_t)·g`` and
``p_t = p − lr·λ·p − lr·m_t`` (no confidence factor, as in the reference). The reference keeps
the factors without their size-1 axis ((..., rows), (..., cols)); here they are (..., rows, 1)
and (..., 1, cols), the same numbers.
"""

from __future__ import annotations

from portopt.algorithms.registry import Algorithm, CaseRow
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, G, P, col_mean, hyper, maximum, ndim, row_mean, rsqrt, square, state, where
from portopt.spec.parts import beta, learning_rate, rms, weight_decay
from portopt.spec.symbols import NON_NEGATIVE, Hyperparameter, Layout, StateDecl

REFERENCES = (
    "Luo, Ren, Zheng, Jiang, Jiang & You, CAME: Confidence-guided Adaptive Memory Efficient Optimization, "
    "ACL 2023, arXiv:2307.02047 (implementation: yangluo7/CAME, came_pytorch/CAME.py)",
)


def _eps(index: int, default: float, doc: str) -> Hyperparameter:
    return Hyperparameter(
        f"eps{index}",
        default,
        NON_NEGATIVE,
        f"ε{index}",
        rf"\epsilon_{index}",
        doc,
        what=f"epsilon{index} value",
        group_key="eps",
        group_index=index - 1,
    )


def _approx(row: Expr, col: Expr) -> Expr:
    """``rsqrt(R/mean_rows(R))·rsqrt(C)``: the factored estimate's inverse square root (the reference's
    ``_approx_sq_grad``)."""
    return rsqrt(row / col_mean(row)) * rsqrt(col)


def came() -> Spec:
    """CAME with decoupled weight decay ``lr·λ·p`` (the reference's)."""
    lr, b1, b2, b3, eps1, eps2, d, wd = (
        hyper(n) for n in ("lr", "beta1", "beta2", "beta3", "eps1", "eps2", "clip_threshold", "weight_decay")
    )
    factored = ndim() >= 2
    g2 = (square(G) + eps1).named("q_t")
    r_t = (b2 * state("exp_avg_sq_row") + (1 - b2) * row_mean(g2)).named("R_t")
    c_t = (b2 * state("exp_avg_sq_col") + (1 - b2) * col_mean(g2)).named("C_t")
    v_t = b2 * state("exp_avg_sq") + (1 - b2) * g2
    u = where(factored, _approx(r_t, c_t) * G, rsqrt(v_t) * G).named("U_t")
    u_hat = (u / maximum(rms(u) / d, 1.0)).named("Û_t", r"\hat{U}_t")
    m_t = b1 * state("exp_avg") + (1 - b1) * u_hat
    s_t = (square(u_hat - m_t) + eps2).named("S_t")
    rr_t = (b3 * state("exp_avg_res_row") + (1 - b3) * row_mean(s_t)).named("R'_t")
    rc_t = (b3 * state("exp_avg_res_col") + (1 - b3) * col_mean(s_t)).named("C'_t")
    update = where(factored, _approx(rr_t, rc_t) * m_t, m_t)
    states = (
        StateDecl("exp_avg", "m", doc="first moment of the clipped update"),
        StateDecl("exp_avg_sq_row", "R", layout=Layout.ROW, doc="row factor of the second moment", when=factored),
        StateDecl("exp_avg_sq_col", "C", layout=Layout.COL, doc="column factor of the second moment", when=factored),
        StateDecl("exp_avg_res_row", "R'", layout=Layout.ROW, doc="row factor of the instability", when=factored),
        StateDecl("exp_avg_res_col", "C'", layout=Layout.COL, doc="column factor of the instability", when=factored),
        StateDecl("exp_avg_sq", "V", doc="second moment of a vector or scalar", when=~factored),
    )
    return Spec(
        name="came",
        title="CAME",
        hyperparameters=(
            learning_rate(2e-4),
            _eps(1, 1e-30, "added to g² before averaging"),
            _eps(2, 1e-16, "added to the instability"),
            Hyperparameter("clip_threshold", 1.0, NON_NEGATIVE, "d", "d", "update clipping threshold"),
            beta(1, 0.9),
            beta(2, 0.999),
            beta(3, 0.9999),
            weight_decay(0.0),
        ),
        states=states,
        updates=(
            ("exp_avg", m_t),
            ("exp_avg_sq_row", r_t),
            ("exp_avg_sq_col", c_t),
            ("exp_avg_res_row", rr_t),
            ("exp_avg_res_col", rc_t),
            ("exp_avg_sq", v_t),
        ),
        param_update=P - wd * lr * P - lr * update,
        references=REFERENCES,
    )


ALGORITHMS = (
    Algorithm(
        "came",
        came,
        class_name="CAME",
        cases=(
            CaseRow(hypers={"lr": 0.01}),
            CaseRow(hypers={"lr": 0.01, "weight_decay": 0.1, "clip_threshold": 0.5}, maximize=True),
            CaseRow(
                hypers={"lr": 0.01, "beta2": 0.99, "eps2": 1e-3, "beta3": 0.9}, quick=False, note="an ε2 that matters"
            ),
        ),
    ),
)
