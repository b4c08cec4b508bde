"""Evaluate a spec on one parameter tensor with a table of primitive rules.

Values of kind ``CONST``/``SCALAR`` (hyperparameters and the step counter) are 0-d
float64 tensors on the host, computed once per step: they never touch the storage
dtype. A ``where`` whose condition is such a scalar evaluates only the branch taken
(RAdam's rectification is not computed when rho_t is below the threshold).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from portopt.lowering.host import shape_leaf_value
from portopt.lowering.torch_ops import Rule
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import SHAPE_LEAVES, Op
from portopt.spec.shapes import TensorFacts
from portopt.spec.symbols import Layout, StateDecl

HOST_SCALAR_DTYPE = torch.float64
RELEASE_ABOVE = 256
"""Specs with more nodes than this free intermediate values during evaluation (:class:`Evaluator`)."""


def host_scalar(value: float | Tensor) -> Tensor:
    """A 0-d float64 host tensor holding ``value`` (a float or a 1-element tensor)."""
    if isinstance(value, Tensor):
        return value.detach().to(device="cpu", dtype=HOST_SCALAR_DTYPE).reshape(())
    return torch.tensor(float(value), dtype=HOST_SCALAR_DTYPE)


_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def tensor_facts(x: Tensor, dtype: torch.dtype | None = None) -> TensorFacts:
    """The shape and dtype a spec's shape leaves read for the stepped tensor ``x`` (``dtype``: the one it is
    stepped in, when ``x`` is a widened copy, as the float64 reference's are)."""
    return TensorFacts(tuple(x.shape), _DTYPE_NAMES.get(dtype or x.dtype, "float32"))


@dataclass
class Bindings:
    """The values of a spec's leaves for one parameter at one step.

    ``hypers`` holds the hyperparameters and the step's inputs; ``facts`` the shape and dtype
    of the stepped tensor (default: ``param``'s).
    """

    param: Tensor
    grad: Tensor
    step: float
    hypers: Mapping[str, float | Tensor]
    states: Mapping[str, Tensor]
    facts: TensorFacts | None = None

    def tensor(self) -> TensorFacts:
        return self.facts if self.facts is not None else tensor_facts(self.param)


class Evaluator:
    """Memoised evaluation of a spec's expressions for one parameter and one step.

    Iterative (an explicit stack, no recursion): a node is computed once, after the
    operands it needs, so evaluation is linear in the distinct nodes whatever the depth.
    Given ``roots`` (every expression that will be asked for), a spec of more than
    :data:`RELEASE_ABOVE` nodes drops a value once its last user is computed, so a long chain
    holds a few tensors, not one per node.
    """

    def __init__(
        self, spec: Spec, rules: Mapping[Op, Rule], bindings: Bindings, roots: Sequence[Expr] | None = None
    ) -> None:
        self.spec = spec
        self.rules = rules
        self.bindings = bindings
        self.memo: dict[Expr, Tensor] = {}
        release = roots is not None and len(spec.node_kinds) > RELEASE_ABOVE
        self.pinned = set(roots) if roots is not None and release else None
        self.users: Counter[Expr] = Counter()
        if self.pinned is not None:
            self.users.update(a for node in walk(list(self.pinned)) for a in set(node.args))

    def __call__(self, root: Expr) -> Tensor:
        memo = self.memo
        pending: list[Expr] = [root]
        while pending:
            node = pending[-1]
            if node in memo:
                pending.pop()
                continue
            needed = [a for a in self._operands(node) if a not in memo]
            if needed:
                pending.extend(needed)
                continue
            memo[node] = self._compute(node)
            pending.pop()
            if self.pinned is not None:
                self._release(node)
        return memo[root]

    def _release(self, node: Expr) -> None:
        """Drop the operands whose last user ``node`` was (a branch not taken keeps its users)."""
        assert self.pinned is not None
        used = self._operands(node) if self._host_condition(node) else node.args
        for operand in {*used, *(node.args[:1] if self._host_condition(node) else ())}:
            self.users[operand] -= 1
            if self.users[operand] == 0 and operand not in self.pinned:
                self.memo.pop(operand, None)

    def _host_condition(self, node: Expr) -> bool:
        return node.op is Op.WHERE and self.spec.kind(node.args[0]).is_step_scalar

    def _operands(self, node: Expr) -> tuple[Expr, ...]:
        """The operands ``node`` needs now: a step-scalar ``where`` needs its condition, then one branch."""
        if self._host_condition(node):
            cond = node.args[0]
            if cond not in self.memo:
                return (cond,)
            return (node.args[1] if bool(self.memo[cond]) else node.args[2],)
        return node.args

    def _compute(self, node: Expr) -> Tensor:
        b = self.bindings
        op = node.op
        if op is Op.CONST:
            return host_scalar(float(node.value or 0.0))
        if op is Op.HYPER or op is Op.INPUT:
            return host_scalar(b.hypers[str(node.value)])
        if op in SHAPE_LEAVES:
            return host_scalar(shape_leaf_value(node, b.tensor()))
        if op is Op.STEP:
            return host_scalar(b.step)
        if op is Op.PARAM:
            return b.param
        if op is Op.GRAD:
            return b.grad
        if op is Op.STATE:
            return b.states[str(node.value)]
        if self._host_condition(node):
            return self.memo[self._operands(node)[0]]
        return self.rules[op](*(self.memo[a] for a in node.args))


def evaluate_step(spec: Spec, rules: Mapping[Op, Rule], bindings: Bindings) -> tuple[dict[str, Tensor], Tensor]:
    """New value of every state the tensor has and of the parameter (nothing is written).

    A shape-dependent spec runs the plain spec of the tensor's shape class.
    """
    spec = spec.specialize(bindings.tensor())
    ev = Evaluator(spec, rules, bindings, spec.roots)
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
    spec: Spec,
    rules: Mapping[Op, Rule],
    param: Tensor,
    grad: Tensor,
    hypers: Mapping[str, float | Tensor],
    facts: TensorFacts | None = None,
) -> dict[str, Tensor]:
    """Each state's initial value, broadcast to its storage shape (in the dtype of ``param``): the states the
    tensor has (``facts``: its shape and dtype, default ``param``'s)."""
    bindings = Bindings(param, grad, 0.0, hypers, {}, facts)
    spec = spec.specialize(bindings.tensor())
    ev = Evaluator(spec, rules, bindings)
    values: dict[str, Tensor] = {}
    for decl in spec.states:
        value = ev(decl.init).to(device=param.device, dtype=param.dtype)
        values[decl.name] = value.expand(state_shape(decl, param.shape)).clone()
    return values
