"""Sharded runs compared with one process: the checks behind the distributed tests and conformance mode.

Each check runs on every rank of a process group (:func:`~portopt.distributed.launch.run_ranks`) and, on
rank 0, the same optimizer in one process on the whole tensors (and torch.optim's where it has the
algorithm): the independent truth. A case is a JSON dict::

    {
        "id": "lamb-shard0",
        "optimizer": "LAMB",
        "hypers": {"lr": 0.01},
        "precision": null,
        "shard_dim": 0,
        "steps": 8,
        "shapes": [[12, 8], [8], [7, 5]],
        "torch": null,
    }

``optimizer`` names a class of :mod:`portopt` (``torch``: one of :mod:`torch.optim`). Gradients are a
fixed stream (seeded per step and tensor), placed on the mesh like their parameter. Results are the
largest absolute differences of parameters and states after the last step, and how far they exceed the
float32 tolerance ``atol + rtol·|truth|`` (``excess <= 0``: within it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

RTOL, ATOL = 1.3e-6, 1e-5
"""torch.testing's float32 tolerance."""


def initial_params(shapes: Sequence[Sequence[int]], seed: int = 0) -> list[Tensor]:
    """The starting parameters of a case (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=gen) for shape in shapes]


def gradient(step: int, index: int, shape: Sequence[int], seed: int = 0) -> Tensor:
    """The gradient of parameter ``index`` at ``step`` (a fixed stream)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + index)
    return torch.randn(tuple(shape), generator=gen)


def case_gradient(case: dict[str, Any], step: int, index: int, shape: Sequence[int]) -> Tensor:
    """:func:`gradient`, with ``inf`` at the places ``case["inf_at"]`` lists (``[step, tensor, flat index]``)."""
    grad = gradient(step, index, shape)
    for at_step, at_tensor, at_element in case.get("inf_at", ()):
        if (at_step, at_tensor) == (step, index):
            grad.view(-1)[at_element] = float("inf")
    return grad


def make_optimizer(case: dict[str, Any], params: list[Any], which: str = "optimizer") -> torch.optim.Optimizer:
    """The optimizer of ``case`` (``which``: ``"optimizer"``, portopt's; ``"torch"``, torch.optim's)."""
    import portopt

    hypers = dict(case.get("hypers", {}))
    cls: type[torch.optim.Optimizer] = (
        getattr(torch.optim, case["torch"]) if which == "torch" else getattr(portopt, case["optimizer"])
    )
    if which != "torch":
        if case.get("precision"):
            hypers["precision"] = case["precision"]
        if "backend" in case:
            hypers["backend"] = case["backend"]
    return cls(params, **hypers)


def one_process(case: dict[str, Any], which: str = "optimizer", with_storage: bool = False) -> Any:
    """Parameters and states after ``case``'s steps in this process on whole tensors (and how the states are
    stored)."""
    params = [p.requires_grad_() for p in initial_params(case["shapes"])]
    opt = make_optimizer(case, params, which)
    for step in range(case["steps"]):
        for i, p in enumerate(params):
            p.grad = case_gradient(case, step, i, p.shape)
        opt.step()
    result = [p.detach() for p in params], [_tensor_states(opt.state[p]) for p in params]
    return (*result, [storage(opt.state[p]) for p in params]) if with_storage else result


def _tensor_states(state: dict[str, Any], param: Tensor | None = None) -> dict[str, Tensor]:
    """Every state as a whole tensor: DTensors gathered, 8-bit states dequantised (and gathered, for the
    local piece of ``param``, a DTensor)."""
    from torch.distributed.tensor import DTensor

    from portopt.precision.quantize import Q8State

    out = {}
    for name, value in state.items():
        if isinstance(value, Q8State):
            loaded = value.load()
            if isinstance(param, DTensor):
                loaded = DTensor.from_local(
                    loaded,
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                ).full_tensor()
            out[name] = loaded
        elif isinstance(value, DTensor):
            out[name] = value.full_tensor()
        elif isinstance(value, Tensor):
            out[name] = value
    return out


def storage(state: dict[str, Any]) -> dict[str, str]:
    """How each state is stored: ``"q8"`` or its dtype."""
    from portopt.precision.quantize import Q8State

    return {k: "q8" if isinstance(v, Q8State) else str(v.dtype) for k, v in state.items() if k != "step"}


def compare(got: Iterable[Tensor], truth: Iterable[Tensor]) -> dict[str, float]:
    """Largest absolute difference and largest excess over the float32 tolerance."""
    error, excess = 0.0, -float("inf")
    for a, b in zip(got, truth, strict=True):
        if a.shape != b.shape:
            return {"error": float("inf"), "excess": float("inf")}
        a64, b64 = a.double(), b.double()
        diff = (a64 - b64).abs()
        if diff.numel():
            error = max(error, float(diff.max()))
            excess = max(excess, float((diff - (ATOL + RTOL * b64.abs())).max()))
    return {"error": error, "excess": excess}


