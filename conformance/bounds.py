"""The float64 reference step with a first-order rounding-error bound for every value.

Each node of a spec is evaluated to a pair (value, error): the value exactly as the
reference backend computes it (float64, :data:`~portopt.lowering.torch_ops.TORCH_RULES`,
the same DAG in the same order), and an absolute bound on how far an implementation that
rounds every operation to the compute dtype (unit roundoff ``u``, 2^-24 for float32) may
land from it. This is running error analysis (Wilkinson): with ``ea``, ``eb`` the bounds of
the operands and ``v`` the exact result,

====================  =========================================================
``a ± b``             ``ea + eb + u·|v|``
``a · b``             ``|a|·eb + |b|·ea + ea·eb + u·|v|``
``a / b``             ``(ea + |v|·eb) / (|b| − eb) + u·|v|``   (inf when ``|b| <= eb``)
``sqrt``, ``log``,    the width of ``f([a − ea, a + ea])`` around ``v``, plus ``u·|v|``
``exp``, ``rsqrt``,   (``2u·|v|`` for transcendental functions, which devices round
``pow``               within about one ulp)
``sign(a)``           2 where ``|a| <= ea`` (the sign may flip), else 0
``max``, ``min``      ``max(ea, eb)``
``a < b`` etc.        *uncertain* where ``|a − b| <= ea + eb``
``where(c, x, y)``    where ``c`` is uncertain: ``|x − y| + ex + ey`` (either branch is
                      acceptable), else the taken branch's bound
reductions            ``Σ ea + γ_n·Σ|a|`` with ``γ_n = u·(⌈log2 n⌉ + 1)`` (tree or
                      blocked summation), ``‖ea‖ + γ_n·‖a‖`` for the norm
====================  =========================================================

Leaves: the parameter, the gradient, the states and the step counter are exact (they are
the inputs, already in the storage format), and so are constants that float32 holds exactly
(``1``, ``2``, ``0.5``); hyperparameters and other constants carry ``u·|h|``, since a device
may hold them as float32 scalars. So a step-only scalar such as
``1 − β2^t`` gets the error of a float32 computation of it (relative ``~u/(1 − β2)``), which
is what a capturable or fused kernel that computes it on the device in float32 actually
incurs; host float64 scalars do better. The bound of the parameter update is therefore
"ULPs of the value plus relative ``κ·u`` of the update", with ``κ`` computed from the
expression rather than guessed. Comparisons near their threshold (``sign`` of a value that
is nearly 0, RAdam's ``ρ_t > 5`` when ``ρ_t`` is within its error of 5) become uncertain and
both outcomes are accepted: that is the lock-step form of the rule for discontinuous ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from portopt.lowering.backend import with_inputs
from portopt.lowering.host import shape_leaf_value
from portopt.lowering.interpreter import host_scalar, state_shape, tensor_facts
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec.analysis import classify
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import OP_INFO, SHAPE_LEAVES, Family, Op
from portopt.spec.shapes import TensorFacts

F64 = torch.float64
INF = math.inf


@dataclass(frozen=True)
class Bounded:
    """A float64 value with two absolute error bounds (for a boolean: where it is uncertain).

    ``error``: the rounding error of computing it from exact inputs (lock-step).
    ``drift``: how far it may move when the inputs carry their own drift bounds, with exact
    arithmetic (free-running); ``None`` when not tracked.
    """

    value: Tensor
    error: Tensor
    drift: Tensor | None = None

    @staticmethod
    def exact(value: Tensor, drift: Tensor | None = None) -> Bounded:
        return Bounded(value, _ZERO, drift)

    def expanded(self, shape: tuple[int, ...]) -> Bounded:
        """Every tensor broadcast to ``shape`` and materialised."""
        drift = None if self.drift is None else self.drift.expand(shape).clone()
        return Bounded(self.value.expand(shape).clone(), self.error.expand(shape).clone(), drift)

    def channel(self, drift: bool) -> Bounded:
        """This value with the chosen bound as its ``error`` (rules read ``error`` only)."""
        if not drift:
            return self
        return Bounded(self.value, _ZERO if self.drift is None else self.drift)


_ZERO = torch.zeros((), dtype=torch.float64)


def _nan_to_inf(e: Tensor) -> Tensor:
    return torch.where(torch.isnan(e), torch.full_like(e, INF), e)


def _width(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``max(|hi − v|, |v − lo|)`` with NaN (an endpoint outside the domain) read as inf."""
    return _nan_to_inf(torch.maximum((hi - v).abs(), (v - lo).abs()))


