"""The ONNX lowering of a spec and the ``onnx`` backend that runs it with onnxruntime.

**The graph.** :func:`spec_to_onnx` writes one optimizer step for one tensor as a standard
ONNX model, built node by node from the spec's IR (no tracing), with only ``ai.onnx`` ops,
so any ONNX runtime can execute it::

    inputs   param, grad, <state> ...,  step,  <hyperparameter> ...
    outputs  param_out, <state>_out ...

``param``, ``grad`` and the element-wise states share one shape of a chosen rank with
dynamic dims (rank 1 by default: flatten a tensor to step it), per-tensor states are 0-d,
``step`` is the float32 scalar ``t`` of this update (1 at the first step) and every
hyperparameter is a float32 scalar named as in the spec.
States start at their ``init`` values (:func:`init_to_onnx` writes that graph: inputs
``param``, ``grad`` and the hyperparameters, outputs ``<state>_init``). Each node of the
spec's DAG is lowered once (a memoised, iterative walk), so the graph is linear in the
spec's distinct nodes; ONNX node and value names come from indices, never from the spec's
strings, and the interface names (state and hyperparameter names) must be C identifiers,
as the ONNX IR asks. The model carries the spec's JSON (``portopt.spec``) and its rendered
equations (``portopt.equations``, ``portopt.equations.latex``) in ``metadata_props`` and
passes ``onnx.checker.check_model(full_check=True)``. (Equations that would be huge written out, a
DAG reusing nodes at depth, are left unrendered: the JSON still holds the spec.)

**Numbers, as the precision contract pins them.** Step-only values (``1 − β2^t``, RAdam's
ρ_t and rectification, a ``where`` condition on them) are computed in float64 inside the
graph from the float32 inputs (``scalar_dtype="float32"`` for a runtime without doubles);
element-wise and per-tensor work runs in float32 (float64 when a float64 tensor is
involved), whatever the storage dtype (float16, bfloat16): inputs are cast up once, each
output is cast to its storage dtype once. A step scalar meets a tensor as a float32 value,
as a Python scalar meets a float32 tensor in torch. A ``where`` on a step scalar (RAdam's
``ρ_t > 5``) is an ONNX ``Where`` on a 0-d condition: both branches are element-wise
arithmetic without side effects, so selecting is exact. Where ONNX and torch differ on
special values the lowering follows torch (the float64 reference's rules): ``sign(NaN) =
0``; ``max_abs`` propagates NaN (onnxruntime's ``ReduceMax`` may skip it) and is 0 for an
empty tensor, as is ``mean``.

**Versions.** The default target is opset :data:`DEFAULT_OPSET` with the smallest IR
version that allows it (opset 17, from onnx 1.12 of 2022: IR 8, well inside what runtimes
load); any opset from :data:`MIN_OPSET` to the installed onnx's newest can be asked for. onnxruntime 1.32 loads up to IR 14 and ai.onnx opset 28 (onnx 1.23's own limits);
onnxruntime 1.23.2, the last release for Python 3.10, up to IR 11 and opset 23.

**The backend** (``backend="onnx"``, by name only) steps each tensor through an
onnxruntime session of its spec's model, built once per (spec, dtypes, rank, device) and
cached; CPUExecutionProvider, CUDAExecutionProvider for CUDA tensors where an onnxruntime
with CUDA is installed. bfloat16 tensors cross onnxruntime's Python API as float32 (numpy
has no bfloat16): widened on the way in, rounded once on store, the same numbers as an
in-graph cast. A step computes every tensor's outputs before it writes any, so a failing
step leaves parameters and states as they were.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from portopt.lowering.backend import Backend, Hypers, ParamState, StepFunction, with_inputs
from portopt.lowering.checks import check_step_inputs, needs_matrices
from portopt.lowering.interpreter import tensor_facts
from portopt.lowering.registry import register_backend
from portopt.spec.analysis import LAYOUT_KIND, Kind, NodeInfo, classify
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import OP_INFO, Family, Op
from portopt.spec.shapes import FINFO, TensorFacts
from portopt.spec.symbols import Layout

if TYPE_CHECKING:
    import onnx

DEFAULT_OPSET = 17
"""The ai.onnx opset written by default: every op used exists in it with today's semantics."""
MIN_OPSET = 13
"""The oldest opset the lowering writes (``ReduceSum`` and ``IsNaN`` as used here date from 13)."""
PARAM, GRAD, STEP = "param", "grad", "step"
OUT_SUFFIX, INIT_SUFFIX = "_out", "_init"
DTYPES = ("float32", "float16", "bfloat16", "float64")
"""Storage dtypes a model can be written for."""
SCALAR_DTYPES = ("float64", "float32")
MAX_RANK = 8
INSTALL_HINT = "pip install 'portopt[onnx]'"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class OnnxExportError(ValueError):
    """A spec (or a request) that cannot be written as an ONNX model; the message says why."""