def _states_compared(got: list[dict[str, Tensor]], truth: list[dict[str, Tensor]]) -> dict[str, float]:
    pairs_a: list[Tensor] = []
    pairs_b: list[Tensor] = []
    for a, b in zip(got, truth, strict=True):
        for name in sorted(set(a) & set(b)):
            pairs_a.append(a[name].reshape(-1).float())
            pairs_b.append(b[name].reshape(-1).float())
        if set(a) != set(b):
            return {"error": float("inf"), "excess": float("inf")}
    return compare(pairs_a, pairs_b)


def _report(case: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]]) -> dict[str, Any]:
    truth_p, truth_s, truth_storage = one_process(case, with_storage=True)
    report: dict[str, Any] = {"id": case["id"], "params": compare(params, truth_p), "storage_1p": truth_storage}
    report["states"] = _states_compared(states, truth_s)
    if case.get("torch"):
        torch_p, _ = one_process(case, "torch")
        report["torch"] = compare(params, torch_p)
    return report


def fsdp(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case stepped under FSDP2 (``fully_shard`` on a 1-D mesh, ``Shard(shard_dim)`` where a tensor has
    that dimension, else ``Shard(0)``); on rank 0, the comparison with one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    reports = []
    for case in cases:
        dim = int(case.get("shard_dim", 0))
        module = _module(initial_params(case["shapes"]))
        fully_shard(module, mesh=mesh, shard_placement_fn=functools.partial(_placement, dim, world_size))
        params: list[Any] = list(module.parameters())
        opt = make_optimizer(case, params)
        if "expect_error" in case:
            reports.append(_refused(case, opt, params, mesh) if rank == 0 else {})
            if rank != 0:
                _refused(case, opt, params, mesh)
            continue
        for step in range(case["steps"]):
            for i, p in enumerate(params):
                p.grad = distribute_tensor(case_gradient(case, step, i, p.shape), mesh, p.placements)
            opt.step()
        full = [p.full_tensor().detach() for p in params]
        states = [_tensor_states(opt.state[p], p) for p in params]
        if rank == 0:
            report = _report(case, full, states)
            report["storage"] = [storage(opt.state[p]) for p in params]
            report["backends"] = opt.chosen_backends() if hasattr(opt, "chosen_backends") else []
            report["placements"] = [str(tuple(p.placements)) for p in params]
            reports.append(report)
    return reports


def _refused(case: dict[str, Any], opt: torch.optim.Optimizer, params: list[Any], mesh: Any) -> dict[str, Any]:
    """The first step of a case that must be refused: the error, and whether nothing changed."""
    from torch.distributed.tensor import distribute_tensor

    before = [p.full_tensor().detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = distribute_tensor(case_gradient(case, 0, i, p.shape), mesh, p.placements)
    try:
        opt.step()
    except Exception as exc:  # reported to the test, which checks the type and the message
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = ""
    unchanged = all(torch.equal(p.full_tensor(), b) for p, b in zip(params, before, strict=True))
    return {"id": case["id"], "error": error, "unchanged": unchanged and not opt.state}


def _train_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6))


def _batch(step: int) -> Tensor:
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(7919 + step))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        opt.zero_grad()
        model(_batch(step)).square().mean().backward()
        opt.step()


