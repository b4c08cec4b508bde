"""Generate one straight-line torch function per spec: the body of a fused step kernel.

The function updates one parameter tensor (and its states) in place::

    def kernel_step(param, grad, st0, ..., st<n-1>, s):
        p = opmath(param); g = opmath(grad); st0_old = opmath(st0); ...
        v0 = op_mul(s[0], st0_old) ...    # one line per tensor-level node of the spec
        store(st0, v3); ...; store(param, v9)   # every store after every load

**Data is never code.** A spec may come from another machine (JSON, a golden file), so
the source holds no text taken from it: no name, title, symbol or label, not even in a
comment. Identifiers are made from indices (``st<i>`` is the i-th declared state, ``v<k>``
the k-th computed value), ops are the fixed names ``op_<op>``, and the only values written
out are finite float literals (``repr`` of a Python float: digits, ``.``, ``e``, signs).
:func:`check_generated_source` verifies this grammar, line by line, before anything is
compiled. What ``s[k]`` holds is ``KernelPlan.scalars[k]`` and ``st<i>`` is the i-th of
``KernelPlan.state_args``; :func:`~portopt.spec.render.render_expr` prints either, outside
the source.

What the plan hoists out of the element loop: every maximal subexpression whose kind is
``SCALAR`` (it depends only on hyperparameters and ``t``: ``lr/(1 − β1^t)``,
``sqrt(1 − β2^t)``, RAdam's rectification, a scalar ``where`` condition) is evaluated
once per step on the host in float64 (:func:`host_scalar_values`) and handed to the
kernel as one small tensor ``s`` in the compute dtype. Changing ``lr``, the betas or the step therefore changes a tensor's
*values*, never the traced program, so a compiled kernel never recompiles for them.
Numbers that are constant in the spec (``0.5``, ``2``) stay literals where torch takes a
Python number (the right operand of an arithmetic or comparison op) so the compiler can
fold them; elsewhere they ride in ``s`` too. A division by a step scalar (Adam's
``sqrt(v)/sqrt(1 − β2^t)``) becomes a multiplication by its reciprocal, computed on the
host in float64: one vector division less per element (divisions, not memory, bound a
bf16 step on a small CPU), at the price of at most one float32 ulp against a true
division.

Kinds above ``SCALAR`` are computed in the kernel: ``TENSOR`` values (norms, per-tensor
states) as 0-d tensors, ``ROW``/``COL`` factors and ``ELEMENT`` values per element. A
``where`` whose condition is a step scalar becomes ``where(s[k] != 0, a, b)``: both
branches are element-wise arithmetic without side effects, so computing both is exact.

Precision: every load goes through ``opmath`` (float32 for bf16/fp16 storage, the
storage dtype for float32/float64), all arithmetic runs in that dtype, and each result
is rounded once by ``store`` into its storage (``dst.copy_(value)`` by default). Both are
hooks of :meth:`KernelPlan.make_function`: a lowering that keeps a state in another form
(8-bit block-wise codes, :mod:`portopt.precision.q8_kernel`) passes a ``load`` that decodes
it and a ``store`` that encodes it, and the generated source stays the same.

The ops are the rules of :data:`portopt.lowering.torch_ops.TORCH_RULES` (the float64
reference's own definitions), bound in the function's globals as ``op_<name>``; the
generated code is plain eager torch, so it runs uncompiled on any tensor layout and is
also what :mod:`portopt.backends.compiled` hands to ``torch.compile``.
"""

from __future__ import annotations

import itertools
import linecache
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from portopt.lowering.host import HostValue, evaluate_host
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec.analysis import Kind
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import OP_INFO, Family, Op
from portopt.spec.symbols import Layout

KernelFunction = Callable[..., None]

# Ops whose torch function accepts a Python number as its second operand.
_NUMBER_RIGHT = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
# Of those, the ones that may swap their operands to put a number on the right (exactly).
_COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.EQ, Op.NE})
_COUNTER = itertools.count()
FUNCTION_NAME = "kernel_step"
"""The generated function's name: the same for every spec (nothing of a spec's text reaches the source)."""
_OP_NAMES = frozenset(op.value for op in Op)


