"""Multi-tensor compiled kernels: one graph steps ``K`` parameters ("slots") in one call.

A *slot* is one parameter's share of a step: its parameter, gradient and states, stepped by
the spec's generated per-tensor function (:mod:`portopt.lowering.codegen`) with its own row
of step scalars. A :class:`ChunkGraph` is that function applied to ``K`` slots of one
:class:`SlotKind` (device, dtypes, storage of each state, rank), traced once by dynamo and
compiled by Inductor into one kernel (C++/OpenMP on the CPU, where Inductor fuses the ``K``
loop nests into one function; Triton on CUDA/XPU, where ``combo_kernels`` puts them into one
launch). Every dimension of every slot is dynamic, so one graph serves every mix of shapes;
a group of ``N`` parameters of one kind is ``ceil(N / K)`` calls, the last one padded with
tiny scratch slots, and never recompiles (not for new sizes, not for a new learning rate:
step scalars are the tensor ``s`` of shape ``(K, J)``, one row per slot).

Per-tensor values stay per tensor: a slot's reductions (LAMB's norms) reduce over its own
elements inside its own loop nest, and its per-tensor states (NAdam's ``mu_product``) are its
own 0-d tensors.

**8-bit states** (:mod:`portopt.precision.q8_kernel`): a slot whose states are block-wise
quantised ("blocked") is stepped on *block views* that the caller passes in: its elements
``[0, B·⌊n/B⌋)`` as ``(⌊n/B⌋, B)`` rows (the head) and the rest as one ``(1, n mod B)`` row (the
tail), for the parameter, the gradient and every element-wise state, each view a graph input of
its own. The generated function runs once on the heads and once on the tails, with a ``load``
that dequantises a state's rows and a ``store`` that quantises them (absmax per row, then
codes), so the update and the codec are one fused pass. The views being inputs, the graph
indexes each of them as a plain ``(rows, B)`` array: had it cut the flat tensor itself, every
element's index would go through an integer division and a modulo (measured in
bench/results/model_steps_cpu_q8_notes.md: several times slower). A
per-tensor state is read by both calls at its old value (the second call gets a copy) and
written by the first. The absmax rows of the whole blocks are a ``(⌊n/B⌋, 1)`` view; the last
block's absmax is a ``(1, 1)`` view (a scratch element when ``B`` divides ``n``, whose tail row is
then empty). A spec that reduces element values (LAMB) or factors states by rows or columns
cannot be split so, and is not offered 8-bit slots (:func:`q8_supported`).

**Calls bypass dynamo.** The graph's inputs (tensors, and the sizes of their dynamic
dimensions) are recorded when it is traced (:attr:`ChunkGraph.layout`); a caller that has
checked what dynamo's guards would check (devices, dtypes, ranks, contiguity: the slot kind)
calls Inductor's compiled function with them directly. Inductor's size assertions are off for
the same reason. Before a graph is used it is run on scratch slots of other sizes and compared
with the uncompiled function; sizes of 0 and 1 (which dynamo would specialise) are tried too,
and a graph that mishandles them is marked so (:attr:`ChunkGraph.edge_sizes`): its caller
steps such tensors another way.
"""

from __future__ import annotations

import functools
import math
import os
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from portopt.lowering.codegen import KernelPlan
from portopt.precision.q8_kernel import dequantize_rows, packed_code_table, padded_map, quantize_rows
from portopt.spec.symbols import Layout

_compilations = 0


def compilations() -> int:
    """How many chunk graphs Inductor compiled in this process (a benchmark reads it: no recompiles)."""
    return _compilations


_PARALLEL_HINT = 1 << 17
"""Elements per slot of the scratch a parallel graph is traced on: Inductor decides from the traced
sizes whether a loop is worth parallelising (a graph traced at a few thousand elements runs
single-threaded at any size)."""
_SERIAL_HINT = 1 << 10