def _gamma(n: int, u: float) -> float:
    return u * (math.ceil(math.log2(max(n, 1))) + 1)


class BoundEvaluator:
    """Memoised (value, error, drift) evaluation of a spec's expressions for one parameter and step.

    ``param_drift`` and the states' ``drift`` are the free-running bounds of the inputs;
    with ``track_drift`` false only the lock-step ``error`` is computed.
    """

    def __init__(
        self,
        spec: Spec,
        u: float,
        param: Tensor,
        grad: Tensor,
        step: float,
        hypers: Mapping[str, float | Tensor],
        states: Mapping[str, Bounded],
        scalar_memo: dict[Expr, Bounded] | None = None,
        param_drift: Tensor | None = None,
        facts: TensorFacts | None = None,
    ) -> None:
        self.spec = spec
        self.facts = facts if facts is not None else tensor_facts(param)
        self.u = u
        self.param, self.grad, self.step = param, grad, step
        self.hypers, self.states = hypers, states
        self.param_drift = param_drift
        self.track_drift = param_drift is not None
        self.memo: dict[Expr, Bounded] = {}
        # Step-only scalars depend on the hyperparameters and t alone: shared by the tensors of a group.
        self.scalar_memo = scalar_memo if scalar_memo is not None else {}

    def __call__(self, node: Expr) -> Bounded:
        cached = self.memo.get(node)
        if cached is not None:
            return cached
        scalar = _is_step_scalar(self.spec, node)
        cached = self.scalar_memo.get(node) if scalar else None
        if cached is None:
            cached = self._compute(node)
            if scalar:
                self.scalar_memo[node] = cached
        self.memo[node] = cached
        return cached

    def _leaf(self, node: Expr) -> Bounded:
        op = node.op
        zero = _ZERO if self.track_drift else None
        if op is Op.CONST:
            v = host_scalar(float(node.value or 0.0))
            # A constant that float32 holds exactly (1, 2, 0.5, ...) is exact on every device: comparing the
            # step counter with it (SGD's where(t == 1, ...)) is certain, not within rounding of either branch.
            exact = float(v.to(torch.float32)) == float(v)
            return Bounded(v, _ZERO if exact else self.u * v.abs(), zero)
        if op is Op.HYPER or op is Op.INPUT:
            v = host_scalar(self.hypers[str(node.value)])
            return Bounded(v, self.u * v.abs(), zero)
        if op in SHAPE_LEAVES:  # integers and powers of two: exact in every format
            return Bounded.exact(host_scalar(shape_leaf_value(node, self.facts)), zero)
        if op is Op.STEP:
            return Bounded.exact(host_scalar(self.step), zero)
        if op is Op.PARAM:
            return Bounded.exact(self.param, self.param_drift)
        if op is Op.GRAD:
            return Bounded.exact(self.grad, zero)
        found = self.states[str(node.value)]
        return found if not self.track_drift or found.drift is not None else Bounded(found.value, found.error, _ZERO)

    def _compute(self, node: Expr) -> Bounded:
        family = OP_INFO[node.op].family
        if family is Family.LEAF:
            return self._leaf(node)
        if node.op is Op.WHERE:
            return self._where(node)
        args = [self(a) for a in node.args]
        value = TORCH_RULES[node.op](*(a.value for a in args))
        if family in (Family.COMPARE, Family.LOGICAL):
            drift = _uncertain(node.op, [a.channel(True) for a in args]) if self.track_drift else None
            return Bounded(value, _uncertain(node.op, args), drift)
        rule = _ERROR_RULES[node.op]
        error = _nan_to_inf(rule(value, args, self.u))
        drift = _nan_to_inf(rule(value, [a.channel(True) for a in args], 0.0)) if self.track_drift else None
        return Bounded(value, error, drift)

    def _where(self, node: Expr) -> Bounded:
        cond = self(node.args[0])
        uncertain = cond.error if cond.drift is None else cond.error | cond.drift
        if _is_step_scalar(self.spec, node.args[0]) and not bool(uncertain):
            # A certain step-only condition: evaluate only the branch taken, as the reference does.
            return self(node.args[1] if bool(cond.value) else node.args[2])
        x, y = self(node.args[1]), self(node.args[2])
        value = torch.where(cond.value, x.value, y.value)
        error = _select_bound(cond.value, cond.error, x, y, drift=False)
        drift = _select_bound(cond.value, cond.drift, x, y, drift=True) if cond.drift is not None else None
        return Bounded(value, error, drift)


