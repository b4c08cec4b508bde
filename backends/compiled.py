"""The compiled backend: each spec's generated kernel, compiled by torch.compile/Inductor.

:mod:`portopt.lowering.codegen` writes one straight-line torch function per spec; this
backend hands it to ``torch.compile`` (Inductor: C++/OpenMP on the CPU, Triton on CUDA
and XPU), so a step is one pass over each tensor: every element of ``p``, ``g`` and the
states is read once and written once, with step-only scalars computed on the host in
float64 and passed in one small tensor (changing ``lr``, the betas or ``t`` never
recompiles). A spec with per-tensor reductions of element-wise values (LAMB's norms)
needs them before the parameter is written, so its kernel makes two passes: one reads
``p, g, m, v`` and reduces (``‖p‖``, ``‖u‖``), the other recomputes ``u`` from the same
inputs and writes ``p, m, v`` (44 instead of 28 bytes per fp32 element; the fewest two
passes can move is 40, by storing ``m, v`` in the first, which would then need ``u``
rebuilt from rounded states). Inductor is told to recompute, not store, such values
(:func:`_inductor_options`): storing ``u`` costs a tensor-sized temporary, freshly
page-faulted every step (measured 46 ms against 35 ms for LAMB on 20M fp32 elements on
one core).

Shapes: tensors go in flattened to 1-D (a spec with row/column-factored states keeps a
``(rows, cols)`` or ``(batch, rows, cols)`` view) with their sizes marked dynamic, so one
compiled graph serves every tensor size. A graph is compiled per *signature* (device,
dtypes of ``p``, ``g`` and each state, rank) the first time the step meets it, on small
scratch tensors before any parameter is touched, then checked on scratch tensors of
another size against the uncompiled function. Inductor's FX-graph cache (under
``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_$USER``) keeps the compiled
code, so a second process pays tracing and loading, not the C++/Triton compile; within a
process, a graph is compiled once per (spec, signature) and shared by every step function of
an equal spec (:func:`compiled_graph`).

Per call, the compiled graph is invoked directly with its arguments (sizes and tensors,
in the order dynamo recorded) instead of through dynamo's guard check: the step has
already checked what the guards would (device, dtype, rank, contiguity, size >= 2), and
this cuts the per-tensor overhead from about 40 us to about 10 us on a small CPU.

``backend="auto"`` chooses this backend for a spec no torch fused kernel computes, on a
param group of at least :func:`auto_min_numel` elements on one device (compiling must pay
for itself); ``PORTOPT_NO_COMPILE=1`` takes it out of ``"auto"`` (``unavailable_reason``).

Size: Inductor's compile time grows with the kernel, and faster than linearly with a value
that one op uses twice (it inlines ``x`` into ``x + x`` twice, so ``x + x`` nested 16 deep,
a 2 KB spec, took 200 s). A spec whose kernel has more than :data:`MAX_KERNEL_NODES`
computed nodes, or would unfold to more than :data:`MAX_INLINED` (see
:func:`~portopt.lowering.codegen.kernel_size`), is not served (``unsupported_reason``):
``"auto"`` takes the generic backend, and naming ``"compiled"`` raises with the reason. The
library's largest spec has 34 nodes and unfolds to 54.

A spec that reads the tensor's shape or dtype (``numel``, ``finfo``, a state layout chosen per rank:
Adafactor, CAME) is not served yet (``unsupported_reason``): ``"auto"`` takes the generic backend.

Tensors the compiled graph does not take (fewer than 2 elements, non-contiguous, a
factored dimension of 1, a device without a compiler) run the same generated function
uncompiled: same arithmetic, same rounding, more memory traffic.

All or nothing: every check, state initialisation, host scalar and compilation happens
before the first write; only an unexpected failure inside a compiled kernel (out of
memory) could leave a step half done.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from portopt.backends.torch_generic import TorchStep, build_graph_step
from portopt.lowering.backend import Backend, Hypers, ParamState, StepFunction, with_inputs
from portopt.lowering.checks import check_step_inputs
from portopt.lowering.codegen import (
    KernelFunction,
    KernelPlan,
    host_scalar_values,
    kernel_size,
    opmath_dtype,
    plan_kernel,
    scalar_tensor,
)
from portopt.lowering.registry import register_backend
from portopt.spec.analysis import Kind
from portopt.spec.definition import Spec
from portopt.spec.symbols import Layout

COMPILED_DEVICE_TYPES = ("cpu", "cuda", "xpu")
DISABLE_VARIABLE = "PORTOPT_NO_COMPILE"
"""Set to 1 to take the compiled backend out of ``backend="auto"`` (e.g. on CI without a cache)."""
MIN_NUMEL_VARIABLE = "PORTOPT_COMPILE_MIN_NUMEL"
DEFAULT_MIN_NUMEL = 1 << 20
MAX_KERNEL_NODES = 512
"""Most computed nodes in a kernel this backend compiles (module doc: size)."""
MAX_INLINED = 2048
"""Most nodes a kernel may unfold to when every value is inlined into each of its uses."""
# Scratch shapes for compiling a graph, then for checking it. Sizes are >= 2 (0 and 1
# specialise) and distinct per axis (a recorded size maps to one axis); the compile shapes
# are large because Inductor decides from the traced size whether a loop is worth
# parallelising (a graph traced at 37 elements runs single-threaded at any size).
_SCRATCH_SHAPES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    1: (((1 << 20) + 7,), (101,)),
    2: ((1031, 1033), (7, 11)),
    3: ((3, 257, 263), (4, 7, 6)),
}


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


@dataclass(frozen=True)
class _Signature:
    """What a compiled graph is specialised on: device, dtypes (p, g, states), rank."""

    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    rank: int


class CompiledGraph:
    """One compiled kernel of a plan for one signature, called without dynamo's guards."""

    def __init__(self, plan: KernelPlan, sig: _Signature) -> None:
        self.plan = plan
        self.signature = sig
        self.graphs_compiled = 0
        self._fast: Callable[..., Any] | None = None
        self._layout: tuple[tuple[int, int], ...] = ()
        captured: list[tuple[list[Any], Callable[..., Any]]] = []

        def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
            with torch._inductor.config.patch(_inductor_options(plan)):
                compiled: Callable[..., Any] = torch._inductor.compile(gm, example_inputs)
            captured.append((list(example_inputs), compiled))
            self.graphs_compiled += 1
            return compiled

        self._eager = plan.make_function()
        self._dynamo = torch.compile(plan.make_function(), backend=capture, fullgraph=True)
        first, second = _SCRATCH_SHAPES[sig.rank]
        scratch = self._scratch(first)
        for t in scratch[:-1]:
            for d, size in enumerate(t.shape):
                if size >= 2:
                    torch._dynamo.mark_dynamic(t, d)
        with torch.no_grad():
            self._dynamo(*scratch)
        if len(captured) == 1:
            layout = _argument_layout(captured[0][0], scratch)
            if layout is not None:
                self._fast, self._layout = captured[0][1], layout
                if not self._agrees_with_eager(second):
                    self._fast = None

    @property
    def direct(self) -> bool:
        """Whether calls bypass dynamo (the recorded graph was bound and checked)."""
        return self._fast is not None

    def __call__(self, args: Sequence[Tensor]) -> None:
        if self._fast is None:
            self._dynamo(*args)
            return
        self._fast(*[args[i] if d < 0 else args[i].shape[d] for i, d in self._layout])

    def _scratch(self, shape: tuple[int, ...], seed: int = 0) -> list[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        sig = self.signature
        shapes = [shape, shape] + [_state_view_shape(self.plan, name, shape) for name in self.plan.state_args]
        tensors = [
            torch.rand(s, generator=gen, dtype=torch.float64).add_(0.5).to(device=sig.device, dtype=dt)
            for s, dt in zip(shapes, sig.dtypes, strict=True)
        ]
        values = torch.rand(max(len(self.plan.scalars), 1), generator=gen, dtype=torch.float64).add_(0.5)
        return [*tensors, values.to(device=sig.device, dtype=opmath_dtype(sig.dtypes[0]))]

    def _agrees_with_eager(self, shape: tuple[int, ...]) -> bool:
        expected = self._scratch(shape, seed=1)
        actual = [t.clone() for t in expected]
        with torch.no_grad():
            self._eager(*expected)
            try:
                self(actual)
            except Exception:
                return False
        return all(
            torch.allclose(a, e, rtol=1e-4, atol=1e-6, equal_nan=True) for a, e in zip(actual, expected, strict=True)
        )


def _inductor_options(plan: KernelPlan) -> dict[str, Any]:
    """Inductor settings for ``plan``: with per-tensor reductions, recompute rather than store.

    A value both reduced (LAMB's ``‖u‖``) and used after the reduction (``p − lr·r·u``)
    would otherwise be stored to a temporary the size of the tensor between the reduction
    pass and the update pass (a write and a read more, and a fresh allocation whose first
    touch page-faults every step); recomputing it from ``p, g, m, v`` in the update pass
    costs arithmetic only.
    """
    if not plan.reductions:
        return {}
    wanted = {
        "realize_reads_threshold": 64,
        "realize_opcount_threshold": 4096,
        "realize_cpu_opcount_threshold": 4096,
        "realize_acc_reads_threshold": 64,
        "realize_cpu_acc_reads_threshold": 64,
    }
    # Settings come and go between torch releases (the CPU ones are newer than torch 2.11's
    # minimum): patch only those this torch has, since patching an unknown one raises.
    return {key: value for key, value in wanted.items() if hasattr(torch._inductor.config, key)}


def _argument_layout(example_inputs: list[Any], scratch: list[Tensor]) -> tuple[tuple[int, int], ...] | None:
    """Each graph input as (argument, -1) or (argument, axis) for a size; ``None`` if one is unknown."""
    layout: list[tuple[int, int]] = []
    for value in example_inputs:
        if isinstance(value, torch.SymInt):
            value = value.node.hint  # the size this graph was traced at
        if isinstance(value, Tensor):
            index = next((i for i, t in enumerate(scratch) if t is value), None)
            if index is None:
                return None
            layout.append((index, -1))
        elif isinstance(value, int):
            where = [(i, d) for i, t in enumerate(scratch[:-1]) for d, n in enumerate(t.shape) if n == value]
            if not where:
                return None
            layout.append(where[0])
        else:
            return None
    return tuple(layout)


def _state_view_shape(plan: KernelPlan, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    layout = plan.spec.state_decl(name).layout
    if layout is Layout.TENSOR:
        return ()
    if layout is Layout.ROW:
        return (*shape[:-1], 1)
    if layout is Layout.COL:
        return (*shape[:-2], 1, shape[-1])
    return shape


@dataclass
class _Item:
    """One parameter's share of a step, prepared before anything is written."""

    param: Tensor
    grad: Tensor
    state: ParamState
    new_state: dict[str, Tensor] | None
    states: list[Tensor]
    step: float
    graph: CompiledGraph | None
    args: list[Tensor]


class CompiledStep:
    """The step function of the compiled backend for one spec."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.plan = plan_kernel(spec)
        self.graphs: dict[_Signature, CompiledGraph] = {}
        self._eager: KernelFunction = self.plan.make_function()
        self._initial = TorchStep(spec)  # state creation exactly as the generic backend's
        self._warned: set[str] = set()

    def __call__(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers
    ) -> None:
        check_step_inputs(self.spec, params, grads, states, hypers)
        hypers = with_inputs(self.spec, hypers)
        with torch.no_grad():
            items = [self._prepare(p, g, s, hypers) for p, g, s in zip(params, grads, states, strict=True)]
            scalars: dict[tuple[float, torch.device, torch.dtype], Tensor] = {}
            host: dict[float, list[float]] = {}
            for item in items:
                key = (item.step, item.param.device, opmath_dtype(item.param.dtype))
                if key not in scalars:
                    if item.step not in host:
                        host[item.step] = host_scalar_values(self.plan, hypers, item.step)
                    scalars[key] = scalar_tensor(host[item.step], key[2], key[1])
                item.args.append(scalars[key])
            # Everything is checked, initialised and compiled: from here on, write.
            for item in items:
                if item.graph is not None:
                    item.graph(item.args)
                else:
                    self._eager(item.param, item.grad, *item.states, item.args[-1])
            for item in items:
                if item.new_state is not None:
                    item.state.update(item.new_state)
            torch._foreach_add_([item.state["step"] for item in items], 1.0)

    def _prepare(self, param: Tensor, grad: Tensor, state: ParamState, hypers: Hypers) -> _Item:
        p, g = param.detach(), grad.detach()
        new_state = None if state else self._initial.initial_state(p, g, hypers)
        current = new_state if new_state is not None else state
        tensors = [current[n] for n in self.spec.state_names]
        graph, args = self._graph_for(p, g, tensors)
        return _Item(p, g, state, new_state, tensors, float(current["step"]) + 1.0, graph, args)

    def _graph_for(self, p: Tensor, g: Tensor, states: list[Tensor]) -> tuple[CompiledGraph | None, list[Tensor]]:
        """The compiled graph for these tensors and its arguments (canonical views), or none."""
        tensors = [p, g, *states]
        if p.numel() < 2 or not all(t.is_contiguous() for t in tensors):
            return None, []
        if self.plan.factored:
            if p.dim() < 2 or min(p.shape[-2:]) < 2:
                return None, []
            rank = 2 if p.dim() == 2 else 3
            lead = (-1,) if rank == 3 else ()
            views = [t.view(*lead, *t.shape[-2:]) if t.dim() else t for t in tensors]
            if rank == 3 and views[0].shape[0] < 2:
                return None, []
        else:
            rank = 1
            views = [t.view(-1) if t.dim() else t for t in tensors]
        reason = compile_unavailable_reason(p.device.type)
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"portopt compiled backend: {reason}; running uncompiled", stacklevel=4)
            return None, []
        sig = _Signature(p.device, tuple(t.dtype for t in tensors), rank)
        graph = self.graphs.get(sig)
        if graph is None:
            graph = self.graphs[sig] = compiled_graph(self.spec, sig)
        return graph, views


@functools.lru_cache(maxsize=256)
def compiled_graph(spec: Spec, sig: _Signature) -> CompiledGraph:
    """The compiled graph of ``spec`` for ``sig``, once per process: optimizers (and conformance
    runs) with equal specs share it instead of tracing and compiling it again."""
    return CompiledGraph(plan_kernel(spec), sig)


def unsupported_reason(spec: Spec) -> str | None:
    """``None`` if this backend compiles ``spec``'s kernel, else why not (too large, or it reads the tensor's
    shape: module doc)."""
    if spec.shape_dependent or any(spec.kind(n) is Kind.SHAPE for n in spec.node_kinds):
        return (
            f"{spec.name}: it reads the tensor's shape or dtype (numel, ndim, size, finfo or a layout chosen per "
            "rank), which the compiled kernel does not take yet; use backend='torch'"
        )
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


COMPILED = register_backend(
    Backend(
        name="compiled",
        summary="the spec's generated kernel compiled by torch.compile (Inductor: C++ on CPU, Triton on GPU)",
        device_types=COMPILED_DEVICE_TYPES,
        build=build_compiled_step,
        unavailable_reason=_unavailable_reason,
        priority=20,
        min_auto_numel=auto_min_numel,
        unsupported_reason=unsupported_reason,
        build_graph=build_graph_step,
        torch_flag="fused",
    )
)