@dataclass(frozen=True)
class StateForm:
    """How a slot stores one declared state: a plain tensor of ``dtype``, or 8-bit codes (``q8`` map)."""

    layout: Layout
    dtype: torch.dtype
    q8: str | None = None
    block: int = 0

    def width(self, blocked: bool) -> int:
        """Tensors this state contributes to a slot: 1; in a blocked slot (module doc) its head and tail
        views, and for 8-bit the absmax views of both too; a per-tensor state is always one."""
        if self.q8 is not None:
            return 4
        return 2 if blocked and self.layout is not Layout.TENSOR else 1


@dataclass(frozen=True)
class SlotKind:
    """What a chunk graph is specialised on, the same for each of its slots."""

    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    states: tuple[StateForm, ...]
    rank: int
    """The parameters' rank; 1 for a blocked kind (its tensors are taken flat, as block views)."""
    compute_dtype: torch.dtype

    @property
    def blocked(self) -> bool:
        """Whether the slots hold 8-bit states and are stepped on block views (module doc)."""
        return any(f.q8 is not None for f in self.states)

    @property
    def width(self) -> int:
        """Tensors per slot: parameter, gradient (two views each when blocked), and each state's."""
        views = 2 if self.blocked else 1
        return 2 * views + sum(f.width(self.blocked) for f in self.states)

    @property
    def q8_maps(self) -> tuple[str, ...]:
        """The 8-bit maps the slots use, in first-use order (each brings its map and code table)."""
        return tuple(dict.fromkeys(f.q8 for f in self.states if f.q8 is not None))

    @property
    def block(self) -> int:
        """The 8-bit block size (0 without 8-bit states)."""
        return next((f.block for f in self.states if f.q8 is not None), 0)


@dataclass(frozen=True)
class GraphKey:
    """One chunk graph: slot kind, slots per call, and whether its loops run in parallel."""

    kind: SlotKind
    arity: int
    parallel: bool


Q8_VARIABLE = "PORTOPT_COMPILE_Q8"
"""Set to 0 to leave 8-bit states to the generic backend's 8-bit step (the compiled backend's
fallback) instead of stepping them inside the compiled pass. On by default: in the pass the step
reads and writes each byte of the 8-bit states once (bench/results/model_steps_cpu_q8_notes.md has
what it costs on a CPU, where its table lookups are scalar loads)."""


def q8_supported(plan: KernelPlan) -> bool:
    """Whether slots of ``plan``'s spec may hold 8-bit states: :data:`Q8_VARIABLE` not 0, and the spec
    has no element reductions and no row/column factors (module doc)."""
    return os.environ.get(Q8_VARIABLE, "1") != "0" and plan.reductions == 0 and not plan.factored


class Q8Rows(NamedTuple):
    """One 8-bit state of a slot on block views: codes ``(rows, B)``, absmax ``(rows, 1)``, the map's tables."""

    codes: Tensor
    absmax: Tensor
    qmap: Tensor
    table: Tensor


def _loader(compute: torch.dtype) -> Callable[[Any], Tensor]:
    def load(x: Tensor | Q8Rows) -> Tensor:
        if isinstance(x, Q8Rows):
            return dequantize_rows(x.codes, x.absmax, x.qmap).to(compute)
        return x.to(compute)

    return load


def _store(dst: Tensor | Q8Rows, value: Tensor) -> None:
    if isinstance(dst, Q8Rows):
        codes, absmax = quantize_rows(value, dst.table)
        dst.codes.copy_(codes)
        dst.absmax.copy_(absmax)
    else:
        dst.copy_(value)


