"""The generic torch backend ("torch"): any spec, on any device torch reaches.

Every primitive is lowered to plain torch ops, so the same code runs on cpu, cuda, xpu,
npu, mps, ... with nothing device-specific. A step over one param group:

1. **Check** everything (:func:`~portopt.lowering.checks.check_step_inputs`); nothing is
   written before this passes. Then create the states of parameters stepped for the
   first time, from each state's ``init`` expression.
2. **Bucket** the parameters by (device, dtypes of parameter, gradient and states, step
   value ``t``): a bucket is a list of tensors that one sequence of ``torch._foreach_*``
   calls processes (parameters at different steps get their own step scalars).
3. **Host scalars** (:mod:`portopt.lowering.host`): every ``CONST``/``SCALAR`` value, once
   per bucket, in float64 on the host; it enters the element-wise ops as a Python scalar.
4. **Program** (:mod:`portopt.lowering.program`): the cached straight-line program for
   this step's host decisions (taken branches, skipped ``x + 0·y``), with fused forms
   (``lerp``, ``addcmul``, ``addcdiv``, ``add`` with ``alpha``) and in-place buffer reuse.
   Each instruction runs as one ``torch._foreach_*`` call over the bucket where torch
   has one for those operands, else as a per-tensor loop (broadcasting a per-tensor or
   row/column value, comparisons, ``where``, reductions).
5. **Commit**: new values that do not already live in their state's or parameter's
   storage are copied there (ordered so that no pending value is overwritten first),
   then the step counters are incremented.

On the CPU this issues torch.optim's own calls for SGD, Adam, AdamW, Adagrad, RMSprop and
Adamax, and the results are bit-identical to torch.optim's default implementation.

A list of parameters stepped again and again is **planned** (:mod:`portopt.backends.torch_generic_plan`):
checked in full once, then confirmed by a snapshot of its objects and tensor properties; its buckets
(but for the step value) kept; its step counters the elements of one tensor. In a plan, the small
contiguous tensors of an element-wise spec (:func:`elementwise_only`) that is not one of the algorithms
above form a **flat** group: their states become views of one buffer per state, and a step runs each
instruction once over the concatenated parameters and gradients and those buffers, then copies the new
parameters back (:meth:`TorchStep.run_flat`): one op per instruction instead of a per-tensor loop.

``foreach=False`` (:func:`build_per_tensor_step`): every parameter is its own bucket and every
instruction a single-tensor call (``lerp_``, ``addcdiv_``, ``torch.mul(..., out=)``), so a step
holds the temporaries of one tensor at a time, in torch.optim's single-tensor op order.
Under ``torch.compile``, ``capturable=True`` and ``differentiable=True`` the front end runs the
spec's :class:`~portopt.lowering.graph_step.GraphStep` instead (:func:`build_graph_step`).

Precision: arithmetic runs in the bucket's "opmath" dtype, float32 unless a float64
tensor is involved; float16/bfloat16 parameters and states are read into float32
temporaries and rounded once when stored. New states are kept like torch.optim's:
element-wise (and row/column) states in the parameter's dtype and on its device,
per-tensor states (NAdam's ``mu_product``) in at least float32; ``state_dtype=`` chooses
otherwise. Existing states keep whatever dtype they have. Precision policies (bf16 and 8-bit
states, stochastic rounding) are served by :class:`~portopt.backends.torch_policy.PolicyStep`,
which hooks into the reads and stores of this executor (``build_with_policy``).
``step`` is a 0-d float32 CPU tensor (float64 under a float64 default dtype).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from portopt.backends.torch_generic_plan import PlannedGroup, StepPlans, step_values
from portopt.distributed.layout import logical_facts
from portopt.distributed.reductions import MeshReductions
from portopt.lowering.backend import (
    Backend,
    Hypers,
    ParamState,
    PolicyStepFunction,
    PreparedStep,
    step_counter_dtype,
    with_inputs,
)
from portopt.lowering.checks import check_step_inputs
from portopt.lowering.graph_step import GraphStep
from portopt.lowering.host import HostValue, evaluate_host
from portopt.lowering.interpreter import initial_state_values, state_shape
from portopt.lowering.program import Instr, Program, SpecPlan
from portopt.lowering.registry import register_backend
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.analysis import Kind
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import Op
from portopt.spec.symbols import Layout, StateDecl

TensorList = list[Tensor]
Value = HostValue | TensorList
StateDtype = Callable[[StateDecl, Tensor], torch.dtype]

DEVICE_TYPES = ("cpu", "cuda", "xpu", "npu", "mps", "hpu", "mtia", "privateuseone")
"""Device types the backend is offered for: it has no device-specific code."""

_COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.MAXIMUM, Op.MINIMUM})

# ---------------------------------------------------------------------------------------
# Executing instructions over lists of tensors.

_FOREACH_UNARY: dict[Op, tuple[Callable[..., Sequence[Tensor]], Callable[..., object]]] = {
    Op.NEG: (torch._foreach_neg, torch._foreach_neg_),
    Op.SQRT: (torch._foreach_sqrt, torch._foreach_sqrt_),
    Op.ABS: (torch._foreach_abs, torch._foreach_abs_),
    Op.SIGN: (torch._foreach_sign, torch._foreach_sign_),
    Op.EXP: (torch._foreach_exp, torch._foreach_exp_),
    Op.LOG: (torch._foreach_log, torch._foreach_log_),
}
_FOREACH_BINARY: dict[Op, tuple[Callable[..., Sequence[Tensor]], Callable[..., object]]] = {
    Op.ADD: (torch._foreach_add, torch._foreach_add_),
    Op.SUB: (torch._foreach_sub, torch._foreach_sub_),
    Op.MUL: (torch._foreach_mul, torch._foreach_mul_),
    Op.DIV: (torch._foreach_div, torch._foreach_div_),
    Op.POW: (torch._foreach_pow, torch._foreach_pow_),
    Op.MAXIMUM: (torch._foreach_maximum, torch._foreach_maximum_),
    Op.MINIMUM: (torch._foreach_minimum, torch._foreach_minimum_),
}
_FUSED: dict[str, tuple[Callable[..., Sequence[Tensor]], Callable[..., object]]] = {
    "addcmul": (torch._foreach_addcmul, torch._foreach_addcmul_),
    "addcdiv": (torch._foreach_addcdiv, torch._foreach_addcdiv_),
}
_OUT_RULES: dict[Op, Callable[..., Tensor]] = {
    op: TORCH_RULES[op]
    for op in (
        *(Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.POW, Op.SQRT, Op.RSQRT),
        *(Op.SQUARE, Op.ABS, Op.SIGN, Op.EXP, Op.LOG, Op.MAXIMUM, Op.MINIMUM),
    )
}
"""Element-wise torch functions that accept ``out=`` (for in-place per-tensor loops)."""
_SCALAR_SECOND = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
"""Ops whose second operand may be a Python number."""


@dataclass
class _Bucket:
    """Parameters that share device, dtypes and step value: processed by the same calls."""

    t: float
    dtype: torch.dtype
    device: torch.device
    spec: Spec | None = None
    """The plain spec these tensors run (their shape class's, for a shape-dependent spec)."""
    hypers: Mapping[str, float] = field(default_factory=dict)
    params: TensorList = field(default_factory=list)
    grads: TensorList = field(default_factory=list)
    states: list[ParamState] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    """Stable numbers of the parameters (only a precision-policy step uses them)."""


class _Runner:
    """Executes a program over one bucket."""

    def __init__(self, bucket: _Bucket, host: Mapping[Expr, HostValue]) -> None:
        self.bucket = bucket
        self.host = host
        self.values: dict[Expr, TensorList] = {}

    def scalar_tensor(self, value: HostValue) -> Tensor:
        dtype = torch.bool if isinstance(value, bool) else self.bucket.dtype
        return torch.tensor(value, dtype=dtype, device=self.bucket.device)

    def load(self, tensors: TensorList) -> TensorList:
        """``tensors`` in the compute dtype: the list itself, or float32/64 temporaries."""
        dtype = self.bucket.dtype
        return tensors if all(x.dtype == dtype for x in tensors) else [x.to(dtype) for x in tensors]

    def per_tensor(self, program: Program) -> dict[Expr, TensorList]:
        """Each per-tensor host value of ``program`` for every tensor of the bucket, as 0-d values."""
        b = self.bucket
        wanted = [leaf for leaf in program.leaves if leaf in program.shape_nodes]
        if not wanted:
            return {}
        rows: list[list[float]] = []
        for param in b.params:
            values: dict[Expr, HostValue] = dict(self.host)
            evaluate_host(program.shape_nodes, b.t, b.hypers, values, logical_facts(param))
            rows.append([float(values[leaf]) for leaf in wanted])
        table = torch.tensor(rows, dtype=b.dtype).to(b.device)  # one transfer per bucket
        return {leaf: list(table[:, j].unbind()) for j, leaf in enumerate(wanted)}

    def run(self, program: Program, storage: Mapping[str | None, TensorList]) -> None:
        b = self.bucket
        self.values.update(self.per_tensor(program))
        for leaf in program.leaves:
            if leaf in self.values:
                continue
            if leaf.op is Op.PARAM:
                self.values[leaf] = self.load(storage[None])
            elif leaf.op is Op.GRAD:
                self.values[leaf] = self.load(b.grads)
            else:
                self.values[leaf] = self.load(storage[str(leaf.value)])
        mesh = MeshReductions.of(b.params, program.kinds)
        if mesh is not None:  # sharded pieces: reductions of the logical tensor, completed over the mesh
            mesh.run(program.instrs, self.values, self.execute)
        else:
            for instr in program.instrs:
                self.values[instr.node] = self.execute(instr)
                for done in instr.release:
                    if done is not instr.node:
                        self.values.pop(done, None)
        self.commit(program, storage)

    def arg(self, node: Expr, host: bool) -> Value:
        return self.host[node] if host else self.values[node]

    def execute(self, instr: Instr) -> TensorList:
        args = [self.arg(o, h) for o, h in zip(instr.operands, instr.host, strict=True)]
        if instr.form == "op":
            return self.apply(instr, args)
        scale = 1.0 if instr.scale is None else float(self.host[instr.scale])
        if instr.negate:
            scale = -scale
        lists = [_as_list(a) for a in args]
        first = lists[0]
        inplace = instr.inplace == 0
        if instr.form == "lerp":
            if inplace:
                torch._foreach_lerp_(first, lists[1], scale)
                return first
            return list(torch._foreach_lerp(first, lists[1], scale))
        if instr.form == "axpy":
            if inplace:
                torch._foreach_add_(first, lists[1], alpha=scale)
                return first
            return list(torch._foreach_add(first, lists[1], alpha=scale))
        fused, fused_ = _FUSED[instr.form]
        if inplace:
            fused_(first, lists[1], lists[2], value=scale)
            return first
        return list(fused(first, lists[1], lists[2], value=scale))

    def apply(self, instr: Instr, args: list[Value]) -> TensorList:
        op = instr.node.op
        if instr.uniform:
            result = self.foreach(op, args, instr.inplace)
            if result is not None:
                return result
        if op is Op.NORM:
            return list(torch._foreach_norm(_as_list(args[0])))
        return self.loop(op, args, instr.inplace)

    def foreach(self, op: Op, args: list[Value], inplace: int | None) -> TensorList | None:
        """A foreach lowering of ``op`` when one exists for these operands, else ``None``."""
        if op in _FOREACH_UNARY:
            fn, fn_ = _FOREACH_UNARY[op]
            x = _as_list(args[0])
            if inplace == 0:
                fn_(x)
                return x
            return list(fn(x))
        if op is Op.SQUARE:
            x = _as_list(args[0])
            if inplace == 0:
                torch._foreach_mul_(x, x)
                return x
            return list(torch._foreach_mul(x, x))
        if op not in _FOREACH_BINARY:
            return None
        fn, fn_ = _FOREACH_BINARY[op]
        a, b = args
        if isinstance(a, list):
            if inplace == 1 and isinstance(b, list):
                if op not in _COMMUTATIVE:
                    return None  # a ∘ b into b's buffer: per-tensor loop with out=
                fn_(b, a)
                return b
            if inplace == 0:
                fn_(a, b)
                return a
            return list(fn(a, b))
        assert isinstance(b, list)
        if op in _COMMUTATIVE:
            if inplace == 1:
                fn_(b, a)
                return b
            return list(fn(b, a))
        if op is Op.SUB:  # s − b = (−b) + s, exactly
            out = b if inplace == 1 else list(torch._foreach_neg(b))
            if inplace == 1:
                torch._foreach_neg_(b)
            torch._foreach_add_(out, a)
            return out
        if op is Op.POW and inplace is None:
            return list(torch._foreach_pow(a, b))
        return None

    def loop(self, op: Op, args: list[Value], inplace: int | None) -> TensorList:
        """Per-tensor lowering (broadcasting operands, ops without a foreach form)."""
        n = len(self.bucket.params)
        fixed: list[Value | Tensor] = []
        for pos, a in enumerate(args):
            if isinstance(a, list) or (pos >= 1 and op in _SCALAR_SECOND and not isinstance(a, bool)):
                fixed.append(a)
            else:
                fixed.append(self.scalar_tensor(a))
        per = [[a[i] if isinstance(a, list) else a for a in fixed] for i in range(n)]
        if inplace is not None:
            out = _as_list(args[inplace])
            fn = _OUT_RULES[op]
            for i in range(n):
                fn(*per[i], out=out[i])
            return out
        rule = TORCH_RULES[op]
        return [rule(*per[i]) for i in range(n)]

    def commit(self, program: Program, storage: Mapping[str | None, TensorList]) -> None:
        """Store every new value in its state's or parameter's storage (rounding once).

        A value may live in another target's buffer (it was computed in place there);
        such a value is stored before that buffer is overwritten, and a cycle is broken
        by copying one value out first.
        """
        pending: list[tuple[str | None, TensorList, Value]] = []
        for name, root in program.commits:
            dst = storage[name]
            if program.kinds[root].kind.is_step_scalar:
                pending.append((name, dst, self.host[root]))
            elif self.values[root] is not dst:
                pending.append((name, dst, self.values[root]))
        while pending:
            for index, (_, dst, _) in enumerate(pending):
                if not any(other is dst for j, (_, _, other) in enumerate(pending) if j != index):
                    break
            else:
                name, dst, value = pending[0]
                pending[0] = (name, dst, [x.clone() for x in _as_list(value)])
                continue
            name, dst, value = pending.pop(index)
            self.store(name, dst, value)

    def store(self, name: str | None, dst: TensorList, value: Value) -> None:
        """Store the new value of state ``name`` (``None``: the parameter) into ``dst``."""
        _store(dst, value)


class _LoopRunner(_Runner):
    """The executor of a one-parameter bucket: single-tensor calls instead of ``torch._foreach_*``."""

    def execute(self, instr: Instr) -> TensorList:
        if instr.form == "op":
            return super().execute(instr)
        args = [_as_list(self.arg(o, h)) for o, h in zip(instr.operands, instr.host, strict=True)]
        scale = 1.0 if instr.scale is None else float(self.host[instr.scale])
        if instr.negate:
            scale = -scale
        a, rest = args[0][0], [x[0] for x in args[1:]]
        inplace = instr.inplace == 0
        if instr.form == "lerp":
            result = a.lerp_(rest[0], scale) if inplace else torch.lerp(a, rest[0], scale)
        elif instr.form == "axpy":
            result = a.add_(rest[0], alpha=scale) if inplace else torch.add(a, rest[0], alpha=scale)
        elif instr.form == "addcmul":
            result = a.addcmul_(*rest, value=scale) if inplace else torch.addcmul(a, *rest, value=scale)
        else:
            result = a.addcdiv_(*rest, value=scale) if inplace else torch.addcdiv(a, *rest, value=scale)
        return [result]

    def foreach(self, op: Op, args: list[Value], inplace: int | None) -> TensorList | None:
        return None  # every op runs as its single-tensor rule (:meth:`loop`)

    def apply(self, instr: Instr, args: list[Value]) -> TensorList:
        if instr.node.op is Op.NORM:
            return [torch.linalg.vector_norm(_as_list(args[0])[0])]
        return super().apply(instr, args)

    def store(self, name: str | None, dst: TensorList, value: Value) -> None:
        if isinstance(value, list):
            dst[0].copy_(value[0])
        else:
            dst[0].fill_(value)


def _store(dst: TensorList, value: Value) -> None:
    if not isinstance(value, list):
        for x in dst:
            x.fill_(value)
    elif all(d.shape == v.shape for d, v in zip(dst, value, strict=True)):
        torch._foreach_copy_(dst, value)
    else:  # a per-tensor value stored into an element-wise buffer: broadcast
        for d, v in zip(dst, value, strict=True):
            d.copy_(v)


def _as_list(value: Value | Tensor) -> TensorList:
    assert isinstance(value, list)
    return value


# ---------------------------------------------------------------------------------------
# The step function.


def torch_state_dtype(decl: StateDecl, param: Tensor) -> torch.dtype:
    """torch.optim's storage: the parameter's dtype; per-tensor states in at least float32."""
    if decl.layout is Layout.TENSOR:
        return torch.promote_types(param.dtype, torch.float32)
    return param.dtype


def compute_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The "opmath" dtype: float64 if any tensor is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


BIT_IDENTICAL = frozenset({"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax"})
"""The torch.optim classes this backend is bit-identical to on the CPU (README, "Bit-identity"): their specs
keep torch's per-tensor calls (a flat op over a concatenation may round an element differently, where it
moves between a vector loop's body and its scalar tail)."""


def elementwise_only(spec: Spec) -> bool:
    """Whether every value of ``spec`` is a step scalar or per element (no reductions, per-tensor or
    row/column values or states, no shape or dtype facts): the step of a concatenation is the concatenation
    of the steps."""
    if any(decl.layout is not Layout.ELEMENTWISE for decl in spec.states):
        return False
    kinds = (spec.kind(node) for node in walk(list(spec.roots)))
    return all(kind.is_step_scalar or kind is Kind.ELEMENT for kind in kinds)


def torch_class(spec: Spec) -> str:
    """The torch.optim class computing ``spec``'s algorithm (empty: none)."""
    from portopt.algorithms import REGISTRY  # the registry's modules import the spec language only

    registered = REGISTRY.get(spec.name)
    return "" if registered is None else registered.torch_class


class TorchStep(PreparedStep):
    """The generic torch step function of one spec (see the module docstring).

    ``state_dtype(decl, param)`` chooses the storage dtype of a new state; the default
    keeps torch.optim's choice (:func:`torch_state_dtype`).
    """

    def __init__(self, spec: Spec, state_dtype: StateDtype = torch_state_dtype, *, per_tensor: bool = False) -> None:
        self.spec = spec
        self.plan = SpecPlan.of(spec)
        self.plans: dict[Spec, SpecPlan] = {spec: self.plan}
        self.state_dtype = state_dtype
        self.per_tensor = per_tensor
        """One parameter per bucket and single-tensor calls (``foreach=False``)."""
        self._state_names: dict[Spec, tuple[str, ...]] = {}
        self._flat: dict[Spec, bool] = {}
        self.plans_ = StepPlans()
        """The plans of the parameter lists this step function steps again and again."""

    def variant(self, param: Tensor) -> Spec:
        """The plain spec ``param`` runs (its shape class's, for a shape-dependent spec)."""
        return self.spec.specialize(logical_facts(param)) if self.spec.shape_dependent else self.spec

    def plan_for(self, spec: Spec) -> SpecPlan:
        plan = self.plans.get(spec)
        if plan is None:
            plan = self.plans[spec] = SpecPlan.of(spec)
        return plan

    def prepare(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        only_if_planned: bool = False,
    ) -> Callable[[], None] | None:
        """Check the inputs and plan the step; nothing is written but the step counters' move into one
        tensor (values unchanged). Returns the step itself, or, with ``only_if_planned``, ``None`` when
        the inputs are not those of a plan already built
        (:class:`~portopt.backends.torch_generic_plan.StepPlans`)."""
        return self.plans_.prepare(
            self,
            params,
            grads,
            states,
            hypers,
            None,
            only_if_planned,
            lambda: check_step_inputs(self.spec, params, grads, states, hypers),
            lambda: functools.partial(self.apply, params, grads, states, hypers),
        )

    @torch.no_grad()
    def apply(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers
    ) -> None:
        """The step without :func:`~portopt.lowering.checks.check_step_inputs` (run it first)."""
        hypers = with_inputs(self.spec, hypers)
        host_hypers = {name: float(value) for name, value in hypers.items()}
        for param, grad, state in zip(params, grads, states, strict=True):
            if not state:
                state.update(self.initial_state(param, grad, hypers))
        for bucket in self.buckets(params, grads, states):
            self.step_bucket(bucket, host_hypers)

    def initial_state(self, param: Tensor, grad: Tensor, hypers: Hypers) -> dict[str, Tensor]:
        """The states of a parameter before its first step, and ``step`` = 0."""
        decls = self.variant(param).states
        return self.new_state(param, grad, hypers, {d.name: self.state_dtype(d, param) for d in decls})

    def new_state(
        self, param: Tensor, grad: Tensor, hypers: Hypers, dtypes: Mapping[str, torch.dtype]
    ) -> dict[str, Tensor]:
        """Every state ``param`` has at its initial value in ``dtypes[name]``, and ``step`` = 0."""
        state: dict[str, Tensor] = {}
        general: list[StateDecl] = []
        spec = self.variant(param)
        for decl in spec.states:
            dtype = dtypes[decl.name]
            init = decl.init
            if init.op in (Op.CONST, Op.HYPER):
                value = float(init.value or 0.0) if init.op is Op.CONST else float(hypers[str(init.value)])
                if decl.layout is Layout.ELEMENTWISE:
                    state[decl.name] = torch.full_like(param, value, dtype=dtype, memory_format=torch.preserve_format)
                else:
                    shape = state_shape(decl, param.shape)
                    state[decl.name] = torch.full(shape, value, dtype=dtype, device=param.device)
            else:
                general.append(decl)
        if general:
            opmath = compute_dtype([param.dtype, grad.dtype])
            facts = logical_facts(param)
            values = initial_state_values(spec, TORCH_RULES, param.to(opmath), grad.to(opmath), hypers, facts)
            for decl in general:
                dtype = dtypes[decl.name]
                if decl.layout is Layout.ELEMENTWISE:
                    buffer = torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format)
                    state[decl.name] = buffer.copy_(values[decl.name])
                else:
                    state[decl.name] = values[decl.name].to(dtype)
        state["step"] = torch.tensor(0.0, dtype=step_counter_dtype())
        return state

    def bucket_key(
        self, param: Tensor, grad: Tensor, state: ParamState, spec: Spec
    ) -> tuple[tuple[object, ...], torch.dtype]:
        """What parameters of one bucket share besides the step value (device, dtypes, shape class), and
        the bucket's compute dtype."""
        state_dtypes = tuple(state[n].dtype for n in self.state_names(spec))
        key = (param.device, param.dtype, grad.dtype, state_dtypes, spec)
        return key, compute_dtype([param.dtype, grad.dtype, *state_dtypes])

    def state_names(self, spec: Spec) -> tuple[str, ...]:
        """``spec.state_names``, built once per variant."""
        names = self._state_names.get(spec)
        if names is None:
            names = self._state_names[spec] = spec.state_names
        return names

    def buckets(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        indices: Sequence[int] | None = None,
    ) -> list[_Bucket]:
        """Group the parameters by device, dtypes, shape class and next step value (keeping their numbers)."""
        numbers = range(len(params)) if indices is None else indices
        buckets: dict[tuple[object, ...], _Bucket] = {}
        counts = step_values(states)
        for param, grad, state, number, count in zip(params, grads, states, numbers, counts, strict=True):
            t = count + 1.0
            spec = self.variant(param)
            shared, dtype = self.bucket_key(param, grad, state, spec)
            key = (*shared, t, len(buckets) if self.per_tensor else 0)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket(t, dtype, param.device, spec)
            bucket.params.append(param)
            bucket.grads.append(grad)
            bucket.states.append(state)
            bucket.indices.append(number)
        return list(buckets.values())

    def run_group(
        self,
        group: PlannedGroup,
        t: float,
        grads: TensorList,
        members: Sequence[int] | None,
        hypers: Mapping[str, float],
    ) -> None:
        """Run a plan's group (or its ``members``, positions in the group) as one bucket at step ``t``."""
        if members is None and group.flat is not None:
            self.run_flat(group, t, grads, hypers)
            return
        if members is None:
            params, states, storage, numbers = group.params, group.states, group.storage, group.numbers
        else:
            params, states, storage, numbers = group.select(members)
        bucket = _Bucket(t, group.dtype, group.device, group.spec, {}, params, grads, states, numbers)
        self.run_bucket(bucket, hypers, storage)

    def run_flat(self, group: PlannedGroup, t: float, grads: TensorList, hypers: Mapping[str, float]) -> None:
        """A flat group's step: the program once over the concatenated parameters and gradients and the
        state buffers (which the states are views of), then the new parameters copied back."""
        assert group.flat is not None
        if group.vectors:  # (the snapshot holds each gradient's shape to its parameter's)
            views, flat_grad = group.params, torch.cat(grads)
        else:
            views = [p if p.dim() == 1 else p.view(-1) for p in group.params]
            flat_grad = torch.cat([g if g.dim() == 1 else g.reshape(-1) for g in grads])
        flat_param = torch.cat(views)
        storage: dict[str | None, TensorList] = {None: [flat_param]}
        storage.update({name: [buffer] for name, buffer in group.flat.items()})
        bucket = _Bucket(t, group.dtype, group.device, group.spec, {}, [flat_param], [flat_grad], [], [0])
        self.run_bucket(bucket, hypers, storage)
        torch.split_with_sizes_copy(flat_param, group.sizes, out=views)

    def flat_eligible(self, spec: Spec) -> bool:
        """Whether a plan may run small tensors of ``spec`` flat (:meth:`run_flat`): an element-wise spec whose
        results are not promised bit-identical to torch.optim's per-tensor calls (:data:`BIT_IDENTICAL`)."""
        if self.per_tensor:
            return False
        eligible = self._flat.get(spec)
        if eligible is None:
            eligible = self._flat[spec] = elementwise_only(spec) and torch_class(spec) not in BIT_IDENTICAL
        return eligible

    def runner(self, bucket: _Bucket, host: Mapping[Expr, HostValue]) -> _Runner:
        """The executor of this step's program over ``bucket``."""
        return _LoopRunner(bucket, host) if self.per_tensor else _Runner(bucket, host)

    def step_bucket(self, bucket: _Bucket, hypers: Mapping[str, float]) -> None:
        """Run the program over ``bucket``, then increment its step counters."""
        spec = bucket.spec or self.spec
        storage: dict[str | None, TensorList] = {None: bucket.params}
        for name in self.state_names(spec):
            storage[name] = [s[name] for s in bucket.states]
        self.run_bucket(bucket, hypers, storage)
        if self.per_tensor:
            bucket.states[0]["step"].add_(1.0)
        else:
            torch._foreach_add_([s["step"] for s in bucket.states], 1.0)

    def run_bucket(
        self, bucket: _Bucket, hypers: Mapping[str, float], storage: Mapping[str | None, TensorList]
    ) -> None:
        """Run the program over ``bucket`` (its parameters and states: ``storage``); counters unchanged."""
        plan = self.plan_for(bucket.spec or self.spec)
        bucket.hypers = hypers
        host: dict[Expr, HostValue] = {}
        evaluate_host(plan.host_nodes, bucket.t, hypers, host)
        grad_writable = bucket.grads[0].dtype != bucket.dtype
        program = plan.program(host, grad_writable)
        evaluate_host(program.host_nodes, bucket.t, hypers, host)
        self.runner(bucket, host).run(program, storage)


