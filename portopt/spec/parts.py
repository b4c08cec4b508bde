"""Parts to build an algorithm from: hyperparameters with torch.optim's wording, moment updates, bias
corrections, weight decay, RMS update clipping, a cautious mask, and a builder that collects them.

Each part returns an expression (labelled where a paper names the value), so an algorithm made of
parts is still one spec and renders as one set of equations::

    from portopt.spec import G, P, sqrt, square
    from portopt.spec.parts import Builder, beta, bias_correction, clip_by_rms, decoupled_decay, epsilon
    from portopt.spec.parts import learning_rate, weight_decay

    b = Builder("adamw_clipped", "AdamW with RMS update clipping")
    lr, b1, b2, eps, wd = b.hypers(learning_rate(1e-3), beta(1, 0.9), beta(2, 0.999), epsilon(1e-8), weight_decay(1e-2))
    m = b.ema("exp_avg", "m", G, b1)
    v = b.ema("exp_avg_sq", "v", square(G), b2)
    u = clip_by_rms(m / bias_correction(b1) / (sqrt(v / bias_correction(b2)) + eps), 1.0)
    spec = b.build(decoupled_decay(P, lr, wd) - lr * u)
"""

from __future__ import annotations

from collections.abc import Sequence

from portopt.spec.definition import OptionValue, Spec
from portopt.spec.errors import SpecError
from portopt.spec.expr import (
    Expr,
    ExprLike,
    G,
    P,
    T,
    as_expr,
    hyper,
    maximum,
    norm,
    numel,
    sqrt,
    state,
    step_input,
    tensor_sum,
    where,
)
from portopt.spec.symbols import (
    NON_NEGATIVE,
    UNIT_INTERVAL_OPEN_RIGHT,
    ZERO,
    Hyperparameter,
    Input,
    Layout,
    Method,
    StateDecl,
)

__all__ = [
    "Builder",
    "beta",
    "bias_correction",
    "cautious",
    "clip_by_rms",
    "coupled_decay",
    "decoupled_decay",
    "ema",
    "epsilon",
    "learning_rate",
    "rms",
    "weight_decay",
]


# hyperparameters ----------------------------------------------------------------------------
def learning_rate(default: float = 1e-3) -> Hyperparameter:
    """``lr >= 0``; torch's message: ``Invalid learning rate: ...``."""
    return Hyperparameter("lr", default, NON_NEGATIVE, "lr", r"\eta", "learning rate", what="learning rate")


def beta(index: int, default: float) -> Hyperparameter:
    """``0 <= beta_i < 1``, stored in ``group["betas"][index - 1]``."""
    return Hyperparameter(
        f"beta{index}",
        default,
        UNIT_INTERVAL_OPEN_RIGHT,
        f"β{index}",
        rf"\beta_{index}",
        f"decay rate of moment {index}",
        what=f"beta parameter at index {index - 1}",
        group_key="betas",
        group_index=index - 1,
    )


def epsilon(default: float) -> Hyperparameter:
    """``eps >= 0``; torch's message: ``Invalid epsilon value: ...``."""
    return Hyperparameter(
        "eps", default, NON_NEGATIVE, "ε", r"\epsilon", "term added for numerical stability", what="epsilon value"
    )


def weight_decay(default: float = 0.0) -> Hyperparameter:
    """``weight_decay >= 0``; torch's message: ``Invalid weight_decay value: ...``."""
    return Hyperparameter(
        "weight_decay", default, NON_NEGATIVE, "λ", r"\lambda", "weight decay coefficient", what="weight_decay value"
    )


# expressions --------------------------------------------------------------------------------
def ema(old: ExprLike, new: ExprLike, decay: ExprLike) -> Expr:
    """``β·old + (1 − β)·new``: an exponential moving average (lowered to one ``lerp``)."""
    decay = as_expr(decay)
    return decay * as_expr(old) + (1 - decay) * as_expr(new)


def bias_correction(decay: ExprLike) -> Expr:
    """``1 − β^t``: divide a moment started at zero by it (Adam's bias correction)."""
    return 1 - as_expr(decay) ** T


def rms(x: ExprLike) -> Expr:
    """``‖x‖ / √n``, the root mean square over the tensor (0 for an empty one), as torch's Adafactor computes it."""
    return norm(x) / sqrt(maximum(numel(), 1.0))


def clip_by_rms(update: ExprLike, threshold: ExprLike) -> Expr:
    """``u / max(1, RMS(u)/d)``: update clipping (Shazeer & Stern 2018, section 5)."""
    u = as_expr(update)
    return u / maximum(1.0, (rms(u) / as_expr(threshold)).named("RMS(u)/d", r"\mathrm{RMS}(u)/d"))