def chunk_function(plan: KernelPlan, kind: SlotKind, arity: int) -> Callable[..., None]:
    """The step of ``arity`` slots of ``kind``: ``fn(*slot tensors, s, *(qmap, table) per 8-bit map)``."""
    kernel = plan.make_function(load=_loader(kind.compute_dtype), store=_store)
    width, forms = kind.width, kind.states
    maps = kind.q8_maps

    def plain_slot(tensors: Sequence[Tensor], s: Tensor) -> None:
        kernel(*tensors, s)

    def blocked_slot(tensors: Sequence[Tensor], s: Tensor, tables: dict[str, tuple[Tensor, Tensor]]) -> None:
        heads: list[Tensor | Q8Rows] = [tensors[0], tensors[2]]
        tails: list[Tensor | Q8Rows] = [tensors[1], tensors[3]]
        at = 4
        for form in forms:
            if form.q8 is not None:
                codes_head, codes_tail, absmax_rows, absmax_tail = tensors[at : at + 4]
                qmap, table = tables[form.q8]
                heads.append(Q8Rows(codes_head, absmax_rows, qmap, table))
                tails.append(Q8Rows(codes_tail, absmax_tail, qmap, table))
            elif form.layout is Layout.TENSOR:
                heads.append(tensors[at])
                tails.append(tensors[at].clone())  # read at its old value, written by the first call only
            else:
                heads.append(tensors[at])
                tails.append(tensors[at + 1])
            at += form.width(True)
        kernel(*heads, s)
        if torch.compiler.is_compiling() or tensors[1].numel():  # eager: an empty tail row has no absmax
            kernel(*tails, s)

    def chunk(*args: Tensor) -> None:
        s = args[arity * width]
        if not maps:
            for k in range(arity):
                plain_slot(args[k * width : (k + 1) * width], s[k])
            return
        rest = args[arity * width + 1 :]
        tables = {name: (rest[2 * i], rest[2 * i + 1]) for i, name in enumerate(maps)}
        for k in range(arity):
            blocked_slot(args[k * width : (k + 1) * width], s[k], tables)

    # A code object of its own: dynamo caches compiled frames per code object, and every chunk function
    # is one closure of the same source.
    code = chunk.__code__.replace()
    return types.FunctionType(code, chunk.__globals__, chunk.__name__, chunk.__defaults__, chunk.__closure__)


def kind_tables(kind: SlotKind) -> list[Tensor]:
    """The map and code table of each 8-bit map of ``kind``, as the chunk function takes them."""
    tables: list[Tensor] = []
    for name in kind.q8_maps:
        tables += [padded_map(name, kind.device), packed_code_table(name, kind.device)]
    return tables