def opmath(x: Tensor) -> Tensor:
    """The compute dtype of a stored tensor: float32 for 16-bit floats, else unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def copy_store(dst: Tensor, value: Tensor) -> None:
    """The default store of a kernel: ``value`` copied into ``dst`` (rounded once to its dtype)."""
    dst.copy_(value)


def opmath_dtype(storage: torch.dtype) -> torch.dtype:
    """dtype in which a kernel computes for parameters stored as ``storage``."""
    return storage if storage in (torch.float32, torch.float64) else torch.float32


@dataclass(frozen=True)
class KernelPlan:
    """What a fused kernel of ``spec`` computes where.

    ``scalars[k]`` is the host expression behind ``s[k]`` (``host_nodes``: every node they
    need, operands first); ``state_args`` is the order of
    the state arguments (the spec's declaration order); ``factored`` is true when a state
    is stored per row or per column, so tensors keep a ``(batch, rows, cols)`` shape
    instead of being flattened; ``reductions`` counts the per-tensor reductions of
    element-wise values (each costs a read pass over its operands before the update).
    """

    spec: Spec
    scalars: tuple[Expr, ...]
    host_nodes: tuple[Expr, ...]
    state_args: tuple[str, ...]
    factored: bool
    reductions: int
    function_name: str
    source: str

    def make_function(
        self, load: Callable[[Any], Tensor] = opmath, store: Callable[[Any, Tensor], object] = copy_store
    ) -> KernelFunction:
        """A fresh function object with its own code object (dynamo caches per code object).

        ``load`` reads each operand into the compute dtype (default :func:`opmath`, which returns a
        float32/float64 tensor itself; a differentiable step passes one that copies); ``store(dst,
        value)`` writes a new value into a state or the parameter (default :func:`copy_store`).
        """
        check_generated_source(self.source)
        filename = f"<portopt-kernel {self.function_name} #{next(_COUNTER)}>"
        # Registered so that tracebacks and dynamo can show the generated lines.
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        namespace: dict[str, object] = {"opmath": load, "store": store, "where": torch.where}
        namespace.update({f"op_{op.value}": rule for op, rule in TORCH_RULES.items()})
        exec(compile(self.source, filename, "exec"), namespace)
        fn = namespace[self.function_name]
        assert callable(fn)
        return fn


def plan_kernel(spec: Spec) -> KernelPlan:
    """Plan and generate the kernel function of ``spec`` (see the module docstring)."""
    nodes = walk(list(spec.roots))
    host = {n for n in nodes if spec.kind(n).is_step_scalar}
    scalars: dict[Expr, int] = {}

    def hoist(node: Expr) -> str:
        if node not in scalars:
            scalars[node] = len(scalars)
        return f"s[{scalars[node]}]"

    names: dict[Expr, str] = {}
    loads = ["    p = opmath(param)", "    g = opmath(grad)"]
    state_vars = {name: f"st{i}" for i, name in enumerate(spec.state_names)}
    body: list[str] = []
    reductions = 0
    for node in nodes:
        if node in host:
            continue
        if node.op is Op.PARAM:
            names[node] = "p"
        elif node.op is Op.GRAD:
            names[node] = "g"
        elif node.op is Op.STATE:
            var = f"{state_vars[str(node.value)]}_old"
            loads.append(f"    {var} = opmath({state_vars[str(node.value)]})")
            names[node] = var
        else:
            names[node] = f"v{len(body)}"
            body.append(f"    {names[node]} = {_call(node, names, host, hoist)}")
            family = OP_INFO[node.op].family
            if family in (Family.REDUCE, Family.AXIS_REDUCE) and spec.kind(node.args[0]) is Kind.ELEMENT:
                reductions += 1

    def value_of(root: Expr) -> str:
        return names[root] if root not in host else hoist(root)

    stores = [
        f"    store({state_vars[name]}, {value_of(expr)})"
        for name, expr in spec.updates
        if not (expr.op is Op.STATE and expr.value == name)
    ]
    stores.append(f"    store(param, {value_of(spec.param_update)})")
    function_name = FUNCTION_NAME
    args = ", ".join(["param", "grad", *state_vars.values(), "s"])
    ordered = sorted(scalars, key=scalars.__getitem__)
    source = "\n".join([f"def {function_name}({args}):", *loads, *body, *stores]) + "\n"
    check_generated_source(source)
    factored = any(s.layout in (Layout.ROW, Layout.COL) for s in spec.states)
    host_nodes = tuple(walk(ordered))  # operands first: the order evaluate_host needs
    return KernelPlan(spec, tuple(ordered), host_nodes, spec.state_names, factored, reductions, function_name, source)


def _call(node: Expr, names: Mapping[Expr, str], host: set[Expr], hoist: Callable[[Expr], str]) -> str:
    args = list(node.args)
    if node.op is Op.WHERE and args[0] in host:
        # A step-scalar condition: s[k] holds 1.0 or 0.0.
        rest = ", ".join(_operand(a, names, host, hoist, literal_ok=False) for a in args[1:])
        return f"where({hoist(args[0])} != 0, {rest})"
    if node.op is Op.DIV and args[1] in host and not _is_const(args[1]):
        # x / s  ->  x · (1/s), the reciprocal computed once on the host in float64.
        return f"op_mul({_operand(args[0], names, host, hoist, literal_ok=False)}, {hoist(1.0 / args[1])})"
    if node.op in _COMMUTATIVE and _is_const(args[0]) and not _is_const(args[1]):
        args.reverse()
    operands = [
        _operand(a, names, host, hoist, literal_ok=i == 1 and node.op in _NUMBER_RIGHT) for i, a in enumerate(args)
    ]
    if node.op is Op.WHERE:
        # torch.where needs a tensor condition but takes numbers for the branches.
        operands = [operands[0], *(_operand(a, names, host, hoist, literal_ok=True) for a in args[1:])]
    return f"op_{node.op.value}({', '.join(operands)})"


def _operand(
    node: Expr, names: Mapping[Expr, str], host: set[Expr], hoist: Callable[[Expr], str], *, literal_ok: bool
) -> str:
    if node not in host:
        return names[node]
    if literal_ok and _is_const(node) and math.isfinite(float(node.value or 0.0)):
        return repr(float(node.value or 0.0))
    return hoist(node)


def _is_const(node: Expr) -> bool:
    return node.op is Op.CONST


_NUMBER = r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?"
_TOKEN = re.compile(r"\s*(?:(" + _NUMBER + r")|([A-Za-z_][A-Za-z0-9_]*)|(!=|[()\[\],.=:]))")
_LINE = re.compile(r"(?:def |    )[A-Za-z0-9_ ()\[\],.=:!+\-]*")
_IDENTIFIER = re.compile(r"(?:param|grad|s|p|g|opmath|store|where|v\d+|st\d+(?:_old)?|op_[a-z_]+)")


def check_generated_source(source: str) -> None:
    """Raise :class:`GeneratedSourceError` unless ``source`` is made only of what :func:`plan_kernel` writes.

    Every line is ``def kernel_step(...)`` or an indented assignment or call; every token
    is an identifier of the fixed vocabulary (``param``, ``grad``, ``s``, ``p``, ``g``,
    ``v<k>``, ``st<i>``, ``st<i>_old``, ``opmath``, ``store``, ``where``, ``op_<op>``), a
    number, or punctuation. No quote, comment, backslash or non-ASCII character can pass,
    so no text from a spec can reach the compiler.
    """
    lines = source.split("\n")
    if lines[-1] != "" or not lines[0].startswith(f"def {FUNCTION_NAME}("):
        raise GeneratedSourceError("generated kernel: unexpected header or ending")
    for number, line in enumerate(lines[:-1], 1):
        if not _LINE.fullmatch(line):
            raise GeneratedSourceError(f"generated kernel line {number}: unexpected characters")
        body = line[4:] if line.startswith("def ") else line
        position = 0
        while position < len(body):
            token = _TOKEN.match(body, position)
            if token is None or token.end() == position:
                raise GeneratedSourceError(f"generated kernel line {number}: unexpected token at column {position}")
            word = token.group(2)
            if word is not None and word != FUNCTION_NAME:
                known = _IDENTIFIER.fullmatch(word) and (not word.startswith("op_") or word[3:] in _OP_NAMES)
                if not known:
                    raise GeneratedSourceError(f"generated kernel line {number}: unknown identifier")
            position = token.end()


class GeneratedSourceError(RuntimeError):
    """The generated kernel source failed :func:`check_generated_source` (a bug in the generator)."""


def kernel_size(spec: Spec) -> tuple[int, int]:
    """``(lines, inlined)``: the computed nodes of ``spec``'s kernel, and how many a compiler that
    inlines every element-wise value into its users would spell out for the largest root.

    ``inlined`` counts a value once per use (``x + x`` counts ``x`` twice), so it measures the
    tree a shared DAG unfolds to: Inductor inlines a value used twice by *one* node into it
    twice, and ``x + x`` nested 16 deep takes minutes to compile (see
    :data:`portopt.backends.compiled.MAX_INLINED`). Linear in the distinct nodes; the count
    saturates at ``2**62``.
    """
    host = {n for n in walk(list(spec.roots)) if spec.kind(n).is_step_scalar}
    size: dict[Expr, int] = {}
    lines = 0
    for node in walk(list(spec.roots)):
        if node in host or not node.args:
            size[node] = 0
            continue
        lines += 1
        size[node] = min(1 + sum(size[a] for a in node.args), 2**62)
    return lines, max((size[r] for r in spec.roots), default=0)


def host_scalar_values(plan: KernelPlan, hypers: Mapping[str, float | Tensor], step: float) -> list[float]:
    """Values of ``s`` at step ``step``: each hoisted expression in float64 on the host.

    Python floats with :mod:`portopt.lowering.host`'s rules (torch's float64 results where
    Python would raise); a condition gives 1.0 or 0.0.
    """
    values: dict[Expr, HostValue] = {}
    evaluate_host(plan.host_nodes, step, {k: float(v) for k, v in hypers.items()}, values)
    return [float(values[e]) for e in plan.scalars]


def scalar_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The kernel's ``s`` argument: one small tensor in the compute dtype."""
    if not values:
        return torch.zeros(1, dtype=dtype, device=device)  # a kernel always takes ``s``
    return torch.tensor(values, dtype=dtype, device=device)
