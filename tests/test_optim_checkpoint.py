"""Checkpoints: torch.optim's layout, round trips that continue bit-identically, clear refusals.

A run of 2·K steps is compared with a run interrupted after K steps, saved with
``torch.save`` (model, optimizer and LR scheduler), loaded into freshly built objects
(initialised differently, so only the checkpoint can make them agree) and continued for K
steps. Through portopt alone, and through torch.optim and back (the checkpoint loaded by
the other library and saved again without a step), the continuation must be
bit-identical to the uninterrupted run. Continuing in the *other* library is
bit-identical where the arithmetic is (see test_optim_torch_parity.BIT_IDENTICAL) and
within 1e-6 elsewhere.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import portopt
from portopt.optim.state_dict import CheckpointError

K = 8
KWARGS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Adam": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
    "AdamW": {"lr": 0.01},
    "NAdam": {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.01},
    "Adamax": {"lr": 0.01},
    "RAdam": {"lr": 0.01, "betas": (0.9, 0.7)},
    "AdaBelief": {"lr": 0.01, "weight_decay": 0.01},
    "LAMB": {"lr": 0.01, "weight_decay": 0.01},
    "Lion": {"lr": 0.001, "weight_decay": 0.1},
}
IN_TORCH = ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "Adamax", "RAdam")
BIT_IDENTICAL = ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.cuda),
]


def pinned(library: Any) -> dict[str, str]:
    """portopt runs on the generic backend, named: "auto" could pick another registered in the same session."""
    return {"backend": "torch"} if library is portopt else {}


def make_net(seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).to(device=device, dtype=dtype)


def batches(device: str, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(99)
    data = [(torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(2 * K)]
    return [(x.to(device, dtype), y.to(device, dtype)) for x, y in data]


class Run:
    """A model, an optimizer (portopt's or torch's) and a StepLR, trained on ``batches``."""

    def __init__(self, library: Any, name: str, device: str = "cpu", seed: int = 0) -> None:
        self.net = make_net(seed, device)
        self.opt = getattr(library, name)(self.net.parameters(), **KWARGS[name], **pinned(library))
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)

    def train(self, data: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in data:
            self.opt.zero_grad()
            nn.functional.mse_loss(self.net(x), y).backward()
            self.opt.step()
            self.sched.step()

    def save(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}, buffer
        )
        return buffer.getvalue()

    def load(self, blob: bytes, map_location: Any = None) -> None:
        checkpoint = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
        self.net.load_state_dict(checkpoint["net"])
        self.opt.load_state_dict(checkpoint["opt"])
        self.sched.load_state_dict(checkpoint["sched"])


def assert_same(a: Run, b: Run, exact: bool = True, tolerance: float = 1e-6, skip: tuple[str, ...] = ()) -> None:
    for p, q in zip(a.net.parameters(), b.net.parameters(), strict=True):
        pairs = [("param", p.detach(), q.detach())]
        pairs += [(k, v, b.opt.state[q][k]) for k, v in a.opt.state[p].items() if k in b.opt.state[q] and k not in skip]
        for key, x, y in pairs:
            if exact:
                assert torch.equal(x.cpu(), y.cpu()), key
            else:
                diff = torch.linalg.vector_norm((x.double() - y.double()).flatten()).item()
                scale = torch.linalg.vector_norm(y.double().flatten()).item()
                assert diff <= tolerance * scale or diff == 0.0, (key, diff / scale if scale else math.inf)


def through(blob: bytes, library: Any, name: str) -> bytes:
    """Load ``blob`` into a fresh optimizer of ``library`` and save it again, without a step."""
    middle = Run(library, name, seed=7)
    middle.load(blob)
    return middle.save()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(KWARGS))
def test_portopt_round_trip_continues_bit_identically(name: str, device: str) -> None:
    data = batches(device)
    whole = Run(portopt, name, device)
    whole.train(data)
    first = Run(portopt, name, device)
    first.train(data[:K])
    resumed = Run(portopt, name, device, seed=1)
    resumed.load(first.save())
    resumed.train(data[K:])
    assert_same(resumed, whole)


@pytest.mark.parametrize("name", IN_TORCH)
def test_portopt_through_torch_and_back_continues_bit_identically(name: str) -> None:
    data = batches("cpu")
    whole = Run(portopt, name)
    whole.train(data)
    first = Run(portopt, name)
    first.train(data[:K])
    resumed = Run(portopt, name, seed=1)
    resumed.load(through(first.save(), torch.optim, name))
    resumed.train(data[K:])
    assert_same(resumed, whole)


@pytest.mark.parametrize("name", IN_TORCH)
def test_torch_through_portopt_and_back_continues_bit_identically(name: str) -> None:
    data = batches("cpu")
    whole = Run(torch.optim, name)
    whole.train(data)
    first = Run(torch.optim, name)
    first.train(data[:K])
    resumed = Run(torch.optim, name, seed=1)
    resumed.load(through(first.save(), portopt, name))
    resumed.train(data[K:])
    assert_same(resumed, whole)


@pytest.mark.parametrize("name", IN_TORCH)
@pytest.mark.parametrize("direction", ["portopt->torch", "torch->portopt"])
def test_continuing_in_the_other_library(name: str, direction: str) -> None:
    """A checkpoint continues in the other library as an uninterrupted run in the first one."""
    source, target = (portopt, torch.optim) if direction == "portopt->torch" else (torch.optim, portopt)
    data = batches("cpu")
    whole = Run(source, name)
    whole.train(data)
    first = Run(source, name)
    first.train(data[:K])
    resumed = Run(target, name, seed=1)
    resumed.load(first.save())
    for p, q in zip(first.net.parameters(), resumed.net.parameters(), strict=True):
        for key, value in first.opt.state[p].items():
            if key in resumed.opt.state[q]:
                assert torch.equal(resumed.opt.state[q][key].cpu(), value.cpu()), key
    resumed.train(data[K:])
    # torch.optim.SGD carries portopt's extra "step" along without counting it.
    skip = ("step",) if name == "SGD" and target is torch.optim else ()
    assert_same(resumed, whole, exact=name in BIT_IDENTICAL, skip=skip)


def test_torch_sgd_checkpoint_without_step_loads() -> None:
    """torch.optim.SGD keeps no step counter; its checkpoint loads as 'at least one step done'."""
    data = batches("cpu")
    whole = Run(torch.optim, "SGD")
    whole.train(data)
    first = Run(torch.optim, "SGD")
    first.train(data[:K])
    assert all("step" not in s for s in first.opt.state.values())
    resumed = Run(portopt, "SGD", seed=1)
    resumed.load(first.save())
    assert all(float(s["step"]) == 1.0 for s in resumed.opt.state.values())
    resumed.train(data[K:])
    assert_same(resumed, whole)


def test_adagrad_state_exists_for_every_parameter_as_in_torch() -> None:
    """torch.optim.Adagrad creates states up front and reads them for every stepped parameter."""
    ours = portopt.Adagrad(
        [*make_net(0).parameters(), nn.Parameter(torch.ones(3))], initial_accumulator_value=0.25, backend="torch"
    )
    twin = torch.optim.Adagrad([*make_net(0).parameters(), nn.Parameter(torch.ones(3))], initial_accumulator_value=0.25)
    ours_state, twin_state = ours.state_dict()["state"], twin.state_dict()["state"]
    assert set(ours_state) == set(twin_state)
    for index, state in twin_state.items():
        assert set(ours_state[index]) == set(state)
        for key, value in state.items():
            assert torch.equal(ours_state[index][key], value), (index, key)
    late = nn.Parameter(torch.zeros(2))
    ours.add_param_group({"params": [late]})
    assert float(ours.state[late]["step"]) == 0.0  # torch would leave a later group without state
    theirs = torch.optim.Adagrad(
        [
            {"params": [*make_net(1).parameters(), nn.Parameter(torch.ones(3))]},
            {"params": [nn.Parameter(torch.ones(2))]},
        ]
    )
    theirs.load_state_dict(ours.state_dict())
    for group in theirs.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    theirs.step()


def test_low_precision_params_keep_fp32_states_on_load() -> None:
    """torch casts loaded states to the parameter dtype; portopt keeps each state's dtype."""
    param = nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    opt = portopt.Adam([param], lr=0.01, backend="torch")
    checkpoint: dict[str, Any] = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4), "exp_avg_sq": torch.rand(4)}},
        "param_groups": [{**opt.state_dict()["param_groups"][0]}],
    }
    opt.load_state_dict(copy.deepcopy(checkpoint))
    assert opt.state[param]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[param]["exp_avg"], checkpoint["state"][0]["exp_avg"])
    param.grad = torch.randn(4, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[param]["exp_avg_sq"].dtype == torch.float32
    assert float(opt.state[param]["step"]) == 4.0
    twin = torch.optim.Adam([nn.Parameter(param.detach().clone())], lr=0.01)
    twin.load_state_dict(copy.deepcopy(checkpoint))
    assert next(iter(twin.state.values()))["exp_avg"].dtype == torch.bfloat16  # what portopt avoids


@pytest.mark.parametrize("device", DEVICES)
def test_map_location(device: str) -> None:
    """A checkpoint saved on ``device`` loads with map_location='cpu' into a CPU run, states on the CPU."""
    data = batches(device)
    first = Run(portopt, "Adam", device)
    first.train(data[:K])
    resumed = Run(portopt, "Adam", "cpu", seed=1)
    resumed.load(first.save(), map_location="cpu")
    for p, q in zip(first.net.parameters(), resumed.net.parameters(), strict=True):
        for key, value in first.opt.state[p].items():
            assert resumed.opt.state[q][key].device.type == "cpu"
            assert torch.equal(resumed.opt.state[q][key], value.cpu()), key
    resumed.train(batches("cpu")[K:])


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy(opt.state_dict())


def assert_unchanged(opt: torch.optim.Optimizer, before: dict[str, Any]) -> None:
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert set(after["state"]) == set(before["state"])
    for index, state in before["state"].items():
        assert set(after["state"][index]) == set(state)
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)