class ChunkGraph:
    """One compiled chunk graph (module doc), called without dynamo's guards.

    ``layout`` says, for each input of the compiled function, where it comes from in the chunk
    function's arguments: ``(index, -1)`` for argument ``index`` itself, ``(index, d)`` for the
    size of its dimension ``d``. ``edge_sizes`` is true when the graph was also found right for
    tensors with a dimension of 0 or 1.
    """

    def __init__(self, plan: KernelPlan, key: GraphKey, options: dict[str, Any]) -> None:
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner  # the compiler stack, on first use

        self.plan = plan
        self.key = key
        self.graphs_compiled = 0
        self.edge_sizes = False
        self._fast: Callable[..., Any] | None = None
        self.layout: tuple[tuple[int, int], ...] = ()
        self._eager = chunk_function(plan, key.kind, key.arity)
        captured: list[tuple[list[Any], Callable[..., Any]]] = []
        inner: list[tuple[list[Any], Any]] = []

        def inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
            compiled = compile_fx_inner(gm, example_inputs, *args, **kwargs)
            inner.append((list(example_inputs), compiled))
            return compiled

        def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
            # AOTAutograd's own cache would hand back the wrapped function without calling inner_compile;
            # Inductor's FX-graph cache below it still saves the C++/Triton compile.
            with torch._inductor.config.patch(options), torch._functorch.config.patch(enable_autograd_cache=False):
                compiled = cast(Callable[..., Any], compile_fx(gm, example_inputs, inner_compile=inner_compile))
            captured.append((list(example_inputs), compiled))
            self.graphs_compiled += 1
            global _compilations
            _compilations += 1
            return compiled

        traced = torch.compile(chunk_function(plan, key.kind, key.arity), backend=capture, fullgraph=True)
        scratch = self.scratch(_trace_sizes(key), seed=0)
        for index, dims in self._dynamic_dims(scratch):
            for d in dims:
                torch._dynamo.mark_dynamic(scratch[index], d)
        with torch.no_grad():
            traced(*scratch)
        if len(captured) != 1:
            return
        layout = _argument_layout(captured[0][0], scratch)
        if layout is None:
            return
        wrapped, self.layout = captured[0][1], layout
        self._fast = functools.partial(_call_unboxed, wrapped)
        if len(inner) == 1 and _same_signature(inner[0][0], captured[0][0]):
            # Inductor's compiled module itself, called with the list of its inputs, without the runtime
            # wrappers around it (they bump the version counters of what the graph writes: the caller
            # does that once per step, not once per call).
            self._fast = inner[0][1].current_callable
        if not self._agrees_with_eager(_check_sizes(key, edge=False), seed=1):
            self._fast = None
            return
        self.edge_sizes = self._agrees_with_eager(_check_sizes(key, edge=True), seed=2)

    @property
    def usable(self) -> bool:
        """Whether the graph was compiled, bound to its inputs and found to agree with the eager function."""
        return self._fast is not None

    def call(self, inputs: list[Any]) -> None:
        """Run the compiled function on ``inputs`` (laid out as :attr:`layout` says; the list is consumed)."""
        assert self._fast is not None
        self._fast(inputs)

    def inputs(self, args: Sequence[Tensor]) -> list[Any]:
        """The compiled function's inputs for the chunk function's arguments ``args``."""
        return [args[i] if d < 0 else args[i].shape[d] for i, d in self.layout]

    # scratch slots --------------------------------------------------------------------
    def scratch(self, sizes: Sequence[tuple[int, ...]], seed: int) -> list[Tensor]:
        """Chunk arguments on random data: one slot per entry of ``sizes`` (a parameter shape)."""
        kind = self.key.kind
        gen = torch.Generator().manual_seed(seed)
        args: list[Tensor] = []
        for shape in sizes:
            args += slot_scratch(kind, shape, gen)
        j = max(len(self.plan.scalars), 1)
        s = torch.rand((self.key.arity, j), generator=gen, dtype=torch.float64).add_(0.5)
        args.append(s.to(device=kind.device, dtype=kind.compute_dtype))
        return args + kind_tables(kind)

    def _dynamic_dims(self, scratch: Sequence[Tensor]) -> list[tuple[int, list[int]]]:
        """Which dimensions of which scratch arguments the graph takes as dynamic."""
        kind, width = self.key.kind, self.key.kind.width
        marks: list[tuple[int, list[int]]] = []
        for k in range(self.key.arity):
            base = k * width
            if kind.blocked:  # heads (rows, B) and absmax rows (rows, 1): the rows; tails (1, r): r
                for at, form in _blocked_positions(kind, base):
                    if form is None or form.layout is not Layout.TENSOR:
                        marks += [(at, [0]), (at + 1, [1])]
                    if form is not None and form.q8 is not None:
                        marks.append((at + 2, [0]))
                continue
            marks += [(base, list(range(kind.rank))), (base + 1, list(range(kind.rank)))]
            at = base + 2
            for form in kind.states:
                t = scratch[at]
                marks.append((at, [d for d in range(t.dim()) if t.shape[d] != 1]))
                at += form.width(False)
        return marks

    def _agrees_with_eager(self, sizes: Sequence[tuple[int, ...]], seed: int) -> bool:
        expected = self.scratch(sizes, seed)
        actual = [t.clone() for t in expected]
        with torch.no_grad():
            self._eager(*expected)
            try:
                self.call(self.inputs(actual))
            except Exception:
                return False
        unused = self._unused_scratch(expected)
        return all(_close(a, e) for i, (a, e) in enumerate(zip(actual, expected, strict=True)) if i not in unused)

    def _unused_scratch(self, args: Sequence[Tensor]) -> set[int]:
        """Arguments whose value is no result: the last block's absmax of a slot whose tail is empty."""
        kind, width = self.key.kind, self.key.kind.width
        if not kind.blocked:
            return set()
        unused: set[int] = set()
        for k in range(self.key.arity):
            if args[k * width + 1].numel() == 0:
                unused |= {at + 3 for at, form in _blocked_positions(kind, k * width) if form and form.q8}
        return unused