# ---------------------------------------------------------------------------------------
# Element types.

# TensorProto's element-type numbers (onnx.TensorProto.FLOAT, ...: fixed by the ONNX standard),
# so that this module imports without onnx.
_ELEM = {"float32": 1, "float16": 10, "float64": 11, "bfloat16": 16, "bool": 9}
_FLOAT, _DOUBLE, _BOOL = _ELEM["float32"], _ELEM["float64"], _ELEM["bool"]
_TORCH_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
}


def _elem(dtype: str, what: str) -> int:
    if dtype not in DTYPES:
        raise OnnxExportError(f"{what} {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return _ELEM[dtype]


@dataclass(frozen=True)
class StepTypes:
    """Storage dtypes of a model's tensor inputs: the parameter, the gradient, each state."""

    param: str
    grad: str
    states: tuple[tuple[str, str], ...]

    @classmethod
    def default(cls, spec: Spec, dtype: str = "float32") -> StepTypes:
        """``dtype`` for the parameter, its gradient and element-wise states; per-tensor states in at
        least float32 (torch.optim's storage)."""
        wide = "float64" if dtype == "float64" else "float32"
        states = tuple((s.name, wide if s.layout is Layout.TENSOR else dtype) for s in spec.states)
        return cls(dtype, dtype, states)

    @property
    def compute(self) -> int:
        """float64 when a float64 tensor is involved, else float32 ("opmath")."""
        return _DOUBLE if "float64" in (self.param, self.grad, *(d for _, d in self.states)) else _FLOAT


# ---------------------------------------------------------------------------------------
# Interface names.


def interface_names(spec: Spec) -> tuple[list[str], list[str]]:
    """The step model's input and output names; :class:`OnnxExportError` if one is unusable."""
    for what, names in (("state", spec.state_names), ("hyperparameter", spec.hyper_names), ("input", spec.input_names)):
        for name in names:
            if not _IDENTIFIER.fullmatch(name):
                raise OnnxExportError(
                    f"{spec.name}: {what} name {name!r} cannot name an ONNX input: ONNX names are C identifiers "
                    "(letters, digits and '_', not starting with a digit, at most 128 characters); rename the "
                    f"{what}"
                )
    inputs = [PARAM, GRAD, *spec.state_names, STEP, *spec.hyper_names, *spec.input_names]
    outputs = [PARAM + OUT_SUFFIX, *(n + OUT_SUFFIX for n in spec.state_names)]
    seen: dict[str, str] = {}
    for name in [*inputs, *outputs, *(n + INIT_SUFFIX for n in spec.state_names)]:
        if name in seen:
            raise OnnxExportError(
                f"{spec.name}: the ONNX interface would use the name {name!r} twice; the names "
                f"{PARAM!r}, {GRAD!r}, {STEP!r}, '<state>{OUT_SUFFIX}' and '<state>{INIT_SUFFIX}' are taken by "
                "the interface, so rename the state or hyperparameter that clashes"
            )
        seen[name] = name
    return inputs, outputs


_RANK_FACTS = frozenset({Op.CONST, Op.NDIM, Op.FINFO})


def shape_condition_reason(spec: Spec) -> str | None:
    """Why a shape-dependent spec's classes cannot be told from a model's rank and dtype alone, or ``None``."""
    for cond in spec._static:
        leaves = {n.op for n in walk([cond]) if not n.args}
        if not leaves <= _RANK_FACTS:
            return (
                f"{spec.name}: a condition on the tensor's shape reads its sizes (numel or size), which an ONNX model "
                "of dynamic dims does not fix; only conditions on ndim and the dtype are lowered"
            )
    return None


def unsupported_reason(spec: Spec) -> str | None:
    """``None`` if :func:`spec_to_onnx` can write ``spec``, else why not."""
    try:
        interface_names(spec)
    except OnnxExportError as exc:
        return str(exc)
    return shape_condition_reason(spec)


# ---------------------------------------------------------------------------------------
# Graph construction.


class _Graph:
    """Nodes and constants of one graph; every name is derived from an index."""

    def __init__(self, prefix: str, opset: int) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple[float, int], str] = {}

    def emit(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        """Append one node; its output is ``out`` or a fresh name."""
        index = len(self.nodes)
        name = out if out is not None else f"{self.prefix}{index}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [name], name=f"n{index}_{op_type}", **attrs))
        return name

    def const(self, value: float, elem: int) -> str:
        """A 0-d constant (one initializer per distinct value and type)."""
        key = (float(value), elem)
        if key not in self._consts:
            name = f"{self.prefix}c{len(self._consts)}"
            dtype = self.helper.tensor_dtype_to_np_dtype(elem)
            array = np.array(value, dtype=dtype)
            self.initializers.append(self.numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        """A 1-d int64 constant (reduction axes)."""
        name = f"{self.prefix}a{len(self.initializers)}"
        self.initializers.append(self.numpy_helper.from_array(np.array(list(values), dtype=np.int64), name))
        return name

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: int) -> str:
        """A reduction over ``axes`` (every axis when ``None``), in the form this opset wants."""
        if axes is None:
            return self.emit(op_type, [x], keepdims=keepdims)
        axes_as_input = op_type == "ReduceSum" or self.opset >= 18
        if axes_as_input:
            return self.emit(op_type, [x, self.ints(axes)], keepdims=keepdims)
        return self.emit(op_type, [x], keepdims=keepdims, axes=list(axes))


Rule = Callable[[_Graph, list[str], int], str]
"""Lowers one op: the graph, the operands' value names, the result's element type -> the result's name."""


def _onnx(op_type: str) -> Rule:
    def rule(g: _Graph, args: list[str], elem: int) -> str:
        return g.emit(op_type, args)

    return rule


def _rsqrt(g: _Graph, args: list[str], elem: int) -> str:
    return g.emit("Reciprocal", [g.emit("Sqrt", args)])


def _square(g: _Graph, args: list[str], elem: int) -> str:
    return g.emit("Mul", [args[0], args[0]])


def _sign(g: _Graph, args: list[str], elem: int) -> str:
    # ONNX's Sign(NaN) is NaN; torch's (and the reference's) is 0.
    return g.emit("Where", [g.emit("IsNaN", args), g.const(0.0, elem), g.emit("Sign", args)])


def _ne(g: _Graph, args: list[str], elem: int) -> str:
    return g.emit("Not", [g.emit("Equal", args)])


def _sum(g: _Graph, args: list[str], elem: int) -> str:
    return g.reduce("ReduceSum", args[0], None, keepdims=0)


def _mean(g: _Graph, args: list[str], elem: int) -> str:
    # sum / max(n, 1): 0 for an empty tensor, as the reference's rule.
    count = g.emit("Max", [g.emit("Cast", [g.emit("Size", args)], to=elem), g.const(1.0, elem)])
    return g.emit("Div", [_sum(g, args, elem), count])


def _norm(g: _Graph, args: list[str], elem: int) -> str:
    return g.reduce("ReduceL2", args[0], None, keepdims=0)


def _max_abs(g: _Graph, args: list[str], elem: int) -> str:
    # max(max|x|, 0) (0 for an empty tensor), NaN if any |x| is NaN: onnxruntime's ReduceMax
    # may skip a NaN, so the NaN test reads the sum of |x| (NaN exactly when some |x| is).
    magnitude = g.emit("Abs", args)
    largest = g.emit("Max", [g.reduce("ReduceMax", magnitude, None, keepdims=0), g.const(0.0, elem)])
    has_nan = g.emit("IsNaN", [g.reduce("ReduceSum", magnitude, None, keepdims=0)])
    return g.emit("Where", [has_nan, g.const(float("nan"), elem), largest])


def _axis(op_type: str, axis: int) -> Rule:
    def rule(g: _Graph, args: list[str], elem: int) -> str:
        reduced = g.reduce(op_type, args[0], [axis], keepdims=1)
        if op_type == "ReduceSum":
            return reduced
        # 0 over an empty axis, as the reference's rule (ONNX: NaN for a mean, -inf or an error for a max)
        length = g.emit("Gather", [g.emit("Shape", args), g.ints([axis])])
        empty = g.emit("Equal", [length, g.ints([0])])
        return g.emit("Where", [empty, g.const(0.0, elem), reduced])

    return rule


def _mod(g: _Graph, args: list[str], elem: int) -> str:
    # Floored: a − floor(a/b)·b (the sign of b), as torch.remainder; ONNX's Mod is C's fmod for floats.
    a, b = args
    return g.emit("Sub", [a, g.emit("Mul", [g.emit("Floor", [g.emit("Div", [a, b])]), b])])


ONNX_RULES: dict[Op, Rule] = {
    Op.ADD: _onnx("Add"),
    Op.SUB: _onnx("Sub"),
    Op.MUL: _onnx("Mul"),
    Op.DIV: _onnx("Div"),
    Op.NEG: _onnx("Neg"),
    Op.POW: _onnx("Pow"),
    Op.SQRT: _onnx("Sqrt"),
    Op.RSQRT: _rsqrt,
    Op.SQUARE: _square,
    Op.ABS: _onnx("Abs"),
    Op.SIGN: _sign,
    Op.EXP: _onnx("Exp"),
    Op.LOG: _onnx("Log"),
    Op.MAXIMUM: _onnx("Max"),
    Op.MINIMUM: _onnx("Min"),
    Op.LT: _onnx("Less"),
    Op.LE: _onnx("LessOrEqual"),
    Op.GT: _onnx("Greater"),
    Op.GE: _onnx("GreaterOrEqual"),
    Op.EQ: _onnx("Equal"),
    Op.NE: _ne,
    Op.AND: _onnx("And"),
    Op.OR: _onnx("Or"),
    Op.NOT: _onnx("Not"),
    Op.WHERE: _onnx("Where"),
    Op.SUM: _sum,
    Op.MEAN: _mean,
    Op.NORM: _norm,
    Op.MAX_ABS: _max_abs,
    Op.ROW_MEAN: _axis("ReduceMean", -1),
    Op.COL_MEAN: _axis("ReduceMean", -2),
    Op.ROW_SUM: _axis("ReduceSum", -1),
    Op.COL_SUM: _axis("ReduceSum", -2),
    Op.ROW_MAX: _axis("ReduceMax", -1),
    Op.COL_MAX: _axis("ReduceMax", -2),
    Op.MOD: _mod,
    Op.FLOOR: _onnx("Floor"),
}
"""The ONNX form of every non-leaf op (the meaning is :data:`portopt.lowering.torch_ops.TORCH_RULES`'s)."""


class _Lowering:
    """The values of a spec's nodes in one graph: each node lowered once, in its natural type.

    A node's natural element type is bool for comparisons and logic, the scalar type for
    step-only values and the compute type for everything per tensor or per element; a
    value wanted in another type is cast once (constants are written in the type wanted).
    """

    def __init__(
        self,
        graph: _Graph,
        info: Mapping[Expr, NodeInfo],
        leaves: Mapping[Op, Callable[[Expr], str]],
        compute: int,
        scalar: int,
    ) -> None:
        self.g = graph
        self.info = info
        self.leaves = leaves
        self.compute = compute
        self.scalar = scalar
        self.values: dict[Expr, str] = {}
        self.casts: dict[tuple[Expr, int], str] = {}

    def natural(self, node: Expr) -> int:
        info = self.info[node]
        if info.is_bool:
            return _BOOL
        return self.scalar if info.kind.is_step_scalar else self.compute

    def value(self, node: Expr, elem: int) -> str:
        """``node``'s value as element type ``elem`` (booleans stay booleans)."""
        if node.op is Op.CONST:
            return self.g.const(float(node.value or 0.0), elem)
        name = self.values[node]
        if self.info[node].is_bool or self.natural(node) == elem:
            return name
        key = (node, elem)
        if key not in self.casts:
            self.casts[key] = self.g.emit("Cast", [name], to=elem)
        return self.casts[key]

    def lower(self, roots: Sequence[Expr]) -> None:
        """Lower every node under ``roots`` (operands first; each node once)."""
        for node in walk(list(roots)):
            if node.op is Op.CONST:
                continue  # written where used, in the type wanted there
            if not node.args:
                self.values[node] = self.leaves[node.op](node)
                continue
            elem = self._operand_type(node)
            args = [self.value(a, _BOOL if self.info[a].is_bool else elem) for a in node.args]
            self.values[node] = ONNX_RULES[node.op](self.g, args, self.natural(node))

    def _operand_type(self, node: Expr) -> int:
        family = OP_INFO[node.op].family
        if family in (Family.REDUCE, Family.AXIS_REDUCE):
            return self.compute
        if family is Family.COMPARE:
            tensor = any(not self.info[a].kind.is_step_scalar for a in node.args)
            return self.compute if tensor else self.scalar
        return self.natural(node)

    def store(self, root: Expr, target: Kind, shape_of: Callable[[], str], elem: int, out: str) -> None:
        """Write ``root`` as output ``out`` of type ``elem``, broadcast to ``shape_of()`` when it is
        smaller than the ``target`` kind's shape."""
        value = self.value(root, self.natural(root))
        if self.info[root].kind != target and target is not Kind.TENSOR:
            value = self.g.emit("Expand", [value, shape_of()])
        if self.natural(root) == elem:
            self.g.emit("Identity", [value], out=out)
        else:
            self.g.emit("Cast", [value], out=out, to=elem)


@dataclass(frozen=True)
class _Target:
    """What a model is written for (checked once)."""

    spec: Spec
    types: StepTypes
    rank: int
    opset: int
    scalar: int
    finfo_dtype: str = "float32"
    """The dtype whose ``finfo`` the spec reads (the parameter's: bfloat16 travels as float32 on the wire)."""


def _target(
    spec: Spec,
    dtype: str,
    types: StepTypes | None,
    rank: int | None,
    opset: int,
    scalar_dtype: str,
    finfo_dtype: str | None = None,
) -> _Target:
    if importlib.util.find_spec("onnx") is None:
        raise OnnxExportError(f"writing an ONNX model needs the onnx package ({INSTALL_HINT})")
    import onnx

    if spec.shape_dependent:
        reason = shape_condition_reason(spec)
        if reason is not None:
            raise OnnxExportError(reason)
        if rank is None:
            rank = 2 if needs_matrices(spec) else 1
        if not _is_int(rank) or not 0 <= rank <= MAX_RANK:
            raise OnnxExportError(f"rank {rank!r} is not supported: use an integer from 0 to {MAX_RANK}")
        stored = finfo_dtype or (types.param if types is not None else dtype)
        spec = spec.specialize(TensorFacts((2,) * rank, stored if stored in FINFO else "float32"))
    interface_names(spec)
    types = types or StepTypes.default(spec, dtype)
    for what, d in (("dtype", types.param), ("grad dtype", types.grad), *(("state dtype", d) for _, d in types.states)):
        _elem(d, what)
    if [n for n, _ in types.states] != list(spec.state_names):
        raise OnnxExportError(
            f"{spec.name}: state dtypes must be given for {', '.join(spec.state_names) or 'no state'}"
        )
    newest = onnx.defs.onnx_opset_version()
    if not _is_int(opset) or not MIN_OPSET <= opset <= newest:
        raise OnnxExportError(f"opset {opset!r} is not supported: use an integer from {MIN_OPSET} to {newest}")
    factored = needs_matrices(spec)
    if rank is None:
        rank = 2 if factored else 1
    if not _is_int(rank) or not 0 <= rank <= MAX_RANK:
        raise OnnxExportError(f"rank {rank!r} is not supported: use an integer from 0 to {MAX_RANK}")
    if factored and rank < 2:
        raise OnnxExportError(f"{spec.name} factors by rows and columns: it needs rank >= 2, got {rank}")
    if scalar_dtype not in SCALAR_DTYPES:
        raise OnnxExportError(f"scalar dtype {scalar_dtype!r} is not supported; use one of {', '.join(SCALAR_DTYPES)}")
    return _Target(spec, types, rank, opset, _ELEM[scalar_dtype], finfo_dtype or types.param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(rank: int, layout: Layout) -> list[str | int]:
    """The declared shape of a tensor of ``layout`` for a parameter of ``rank`` symbolic dims."""
    if layout is Layout.TENSOR:
        return []
    dims: list[str | int] = [f"d{i}" for i in range(rank)]
    if layout is Layout.ROW:
        dims[-1] = 1
    elif layout is Layout.COL:
        dims[-2] = 1
    return dims


def _prefix(names: Sequence[str]) -> str:
    """A prefix for internal value names that no interface name starts with."""
    prefix = "v"
    while any(n.startswith(prefix) for n in names):
        prefix = "_" + prefix
    return prefix


RENDER_LIMIT = 20_000
"""The most expression nodes the equations may have written out as a tree (rendering inlines shared nodes)."""
RENDER_DEPTH = 200
_UNRENDERED = (
    f"(not rendered: written out, the expressions exceed {RENDER_LIMIT} nodes or {RENDER_DEPTH} levels; "
    "the spec's JSON in portopt.spec holds them)"
)


def _renderable(spec: Spec) -> bool:
    """Whether the rendered equations stay small: the expression trees' sizes and depths, counted over the
    DAG in one pass (a DAG that reuses nodes can have exponentially many paths)."""
    size: dict[Expr, int] = {}
    depth: dict[Expr, int] = {}
    roots = [*spec.roots, *(s.init for s in spec.states)]
    for node in walk(roots):
        size[node] = min(RENDER_LIMIT + 1, 1 + sum(size[a] for a in node.args))
        depth[node] = 1 + max((depth[a] for a in node.args), default=0)
    return sum(size[r] for r in roots) <= RENDER_LIMIT and max(depth[r] for r in roots) <= RENDER_DEPTH


def _model(
    target: _Target,
    graph: _Graph,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    doc: str,
    role: str,
) -> onnx.ModelProto:
    from onnx import checker, helper

    from portopt import __version__
    from portopt.spec.render import render_latex, render_text
    from portopt.spec.serialize import spec_to_json

    spec = target.spec
    body = helper.make_graph(
        graph.nodes, f"portopt_{role}", inputs, outputs, initializer=graph.initializers, doc_string=doc
    )
    opsets = [helper.make_opsetid("", target.opset)]
    model = helper.make_model(
        body,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="portopt",
        producer_version=__version__,
        doc_string=doc,
    )
    text, latex = (render_text(spec), render_latex(spec)) if _renderable(spec) else (_UNRENDERED, _UNRENDERED)
    helper.set_model_props(
        model,
        {
            "portopt.role": role,
            "portopt.spec": spec_to_json(spec),
            "portopt.equations": text,
            "portopt.equations.latex": latex,
        },
    )
    checker.check_model(model, full_check=True)
    return model


def _shape_leaves(graph: _Graph, target: _Target, compute: int) -> dict[Op, Callable[[Expr], str]]:
    """The tensor's shape leaves: ``numel``/``size`` from ``param``'s dynamic shape, ``ndim`` and ``finfo`` fixed."""

    def size(n: Expr) -> str:
        axis = int(float(n.value or 0.0))
        if not -target.rank <= axis < target.rank:
            return graph.const(1.0, compute)  # an axis the tensor lacks has size 1
        dims = graph.emit("Shape", [PARAM])
        return graph.emit("Cast", [graph.emit("Gather", [dims, graph.ints([axis])])], to=compute)

    return {
        Op.NUMEL: lambda n: graph.emit("Cast", [graph.emit("Size", [PARAM])], to=compute),
        Op.NDIM: lambda n: graph.const(float(target.rank), compute),
        Op.SIZE: size,
        Op.FINFO: lambda n: graph.const(FINFO[target.finfo_dtype][str(n.value)], compute),
    }


def spec_to_onnx(
    spec: Spec,
    *,
    dtype: str = "float32",
    types: StepTypes | None = None,
    rank: int | None = None,
    opset: int = DEFAULT_OPSET,
    scalar_dtype: str = "float64",
    finfo_dtype: str | None = None,
) -> onnx.ModelProto:
    """One step of ``spec`` for one tensor as an ONNX model (module docstring: interface, numbers).

    ``dtype`` is the storage dtype of the parameter, its gradient and its element-wise states
    (``types`` sets each one); ``rank`` the number of dims, each of dynamic size (``None``: 1,
    or 2 for a spec that factors by rows and columns; flatten a tensor to step it with rank 1);
    ``opset`` the ai.onnx opset; ``scalar_dtype`` the type of the step-only arithmetic;
    ``finfo_dtype`` the dtype whose machine epsilon ``finfo`` reads (default: the parameter's). A
    shape-dependent spec (Adafactor) is written for the shape class of its rank and dtype.
    """
    from onnx import helper

    target = _target(spec, dtype, types, rank, opset, scalar_dtype, finfo_dtype)
    spec = target.spec
    inputs, outputs = interface_names(spec)
    graph = _Graph(_prefix([*inputs, *outputs]), opset)
    types = target.types
    state_types = dict(types.states)
    compute = types.compute
    layouts = {s.name: s.layout for s in spec.states}

    def tensor_input(name: str, storage: str) -> str:
        elem = _ELEM[storage]
        return name if elem == compute else graph.emit("Cast", [name], to=compute)

    def scalar_input(name: str) -> str:
        return name if target.scalar == _FLOAT else graph.emit("Cast", [name], to=target.scalar)

    leaves: dict[Op, Callable[[Expr], str]] = {
        Op.PARAM: lambda n: tensor_input(PARAM, types.param),
        Op.GRAD: lambda n: tensor_input(GRAD, types.grad),
        Op.STATE: lambda n: tensor_input(str(n.value), state_types[str(n.value)]),
        Op.STEP: lambda n: scalar_input(STEP),
        Op.HYPER: lambda n: scalar_input(str(n.value)),
        Op.INPUT: lambda n: scalar_input(str(n.value)),
        **_shape_leaves(graph, target, compute),
    }
    lowering = _Lowering(graph, classify(spec.roots, layouts, spec.name), leaves, compute, target.scalar)
    lowering.lower(spec.roots)
    for name, root in spec.updates:
        decl = spec.state_decl(name)
        lowering.store(
            root,
            LAYOUT_KIND[decl.layout],
            functools.partial(graph.emit, "Shape", [name]),
            _ELEM[state_types[name]],
            name + OUT_SUFFIX,
        )
    lowering.store(
        spec.param_update, Kind.ELEMENT, functools.partial(graph.emit, "Shape", [PARAM]), _ELEM[types.param], outputs[0]
    )

    def info(name: str, storage: str, layout: Layout) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, _ELEM[storage], _shape(target.rank, layout))

    scalar_info = [helper.make_tensor_value_info(n, _FLOAT, []) for n in (STEP, *spec.hyper_names, *spec.input_names)]
    tensors = [(PARAM, types.param, Layout.ELEMENTWISE), (GRAD, types.grad, Layout.ELEMENTWISE)]
    tensors += [(n, state_types[n], layouts[n]) for n in spec.state_names]
    input_info = [info(n, d, layout) for n, d, layout in tensors] + scalar_info
    output_info = [info(PARAM + OUT_SUFFIX, types.param, Layout.ELEMENTWISE)]
    output_info += [info(n + OUT_SUFFIX, state_types[n], layouts[n]) for n in spec.state_names]
    doc = (
        f"One {spec.title} step for one tensor (portopt). Inputs: {', '.join(inputs)} "
        f"({STEP!r}: the step t of this update, 1 at the first; hyperparameters: float32 scalars). "
        f"Outputs: {', '.join(outputs)}."
    )
    return _model(target, graph, input_info, output_info, doc, "step")


def init_to_onnx(
    spec: Spec,
    *,
    dtype: str = "float32",
    types: StepTypes | None = None,
    rank: int | None = None,
    opset: int = DEFAULT_OPSET,
    scalar_dtype: str = "float64",
) -> onnx.ModelProto:
    """The states of ``spec`` before the first step as an ONNX model (arguments as :func:`spec_to_onnx`).

    Inputs ``param``, ``grad`` and every hyperparameter; outputs ``<state>_init`` in the
    state's storage dtype and shape.
    """
    from onnx import helper

    target = _target(spec, dtype, types, rank, opset, scalar_dtype)
    spec = target.spec
    if not spec.states:
        raise OnnxExportError(f"{spec.title} keeps no state: there are no initial values to write")
    inputs, outputs = interface_names(spec)
    graph = _Graph(_prefix([*inputs, *outputs, *(n + INIT_SUFFIX for n in spec.state_names)]), opset)
    types = target.types
    state_types = dict(types.states)
    compute = types.compute

    def tensor_input(name: str, storage: str) -> str:
        return name if _ELEM[storage] == compute else graph.emit("Cast", [name], to=compute)

    leaves: dict[Op, Callable[[Expr], str]] = {
        Op.PARAM: lambda n: tensor_input(PARAM, types.param),
        Op.GRAD: lambda n: tensor_input(GRAD, types.grad),
        Op.HYPER: lambda n: (
            str(n.value) if target.scalar == _FLOAT else graph.emit("Cast", [str(n.value)], to=target.scalar)
        ),
        Op.INPUT: lambda n: (
            str(n.value) if target.scalar == _FLOAT else graph.emit("Cast", [str(n.value)], to=target.scalar)
        ),
        **_shape_leaves(graph, target, compute),
    }
    roots = [s.init for s in spec.states]
    lowering = _Lowering(graph, classify(roots, {}, spec.name), leaves, compute, target.scalar)
    lowering.lower(roots)
    axes = {Layout.ROW: -1, Layout.COL: -2}
    for decl in spec.states:
        axis = axes.get(decl.layout)

        def shape_of(axis: int | None = axis) -> str:
            base = PARAM if axis is None else graph.reduce("ReduceMean", PARAM, [axis], keepdims=1)
            return graph.emit("Shape", [base])

        lowering.store(
            decl.init, LAYOUT_KIND[decl.layout], shape_of, _ELEM[state_types[decl.name]], decl.name + INIT_SUFFIX
        )
    input_info = [
        helper.make_tensor_value_info(PARAM, _ELEM[types.param], _shape(target.rank, Layout.ELEMENTWISE)),
        helper.make_tensor_value_info(GRAD, _ELEM[types.grad], _shape(target.rank, Layout.ELEMENTWISE)),
        *(helper.make_tensor_value_info(n, _FLOAT, []) for n in (*spec.hyper_names, *spec.input_names)),
    ]
    output_info = [
        helper.make_tensor_value_info(s.name + INIT_SUFFIX, _ELEM[state_types[s.name]], _shape(target.rank, s.layout))
        for s in spec.states
    ]
    doc = (
        f"The {spec.title} states of one tensor before its first step (portopt). Inputs: {PARAM}, {GRAD}, "
        f"{', '.join(spec.hyper_names)}. Outputs: {', '.join(s.name + INIT_SUFFIX for s in spec.states) or 'none'}."
    )
    return _model(target, graph, input_info, output_info, doc, "init")


# ---------------------------------------------------------------------------------------
# The backend: onnxruntime sessions.


@functools.cache
def onnxruntime_unavailable_reason() -> str | None:
    """``None`` if onnx and onnxruntime import here, else why not."""
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            return f"package {package} is not installed ({INSTALL_HINT})"
        try:
            importlib.import_module(package)
        except Exception as exc:  # a broken install is a reason, not a crash
            return f"package {package} failed to import: {type(exc).__name__}: {exc}"
    return None


def _has_cuda_onnxruntime() -> bool:
    """Whether an onnxruntime build with the CUDA execution provider is installed (read from package
    metadata, so importing this module stays cheap)."""
    try:
        importlib.metadata.distribution("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


ONNX_DEVICE_TYPES = ("cpu", "cuda") if _has_cuda_onnxruntime() else ("cpu",)


@dataclass(frozen=True)
class _Signature:
    """What one session is specialised on: storage dtypes on the wire, rank, device."""

    types: StepTypes
    rank: int
    device: torch.device
    finfo_dtype: str = "float32"


def _wire(dtype: torch.dtype) -> str:
    # onnxruntime's Python API has no numpy bfloat16: such tensors travel as float32.
    return "float32" if dtype == torch.bfloat16 else _TORCH_NAMES[dtype]


@functools.lru_cache(maxsize=256)
def _session(spec: Spec, sig: _Signature) -> Any:
    import onnxruntime as ort

    model = spec_to_onnx(spec, types=sig.types, rank=sig.rank, finfo_dtype=sig.finfo_dtype)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The machine's cores are shared: idle worker threads sleep instead of spinning.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if sig.device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(
                f"backend 'onnx': this onnxruntime has no CUDAExecutionProvider for {sig.device} tensors "
                f"(providers: {', '.join(ort.get_available_providers())})"
            )
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": sig.device.index or 0}))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def _to_numpy(x: Tensor) -> Any:
    x = x.detach()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.cpu().contiguous().numpy()


@dataclass
class _Pending:
    """One tensor's new values, computed before anything is written."""

    param: Tensor
    state: ParamState
    new_state: dict[str, Tensor] | None
    outputs: list[Any]
    names: tuple[str, ...]


class OnnxStep:
    """The ``onnx`` backend's step function of one spec: one onnxruntime run per tensor."""

    def __init__(self, spec: Spec) -> None:
        from portopt.backends.torch_generic import TorchStep

        reason = unsupported_reason(spec)
        if reason is not None:
            raise ValueError(f"backend 'onnx' cannot lower {spec.name}: {reason}")
        self.spec = spec
        self._initial = TorchStep(spec)  # states created exactly as the generic backend creates them

    def __call__(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers
    ) -> None:
        check_step_inputs(self.spec, params, grads, states, hypers)
        spec = self.spec
        hypers = with_inputs(spec, hypers)
        names = (*spec.hyper_names, *spec.input_names)
        scalars = {name: np.asarray(float(hypers[name]), dtype=np.float32) for name in names}
        pending: list[_Pending] = []
        with torch.no_grad():
            for param, grad, state in zip(params, grads, states, strict=True):
                new_state = None if state else self._initial.initial_state(param, grad, hypers)
                current = new_state if new_state is not None else state
                variant = spec.specialize(tensor_facts(param))
                tensors = [current[n] for n in variant.state_names]
                types = StepTypes(
                    _wire(param.dtype),
                    _wire(grad.dtype),
                    tuple((n, _wire(t.dtype)) for n, t in zip(variant.state_names, tensors, strict=True)),
                )
                session = _session(spec, _Signature(types, param.dim(), param.device, tensor_facts(param).dtype))
                feeds = {PARAM: _to_numpy(param), GRAD: _to_numpy(grad), **scalars}
                feeds.update({n: _to_numpy(t) for n, t in zip(variant.state_names, tensors, strict=True)})
                feeds[STEP] = np.asarray(float(current["step"]) + 1.0, dtype=np.float32)
                pending.append(_Pending(param, state, new_state, session.run(None, feeds), variant.state_names))
            # Every output is computed: from here on, write (rounding once into each storage dtype).
            for item in pending:
                if item.new_state is not None:
                    item.state.update(item.new_state)
                item.param.copy_(torch.from_numpy(item.outputs[0]))
                for name, value in zip(item.names, item.outputs[1:], strict=True):
                    item.state[name].copy_(torch.from_numpy(value))
            torch._foreach_add_([item.state["step"] for item in pending], 1.0)


def build_onnx_step(spec: Spec) -> StepFunction:
    """A step function running ``spec``'s ONNX model with onnxruntime."""
    return OnnxStep(spec)


ONNX = register_backend(
    Backend(
        name="onnx",
        summary="the spec's step as a standard ONNX graph, run by onnxruntime (a second runtime, outside torch)",
        device_types=ONNX_DEVICE_TYPES,
        build=build_onnx_step,
        unavailable_reason=onnxruntime_unavailable_reason,
        priority=-50,
        auto_select=False,
        unsupported_reason=unsupported_reason,
    )
)
