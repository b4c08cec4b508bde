"""Adafactor: adaptive learning rates with sublinear memory cost.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
arXiv:1804.04235. One spec for every rank: a tensor with ``ndim >= 2`` keeps a row factor ``R``
(shape ``(..., rows, 1)``) and a column factor ``C`` (``(..., 1, cols)``) of each trailing 2-D
slice, O(rows + cols) memory; a vector or scalar keeps the full second moment ``V``.

``convention="torch"`` (default) is torch.optim.Adafactor's arithmetic (torch/optim/_adafactor.py)::

    1 − β̂2_t = t^τ                    ρ_t = min(lr, 1/√t)          α_t = max(ε2, RMS(p_{t−1}))·ρ_t
    p' = p_{t−1}·(1 − lr·λ)                                           (decoupled decay, with lr)
    R_t = β̂2_t·R + (1 − β̂2_t)·rowmean(g²)     C_t = β̂2_t·C + (1 − β̂2_t)·colmean(g²)
    V̂_t = R_t·(C_t / max(mean_rows(R_t), ε1))   (per slice)   or   V_t = β̂2_t·V + (1 − β̂2_t)·g²
    U_t = g / √max(V̂_t, ε1²)          p_t = p' − α_t·U_t / max(1, RMS(U_t)/d)

with ``ε1`` the machine epsilon of the parameter's dtype when torch's ``eps=(None, ε2)``
(``eps1_from_dtype=True``), else the hyperparameter ``eps1``. RMS is ``‖x‖/√n`` over the whole
tensor; ``mean_rows`` is per trailing 2-D slice (torch's ``row_var.mean(dim=-2)``). torch computes
``(R·C)/mean_rows(R)``, which overflows float32 for gradients above about 1e9; the division first
gives the same value within an ulp.

``convention="transformers"`` is HF transformers' ``Adafactor`` (src/transformers/optimization.py,
after fairseq): ε1 added to ``g²`` before averaging, ``U = rsqrt(R/mean_rows(R))·rsqrt(C)·g``,
update clipping by ``max(1, RMS(U)/d)``, step size ``max(ε2, RMS(p))·min(10⁻², 1/√t)``
(``relative_step``, ``scale_parameter``; ``warmup_init``: ``min(10⁻⁶·t, 1/√t)``), an optional first
moment (``first_moment=True``, ``beta1``), and weight decay ``p·(1 − λ·lr_t)``. Its states keep our
``(..., rows, 1)``/``(..., 1, cols)`` layout (transformers drops the size-1 axis).
"""

from __future__ import annotations

from portopt.algorithms.registry import Algorithm, CaseRow
from portopt.spec.definition import Spec
from portopt.spec.expr import (
    Expr,
    G,
    P,
    T,
    col_mean,
    finfo,
    hyper,
    maximum,
    minimum,
    ndim,
    row_mean,
    rsqrt,
    square,
    state,
    substitute,
    where,
)
from portopt.spec.parts import learning_rate, rms, weight_decay
from portopt.spec.symbols import NON_NEGATIVE, Hyperparameter, Layout, Range, StateDecl

REFERENCES = (
    "Shazeer & Stern, Adafactor: Adaptive Learning Rates with Sublinear Memory Cost, ICML 2018, arXiv:1804.04235",
)
CONVENTIONS = ("torch", "transformers")


def _eps(index: int, default: float) -> Hyperparameter:
    doc = "floor of the second-moment estimate" if index == 1 else "floor of the parameter scale"
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


def _threshold(name: str) -> Hyperparameter:
    return Hyperparameter(
        name, 1.0, Range(low=1.0) if name == "d" else NON_NEGATIVE, "d", "d", "update clipping threshold", what=name
    )


def _decay_exponent(name: str) -> Hyperparameter:
    return Hyperparameter(
        name, -0.8, Range(high=0.0), "τ", r"\tau", "1 − β̂2_t = t^τ: the decay of β2", what=f"{name} value"
    )


def _second_moment(g2: Expr, decay: Expr) -> tuple[list[StateDecl], list[tuple[str, Expr]], Expr, Expr, Expr]:
    """States, updates and (R_t, C_t, V_t) of the factored / full second moment of ``g2`` (torch's names)."""
    factored = ndim() >= 2
    r_t = (decay * state("row_var") + (1 - decay) * row_mean(g2)).named("R_t")
    c_t = (decay * state("col_var") + (1 - decay) * col_mean(g2)).named("C_t")
    v_t = decay * state("variance") + (1 - decay) * g2
    states = [
        StateDecl("row_var", "R", layout=Layout.ROW, doc="row factor of the second moment", when=factored),
        StateDecl("col_var", "C", layout=Layout.COL, doc="column factor of the second moment", when=factored),
        StateDecl("variance", "V", doc="second moment of a vector or scalar", when=~factored),
    ]
    return states, [("row_var", r_t), ("col_var", c_t), ("variance", v_t)], r_t, c_t, v_t