def trained(library: Any, name: str, **overrides: Any) -> torch.optim.Optimizer:
    net = make_net(0)
    opt: torch.optim.Optimizer = getattr(library, name)(
        net.parameters(), **{**KWARGS[name], **overrides}, **pinned(library)
    )
    for x, y in batches("cpu")[:2]:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ("Adam", "SGD", "has no 'momentum'"),
        ("SGD", "Adam", "has no 'betas', 'eps'"),
        ("NAdam", "Adam", "unexpected: mu_product"),
        ("Adamax", "Adam", "unexpected: exp_inf"),
        ("RMSprop", "Adagrad", "has no 'lr_decay'"),
        ("Adam", "Lion", "unexpected: exp_avg_sq"),
    ],
)
def test_checkpoint_of_another_algorithm_is_refused(source: str, target: str, message: str) -> None:
    library = torch.optim if source in IN_TORCH else portopt
    checkpoint = trained(library, source).state_dict()
    opt = trained(portopt, target)
    before = snapshot(opt)
    with pytest.raises(CheckpointError, match=message):
        opt.load_state_dict(checkpoint)
    assert_unchanged(opt, before)


def test_mismatched_groups_and_shapes_are_refused() -> None:
    opt = trained(portopt, "Adam")
    before = snapshot(opt)
    two_groups = trained(portopt, "Adam").state_dict()
    two_groups["param_groups"].append({**two_groups["param_groups"][0], "params": []})
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(two_groups)
    fewer = trained(portopt, "Adam").state_dict()
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        opt.load_state_dict(fewer)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 2))  # same count, other shapes
    other_opt = portopt.Adam(other.parameters(), **KWARGS["Adam"])
    nn.functional.mse_loss(other(torch.randn(3, 5)), torch.randn(3, 2)).backward()
    other_opt.step()
    with pytest.raises(CheckpointError, match=r"parameter 0 \(shape \(7, 5\)\): state 'exp_avg' has shape \(9, 5\)"):
        opt.load_state_dict(other_opt.state_dict())
    assert_unchanged(opt, before)


def test_bad_values_in_a_checkpoint_are_refused() -> None:
    opt = trained(portopt, "Adam")
    before = snapshot(opt)
    checkpoint = trained(torch.optim, "Adam").state_dict()
    checkpoint["param_groups"][0]["lr"] = -1.0
    with pytest.raises(CheckpointError, match=r"Invalid learning rate: -1\.0"):
        opt.load_state_dict(checkpoint)
    assert_unchanged(opt, before)


def test_hooks_run_on_load() -> None:
    opt = trained(portopt, "Adam")
    calls: list[str] = []

    def pre(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        calls.append("pre")

    def post(optimizer: torch.optim.Optimizer) -> None:
        calls.append("post")

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post"]
