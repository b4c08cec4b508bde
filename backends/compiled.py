"""The compiled backend: each spec's generated kernel, compiled by torch.compile/Inductor.

:mod:`portopt.lowering.codegen` writes one straight-line torch function per spec; this
backend applies it to several parameters at once ("slots") and hands that to ``torch.compile``
(Inductor: C++/OpenMP on the CPU, Triton on CUDA and XPU, where the slots' kernels become one
launch), so a step is a few calls per group, each one pass over its tensors: every element of
``p``, ``g`` and the states is read once and written once, with step-only scalars computed on
the host in float64 and passed in one small tensor, one row per slot (changing ``lr``, the
betas or ``t`` never recompiles). :mod:`portopt.backends.compiled_graphs` builds the graphs
(one per slot kind: device, dtypes, storage of each state, rank; small tensors on serial
graphs of up to :data:`SERIAL_ARITY` slots, large ones on parallel graphs of up to
:data:`PARALLEL_ARITY`, fewer for a group with fewer tensors of the kind:
:func:`~portopt.backends.compiled_plan.fitted_arity`);
every dimension is dynamic, so one graph serves every mix of sizes. Graphs are compiled once
per process per (spec, kind) (:func:`compiled_graph`) and shared by every step function of an
equal spec; Inductor's FX-graph cache (``TORCHINDUCTOR_CACHE_DIR``) keeps the compiled code
between processes.

Per-step host work does not grow with the work done per tensor: the first step over a list of
parameters checks everything and builds a plan (:mod:`portopt.backends.compiled_plan`: slot
kinds, the graphs' argument lists, the step counters as one tensor); later steps confirm the
inputs are the planned ones (identities, and dtype/shape/strides through dynamo's C++ tensor
guards: :mod:`portopt.lowering.input_snapshot`) and run the calls.

A spec with per-tensor reductions of element-wise values (LAMB's norms) needs them before the
parameter is written, so its kernel makes two passes: one reads ``p, g, m, v`` and reduces
(``‖p‖``, ``‖u‖``), the other recomputes ``u`` from the same inputs and writes ``p, m, v`` (44
instead of 28 bytes per fp32 element; the fewest two passes can move is 40, by storing ``m, v``
in the first, which would then need ``u`` rebuilt from rounded states). Inductor is told to
recompute, not store, such values (:func:`inductor_options`): storing ``u`` costs a tensor-sized
temporary, freshly page-faulted every step.

Precision policies (:func:`build_policy_step`): bf16 states are loaded and stored in the same
pass, and so are 8-bit block-wise states: decoded, updated and encoded in the pass
(:mod:`portopt.precision.q8_kernel`, bit for bit the codes of :mod:`portopt.precision.quantize`),
on block views of each tensor (:mod:`portopt.backends.compiled_graphs`). A spec with element
reductions or factored states, or ``PORTOPT_COMPILE_Q8=0``, leaves 8-bit states to the generic
backend's executor (:data:`~portopt.backends.compiled_graphs.Q8_VARIABLE`).

``backend="auto"`` chooses this backend for a spec no torch fused kernel computes, on a
param group of at least :func:`auto_min_numel` elements on one device (compiling must pay
for itself); ``PORTOPT_NO_COMPILE=1`` takes it out of ``"auto"`` (``unavailable_reason``).

Size: Inductor's compile time grows with the kernel, and faster than linearly with a value
that one op uses twice (it inlines ``x`` into ``x + x`` twice, so ``x + x`` nested 16 deep,
a 2 KB spec, took 200 s). A spec whose kernel has more than :data:`MAX_KERNEL_NODES`
computed nodes, or would unfold to more than :data:`MAX_INLINED` (see
:func:`~portopt.lowering.codegen.kernel_size`), is not served (``unsupported_reason``):
``"auto"`` takes the generic backend, and naming ``"compiled"`` raises with the reason.

A spec that reads the tensor's shape or dtype (``numel``, ``finfo``, a state layout chosen per rank:
Adafactor, CAME), or a node kind the generated kernel does not know (a declared input: SophiaG), is
not served yet (``unsupported_reason``): ``"auto"`` takes the generic backend.

Tensors no graph takes (non-contiguous, sizes a graph was not found right for, a device
without a compiler) are stepped by the generic backend's executor: same arithmetic, same
rounding, more memory traffic.

All or nothing: every check, state initialisation, host scalar and compilation happens
before the first write; only an unexpected failure inside a compiled kernel (out of
memory) could leave a step half done.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from portopt.backends.compiled_graphs import ChunkGraph, GraphKey
from portopt.backends.compiled_plan import GroupPlan, PlanContext
from portopt.backends.torch_generic import TorchStep, build_graph_step, compute_dtype
from portopt.backends.torch_policy import PolicyStep
from portopt.lowering.backend import (
    Backend,
    Hypers,
    ParamState,
    PolicyStepFunction,
    PreparedStep,
    StepFunction,
    no_step,
    with_inputs,
)
from portopt.lowering.checks import check_hyperparameter_values, check_step_inputs
from portopt.lowering.codegen import KernelPlan, kernel_size, plan_kernel
from portopt.lowering.registry import register_backend
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.analysis import Kind
from portopt.spec.definition import Spec
from portopt.spec.expr import walk
from portopt.spec.ops import OP_INFO, Family, Op

COMPILED_DEVICE_TYPES = ("cpu", "cuda", "xpu")
DISABLE_VARIABLE = "PORTOPT_NO_COMPILE"
"""Set to 1 to take the compiled backend out of ``backend="auto"`` (e.g. on CI without a cache)."""
MIN_NUMEL_VARIABLE = "PORTOPT_COMPILE_MIN_NUMEL"
DEFAULT_MIN_NUMEL = 1 << 20
MAX_KERNEL_NODES = 512
"""Most computed nodes in a kernel this backend compiles (module doc: size)."""
MAX_INLINED = 2048
"""Most nodes a kernel may unfold to when every value is inlined into each of its uses."""


@functools.cache
def compile_unavailable_reason(device_type: str) -> str | None:
    """``None`` if torch.compile can build kernels for ``device_type`` here, else why not."""
    if device_type not in COMPILED_DEVICE_TYPES:
        return f"torch.compile unavailable: no Inductor code generator for device type {device_type!r}"
    try:
        import torch._dynamo
        import torch._inductor
    except ImportError as exc:  # a torch build without the compiler stack
        return f"torch.compile unavailable: {exc}"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile unavailable: dynamo does not support this Python version"
    if device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as exc:
            return f"torch.compile unavailable: Inductor finds no C++ compiler for the CPU ({exc})"
        return None
    from torch.utils._triton import has_triton

    return None if has_triton() else f"torch.compile unavailable: Triton is not installed (needed for {device_type})"


def auto_min_numel() -> int:
    """The smallest group (elements on one device) for which ``backend="auto"`` compiles.

    Compiling costs seconds once per process (about 8 s cold, 3-4 s from Inductor's cache on
    a 2-core CPU) and saves a few milliseconds per step per million elements (AdamW: 2-3 ms
    per 1M fp32 elements against the generic backend's foreach passes), so it pays within
    the first few thousand steps from ``2**20`` elements on. ``PORTOPT_COMPILE_MIN_NUMEL``
    overrides it (``0``: always compile).
    """
    text = os.environ.get(MIN_NUMEL_VARIABLE, "")
    if not text:
        return DEFAULT_MIN_NUMEL
    try:
        value = int(float(text))
    except ValueError:
        raise ValueError(
            f"{MIN_NUMEL_VARIABLE} must be a non-negative element count such as 1048576 or 1e6, got {text!r}"
        ) from None
    if value < 0:
        raise ValueError(f"{MIN_NUMEL_VARIABLE} must be a non-negative element count, got {text!r}")
    return value


def _unavailable_reason() -> str | None:
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return f"torch.compile disabled by {DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]}"
    reasons = [compile_unavailable_reason("cpu")]
    if torch.cuda.is_available():
        reasons.append(compile_unavailable_reason("cuda"))
    return None if any(r is None for r in reasons) else reasons[0]


SERIAL_ARITY = 16
"""Most slots per call of a graph for small tensors (its loops run on one thread)."""
PARALLEL_ARITY = 4
"""Most slots per call of a graph for large tensors (each loop split over the threads)."""
PARALLEL_MIN_NUMEL = 1 << 16
"""Tensors of at least this many elements go to the parallel graphs. Below it, splitting a loop
over the threads costs more (a fork and a barrier per tensor, far more when the cores are shared)
than it saves (a 64K-element fp32 AdamW tensor moves 1.8 MB)."""
ARITY_VARIABLE = "PORTOPT_COMPILE_ARITY"
"""``"serial,parallel"`` slots per call (default ``16,4``): fewer compile faster, more call less often."""
MAX_PLANS = 8
"""Plans (parameter lists) a step function keeps: several param groups may share one step function."""
KNOWN_LEAVES = frozenset({Op.CONST, Op.HYPER, Op.STEP, Op.PARAM, Op.GRAD, Op.STATE})
"""The leaf kinds the generated kernel knows how to read."""
KNOWN_FAMILIES = frozenset(
    {Family.ELEMENTWISE, Family.COMPARE, Family.LOGICAL, Family.SELECT, Family.REDUCE, Family.AXIS_REDUCE}
)
"""The op families the generated kernel lowers (each op through its rule in ``TORCH_RULES``)."""


def arities() -> tuple[int, int]:
    """``(serial, parallel)`` slots per call: :data:`SERIAL_ARITY`, :data:`PARALLEL_ARITY`, or
    ``PORTOPT_COMPILE_ARITY``."""
    text = os.environ.get(ARITY_VARIABLE, "")
    if not text:
        return SERIAL_ARITY, PARALLEL_ARITY
    parts = text.split(",")
    try:
        values = [int(x) for x in parts]
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 1 or max(values) > 256:
        raise ValueError(
            f"{ARITY_VARIABLE} must be two slot counts 'serial,parallel' between 1 and 256, such as '16,4'; "
            f"got {text!r}"
        )
    return values[0], values[1]


def inductor_options(plan: KernelPlan, key: GraphKey) -> dict[str, Any]:
    """Inductor settings for one chunk graph.

    * no size assertions and no bounds checks on table lookups: the caller checks what they
      would (module doc), and an 8-bit code or a float's top 16 bits cannot leave their tables;
    * one thread for a serial graph (:data:`PARALLEL_MIN_NUMEL`);
    * with per-tensor reductions, recompute rather than store: a value both reduced (LAMB's
      ``‖u‖``) and used after the reduction (``p − lr·r·u``) would otherwise be stored to a
      temporary the size of the tensor between the reduction and its use (a write and a read
      more, and a fresh allocation whose first touch page-faults every step); recomputing it
      from the inputs costs arithmetic only. Not for 8-bit states: their encoder uses the new
      value several times, and inlining every use into every other makes Inductor's lowering
      exponential in the chain (minutes for Adam's two states); Inductor keeps a block's new
      values in a temporary between its absmax and its codes;
    * on GPUs, Inductor's combo kernels: the slots' kernels become one launch.
    """
    wanted: dict[str, Any] = {"size_asserts": False, "assert_indirect_indexing": False}
    if key.kind.device.type == "cpu" and not key.parallel:
        wanted["cpp.threads"] = 1
    if key.kind.device.type != "cpu":
        wanted["combo_kernels"] = True
    if plan.reductions:
        wanted.update(
            {
                "realize_reads_threshold": 64,
                "realize_opcount_threshold": 4096,
                "realize_cpu_opcount_threshold": 4096,
                "realize_acc_reads_threshold": 64,
                "realize_cpu_acc_reads_threshold": 64,
            }
        )
    # Settings come and go between torch releases: patch only those this torch has (an unknown one raises).
    known = torch._inductor.config.get_config_copy()
    return {k: v for k, v in wanted.items() if k in known}


class CompiledStep(PreparedStep):
    """The step function of the compiled backend for one spec (and precision policy).

    ``serial_arity`` and ``parallel_arity`` are the slots per call of the graphs for small and
    large tensors (default :func:`arities`), ``parallel_min_numel`` the size from which a tensor is
    large. With a ``policy`` (:func:`build_policy_step`), new states are stored as it says (bf16,
    8-bit block-wise) and the step takes the keywords of a
    :class:`~portopt.lowering.backend.PolicyStepFunction`.
    """

    def __init__(
        self,
        spec: Spec,
        policy: PrecisionPolicy | None = None,
        *,
        serial_arity: int | None = None,
        parallel_arity: int | None = None,
        parallel_min_numel: int = PARALLEL_MIN_NUMEL,
    ) -> None:
        self.spec = spec
        self.policy = policy
        self.plan = plan_kernel(spec)
        defaults = arities()
        self.graphs: dict[GraphKey, ChunkGraph] = {}
        self._unusable: set[GraphKey] = set()
        self._plans: OrderedDict[tuple[object, ...], GroupPlan] = OrderedDict()
        self._warned: set[str] = set()
        generic = TorchStep(spec) if policy is None else PolicyStep(spec, policy)
        self.fallback_step = generic
        """The generic backend's executor: state creation, and the parameters no graph takes."""
        self._context = PlanContext(
            kernel=self.plan,
            graph=self._graph,
            initial_state=self._initial_state,
            fallback=self._fallback,
            compute_dtype=self._compute_dtype,
            serial_arity=serial_arity or defaults[0],
            parallel_arity=parallel_arity or defaults[1],
            parallel_min_numel=parallel_min_numel,
        )

    @property
    def graphs_compiled(self) -> int:
        """How many times Inductor compiled a graph for this step function (a recompile would add one)."""
        return sum(g.graphs_compiled for g in self.graphs.values())

    def prepare(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        param_dtypes: Sequence[torch.dtype] | None = None,
        indices: Sequence[int] | None = None,
        only_if_planned: bool = False,
    ) -> Callable[[], None] | None:
        """Check the inputs and choose (or build, compiling what it needs) the plan; nothing is written
        but the step counters' move into one tensor (values unchanged). Returns the step itself, or,
        with ``only_if_planned``, ``None`` when the inputs are not those of a plan already built."""
        if not params:
            check_step_inputs(self.spec, params, grads, states, hypers, allow_quantized=self.policy is not None)
            return no_step
        hypers = with_inputs(self.spec, hypers)
        key = (len(params), id(params[0]), id(states[0]))
        plan = self._plans.get(key)
        if plan is not None and plan.matches(params, grads, states):
            check_hyperparameter_values(self.spec, hypers)
            self._plans.move_to_end(key)
        elif only_if_planned:
            return None
        else:
            check_step_inputs(self.spec, params, grads, states, hypers, allow_quantized=self.policy is not None)
            for what, values in (("param_dtypes", param_dtypes), ("indices", indices)):
                if values is not None and len(values) != len(params):
                    raise ValueError(f"{self.spec.name}: got {len(values)} {what} for {len(params)} parameters")
            dtypes = list(param_dtypes) if param_dtypes is not None else [p.dtype for p in params]
            numbers = list(indices) if indices is not None else list(range(len(params)))
            with torch.no_grad():
                plan = GroupPlan(self._context, self.spec.state_names, params, grads, states, hypers, dtypes, numbers)
            self._plans[key] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        return functools.partial(_run_plan, plan, list(grads), hypers)

    # what a plan asks for -----------------------------------------------------------------
    def _graph(self, key: GraphKey) -> ChunkGraph | None:
        """The usable graph for ``key``, compiled on first request; ``None`` if none can be. A graph of the
        same kind with more slots, compiled already for another group, serves instead (the smallest such):
        a padded call costs less than compiling another graph."""
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        wider = [
            g
            for k, g in self.graphs.items()
            if (k.kind, k.parallel) == (key.kind, key.parallel) and k.arity > key.arity
        ]
        if wider:
            return min(wider, key=lambda g: g.key.arity)
        if key in self._unusable:
            return None
        reason = compile_unavailable_reason(key.kind.device.type)
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"portopt compiled backend: {reason}; running uncompiled", stacklevel=5)
            self._unusable.add(key)
            return None
        built = compiled_graph(self.spec, key)
        if built is None:
            self._unusable.add(key)
            return None
        self.graphs[key] = built
        return built

    def _initial_state(self, param: Tensor, grad: Tensor, hypers: Hypers, dtype: torch.dtype) -> dict[str, Any]:
        generic = self.fallback_step
        if isinstance(generic, PolicyStep):
            return generic.initial_state(param, grad, hypers, dtype)
        return generic.initial_state(param, grad, hypers)

    def _fallback(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[ParamState],
        hypers: Hypers,
        dtypes: list[torch.dtype],
        indices: list[int],
    ) -> None:
        generic = self.fallback_step
        if isinstance(generic, PolicyStep):
            generic.apply(params, grads, states, hypers, param_dtypes=dtypes, indices=indices)
        else:
            generic.apply(params, grads, states, hypers)

    def _compute_dtype(self, dtypes: Sequence[torch.dtype]) -> torch.dtype:
        """The generic backend's compute dtype for these tensors (and the policy's, for its parameter)."""
        wanted = list(dtypes)
        if self.policy is not None:
            wanted.append(self.policy.compute_dtype_for(dtypes[0]))
        return compute_dtype(wanted)


@functools.lru_cache(maxsize=256)
def compiled_graph(spec: Spec, key: GraphKey) -> ChunkGraph | None:
    """The usable compiled chunk graph of ``spec`` for ``key``, once per process (``None`` if it cannot
    be compiled or disagrees with the uncompiled function): optimizers and conformance runs with equal
    specs share it instead of tracing and compiling it again."""
    plan = plan_kernel(spec)
    graph = ChunkGraph(plan, key, inductor_options(plan, key))
    return graph if graph.usable else None


def _run_plan(plan: GroupPlan, grads: list[Tensor], hypers: Hypers) -> None:
    with torch.no_grad():
        plan.run(grads, hypers)


def unsupported_reason(spec: Spec) -> str | None:
    """``None`` if this backend compiles ``spec``'s kernel, else why not: it reads the tensor's shape, a
    node kind the generated kernel does not know (:data:`KNOWN_LEAVES`, :data:`KNOWN_FAMILIES`), or too
    large (module doc)."""
    if spec.shape_dependent or any(spec.kind(n) is Kind.SHAPE for n in spec.node_kinds):
        return (
            f"{spec.name}: it reads the tensor's shape or dtype (numel, ndim, size, finfo or a layout chosen per "
            "rank), which the compiled kernel does not take yet; use backend='torch'"
        )
    for node in walk(list(spec.roots)):
        op = node.op
        known = op in KNOWN_LEAVES or (OP_INFO[op].family in KNOWN_FAMILIES and op in TORCH_RULES)
        if not known:
            return f"{spec.name}: the compiled backend has no lowering for node kind {op.value!r}; use backend='torch'"
    lines, inlined = kernel_size(spec)
    if lines > MAX_KERNEL_NODES:
        return (
            f"{spec.name}: its kernel has {lines} computed nodes; the compiled backend compiles at most "
            f"{MAX_KERNEL_NODES} (compile time grows with the kernel); use backend='torch'"
        )
    if inlined > MAX_INLINED:
        return (
            f"{spec.name}: its kernel would unfold to {inlined} nodes when values are inlined into each use "
            f"(shared subexpressions used twice by one op); the compiled backend compiles at most "
            f"{MAX_INLINED}; use backend='torch'"
        )
    return None


def build_compiled_step(spec: Spec) -> StepFunction:
    """A step function running ``spec``'s generated kernel compiled by torch.compile.

    Raises ``ValueError`` for a spec too large to compile (:func:`unsupported_reason`)."""
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(reason)
    return CompiledStep(spec)


def build_policy_step(spec: Spec, policy: PrecisionPolicy) -> PolicyStepFunction:
    """The compiled step of ``spec`` storing states as ``policy`` says (bf16, 8-bit block-wise), with
    each state decoded, updated and encoded in the kernel's one pass.

    A policy that rounds bf16 stores stochastically runs on the generic backend's executor (its
    noise is keyed per tensor and step on the host)."""
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(reason)
    if policy.stochastic_rounding:
        return PolicyStep(spec, policy)
    return CompiledStep(spec, policy)


COMPILED = register_backend(
    Backend(
        name="compiled",
        summary="the spec's generated kernel compiled by torch.compile (Inductor: C++ on CPU, Triton on GPU)",
        device_types=COMPILED_DEVICE_TYPES,
        build=build_compiled_step,
        build_with_policy=build_policy_step,
        unavailable_reason=_unavailable_reason,
        priority=20,
        min_auto_numel=auto_min_numel,
        unsupported_reason=unsupported_reason,
        build_graph=build_graph_step,
        torch_flag="fused",
    )
)