def adafactor(
    *,
    convention: str = "torch",
    eps1_from_dtype: bool = True,
    relative_step: bool = True,
    scale_parameter: bool = True,
    warmup_init: bool = False,
    first_moment: bool = False,
) -> Spec:
    """Adafactor as torch.optim.Adafactor (default), or as transformers' (``convention="transformers"``)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(map(repr, CONVENTIONS))}, got {convention!r}")
    if convention == "transformers":
        return _transformers(relative_step, scale_parameter, warmup_init, first_moment)
    lr, tau, eps2, d, wd = (hyper(n) for n in ("lr", "beta2_decay", "eps2", "d", "weight_decay"))
    eps1 = finfo("eps").named("ε1", r"\epsilon_1") if eps1_from_dtype else hyper("eps1")
    decay = (1 - T**tau).named("β̂2_t", r"\hat{\beta}_{2,t}")
    rho = minimum(lr, 1 / T**0.5).named("ρ_t", r"\rho_t")
    alpha = (maximum(eps2, rms(P)) * rho).named("α_t", r"\alpha_t")
    states, updates, r_t, c_t, v_t = _second_moment(square(G), decay)
    # R·(C/mean_rows(R)), not torch's (R·C)/mean_rows(R): the same number to an ulp, without the float32
    # overflow of R·C when gradients are above ~1e9 (both factors ~g²).
    v_hat = where(ndim() >= 2, r_t * (c_t / maximum(col_mean(r_t), eps1)), v_t).named("V̂_t", r"\hat{V}_t")
    u = (rsqrt(maximum(v_hat, eps1 * eps1)) * G).named("U_t")
    clip = maximum(1.0, rms(u) / d).named("κ_t", r"\kappa_t")
    hypers = [learning_rate(1e-2), _decay_exponent("beta2_decay")]
    hypers += [] if eps1_from_dtype else [_eps(1, 1e-30)]
    hypers += [_eps(2, 1e-3), _threshold("d"), weight_decay(0.0)]
    return Spec(
        name="adafactor",
        title="Adafactor",
        hyperparameters=tuple(hypers),
        states=tuple(states),
        updates=tuple(updates),
        param_update=P * (1 - lr * wd) - alpha / clip * u,
        options=(("convention", convention), ("eps1_from_dtype", eps1_from_dtype)),
        references=REFERENCES,
        notes="ε1 is the machine epsilon of the parameter's dtype unless eps1_from_dtype=False (torch's eps=(None, ε2)).",
    )


def _transformers(relative_step: bool, scale_parameter: bool, warmup_init: bool, first_moment: bool) -> Spec:
    if warmup_init and not relative_step:
        raise ValueError("warmup_init=True requires relative_step=True")
    eps1, eps2, d, wd = (hyper(n) for n in ("eps1", "eps2", "clip_threshold", "weight_decay"))
    decay = (1 - T ** hyper("decay_rate")).named("β̂2_t", r"\hat{\beta}_{2,t}")
    hypers = [] if relative_step else [learning_rate(1e-3)]
    if relative_step:
        limit = 1e-6 * T if warmup_init else 1e-2
        step = minimum(limit, 1 / T**0.5).named("ρ_t", r"\rho_t")
    else:
        step = hyper("lr")
    scale = maximum(eps2, rms(P)) if scale_parameter else 1.0
    lr_t = (scale * step).named("lr_t", r"\eta_t")
    states, updates, r_t, c_t, v_t = _second_moment(square(G) + eps1, decay)
    names = {"row_var": "exp_avg_sq_row", "col_var": "exp_avg_sq_col", "variance": "exp_avg_sq"}
    renamed = {state(old): state(new) for old, new in names.items()}

    def rename(e: Expr) -> Expr:
        return substitute(e, renamed)

    states = [StateDecl(names[s.name], s.symbol, s.latex, s.init, s.layout, s.doc, s.when) for s in states]
    updates = [(names[n], rename(e)) for n, e in updates]
    r_t, c_t, v_t = rename(r_t), rename(c_t), rename(v_t)
    approx = rsqrt(r_t / col_mean(r_t)) * rsqrt(c_t)
    u = where(ndim() >= 2, approx * G, rsqrt(v_t) * G).named("U_t")
    clipped = (u / maximum(rms(u) / d, 1.0) * lr_t).named("Û_t", r"\hat{U}_t")
    hypers += [_eps(1, 1e-30), _eps(2, 1e-3), _threshold("clip_threshold"), _decay_exponent("decay_rate")]
    update = clipped
    if first_moment:
        b1 = hyper("beta1")
        m_t = b1 * state("exp_avg") + (1 - b1) * clipped
        states.insert(0, StateDecl("exp_avg", "m", doc="first moment of the clipped update"))
        updates.insert(0, ("exp_avg", m_t))
        hypers.append(
            Hyperparameter("beta1", 0.9, Range(0.0, 1.0, True, False), "β1", r"\beta_1", "first-moment decay")
        )
        update = m_t
    hypers.append(weight_decay(0.0))
    return Spec(
        name="adafactor",
        title="Adafactor (transformers)",
        hyperparameters=tuple(hypers),
        states=tuple(states),
        updates=tuple(updates),
        param_update=P - wd * lr_t * P - update,
        options=(
            ("convention", "transformers"),
            ("relative_step", relative_step),
            ("scale_parameter", scale_parameter),
            ("warmup_init", warmup_init),
            ("first_moment", first_moment),
        ),
        references=(*REFERENCES, "huggingface/transformers, src/transformers/optimization.py, class Adafactor"),
    )


ALGORITHMS = (
    Algorithm(
        "adafactor",
        adafactor,
        class_name="Adafactor",
        optimizer="portopt.optim.adafactor:Adafactor",
        torch_class="Adafactor",
        cases=(
            CaseRow(hypers={"lr": 0.01}, note="torch's defaults: ε1 from the dtype, lr caps ρ_t"),
            CaseRow(hypers={"lr": 0.05, "weight_decay": 0.1, "d": 1.5}, maximize=True),
            CaseRow({"eps1_from_dtype": False}, {"lr": 0.01, "eps1": 1e-3}, note="an ε1 large enough to matter"),
            CaseRow({"convention": "transformers"}, quick=False, note="transformers' relative step"),
            CaseRow(
                {"convention": "transformers", "first_moment": True, "relative_step": False, "scale_parameter": False},
                {"lr": 0.01, "weight_decay": 0.1},
                note="transformers with a first moment and an external learning rate",
            ),
        ),
    ),
)