def cautious(update: ExprLike, gradient: ExprLike = G) -> Expr:
    """The update masked where it disagrees in sign with the gradient, rescaled by ``n / (Σ mask + 1)``.

    Liang, Chen, Liu & Liu, "Cautious Optimizers: Improving Training with One Line of Code",
    arXiv:2411.16085: ``mask = (u·g > 0)``, ``u ← u·mask·n/(Σ mask + 1)``.
    """
    u = as_expr(update)
    mask = where(u * as_expr(gradient) > 0, 1.0, 0.0).named("φ", r"\phi_t")
    return u * mask * (numel() / (tensor_sum(mask) + 1.0))


def decoupled_decay(param: ExprLike = P, lr: ExprLike | None = None, decay: ExprLike | None = None) -> Expr:
    """``p·(1 − lr·λ)``: decoupled weight decay applied before the step (AdamW)."""
    lr = hyper("lr") if lr is None else lr
    decay = hyper("weight_decay") if decay is None else decay
    return as_expr(param) * (1 - as_expr(lr) * as_expr(decay))


def coupled_decay(gradient: ExprLike = G, param: ExprLike = P, decay: ExprLike | None = None) -> Expr:
    """``g + λ·p``: L2 regularisation folded into the gradient (torch's ``weight_decay``)."""
    decay = hyper("weight_decay") if decay is None else decay
    return (as_expr(gradient) + as_expr(decay) * as_expr(param)).named("g'", "g'_t")


# assembly -----------------------------------------------------------------------------------
class Builder:
    """Collects the declarations an algorithm's parts need, then builds the :class:`Spec`.

    ``hypers`` declares hyperparameters (returning their symbols), ``state``/``ema`` declare
    states with their updates, ``input`` declares an extra input of ``step``, ``method`` a
    method; :meth:`build` checks everything as :class:`Spec` does.
    """

    def __init__(self, name: str, title: str, *, references: Sequence[str] = (), notes: str = "") -> None:
        self.name, self.title = name, title
        self.references, self.notes = tuple(references), notes
        self.hyperparameters: list[Hyperparameter] = []
        self.states: list[StateDecl] = []
        self.updates: list[tuple[str, Expr]] = []
        self.inputs: list[Input] = []
        self.methods: list[Method] = []

    def hypers(self, *declared: Hyperparameter) -> tuple[Expr, ...]:
        """Declare hyperparameters; their symbols, in order."""
        for h in declared:
            if any(h.name == known.name for known in self.hyperparameters):
                raise SpecError(f"{self.name}: hyperparameter {h.name!r} is declared twice")
            self.hyperparameters.append(h)
        return tuple(hyper(h.name) for h in declared)

    def input(self, declared: Input) -> Expr:
        """Declare an extra input of ``step``; its symbol."""
        self.inputs.append(declared)
        return step_input(declared.name)

    def state(
        self,
        name: str,
        symbol: str,
        *,
        latex: str = "",
        init: ExprLike = ZERO,
        layout: Layout = Layout.ELEMENTWISE,
        doc: str = "",
        when: Expr | None = None,
    ) -> Expr:
        """Declare a state; its value before the step (give its new value with :meth:`update`)."""
        self.states.append(StateDecl(name, symbol, latex, as_expr(init), layout, doc, when))
        return state(name)

    def update(self, name: str, value: ExprLike) -> Expr:
        """Set the new value of state ``name``; returns it (the paper's ``m_t``)."""
        new = as_expr(value)
        self.updates.append((name, new))
        return new

    def ema(self, name: str, symbol: str, x: ExprLike, decay: ExprLike, **declaration: object) -> Expr:
        """A state ``name`` kept as the moving average of ``x`` (:func:`ema`); its new value."""
        old = self.state(name, symbol, **declaration)  # type: ignore[arg-type]
        return self.update(name, ema(old, x, decay))

    def method(
        self, name: str, updates: Sequence[tuple[str, ExprLike]], due: Expr | None = None, doc: str = ""
    ) -> None:
        """Declare a method (an update of some states run between steps)."""
        self.methods.append(Method(name, tuple((n, as_expr(e)) for n, e in updates), due, doc))

    def build(self, param_update: ExprLike, options: Sequence[tuple[str, OptionValue]] = ()) -> Spec:
        """The checked spec with ``param_update`` as the new parameter."""
        return Spec(
            name=self.name,
            title=self.title,
            hyperparameters=tuple(self.hyperparameters),
            states=tuple(self.states),
            updates=tuple(self.updates),
            param_update=as_expr(param_update),
            options=tuple(options),
            references=self.references,
            notes=self.notes,
            inputs=tuple(self.inputs),
            methods=tuple(self.methods),
        )
