"""A compiled step's plan for one list of parameters: decided once, checked cheaply, reused.

Building a :class:`GroupPlan` does what a step must do once for a structure of inputs: create
the states of parameters stepped for the first time, choose for each parameter its slot kind
(:class:`~portopt.backends.compiled_graphs.SlotKind`) or the uncompiled fallback, compile the
chunk graphs the kinds need, pack the slots of each graph into chunks (:class:`Chunk`: the
graph's inputs laid out once, with the places of the gradient and of the step scalars), put
the step counters into one tensor (:class:`~portopt.lowering.step_counters.StepCounters`),
and record what the next call must find unchanged.

A later call with the same inputs is checked in time linear in the tensors but with small
constants (:meth:`GroupPlan.matches`): the same parameter, state-dict and state objects
(identity), and the same properties (dtype, device, shape, strides, ...) of every parameter,
gradient and state tensor, checked by dynamo's C++ ``TensorGuards`` (a Python fallback where
this torch has none). Anything else (a new parameter, a gradient of another dtype, a state
replaced by ``load_state_dict``) builds a new plan, after the full input checks. A step on a
plan is then: the step scalars (once per distinct step count), one call per chunk, the
fallback's step for parameters no graph takes, one increment of the counters.

Parameters no graph takes (a device without a compiler, non-contiguous tensors, sizes a graph
mishandles, 8-bit states where the spec reduces element values) are stepped by the generic
backend's executor (``fallback``): same states, same rounding rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from portopt.backends.compiled_graphs import (
    ChunkGraph,
    GraphKey,
    SlotKind,
    StateForm,
    block_views,
    dummy_shape,
    is_edge,
    kind_tables,
    q8_supported,
    slot_scratch,
)
from portopt.lowering.backend import Hypers, ParamState
from portopt.lowering.codegen import KernelPlan, host_scalar_values
from portopt.lowering.input_snapshot import InputSnapshot
from portopt.lowering.step_counters import StepCounters
from portopt.precision.quantize import Q8State
from portopt.spec.symbols import Layout

Q8_MAX_ARITY = 1
"""Most slots per call of a graph with 8-bit states. Its compile time grows much faster than its slot
count (on this project's loaded 2-core machine: 30 s for one slot, more than 13 minutes for four), and an
8-bit state is only used for tensors of at least 4096 elements, whose call overhead is small beside them."""
InitialState = Callable[[Tensor, Tensor, Hypers, torch.dtype], dict[str, Any]]
"""Creates the states of a parameter before its first step (``param_dtype``: the model's dtype)."""
Fallback = Callable[[list[Tensor], list[Tensor], list[ParamState], Hypers, list[torch.dtype], list[int]], None]
"""Steps parameters no graph takes (params, grads, states, hypers, model dtypes, optimizer-wide numbers)."""


def fitted_arity(members: int, most: int) -> int:
    """Slots per call for a group of ``members`` parameters of one kind: the next power of two at or
    above ``members``, at most ``most``. A graph's compile time grows with its slots (a 16-slot graph
    costs several times a 2-slot one), so a group of 3 tensors gets a 4-slot graph, not a 16-slot one
    of 13 padding slots; powers of two keep the graphs of one kind to a handful. Groups of ``most``
    tensors or more get the configured arity (the steady-state step on many tensors is unchanged)."""
    arity = 1
    while arity < members and arity < most:
        arity *= 2
    return min(arity, most)


@dataclass(frozen=True)
class PlanContext:
    """What a plan needs from its step function (:class:`~portopt.backends.compiled.CompiledStep`)."""

    kernel: KernelPlan
    graph: Callable[[GraphKey], ChunkGraph | None]
    """The usable compiled graph for a key (compiled on first request), or ``None``."""
    initial_state: InitialState
    fallback: Fallback
    compute_dtype: Callable[[Sequence[torch.dtype]], torch.dtype]
    """The compute dtype of a slot from its parameter, gradient and plain state dtypes."""
    serial_arity: int
    parallel_arity: int
    parallel_min_numel: int


@dataclass
class Chunk:
    """One call of a chunk graph: its inputs, with the places the gradients and step scalars go."""

    graph: ChunkGraph
    template: list[Any]
    fresh: list[tuple[int, int, int, int]]
    """The inputs taken anew at every call: (input position, parameter index, source, view). Source 1
    is the gradient (a new tensor every step), 0 the parameter, taken anew in a blocked slot only (its
    block views: a later ``param.data = ...`` must be seen, as an unblocked slot sees it through the
    parameter itself). View 0 is the tensor itself, or in a blocked slot its head, 1 its tail
    (:func:`block_views`)."""
    scalars: int
    """Input position of the step-scalar tensor ``s``."""
    slots: list[int]
    """The parameter index of each real slot, in slot order (padding slots follow)."""
    block: int = 0
    """The block size of a blocked graph's views (0: not blocked)."""


@dataclass
class Pack:
    """The chunks of one graph key."""

    key: GraphKey
    offset: int
    """Where the pack's slots start among the counted parameters (packs count in order)."""
    chunks: list[Chunk] = field(default_factory=list)


class GroupPlan:
    """The step over one list of parameters, decided once (module docstring)."""

    def __init__(
        self,
        ctx: PlanContext,
        state_names: tuple[str, ...],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        param_dtypes: Sequence[torch.dtype],
        indices: Sequence[int],
    ) -> None:
        self.ctx = ctx
        self.names = state_names
        self.params = list(params)
        self.states = list(states)
        self.model_dtypes = list(param_dtypes)
        self.indices = list(indices)
        self.fresh: list[tuple[ParamState, dict[str, Any]]] = []
        current: list[ParamState] = []
        for p, g, state, dtype in zip(params, grads, states, param_dtypes, strict=True):
            if state:
                current.append(state)
            else:
                new = ctx.initial_state(p.detach(), g.detach(), hypers, dtype)
                self.fresh.append((state, new))
                current.append(new)
        self.current = current
        kinds = [self._slot_kind(p, g, s) for p, g, s in zip(params, grads, current, strict=True)]
        sizes = [None if k is None else (k, self._parallel(p)) for p, k in zip(params, kinds, strict=True)]
        counts = Counter(x for x in sizes if x is not None)
        self.packs: list[Pack] = []
        self.fallback: list[int] = []
        by_key: dict[GraphKey, list[int]] = {}
        for i, (p, size) in enumerate(zip(params, sizes, strict=True)):
            key = None if size is None else self._key(*size, counts[size])
            graph = None if key is None else ctx.graph(key)
            if graph is None or (not graph.edge_sizes and is_edge(graph.key.kind, tuple(p.shape))):
                self.fallback.append(i)
            else:
                by_key.setdefault(graph.key, []).append(i)
        compiled = [i for members in by_key.values() for i in members]
        self.counters: StepCounters | None = None
        if compiled and StepCounters.can_adopt([current[i] for i in compiled]):
            self.counters = StepCounters([current[i] for i in compiled])
            self.counters.adopt([current[i] for i in compiled])
            self.counted = compiled
        else:  # counters of mixed dtypes or devices: stepped with the fallback's increments
            self.fallback = sorted(self.fallback + compiled)
            by_key = {}
        self.written = [params[i] for members in by_key.values() for i in members]
        offset = 0
        for key, members in by_key.items():
            self.packs.append(self._pack(key, members, params, grads, offset))
            offset += len(members)
        self.snapshot = InputSnapshot(state_names, params, grads, current, holders=states)

    # classification -------------------------------------------------------------------
    def _slot_kind(self, param: Tensor, grad: Tensor, state: ParamState) -> SlotKind | None:
        """The slot kind of one parameter, or ``None`` if no graph takes it (module docstring)."""
        tensors = [param, grad]
        forms: list[StateForm] = []
        for decl in self.ctx.kernel.spec.states:
            value: Any = state[decl.name]
            if isinstance(value, Q8State):
                if not (
                    q8_supported(self.ctx.kernel)
                    and decl.layout is Layout.ELEMENTWISE
                    and value.codes.numel() > 0
                    and value.codes.is_contiguous()
                    and value.absmax.is_contiguous()
                ):
                    return None
                forms.append(StateForm(decl.layout, torch.uint8, value.map_name, value.block_size))
            else:
                forms.append(StateForm(decl.layout, value.dtype))
                tensors.append(value)
        blocks = {f.block for f in forms if f.q8 is not None}
        if len(blocks) > 1 or not all(t.is_contiguous() for t in tensors):
            return None
        compute = self.ctx.compute_dtype([t.dtype for t in tensors])
        rank = 1 if blocks else param.dim()  # a blocked slot is taken flat, as block views
        return SlotKind(param.device, param.dtype, grad.dtype, tuple(forms), rank, compute)

    def _parallel(self, param: Tensor) -> bool:
        return param.numel() >= self.ctx.parallel_min_numel

    def _key(self, kind: SlotKind, parallel: bool, members: int) -> GraphKey:
        """The graph wanted for ``members`` parameters of ``kind``: at most the configured arity, and no
        more slots than the next power of two above ``members`` (:func:`fitted_arity`)."""
        arity = self.ctx.parallel_arity if parallel else self.ctx.serial_arity
        if kind.q8_maps:  # each 8-bit slot is two loop nests with a gather-heavy codec (Q8_MAX_ARITY)
            arity = min(arity, Q8_MAX_ARITY)
        return GraphKey(kind, fitted_arity(members, arity), parallel)

    # packing --------------------------------------------------------------------------
    def _slot_tensors(self, kind: SlotKind, state: ParamState, param: Tensor, grad: Tensor) -> list[Tensor]:
        if not kind.blocked:
            # the parameter itself: a later ``param.data = ...`` is seen, never a stale alias
            return [param, grad] + [state[name] for name in self.names]
        # block views (compiled_graphs module doc); a later ``param.data = ...`` changes the
        # parameter's identity or storage, which ``matches`` sees
        block = kind.block
        tensors = block_views(param, block) + block_views(grad, block)
        n = param.numel()
        for form, name in zip(kind.states, self.names, strict=True):
            value: Any = state[name]
            if form.q8 is None:
                tensors += [value] if form.layout is Layout.TENSOR else block_views(value, block)
                continue
            rows = n // block
            absmax = value.absmax
            tail = absmax[rows:].view(1, 1) if n % block else torch.zeros((1, 1), device=absmax.device)
            tensors += [*block_views(value.codes, block), absmax[:rows].view(rows, 1), tail]
        return tensors

    def _pack(
        self, key: GraphKey, members: list[int], params: Sequence[Tensor], grads: Sequence[Tensor], offset: int
    ) -> Pack:
        graph = self.ctx.graph(key)
        assert graph is not None
        kind, arity, width = key.kind, key.arity, key.kind.width
        pack = Pack(key, offset)
        padding = slot_scratch(kind, dummy_shape(kind))
        j = max(len(self.ctx.kernel.scalars), 1)
        s = torch.zeros((arity, j), dtype=kind.compute_dtype, device=kind.device)
        tables = kind_tables(kind)
        for start in range(0, len(members), arity):
            slots = members[start : start + arity]
            args: list[Tensor] = []
            for i in slots:
                args += self._slot_tensors(kind, self.current[i], params[i], grads[i])
            for _ in range(arity - len(slots)):
                args += padding
            args += [s, *tables]
            template = graph.inputs(args)
            # a slot's arguments 0 and 1 are its parameter and gradient, or in a blocked slot 0-3 their
            # head and tail views (Chunk.fresh)
            fresh: dict[int, tuple[int, int, int]] = {}
            for k, i in enumerate(slots):
                if kind.blocked:
                    fresh |= {k * width + a: (i, a // 2, a % 2) for a in range(4)}
                else:
                    fresh[k * width + 1] = (i, 1, 0)
            positions = [(pos, *fresh[a]) for pos, (a, d) in enumerate(graph.layout) if d < 0 and a in fresh]
            scalars = next(pos for pos, (a, d) in enumerate(graph.layout) if d < 0 and a == arity * width)
            pack.chunks.append(Chunk(graph, template, positions, scalars, slots, kind.block if kind.blocked else 0))
        return pack

    def matches(self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState]) -> bool:
        """Whether a call with these inputs can run on this plan (module docstring)."""
        return not self.fresh and self.snapshot.matches(params, grads, states)

    # running --------------------------------------------------------------------------
    def run(self, grads: Sequence[Tensor], hypers: Hypers) -> None:
        """The step (the inputs were checked: by :meth:`matches`, or before the plan was built)."""
        ctx = self.ctx
        if self.packs:
            assert self.counters is not None
            counts = self.counters.values()
            rows: dict[float, list[float]] = {}
            if counts.count(counts[0]) == len(counts):  # one step count for all: one row of step scalars
                for pack in self.packs:
                    self._run_pack(pack, grads, hypers, None, counts[0] + 1.0, rows)
            else:
                for pack in self.packs:
                    size = sum(len(c.slots) for c in pack.chunks)
                    steps = [t + 1.0 for t in counts[pack.offset : pack.offset + size]]
                    self._run_pack(pack, grads, hypers, steps, 0.0, rows)
        if self.fallback:
            f = self.fallback
            ctx.fallback(
                [self.params[i] for i in f],
                [grads[i] for i in f],
                [self.current[i] for i in f],
                hypers,
                [self.model_dtypes[i] for i in f],
                [self.indices[i] for i in f],
            )
        if self.written:
            torch._C._increment_version(self.written)  # what autograd checks before reusing a saved tensor
        for state, new in self.fresh:
            state.update(new)
        if self.fresh:
            self.fresh = []
            self.current = self.states
        if self.counters is not None and self.packs:
            self.counters.increment()

    def _scalars(self, hypers: Hypers, t: float, rows: dict[float, list[float]]) -> list[float]:
        row = rows.get(t)
        if row is None:
            row = rows[t] = host_scalar_values(self.ctx.kernel, hypers, t) or [0.0]
        return row

    def _run_pack(
        self,
        pack: Pack,
        grads: Sequence[Tensor],
        hypers: Hypers,
        steps: list[float] | None,
        t: float,
        rows: dict[float, list[float]],
    ) -> None:
        """One call per chunk; ``steps``: each slot's step count, or ``None`` when all are ``t``."""
        kind, arity = pack.key.kind, pack.key.arity
        dtype, device = kind.compute_dtype, kind.device
        shared = None
        if steps is None:
            shared = torch.tensor([self._scalars(hypers, t, rows)] * arity, dtype=dtype, device=device)
        at = 0
        for chunk in pack.chunks:
            if shared is None:
                assert steps is not None
                mine = steps[at : at + len(chunk.slots)]
                at += len(chunk.slots)
                mine += [mine[0]] * (arity - len(mine))
                s = torch.tensor([self._scalars(hypers, x, rows) for x in mine], dtype=dtype, device=device)
            else:
                s = shared
            inputs = chunk.template.copy()
            if chunk.block:
                views: dict[tuple[int, int], list[Tensor]] = {}
                for pos, i, source, view in chunk.fresh:
                    if (i, source) not in views:
                        views[i, source] = block_views(grads[i] if source else self.params[i], chunk.block)
                    inputs[pos] = views[i, source][view]
            else:
                for pos, i, _, _ in chunk.fresh:
                    inputs[pos] = grads[i]
            inputs[chunk.scalars] = s
            chunk.graph.call(inputs)
