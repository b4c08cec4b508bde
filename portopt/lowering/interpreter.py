"""Evaluate a spec on one parameter tensor with a table of primitive rules.

Values of kind ``CONST``/``SCALAR`` (hyperparameters and the step counter) are 0-d
float64 tensors on the host, computed once per step: they never touch the storage
dtype. A ``where`` whose condition is such a scalar evaluates only the branch taken
(RAdam's rectification is not computed when rho_t is below the threshold).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from portopt.lowering.torch_ops import Rule
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr
from portopt.spec.ops import Op
from portopt.spec.symbols import Layout, StateDecl

HOST_SCALAR_DTYPE = torch.float64


def host_scalar(value: float | Tensor) -> Tensor:
    """A 0-d float64 host tensor holding ``value`` (a float or a 1-element tensor)."""
    if isinstance(value, Tensor):
        return value.detach().to(device="cpu", dtype=HOST_SCALAR_DTYPE).reshape(())
    return torch.tensor(float(value), dtype=HOST_SCALAR_DTYPE)


@dataclass
class Bindings:
    """The values of a spec's leaves for one parameter at one step."""

    param: Tensor
    grad: Tensor
    step: float
    hypers: Mapping[str, float | Tensor]
    states: Mapping[str, Tensor]


class Evaluator:
    """Memoised evaluation of a spec's expressions for one parameter and one step."""

    def __init__(self, spec: Spec, rules: Mapping[Op, Rule], bindings: Bindings) -> None:
        self.spec = spec
        self.rules = rules
        self.bindings = bindings
        self.memo: dict[Expr, Tensor] = {}

    def __call__(self, node: Expr) -> Tensor:
        cached = self.memo.get(node)
        if cached is None:
            cached = self._compute(node)
            self.memo[node] = cached
        return cached

    def _compute(self, node: Expr) -> Tensor:
        b = self.bindings
        op = node.op
        if op is Op.CONST:
            return host_scalar(float(node.value or 0.0))
        if op is Op.HYPER:
            return host_scalar(b.hypers[str(node.value)])
        if op is Op.STEP:
            return host_scalar(b.step)
        if op is Op.PARAM:
            return b.param
        if op is Op.GRAD:
            return b.grad
        if op is Op.STATE:
            return b.states[str(node.value)]
        if op is Op.WHERE and self.spec.kind(node.args[0]).is_step_scalar:
            taken = node.args[1] if bool(self(node.args[0])) else node.args[2]
            return self(taken)
        return self.rules[op](*(self(a) for a in node.args))


def evaluate_step(spec: Spec, rules: Mapping[Op, Rule], bindings: Bindings) -> tuple[dict[str, Tensor], Tensor]:
    """New value of every state and of the parameter (nothing is written)."""
    ev = Evaluator(spec, rules, bindings)
    new_states = {name: ev(expr) for name, expr in spec.updates}
    return new_states, ev(spec.param_update)


def state_shape(decl: StateDecl, param_shape: torch.Size) -> tuple[int, ...]:
    """Storage shape of a state for a parameter of ``param_shape``."""
    if decl.layout is Layout.ELEMENTWISE:
        return tuple(param_shape)
    if decl.layout is Layout.TENSOR:
        return ()
    if len(param_shape) < 2:
        raise ValueError(
            f"state {decl.name!r} is factored by {decl.layout.value}s and needs a parameter with at "
            f"least 2 dims, got shape {tuple(param_shape)}"
        )
    if decl.layout is Layout.ROW:
        return (*param_shape[:-1], 1)
    return (*param_shape[:-2], 1, param_shape[-1])


def initial_state_values(
    spec: Spec, rules: Mapping[Op, Rule], param: Tensor, grad: Tensor, hypers: Mapping[str, float | Tensor]
) -> dict[str, Tensor]:
    """Each state's initial value, broadcast to its storage shape (in the dtype of ``param``)."""
    ev = Evaluator(spec, rules, Bindings(param, grad, 0.0, hypers, {}))
    values: dict[str, Tensor] = {}
    for decl in spec.states:
        value = ev(decl.init).to(device=param.device, dtype=param.dtype)
        values[decl.name] = value.expand(state_shape(decl, param.shape)).clone()
    return values
