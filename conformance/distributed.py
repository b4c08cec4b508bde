"""The conformance suite under N ranks: ``portopt conformance --distributed N``.

Every rank of a process group (gloo processes on localhost, :func:`~portopt.distributed.launch.run_ranks`)
runs the same cases in the same order, with the same float64 reference chain
(:mod:`portopt.conformance.chain`), so the sharded steps' collectives line up; rank 0's results are the
report. The implementation under test, :class:`ShardedImplementation`, is portopt's front end over
DTensor parameters cut ``Shard(d)`` over the ranks (what FSDP2 hands an optimizer; ``d = 1`` where a
tensor has a second dimension, else ``Shard(0)``; 0-d tensors replicated; uneven cuts and empty pieces
included), in every precision of the suite (master weights too: the float32 master copy is a DTensor
placed like its parameter). The session compares, step by step, the gathered parameters, every state, the
master copy and the step counters with the reference, under the same tolerances as a one-process run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from portopt.conformance.candidates import Instance, Setup, front_end_reason
from portopt.conformance.cases import Case
from portopt.conformance.precision import Precision
from portopt.spec.definition import Spec


@dataclass(frozen=True)
class ShardedImplementation:
    """portopt's front end (``backend``) stepping DTensor parameters cut ``Shard(shard_dim)`` over the world."""

    world_size: int
    shard_dim: int = 0
    backend: str = "auto"
    requires_step_counter: bool = True

    @property
    def name(self) -> str:
        prefix = "portopt" if self.backend == "auto" else f"portopt {self.backend}"
        return f"{prefix} Shard({self.shard_dim}) x{self.world_size}"

    def unavailable_reason(self, case: Case, spec: Spec, precision: Precision, device: str) -> str | None:
        if device != "cpu":
            return "the distributed mode runs gloo ranks on the CPU here"
        return front_end_reason(case, precision)

    def instantiate(self, setup: Setup) -> Instance:
        return ShardedInstance(setup, self.shard_dim, self.backend)


def _local(full: Tensor, like: Any) -> Tensor:
    """The piece of ``full`` (a whole tensor) that this rank holds of the DTensor ``like``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh, like.placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    return full[index] if index else full


class ShardedInstance:
    """The problem's parameters as DTensors on a 1-D mesh of every rank, stepped by ``portopt.Optimizer``;
    ``params`` are whole tensors the session reads and writes, kept in step with the pieces."""

    def __init__(self, setup: Setup, shard_dim: int, backend: str) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        import portopt

        world = torch.distributed.get_world_size()
        self.mesh = init_device_mesh("cpu", (world,))
        self.params = setup.params
        self.sharded: list[Any] = []
        for p in setup.params:
            dim = shard_dim if p.dim() > shard_dim else 0
            placement = Shard(dim) if p.dim() > 0 else Replicate()
            shell = DTensor.from_local(
                torch.empty(0), self.mesh, [placement], run_check=False, shape=p.shape, stride=p.contiguous().stride()
            )
            piece = _local(p.detach(), shell).contiguous().clone()
            dtensor = DTensor.from_local(
                piece, self.mesh, [placement], run_check=False, shape=p.shape, stride=p.contiguous().stride()
            )
            self.sharded.append(torch.nn.Parameter(dtensor, requires_grad=p.requires_grad))
        groups = []
        index = {id(p): i for i, p in enumerate(setup.params)}
        for group in setup.param_groups():
            groups.append({**group, "params": [self.sharded[index[id(p)]] for p in group["params"]]})
        policy = setup.precision.policy if setup.precision.needs_policy else None
        self.optimizer = portopt.Optimizer(
            groups, setup.spec, backend=backend, skip_nonfinite=setup.skip_nonfinite, precision=policy
        )

    def step(self, grads: Sequence[Tensor | None]) -> None:
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            for full, piece in zip(self.params, self.sharded, strict=True):
                piece.to_local().copy_(_local(full, piece))
        for piece, grad in zip(self.sharded, grads, strict=True):
            if grad is None:
                piece.grad = None
                continue
            local = _local(grad, piece).contiguous().clone()
            piece.grad = DTensor.from_local(
                local, self.mesh, piece.placements, run_check=False, shape=piece.shape, stride=piece.stride()
            )
        self.optimizer.step()
        with torch.no_grad():
            for full, piece in zip(self.params, self.sharded, strict=True):
                full.copy_(piece.full_tensor())

    def read_state(self, index: int) -> dict[str, Tensor]:
        from torch.distributed.tensor import DTensor

        state = self.optimizer.state.get(self.sharded[index], {})
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            if isinstance(value, DTensor):
                out[key] = value.full_tensor()
            elif isinstance(value, Tensor):
                out[key] = value
        return out

    def write_state(self, index: int, values: Mapping[str, Tensor]) -> None:
        from torch.distributed.tensor import DTensor

        state = self.optimizer.state[self.sharded[index]]
        with torch.no_grad():
            for key, value in values.items():
                old = state.get(key)
                if isinstance(old, DTensor):
                    old.to_local().copy_(_local(value.to(old.dtype), old))
                elif isinstance(old, Tensor):
                    old.copy_(value.to(old.dtype))
                elif value.dim() and tuple(value.shape) == tuple(self.sharded[index].shape):  # a master copy
                    piece = self.sharded[index]
                    state[key] = DTensor.from_local(
                        _local(value, piece).contiguous().clone(),
                        self.mesh,
                        piece.placements,
                        run_check=False,
                        shape=piece.shape,
                        stride=piece.stride(),
                    )
                else:
                    state[key] = value.clone()


def run_on_rank(rank: int, world_size: int, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """On every rank: the payload's cases (by name) x shard dims x precisions, in one order; rank 0's results
    as dicts (:meth:`~portopt.conformance.results.RunResult.to_dict`)."""
    from portopt.conformance.cases import build_cases
    from portopt.conformance.precision import get_precision
    from portopt.conformance.runner import RunOptions, run_case

    wanted = set(payload["cases"])
    cases = [c for c in build_cases(payload["algorithms"], quick=payload["quick"]) if c.name in wanted]
    options = RunOptions(drift=payload.get("drift", True), diagnose=False)
    results = []
    for case in cases:
        for dim in payload["dims"]:
            for name in payload["precisions"]:
                impl = ShardedImplementation(world_size, dim)
                result = run_case(case, impl, get_precision(name), options=options)
                results.append(result.to_dict())
    return results if rank == 0 else []


def run_distributed(
    cases: Sequence[Case],
    precisions: Sequence[Precision],
    world_size: int,
    *,
    quick: bool,
    algorithms: Sequence[str] | None,
    dims: Sequence[int] = (0, 1),
    drift: bool = True,
) -> list[Any]:
    """``cases`` under ``world_size`` gloo ranks (module doc): the results, as one process reports them."""
    from portopt.conformance.results import RunResult
    from portopt.distributed.launch import run_ranks

    payload = {
        "cases": [c.name for c in cases],
        "algorithms": list(algorithms) if algorithms else None,
        "quick": quick,
        "dims": list(dims),
        "precisions": [p.name for p in precisions],
        "drift": drift,
    }
    rows = run_ranks("portopt.conformance.distributed:run_on_rank", world_size, payload, timeout_s=600.0)[0]
    return [RunResult.from_dict(r) for r in rows]
