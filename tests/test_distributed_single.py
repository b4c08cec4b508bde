"""portopt.distributed in this process, on a 1-rank gloo mesh: batching of the collectives, the refusals,
and what DCP's dummy step does to every algorithm (no process group needed for that one).

A 1-rank mesh still takes the sharded path (a ``Shard(d)`` placement is a cut, whatever its size), so the
number of collectives and the results are those of any world size; equality with N ranks is shown in
``test_distributed.py``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import portopt
from portopt.algorithms import REGISTRY
from portopt.distributed import ShardingError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed (this torch build lacks it)")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder, "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        try:
            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()


def _sharded(mesh: Any, shapes: list[tuple[int, ...]], dim: int) -> tuple[list[torch.Tensor], list[Any]]:
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(s, generator=gen) for s in shapes]
    placed = [distribute_tensor(t.clone(), mesh, [Shard(dim if t.dim() > dim else 0)]) for t in full]
    return full, [torch.nn.Parameter(p) for p in placed]


def _count_gathers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    original = getattr(dist, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dist, name, counted)
    for other in ("all_reduce", "all_gather", "broadcast", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, other, _forbidden(other))
    return calls


def _forbidden(name: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the step issued a {name}: only the batched all-gather is expected")

    return refuse


@pytest.mark.parametrize(
    ("optimizer", "dim", "per_step"),
    [
        ("LAMB", 0, 1),  # ‖p‖ and ‖u‖ of every tensor: one round
        # matrices (one bucket): the factored statistics of g², then the RMS of the update; vectors (a bucket
        # of their own shape class): the RMS of the update
        ("Adafactor", 0, 2 + 1),
        # as above, and the 3-D tensor's rows are cut: the mean of its row factor needs the row factor first
        ("Adafactor", 1, 3 + 1),
    ],
)
def test_one_collective_per_round_of_reductions(
    mesh: Any, monkeypatch: pytest.MonkeyPatch, optimizer: str, dim: int, per_step: int
) -> None:
    shapes = [(6, 4), (5, 3), (4,), (3, 2, 2)]
    full, params = _sharded(mesh, shapes, dim)
    opt = getattr(portopt, optimizer)(params, lr=0.01)
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    truth = getattr(portopt, optimizer)(plain, lr=0.01)
    calls = _count_gathers(monkeypatch)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(params, plain, grads, strict=True):
            q.grad = g.clone()
            p.grad = _like(p, g.clone())
        opt.step()
        truth.step()
    assert len(calls) == 3 * per_step  # per round of dependent reductions and bucket, not per tensor
    for p, q in zip(params, plain, strict=True):
        torch.testing.assert_close(p.full_tensor(), q.detach())


def _like(param: Any, value: torch.Tensor) -> Any:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements)


def test_explicit_compiled_backend_is_refused_for_a_reducing_spec(mesh: Any) -> None:
    _, params = _sharded(mesh, [(4, 4)], 0)
    opt = portopt.LAMB(params, lr=0.01, backend="compiled")
    params[0].grad = _like(params[0], torch.ones(4, 4))
    before = params[0].full_tensor().clone()
    with pytest.raises(ShardingError, match="backend 'compiled' cannot step sharded"):
        opt.step()
    assert torch.equal(params[0].full_tensor(), before)
    assert not opt.state


def test_element_wise_spec_runs_on_any_backend_on_local_pieces(mesh: Any) -> None:
    full, params = _sharded(mesh, [(4, 4)], 1)
    opt = portopt.AdamW(params, lr=0.01, backend="reference")
    truth = torch.optim.AdamW([q := torch.nn.Parameter(full[0].clone())], lr=0.01)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):  # gradients that change: a state not kept between steps shows (a constant one hides it)
        grad = torch.randn(4, 4, generator=gen)
        q.grad = grad.clone()
        params[0].grad = _like(params[0], grad)
        opt.step()
        truth.step()
    torch.testing.assert_close(params[0].full_tensor(), q.detach())


def test_states_are_dtensors_placed_like_their_parameter(mesh: Any) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    _, params = _sharded(mesh, [(6, 4)], 0)
    opt = portopt.Adafactor(params, lr=0.01)
    params[0].grad = _like(params[0], torch.ones(6, 4))
    opt.step()
    state = opt.state[params[0]]
    rows, cols = state["row_var"], state["col_var"]
    assert isinstance(rows, DTensor)
    assert rows.shape == (6, 1)
    assert rows.placements == (Shard(0),)
    assert isinstance(cols, DTensor)
    assert cols.shape == (1, 4)
    assert cols.placements == (Replicate(),)
    assert not isinstance(state["step"], DTensor)  # on the host, as torch.optim keeps it under FSDP2


@pytest.mark.parametrize("name", sorted(n for n, a in REGISTRY.items() if a.class_name and n != "sparse_adam"))
def test_dcp_dummy_step_moves_no_parameter_and_load_restores_the_step(name: str) -> None:
    """DCP's ``set_state_dict``/``get_state_dict`` initialise an empty optimizer with a step of zero gradients
    and ``lr = 0`` (``_init_optim_state``): no portopt algorithm moves a parameter then, and loading a
    checkpoint replaces the states and the step counter it made."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    cls = getattr(portopt, REGISTRY[name].class_name)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    trained = cls([torch.nn.Parameter(p.detach().clone()) for p in params])
    for _ in range(3):
        for p in trained.param_groups[0]["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
        trained.step()
    before = [p.detach().clone() for p in params]
    opt = cls(params)
    _init_optim_state(opt)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b), f"{name}: the dummy step moved a parameter"
    opt.load_state_dict(trained.state_dict())
    assert [float(opt.state[p]["step"]) for p in params] == [3.0, 3.0]


def test_8bit_states_of_sharded_pieces_are_not_checkpointed_silently(mesh: Any) -> None:
    _, params = _sharded(mesh, [(16, 256)], 0)
    opt = portopt.AdamW(params, lr=0.01, precision="q8-states")
    params[0].grad = _like(params[0], torch.ones(16, 256))
    opt.step()
    with pytest.raises(ShardingError, match="cannot checkpoint the 8-bit states"):
        opt.state_dict()
