"""How a sharded parameter lies on its device mesh, and its local views for one step.

Under FSDP2 (``fully_shard``) and tensor parallelism a parameter is a :class:`DTensor`: a logical
tensor of shape ``L`` cut along some of its dimensions (``Shard(d)``), each rank holding one piece
(``to_local()``), or replicated (``Replicate()``). portopt steps the local pieces: element-wise work
is local, and what depends on the whole tensor is taken from the logical tensor:

* **shape facts** (``numel()``, ``size(k)``, ``ndim()``: Adafactor's shape class and relative step
  size, the 8-bit size threshold) are those of ``L``;
* **reductions** (:mod:`portopt.distributed.reductions`) are completed over the mesh dimensions
  that shard a reduced dimension.

A :class:`ShardLayout` records this for one tensor; :func:`local_views` hands the backend the local
pieces with their layout attached (:func:`layout_of`), and wraps the states created in the step into
DTensors placed like their parameter, so that ``state_dict``, DCP and resharding see what torch.optim's
optimizers leave under FSDP2. Nothing here is device-specific: the collectives run on the mesh's
process groups (gloo, NCCL, HCCL, ...).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from portopt.lowering.backend import Backend, ParamState
from portopt.lowering.interpreter import TensorFacts, tensor_facts
from portopt.spec.analysis import Kind
from portopt.spec.definition import Spec
from portopt.spec.expr import walk
from portopt.spec.ops import OP_INFO, Family, Op
from portopt.spec.symbols import Layout

if TYPE_CHECKING:
    from torch.distributed.tensor import DeviceMesh, DTensor

    from portopt.optim.torch_flags import Mode

_ATTRIBUTE = "_portopt_shard_layout"


class ShardingError(ValueError):
    """A distributed parameter portopt cannot step exactly (a placement it does not support)."""


@dataclass(frozen=True)
class ShardLayout:
    """One parameter's logical shape and, per sharded tensor dimension, the process groups that cut it.

    ``groups[d]`` lists the mesh dimensions' process groups that shard tensor dimension ``d`` (usually
    one); a reduction over ``d`` is completed over each of them. ``offset`` is the local piece's
    position in the logical tensor.
    """

    mesh: DeviceMesh
    placements: tuple[Any, ...]
    logical_shape: tuple[int, ...]
    offset: tuple[int, ...]
    groups: dict[int, tuple[ProcessGroup, ...]]

    @classmethod
    def of(cls, tensor: DTensor) -> ShardLayout:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = tuple(tensor.placements)
        shape = tuple(tensor.shape)
        groups: dict[int, list[ProcessGroup]] = {}
        for mesh_dim, placement in enumerate(placements):
            if isinstance(placement, Replicate):
                continue
            if type(placement) is not Shard:
                raise ShardingError(
                    f"portopt steps parameters placed as Shard(d) or Replicate() on their mesh; got placement "
                    f"{placement!r} for a parameter of shape {shape} (mesh {tensor.device_mesh})"
                )
            dim = placement.dim % max(len(shape), 1)
            groups.setdefault(dim, []).append(tensor.device_mesh.get_group(mesh_dim))
        _, offset = compute_local_shape_and_global_offset(shape, tensor.device_mesh, placements)
        return cls(tensor.device_mesh, placements, shape, tuple(offset), {d: tuple(g) for d, g in groups.items()})

    @property
    def ndim(self) -> int:
        return len(self.logical_shape)

    def sharded_dims(self, kind: Kind) -> frozenset[int]:
        """The tensor dimensions cut across ranks in a value of ``kind`` derived from this parameter: all
        sharded ones for an element-wise value, none for a per-tensor one; a row (column) value has size 1,
        hence is whole, along the last (second-to-last) dimension."""
        if kind <= Kind.TENSOR:
            return frozenset()
        reduced = {Kind.ROW: {self.ndim - 1}, Kind.COL: {self.ndim - 2}, Kind.SLICE: {self.ndim - 1, self.ndim - 2}}
        return frozenset(self.groups) - reduced.get(kind, set())

    def logical_size(self, kind: Kind, dims: Sequence[int] | None = None) -> int:
        """How many logical elements a value of ``kind`` has along ``dims`` (``None``: all dimensions)."""
        shape = list(self.logical_shape)
        if kind <= Kind.TENSOR:
            return 1
        if kind in (Kind.ROW, Kind.SLICE):
            shape[-1] = 1
        if kind in (Kind.COL, Kind.SLICE):
            shape[-2] = 1
        count = 1
        for d in range(len(shape)) if dims is None else dims:
            count *= shape[d]
        return count

    def flat_range(self, local_shape: Sequence[int]) -> tuple[int, int] | None:
        """``(start, length)`` of the local piece in the logical tensor's row-major order when the piece is
        one contiguous run of it (a cut along the first dimension that is not 1), else ``None``."""
        cut = [d for d in range(self.ndim) if self.logical_shape[d] != local_shape[d]]
        if not cut:
            return 0, int(torch.Size(local_shape).numel())
        if any(self.logical_shape[d] != 1 for d in range(cut[0])) or len(cut) > 1:
            return None
        inner = int(torch.Size(self.logical_shape[cut[0] + 1 :]).numel())
        return self.offset[cut[0]] * inner, int(torch.Size(local_shape).numel())


def layout_of(tensor: object) -> ShardLayout | None:
    """The layout attached to a local piece by :func:`local_views` (``None``: an ordinary tensor)."""
    return getattr(tensor, _ATTRIBUTE, None)


def carry_layout(piece: Tensor, other: Tensor) -> Tensor:
    """``other`` (a tensor stepped in ``piece``'s place: its float32 master copy) with ``piece``'s layout."""
    layout = layout_of(piece)
    if layout is not None:
        setattr(other, _ATTRIBUTE, layout)
    return other


def logical_facts(tensor: Tensor) -> TensorFacts:
    """The shape facts a spec reads for ``tensor``: its logical tensor's, for a local piece."""
    layout = layout_of(tensor)
    facts = tensor_facts(tensor)
    if layout is None:
        return facts
    return TensorFacts(layout.logical_shape, facts.dtype)


def logical_shape(tensor: Tensor) -> torch.Size:
    """The logical shape of ``tensor`` (its own for an ordinary tensor)."""
    layout = layout_of(tensor)
    return tensor.shape if layout is None else torch.Size(layout.logical_shape)


def check_blocks_whole(piece: Tensor, state: str, block_size: int) -> None:
    """Refuse an 8-bit state of a sharded piece whose blocks would not be the logical tensor's.

    8-bit states (:mod:`portopt.precision.quantize`) cut a tensor, in row-major order, into blocks of
    ``block_size`` elements, each with its own absmax; whether a state is 8-bit at all is decided on the
    logical tensor (``min_8bit_size``). A local piece holds the logical tensor's own blocks, and so
    quantises exactly as one process does whatever the world size, when it is one contiguous run of the
    logical tensor that starts and ends on block boundaries (or at the tensor's end): ``Shard(0)`` of a
    tensor whose rows per rank times row length is a multiple of ``block_size``.
    """
    layout = layout_of(piece)
    if layout is None or not layout.groups:
        return
    run = layout.flat_range(tuple(piece.shape))
    total = int(torch.Size(layout.logical_shape).numel())
    if run is not None:
        start, length = run
        if start % block_size == 0 and ((start + length) % block_size == 0 or start + length == total):
            return
    raise ShardingError(
        f"8-bit state {state!r} of a parameter of shape {layout.logical_shape} placed {layout.placements}: the "
        f"local piece of shape {tuple(piece.shape)} at offset {layout.offset} does not hold whole blocks of "
        f"{block_size} elements of the logical tensor, so its 8-bit blocks would differ from one process's; "
        f"accepted: Shard(0) with (rows per rank x row length) a multiple of block_size (choose block_size= "
        f"in the precision policy), or this state in fp32/bf16 (precision='q8-states,{state}=fp32')"
    )


@functools.lru_cache(maxsize=256)
def reads_whole_tensor(spec: Spec) -> bool:
    """Whether ``spec`` reads more of a tensor than one element at a time: a reduction, a row/column
    statistic or a shape fact (``numel``, ``size``, ``finfo`` aside). Such a spec steps sharded pieces
    exactly only on a backend that :attr:`~portopt.lowering.backend.Backend.shards`."""
    whole = (Family.REDUCE, Family.AXIS_REDUCE)
    return any(OP_INFO[n.op].family in whole or n.op in (Op.NUMEL, Op.SIZE) for n in walk(list(spec.roots)))


def check_sharded_mode(spec: Spec, backend: Backend | str, mode: Mode) -> None:
    """Refuse, before anything is written, a way of stepping the sharded pieces of a spec that reads whole
    tensors (:func:`reads_whole_tensor`) that would reduce over a piece only: a named backend that does not
    :attr:`~portopt.lowering.backend.Backend.shards` (``compiled``, ``reference``, ...), or a traced step
    (``capturable``, ``differentiable``: its reductions are not completed over the mesh yet)."""
    from portopt import backends

    named = backends.named_backend(backend) if isinstance(backend, str) and backend != "auto" else backend
    if isinstance(named, Backend) and not named.shards:
        raise ShardingError(
            f"backend {named.name!r} cannot step sharded (DTensor) parameters of {spec.name}: its reductions "
            f"would cover each rank's local piece only; use backend='auto' or 'torch' (element-wise specs "
            f"such as AdamW run on any backend)"
        )
    if mode.graph:
        raise ShardingError(
            f"{mode.value}=True steps of sharded (DTensor) parameters of {spec.name} are not supported: their "
            f"reductions are completed over the mesh only in the eager step; use {mode.value}=False"
        )


def agreed(flag: bool, pieces: Sequence[Tensor]) -> bool:
    """``flag`` or'ed over every process group that cuts one of ``pieces`` (the local pieces of one step):
    what ``skip_nonfinite`` decides from each rank's own gradients, agreed so that every rank skips or
    steps together. One all-reduce per distinct group; nothing for ordinary tensors."""
    groups: dict[int, tuple[ProcessGroup, torch.device]] = {}
    for piece in pieces:
        layout = layout_of(piece)
        if layout is not None:
            for cut in layout.groups.values():
                for group in cut:
                    groups.setdefault(id(group), (group, piece.device))
    for group, device in groups.values():
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
        flag = bool(value.item())
    return flag


def check_checkpointable(state: Mapping[Any, Mapping[str, Any]]) -> None:
    """Refuse to checkpoint 8-bit states of sharded parameters: each rank holds the codes and block maxima of
    its own piece as plain tensors, which a DCP checkpoint would take for replicated values (one rank's
    kept, the others' lost)."""
    from portopt.precision.quantize import Q8State

    if "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import DTensor

    for param, values in state.items():
        if isinstance(param, DTensor):
            quantized = sorted(k for k, v in values.items() if isinstance(v, Q8State))
            if quantized:
                raise ShardingError(
                    f"cannot checkpoint the 8-bit states {quantized} of a sharded parameter of shape "
                    f"{tuple(param.shape)} placed {tuple(param.placements)}: 8-bit states of local pieces do not "
                    f"reshard yet; keep these states in fp32 or bf16 (precision='q8-states,{quantized[0]}=bf16', "
                    f"...) to checkpoint with DCP"
                )


def is_distributed(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (none can be before torch's DTensor module is imported: this
    costs nothing, and imports nothing, in a process that does not use it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(p, module.DTensor) for p in params)


def _keep_entry(param: DTensor, state: ParamState, key: str, value: Any, layout: Layout) -> None:
    """Store a local state entry a step left in ``state`` (the parameter's own, DTensor states)."""
    from torch.distributed.tensor import DTensor

    current = state.get(key)
    if current is value:
        return
    if not isinstance(current, DTensor):
        state[key] = value
        return
    target = current.to_local()
    if isinstance(value, Tensor) and target.data_ptr() == value.data_ptr() and target.shape == value.shape:
        return  # written in place through the local view
    if isinstance(value, Tensor) and target.shape == value.shape and target.dtype == value.dtype:
        target.copy_(value)
    else:
        state[key] = as_distributed(value, param, layout)


def local_views(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], layouts: Mapping[str, Layout]
) -> tuple[list[Tensor], list[Tensor], list[ParamState], Callable[[], None]]:
    """The local pieces of ``params``, ``grads`` and their states (views: the step writes through them),
    each parameter piece carrying its :class:`ShardLayout`, and a function to run once the step succeeded:
    it stores the states the step created into ``states`` as DTensors (:func:`as_distributed`; ``layouts``
    says how each named state lies relative to its parameter), and the entries it replaced instead of
    writing into them (:func:`_keep_entry`)."""
    from torch.distributed.tensor import DTensor

    local_params: list[Tensor] = []
    local_grads: list[Tensor] = []
    local_states: list[ParamState] = []
    created: list[tuple[DTensor, ParamState, ParamState]] = []
    kept: list[tuple[DTensor, ParamState, ParamState]] = []
    for param, grad, state in zip(params, grads, states, strict=True):
        if not isinstance(param, DTensor):
            local_params.append(param)
            local_grads.append(grad)
            local_states.append(state)
            continue
        layout = ShardLayout.of(param)
        if not isinstance(grad, DTensor) or tuple(grad.placements) != layout.placements:
            where = "a plain tensor" if not isinstance(grad, DTensor) else f"placements {tuple(grad.placements)}"
            raise ShardingError(
                f"a DTensor parameter of shape {layout.logical_shape} placed {layout.placements} has a gradient "
                f"with {where}; portopt needs the gradient placed like its parameter (FSDP2 does this)"
            )
        piece = param.to_local()
        setattr(piece, _ATTRIBUTE, layout)
        local_params.append(piece)
        local_grads.append(grad.to_local())
        local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}
        local_states.append(local)
        if not state:
            created.append((param, state, local))
        else:
            kept.append((param, state, local))

    def keep_created() -> None:
        for param, state, local in created:
            state.update({k: as_distributed(v, param, layouts.get(k, Layout.ELEMENTWISE)) for k, v in local.items()})
        # A backend may replace an entry of the local copy instead of writing into it (the reference
        # backend's new tensors; the step counter made a view of one tensor holding every counter of
        # its plan): the parameter's own state takes what the backend left there.
        for param, state, local in kept:
            for key, value in local.items():
                _keep_entry(param, state, key, value, layouts.get(key, Layout.ELEMENTWISE))

    return local_params, local_grads, local_states, keep_created


def as_distributed(value: Any, param: DTensor, layout: Layout) -> Any:
    """A state made on ``param``'s local piece as a DTensor of ``param``'s mesh: an element-wise state
    placed like ``param``; a row (column) factor likewise, but replicated along the last (second-to-last)
    dimension, which it has reduced. 0-d values (the step counter, per-tensor states: equal on every rank)
    and 8-bit states (local codes and block maxima) stay as they are."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(value, Tensor) or isinstance(value, DTensor) or value.dim() == 0:
        return value
    shape = list(param.shape)
    reduced = {Layout.ROW: {len(shape) - 1}, Layout.COL: {len(shape) - 2}}.get(layout, set())
    placements = [
        Replicate() if isinstance(p, Shard) and p.dim % len(shape) in reduced else p for p in param.placements
    ]
    logical = [1 if d in reduced else n for d, n in enumerate(shape)]
    return DTensor.from_local(
        value, param.device_mesh, placements, run_check=False, shape=torch.Size(logical), stride=_strides(logical)
    )


def _strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of ``shape``."""
    strides: list[int] = []
    running = 1
    for n in reversed(shape):
        strides.append(running)
        running *= max(n, 1)
    return tuple(reversed(strides))
