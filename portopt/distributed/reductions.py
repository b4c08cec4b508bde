"""Per-tensor and row/column reductions of sharded tensors, completed over the mesh, batched.

A reduction whose operand is cut across ranks along a reduced dimension (LAMB's ``‖p‖`` and ``‖u‖`` of a
``Shard(0)`` weight; Adafactor's column mean of ``g²`` under ``Shard(0)``, its row mean under ``Shard(1)``;
an RMS update clip) is computed in two parts:

1. **partial**, on each rank, over its local piece: ``Σx`` (``sum``, ``mean``, ``row_sum``, ...), ``Σx²``
   (``norm``), ``max`` (``max_abs``, ``row_max``, ...; the identity ``−∞`` over an empty piece);
2. **combine**, once the value is needed: every partial waiting in the bucket, of every tensor and every
   reduction node, is gathered in **one** all-gather (``all_gather_single``) per process group, and each rank
   combines the gathered rows in rank order (a sum or a maximum), then finishes: ``√`` for a norm,
   ``/ n`` for a mean with ``n`` the *logical* number of reduced elements.

Every rank thus holds the same bits of every reduced value (a sum in rank order is the same sum
everywhere), and a bucket issues one collective per process group for each round of reductions that
depend on one another (LAMB: one round, its two norms together; Adafactor: one for the factored
statistics of ``g²``, one for the RMS of the update that uses them). A reduction whose reduced dimensions
are all whole on every rank (Adafactor's row mean under ``Shard(0)``) is computed locally, exactly as in
one process. The collective runs on the tensors' device, so the same code serves gloo (CPU), NCCL (CUDA)
and HCCL (Ascend).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from portopt.distributed.layout import ShardLayout, layout_of
from portopt.lowering.program import Instr
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec.analysis import Kind, NodeInfo
from portopt.spec.expr import Expr
from portopt.spec.ops import COL_REDUCTIONS, OP_INFO, ROW_REDUCTIONS, Family, Op

_MAXIMA = frozenset({Op.MAX_ABS, Op.ROW_MAX, Op.COL_MAX})
_MEANS = frozenset({Op.MEAN, Op.ROW_MEAN, Op.COL_MEAN})


@dataclass
class _Partial:
    """One tensor's local part of one reduction node, waiting to be combined over ``groups``."""

    node: Expr
    index: int
    value: Tensor
    groups: tuple[ProcessGroup, ...]
    count: int  # logical number of reduced elements (means)