def _select_bound(cond: Tensor, uncertain: Tensor, x: Bounded, y: Bounded, drift: bool) -> Tensor:
    ex, ey = x.channel(drift).error, y.channel(drift).error
    either = (x.value - y.value).abs() + ex + ey
    return _nan_to_inf(torch.where(uncertain, either, torch.where(cond, ex, ey)))


def _is_step_scalar(spec: Spec, node: Expr) -> bool:
    try:
        return spec.kind(node).is_step_scalar
    except KeyError:  # a node of a state's initial value, not reached from the update
        return classify([node], {s.name: s.layout for s in spec.states}, spec.name)[node].kind.is_step_scalar


def _uncertain(op: Op, args: list[Bounded]) -> Tensor:
    if op is Op.NOT:
        return args[0].error.to(torch.bool)
    if op in (Op.AND, Op.OR):
        return args[0].error.to(torch.bool) | args[1].error.to(torch.bool)
    a, b = args
    slack = a.error + b.error
    return ((a.value - b.value).abs() <= slack) & (slack > 0)


ErrorRule = Callable[[Tensor, list[Bounded], float], Tensor]


def _add(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    return x[0].error + x[1].error + u * v.abs()


def _mul(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    (a, ea), (b, eb) = ((t.value, t.error) for t in x)
    return a.abs() * eb + b.abs() * ea + ea * eb + u * v.abs()


def _div(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    (_, ea), (b, eb) = ((t.value, t.error) for t in x)
    low = b.abs() - eb
    safe = torch.where(low > 0, low, torch.ones_like(low))
    return torch.where(low > 0, (ea + v.abs() * eb) / safe, torch.full_like(low, INF)) + u * v.abs()


def _monotone(f: Callable[[Tensor], Tensor], ulps: float, lower_domain: float | None = None) -> ErrorRule:
    def rule(v: Tensor, x: list[Bounded], u: float) -> Tensor:
        a, ea = x[0].value, x[0].error
        lo_arg = a - ea
        if lower_domain is not None:
            lo_arg = torch.clamp(lo_arg, min=lower_domain)
        return _width(v, f(lo_arg), f(a + ea)) + ulps * u * v.abs()

    return rule


def _pow(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    (a, ea), (b, eb) = ((t.value, t.error) for t in x)
    worst = torch.zeros_like(v)
    for da in (-1.0, 1.0):
        for db in (-1.0, 1.0):
            corner = torch.pow(a + da * ea, b + db * eb)
            worst = torch.maximum(worst, _nan_to_inf((corner - v).abs()))
    return worst + 2 * u * v.abs()


def _square(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    a, ea = x[0].value, x[0].error
    return 2 * a.abs() * ea + ea * ea + u * v.abs()


def _exp(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    return v.abs() * torch.expm1(x[0].error) + 2 * u * v.abs()


def _sign(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    a, ea = x[0].value, x[0].error
    flips = (a.abs() <= ea) & (ea > 0)
    return torch.where(flips, torch.full_like(v, 2.0), torch.zeros_like(v))


def _passthrough(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    return x[0].error


def _extremum(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    return torch.maximum(x[0].error, x[1].error)


def _full(x: Bounded) -> Tensor:
    return x.error.expand(x.value.shape)


def _sum(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    a = x[0].value
    return _full(x[0]).sum() + _gamma(a.numel(), u) * a.abs().sum()


def _mean(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    return _sum(v, x, u) / max(x[0].value.numel(), 1)


def _norm(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    a = x[0].value
    inputs: Tensor = torch.linalg.vector_norm(_full(x[0]))
    return inputs + (_gamma(a.numel(), u) + u) * v.abs()


def _max_abs(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    e = _full(x[0])
    worst: Tensor = e.amax() if e.numel() else torch.zeros((), dtype=F64)
    return worst


def _axis(reduce: str, dim: int) -> ErrorRule:
    def rule(v: Tensor, x: list[Bounded], u: float) -> Tensor:
        a = x[0].value
        n = a.shape[dim]
        e = _full(x[0])
        if reduce == "max":
            return e.amax(dim=dim, keepdim=True) if n else torch.zeros_like(v)
        total = e.sum(dim=dim, keepdim=True) + _gamma(n, u) * a.abs().sum(dim=dim, keepdim=True)
        return total / max(n, 1) if reduce == "mean" else total

    return rule


def _mod(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    # a − floor(a/b)·b: continuous away from the jumps; a jump (the quotient within its error of an
    # integer) may land anywhere in [0, |b|).
    (a, ea), (b, eb) = ((t.value, t.error) for t in x)
    q = a / b
    near = ((q - torch.round(q)).abs() * b.abs() <= ea + q.abs() * eb) & ((ea + eb) > 0)
    smooth = ea + torch.floor(q).abs() * eb + u * v.abs()
    return torch.where(near, b.abs() + eb, smooth)


def _floor(v: Tensor, x: list[Bounded], u: float) -> Tensor:
    a, ea = x[0].value, x[0].error
    jumps = (torch.floor(a - ea) != torch.floor(a + ea)) & (ea > 0)
    return torch.where(jumps, torch.ones_like(v), torch.zeros_like(v))


_ERROR_RULES: dict[Op, ErrorRule] = {
    Op.ADD: _add,
    Op.SUB: _add,
    Op.MUL: _mul,
    Op.DIV: _div,
    Op.NEG: _passthrough,
    Op.ABS: _passthrough,
    Op.POW: _pow,
    Op.SQRT: _monotone(torch.sqrt, 1.0, lower_domain=0.0),
    Op.RSQRT: _monotone(torch.rsqrt, 2.0, lower_domain=0.0),
    Op.SQUARE: _square,
    Op.EXP: _exp,
    Op.LOG: _monotone(torch.log, 2.0, lower_domain=0.0),
    Op.SIGN: _sign,
    Op.MAXIMUM: _extremum,
    Op.MINIMUM: _extremum,
    Op.SUM: _sum,
    Op.MEAN: _mean,
    Op.NORM: _norm,
    Op.MAX_ABS: _max_abs,
    Op.ROW_MEAN: _axis("mean", -1),
    Op.COL_MEAN: _axis("mean", -2),
    Op.ROW_SUM: _axis("sum", -1),
    Op.COL_SUM: _axis("sum", -2),
    Op.ROW_MAX: _axis("max", -1),
    Op.COL_MAX: _axis("max", -2),
    Op.MOD: _mod,
    Op.FLOOR: _floor,
}


def initial_states(
    spec: Spec,
    u: float,
    param: Tensor,
    grad: Tensor,
    hypers: Mapping[str, float | Tensor],
    facts: TensorFacts | None = None,
) -> dict[str, Bounded]:
    """Each state's initial value and bound, broadcast to its storage shape (the states of the tensor's shape
    class: ``facts``, default ``param``'s)."""
    facts = facts if facts is not None else tensor_facts(param)
    spec = spec.specialize(facts)
    ev = BoundEvaluator(spec, u, param, grad, 0.0, with_inputs(spec, hypers), {}, facts=facts)
    return {decl.name: ev(decl.init).expanded(state_shape(decl, param.shape)) for decl in spec.states}


def bounded_step(
    spec: Spec,
    u: float,
    param: Tensor,
    grad: Tensor,
    step: float,
    hypers: Mapping[str, float | Tensor],
    states: Mapping[str, Bounded],
    scalar_memo: dict[Expr, Bounded] | None = None,
    param_drift: Tensor | None = None,
    facts: TensorFacts | None = None,
) -> tuple[dict[str, Bounded], Bounded]:
    """New value and bounds of every state and of the parameter (float64, nothing written).

    ``scalar_memo`` may be shared by the tensors of one param group at one step; with
    ``param_drift`` (and the states' drifts) the free-running bound is propagated too.
    """
    facts = facts if facts is not None else tensor_facts(param)
    spec = spec.specialize(facts)
    hypers = with_inputs(spec, hypers)
    ev = BoundEvaluator(spec, u, param, grad, step, hypers, states, scalar_memo, param_drift, facts)
    new_states = {name: ev(expr).expanded(tuple(states[name].value.shape)) for name, expr in spec.updates}
    return new_states, ev(spec.param_update).expanded(tuple(param.shape))


def has_discontinuity(spec: Spec) -> bool:
    """True when an element-wise value depends on a sign or a comparison (a jump in the update)."""
    return any(
        (node.op is Op.SIGN or OP_INFO[node.op].family is Family.COMPARE) and not spec.kind(node).is_step_scalar
        for node in walk(list(spec.roots))
    )