def slot_scratch(kind: SlotKind, shape: tuple[int, ...], gen: torch.Generator | None = None) -> list[Tensor]:
    """A slot of ``kind`` for a parameter of ``shape`` on random data (positive, as states are)."""

    def rand(s: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.rand(s, generator=gen, dtype=torch.float64).add_(0.5).to(device=kind.device, dtype=dtype)

    if not kind.blocked:
        tensors = [rand(shape, kind.param_dtype), rand(shape, kind.grad_dtype)]
        return tensors + [rand(_state_shape(form.layout, shape), form.dtype) for form in kind.states]
    # separate tensors, not views of one: dynamo would trace views of one base as that base
    n, block = math.prod(shape), kind.block
    head, tail = (n // block, block), (1, n % block)
    tensors = [rand(head, kind.param_dtype), rand(tail, kind.param_dtype)]
    tensors += [rand(head, kind.grad_dtype), rand(tail, kind.grad_dtype)]
    for form in kind.states:
        if form.q8 is not None:
            top = 255 if form.q8 == "signed" else 256  # a signed map has 255 entries
            tensors += [
                torch.randint(0, top, v, generator=gen, dtype=torch.uint8).to(kind.device) for v in (head, tail)
            ]
            tensors += [rand((head[0], 1), torch.float32), rand((1, 1), torch.float32)]
        elif form.layout is Layout.TENSOR:
            tensors.append(rand((), form.dtype))
        else:
            tensors += [rand(head, form.dtype), rand(tail, form.dtype)]
    return tensors


def block_views(x: Tensor, block: int) -> list[Tensor]:
    """The head ``(⌊n/B⌋, B)`` and tail ``(1, n mod B)`` views of a contiguous tensor (module doc)."""
    flat = x.view(-1)
    rows = flat.numel() // block
    whole = rows * block
    return [flat[:whole].view(rows, block), flat[whole:].view(1, -1)]


def _blocked_positions(kind: SlotKind, base: int) -> list[tuple[int, StateForm | None]]:
    """Where each tensor of a blocked slot starting at ``base`` begins: the parameter's and the
    gradient's views (``None``), then each state's (module doc)."""
    positions: list[tuple[int, StateForm | None]] = [(base, None), (base + 2, None)]
    at = base + 4
    for form in kind.states:
        positions.append((at, form))
        at += form.width(True)
    return positions


def _state_shape(layout: Layout, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout is Layout.TENSOR:
        return ()
    if layout is Layout.ROW:
        return (*shape[:-1], 1)
    if layout is Layout.COL:
        return (*shape[:-2], 1, shape[-1])
    return shape


@functools.cache
def _primes(start: int, count: int) -> tuple[int, ...]:
    found: list[int] = []
    n = start
    while len(found) < count:
        if n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1)):
            found.append(n)
        n += 1
    return tuple(found)


def _trace_sizes(key: GraphKey) -> list[tuple[int, ...]]:
    """The scratch shapes a graph is traced on: large enough for a parallel graph to be traced as
    parallel (Inductor decides from the traced sizes)."""
    return _distinct_shapes(key, _PARALLEL_HINT if key.parallel else _SERIAL_HINT)


def _distinct_shapes(key: GraphKey, target: int) -> list[tuple[int, ...]]:
    """One shape per slot of about ``target`` elements, every dimension a distinct prime (a size seen
    twice would be traced as one symbol). A blocked slot's graph sees its block count and tail length
    instead: those are distinct, at least 2 each, and never the block size."""
    kind = key.kind
    rank = kind.rank
    per_dim = max(round(target ** (1.0 / max(rank, 1))), 3)
    primes = iter(_primes(per_dim, 64 * (key.arity + 1) * max(rank, 1)))
    used: set[int] = set()
    shapes: list[tuple[int, ...]] = []
    for _ in range(key.arity):
        while True:
            shape = tuple(next(primes) for _ in range(rank))
            dims = set(shape)
            if kind.blocked:
                n = math.prod(shape)
                dims = {n // kind.block, n % kind.block}
                if min(dims) < 2 or len(dims) < 2 or kind.block in dims:
                    continue
            if not dims & used:
                used |= dims
                shapes.append(shape)
                break
    return shapes


def _check_sizes(key: GraphKey, edge: bool) -> list[tuple[int, ...]]:
    """Other sizes to compare a graph with the eager function on: ordinary ones, or edge cases
    (dimensions of 0 and 1; for 8-bit slots, whole numbers of blocks and tails of one element)."""
    rank, block = key.kind.rank, key.kind.block
    if not edge:
        return _distinct_shapes(key, 3 * block + 100 if block else 600)
    if block:
        cases = [block, 2 * block + 1, 1, block - 1, 3 * block, block + 1]
        return [_with_numel(rank, cases[k % len(cases)]) for k in range(key.arity)]
    shapes: list[tuple[int, ...]] = [(0,), (1,), (2,), (1, 7), (0, 3), (7, 1), (1, 1)]
    return [_fit_rank(shapes[k % len(shapes)], rank) for k in range(key.arity)]


def is_edge(kind: SlotKind, shape: tuple[int, ...]) -> bool:
    """Whether a parameter of ``shape`` needs a graph checked on edge sizes (:attr:`ChunkGraph.edge_sizes`)."""
    if any(d <= 1 for d in shape):
        return True
    if kind.block:
        n = math.prod(shape)
        return n // kind.block <= 1 or n % kind.block <= 1
    return False


def _with_numel(rank: int, n: int) -> tuple[int, ...]:
    return (n,) if rank <= 1 else (1,) * (rank - 1) + (n,)


def _fit_rank(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    if rank == 0:
        return ()
    padded = (*shape, *([3] * rank))
    return padded[:rank]


def _argument_layout(example_inputs: list[Any], scratch: list[Tensor]) -> tuple[tuple[int, int], ...] | None:
    """Each graph input as (argument, -1) or (argument, dim) for a size; ``None`` if one is unknown."""
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
            where = [(i, d) for i, t in enumerate(scratch) for d, n in enumerate(t.shape) if n == value]
            if not where:
                return None
            layout.append(where[0])
        else:
            return None
    return tuple(layout)


def _same_signature(inner: Sequence[Any], outer: Sequence[Any]) -> bool:
    """Whether the compiled graph takes exactly the traced graph's inputs, in order (no input was
    merged, dropped or added between dynamo's graph and Inductor's)."""
    if len(inner) != len(outer):
        return False
    for a, b in zip(inner, outer, strict=True):
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return False
        if isinstance(a, Tensor) and (a.dtype != b.dtype or a.dim() != b.dim()):
            return False
    return True


def _call_unboxed(compiled: Callable[..., Any], inputs: list[Any]) -> Any:
    return compiled(*inputs)


def _close(actual: Tensor, expected: Tensor) -> bool:
    if actual.dtype == torch.uint8:  # 8-bit codes: an ulp of arithmetic may move a value across a boundary
        return bool((actual.int() - expected.int()).abs().le(1).all())
    return torch.allclose(actual.double(), expected.double(), rtol=1e-4, atol=1e-6, equal_nan=True)


def dummy_shape(kind: SlotKind) -> tuple[int, ...]:
    """The smallest parameter shape that is not an edge case for ``kind``: what padding slots get."""
    if kind.rank == 0:
        return ()
    if kind.block:
        return (
            _with_numel(kind.rank, 2 * kind.block + 2) if kind.rank == 1 else (2,) * (kind.rank - 1) + (kind.block + 1,)
        )
    return (2,) * kind.rank