@dataclass
class MeshReductions:
    """The reductions of one bucket's program over the mesh (module doc)."""

    layouts: Sequence[ShardLayout | None]
    kinds: Mapping[Expr, NodeInfo]
    pending: dict[Expr, list[Tensor | None]] = field(default_factory=dict)
    partials: list[_Partial] = field(default_factory=list)
    collectives: int = 0
    """How many collectives this bucket's step issued (for tests and the docs' accounting)."""

    @classmethod
    def of(cls, params: Sequence[Tensor], kinds: Mapping[Expr, NodeInfo]) -> MeshReductions | None:
        """The reductions of a bucket of ``params`` (``None`` when none of them is a sharded piece)."""
        layouts = [layout_of(p) for p in params]
        if all(layout is None or not layout.groups for layout in layouts):
            return None
        return cls(layouts, kinds)

    def run(
        self,
        instrs: Sequence[Instr],
        values: dict[Expr, list[Tensor]],
        execute: Callable[[Instr], list[Tensor]],
    ) -> None:
        """Execute a program with reductions over the mesh, batching as many as the data flow allows.

        A reduction is started (its partials computed) where it stands; an instruction that reads a value
        still waiting is *deferred* when its result is smaller than element-wise (per tensor, per slice, per
        row or column: LAMB's ``‖p‖ > 0`` and ``‖p‖/‖u‖``, Adafactor's new column factor), so that later
        reductions join the same collective. The first element-wise reader or reduction of a waiting value,
        or an instruction that would overwrite a buffer a deferred one reads, combines everything waiting
        (:meth:`finish`) and runs the deferred instructions in their order: the program's data flow, and so
        its arithmetic, is unchanged.
        """
        deferred: list[Instr] = []
        held: set[Expr] = set()  # operands of deferred instructions: not released, not overwritten yet
        late_release: list[Expr] = []

        def flush() -> None:
            self.finish(values)
            for waiting in deferred:
                values[waiting.node] = execute(waiting)
            deferred.clear()
            held.clear()
            for done in late_release:
                values.pop(done, None)
            late_release.clear()

        for instr in instrs:
            waits = any(o in self.pending or any(o is d.node for d in deferred) for o in instr.operands)
            overwrites = instr.inplace is not None and instr.operands[instr.inplace] in held
            small = self.kinds[instr.node].kind < Kind.ELEMENT and not _is_reduction(instr)
            if waits and small and not overwrites:
                deferred.append(instr)
                held.update(instr.operands)
                late_release.extend(d for d in instr.release if d is not instr.node)
                continue
            if waits or overwrites:
                flush()
            if not self.start(instr, values):
                values[instr.node] = execute(instr)
            for done in instr.release:
                if done is instr.node:
                    continue
                if done in held:
                    late_release.append(done)
                else:
                    values.pop(done, None)
        flush()

    def start(self, instr: Instr, values: Mapping[Expr, list[Tensor]]) -> bool:
        """Take a reduction instruction whose operand is cut across ranks on some tensor: compute the local
        results of the whole tensors and the partials of the cut ones. ``False``: not such an instruction
        (the caller runs it as in one process)."""
        node = instr.node
        if not _is_reduction(instr):
            return False
        kind = self.kinds[instr.operands[0]].kind
        operand = values[instr.operands[0]]
        cuts = [self._cut(layout, node.op, kind) for layout in self.layouts]
        if not any(cuts):
            return False
        results: list[Tensor | None] = []
        for index, (x, layout, cut) in enumerate(zip(operand, self.layouts, cuts, strict=True)):
            if not cut or layout is None:
                results.append(TORCH_RULES[node.op](x))
                continue
            groups = tuple(dict.fromkeys(g for d in sorted(cut) for g in layout.groups[d]))
            dims = self._reduced_dims(layout, node.op)
            partial = _local_partial(node.op, x, dims)
            self.partials.append(_Partial(node, index, partial, groups, self._count(layout, node.op, kind)))
            results.append(None)
        self.pending[node] = results
        return True

    def finish(self, values: dict[Expr, list[Tensor]]) -> None:
        """Combine every waiting partial (one collective per process group) and store the reduced values."""
        by_groups: dict[tuple[ProcessGroup, ...], list[_Partial]] = {}
        for partial in self.partials:
            by_groups.setdefault(partial.groups, []).append(partial)
        for groups, partials in by_groups.items():
            combined = [p.value for p in partials]
            for group in groups:
                combined = self._combine(group, partials, combined)
            for partial, value in zip(partials, combined, strict=True):
                self.pending[partial.node][partial.index] = _finished(partial.node.op, value, partial.count)
        for node, results in self.pending.items():
            assert all(r is not None for r in results)
            values[node] = [r for r in results if r is not None]
        self.pending.clear()
        self.partials.clear()

    def _combine(self, group: ProcessGroup, partials: list[_Partial], current: list[Tensor]) -> list[Tensor]:
        """One all-gather over ``group`` of every partial, combined in rank order."""
        flat = torch.cat([c.reshape(-1) for c in current])
        size = dist.get_world_size(group)
        gathered = flat.new_empty((size * flat.numel(),))
        _all_gather(gathered, flat, group=group)
        self.collectives += 1
        rows = gathered.view(size, flat.numel())
        out: list[Tensor] = []
        start = 0
        for partial, value in zip(partials, current, strict=True):
            piece = rows[:, start : start + value.numel()]
            start += value.numel()
            merged = piece.amax(dim=0) if partial.node.op in _MAXIMA else piece.sum(dim=0)
            out.append(merged.reshape(value.shape))
        return out

    def _reduced_dims(self, layout: ShardLayout, op: Op) -> tuple[int, ...]:
        if op in ROW_REDUCTIONS:
            return (layout.ndim - 1,)
        if op in COL_REDUCTIONS:
            return (layout.ndim - 2,)
        return tuple(range(layout.ndim))

    def _cut(self, layout: ShardLayout | None, op: Op, kind: Kind) -> frozenset[int]:
        """The reduced dimensions of the operand (of ``kind``) cut across ranks."""
        if layout is None:
            return frozenset()
        return layout.sharded_dims(kind) & frozenset(self._reduced_dims(layout, op))

    def _count(self, layout: ShardLayout, op: Op, kind: Kind) -> int:
        if op in ROW_REDUCTIONS or op in COL_REDUCTIONS:
            return layout.logical_size(kind, self._reduced_dims(layout, op))
        return layout.logical_size(kind)


def _all_gather(output: Tensor, value: Tensor, group: ProcessGroup) -> None:
    """``all_gather_single`` (torch >= 2.13), else its older name ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, value, group=group)


def _is_reduction(instr: Instr) -> bool:
    return instr.form == "op" and OP_INFO[instr.node.op].family in (Family.REDUCE, Family.AXIS_REDUCE)


def _local_partial(op: Op, x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The local part of ``op`` over ``x``: a sum (of squares for a norm) or a maximum (−∞ over nothing)."""
    axis = op in ROW_REDUCTIONS or op in COL_REDUCTIONS
    if op in _MAXIMA:
        y = x.abs() if op is Op.MAX_ABS else x
        if x.numel() == 0:
            shape = list(x.shape)
            if axis:
                shape[dims[0]] = 1
            else:
                shape = []
            return x.new_full(shape, -torch.inf)
        return y.amax(dim=dims[0], keepdim=True) if axis else y.amax()
    y = x.square() if op is Op.NORM else x
    return y.sum(dim=dims[0], keepdim=True) if axis else y.sum()


def _finished(op: Op, combined: Tensor, count: int) -> Tensor:
    """The reduced value from the combined partial: ``√`` of a sum of squares, a sum over the logical count
    for a mean, 0 for a maximum over no element (as one process computes over an empty axis)."""
    if op is Op.NORM:
        return combined.sqrt()
    if op in _MEANS:
        return combined / max(count, 1)
    if op in _MAXIMA and count == 0:
        return torch.zeros_like(combined)
    return combined