def train(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real training steps (forward, backward, step) of a small MLP wrapped as ``case["wrap"]`` (``"ddp"`` or
    ``"fsdp2"``, every layer and the root sharded), every rank on the same batches, so the averaged gradients
    are one process's; on rank 0, the parameters compared with one process training the unwrapped model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    reports = []
    for case in cases:
        model = _train_model()
        if case["wrap"] == "ddp":
            wrapped: torch.nn.Module = DistributedDataParallel(model)
            params = list(model.parameters())
        else:
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in model.children():
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
            params = list(model.parameters())
        opt = make_optimizer(case, params)
        _train(wrapped, opt, case["steps"])
        got = [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in params]
        if rank == 0:
            single = _train_model()
            _train(single, make_optimizer(case, list(single.parameters())), case["steps"])
            reports.append({"id": case["id"], "params": compare(got, [p.detach() for p in single.parameters()])})
    return reports


def suite(rank: int, world_size: int, payload: dict[str, Any]) -> dict[str, Any]:
    """``fsdp``, ``zero``, ``train`` and ``dcp_save`` (a list of saves) of one payload in one process group (one start-up
    for all)."""
    out: dict[str, Any] = {"world_size": world_size}
    if payload.get("fsdp"):
        out["fsdp"] = fsdp(rank, world_size, payload["fsdp"])
    if payload.get("zero"):
        out["zero"] = zero(rank, world_size, payload["zero"])
    if payload.get("train"):
        out["train"] = train(rank, world_size, payload["train"])
    if payload.get("dcp"):
        out["dcp"] = [dcp_save(rank, world_size, save) for save in payload["dcp"]]
    return out


def zero(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case stepped under ZeRO-1 (``ZeroRedundancyOptimizer(optimizer_class=...)``: each rank steps
    whole tensors of its partition and broadcasts them); on rank 0, the comparison with one process."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import portopt

    reports = []
    for case in cases:
        params = [p.requires_grad_() for p in initial_params(case["shapes"])]
        hypers = dict(case.get("hypers", {}))
        if case.get("precision"):
            hypers["precision"] = case["precision"]
        opt = ZeroRedundancyOptimizer(params, optimizer_class=getattr(portopt, case["optimizer"]), **hypers)
        for step in range(case["steps"]):
            for i, p in enumerate(params):
                p.grad = case_gradient(case, step, i, p.shape)
            opt.step()
        if rank == 0:
            truth, _ = one_process(case)
            report = {"id": case["id"], "params": compare([p.detach() for p in params], truth)}
            if case.get("torch"):
                report["torch"] = compare([p.detach() for p in params], one_process(case, "torch")[0])
            reports.append(report)
    return reports


def dcp_save(rank: int, world_size: int, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload["case"]`` for ``payload["saved_at"]`` steps under FSDP2, saved with DCP into
    ``payload["path"]`` (``get_state_dict``: the model and the optimizer, states resharded on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    case = payload["case"]
    dim = int(case.get("shard_dim", 0))
    mesh = init_device_mesh("cpu", (world_size,))
    module = _module(initial_params(case["shapes"]))
    fully_shard(module, mesh=mesh, shard_placement_fn=functools.partial(_placement, dim, world_size))
    params: list[Any] = list(module.parameters())
    opt = make_optimizer(case, params)
    for step in range(payload["saved_at"]):
        for i, p in enumerate(params):
            p.grad = distribute_tensor(case_gradient(case, step, i, p.shape), mesh, p.placements)
        opt.step()
    model_sd, optim_sd = get_state_dict(module, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=payload["path"])
    return {"placements": [str(tuple(p.placements)) for p in params]}


def dcp_resume(case: dict[str, Any], path: str, saved_at: int) -> dict[str, Any]:
    """In this process (no process group): a fresh model and optimizer loaded from the DCP checkpoint at
    ``path`` with ``set_state_dict`` (whose dummy step with zero gradients and ``lr = 0`` creates the
    states before they are overwritten), then stepped on to ``case["steps"]``, compared with one process
    that never stopped. Also reports the step counters and parameters right after loading."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    module = _module([torch.zeros(tuple(s)) for s in case["shapes"]])
    params: list[Any] = list(module.parameters())
    opt = make_optimizer(case, params)
    model_sd, optim_sd = get_state_dict(module, opt)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    after_load = [float(opt.state[p]["step"]) for p in params]
    loaded = [p.detach().clone() for p in params]
    for step in range(saved_at, case["steps"]):
        for i, p in enumerate(params):
            p.grad = case_gradient(case, step, i, p.shape)
        opt.step()
    partial = dict(case, steps=saved_at)
    truth_at_save, _ = one_process(partial)
    report = _report(case, [p.detach() for p in params], [_tensor_states(opt.state[p]) for p in params])
    report["steps_after_load"] = after_load
    report["loaded"] = compare(loaded, truth_at_save)
    return report


def dcp_load(rank: int, world_size: int, payload: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint ``payload["path"]`` (saved by :func:`dcp_save`, on any world size) loaded under FSDP2 on
    this world size, stepped on to the case's last step; on rank 0, the comparison with one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    case, saved_at = payload["case"], payload["saved_at"]
    mesh = init_device_mesh("cpu", (world_size,))
    module = _module([torch.zeros(tuple(s)) for s in case["shapes"]])
    fully_shard(module, mesh=mesh, shard_placement_fn=functools.partial(_placement, case["shard_dim"], world_size))
    params: list[Any] = list(module.parameters())
    opt = make_optimizer(case, params)
    model_sd, optim_sd = get_state_dict(module, opt)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=payload["path"])
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    after_load = [float(opt.state[p]["step"]) for p in params]
    for step in range(saved_at, case["steps"]):
        for i, p in enumerate(params):
            p.grad = distribute_tensor(case_gradient(case, step, i, p.shape), mesh, p.placements)
        opt.step()
    full = [p.full_tensor().detach() for p in params]
    states = [_tensor_states(opt.state[p], p) for p in params]
    if rank != 0:
        return {}
    report = _report(case, full, states)
    report["steps_after_load"] = after_load
    return report


def _placement(dim: int, world_size: int, param: Tensor) -> Any:
    """``Shard(dim)`` where the tensor has that dimension and FSDP2 can cut it evenly (it shards only dim 0
    unevenly), else ``Shard(0)``."""
    from torch.distributed.tensor import Shard

    even = param.dim() > dim and param.shape[dim] % world_size == 0
    return Shard(dim if dim == 0 or even else 0)


def _module(params: list[Tensor]) -> torch.nn.Module:
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"w{i}", torch.nn.Parameter(p.clone()))
    return module


Check = Callable[[int, int, Any], Any]