def build_torch_step(spec: Spec) -> TorchStep:
    """The generic torch step function of ``spec``."""
    return TorchStep(spec)


def build_per_tensor_step(spec: Spec) -> TorchStep:
    """The generic torch step of ``spec``, one tensor at a time with single-tensor calls (``foreach=False``)."""
    return TorchStep(spec, per_tensor=True)


def build_graph_step(spec: Spec) -> GraphStep:
    """The step of ``spec`` as torch ops over step tensors (torch.compile, capturable, differentiable)."""
    return GraphStep(spec, TorchStep(spec).initial_state)


def build_policy_step(spec: Spec, policy: PrecisionPolicy) -> PolicyStepFunction:
    """The generic torch step function of ``spec`` storing states as ``policy`` says."""
    from portopt.backends.torch_policy import PolicyStep  # it builds on this module

    return PolicyStep(spec, policy)


TORCH_GENERIC = register_backend(
    Backend(
        name="torch",
        summary="generic torch ops (foreach where they help): every spec, every device torch reaches",
        device_types=DEVICE_TYPES,
        build=build_torch_step,
        priority=0,
        build_with_policy=build_policy_step,
        build_per_tensor=build_per_tensor_step,
        build_graph=build_graph_step,
        torch_flag="foreach",
        shards=True,
    )
)
