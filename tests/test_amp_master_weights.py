"""Master weights: bf16/fp16 parameters updated through an fp32 copy; policies and backends.

Truth: torch.optim.Adam run in float32 on the master copy (the update *is* an fp32 Adam step),
torch's round-to-nearest cast (the write-back), and an fp32 training run that bf16 training
with a master must follow far more closely than bf16 training without one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import portopt
from portopt.backends.torch_generic import TorchStep
from portopt.lowering import registry
from portopt.lowering.backend import Backend
from portopt.precision.policy import PolicyError, PrecisionPolicy, StateStorage


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def regression(n: int = 256) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    return x, torch.sin(x @ torch.randn(8, 1, generator=gen))


def make_net(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)


def train_curve(dtype: torch.dtype, precision: str | None, steps: int = 100, lr: float = 1e-3) -> Tensor:
    """Full-data loss every 5 steps of Adam on minibatches (the same batches for every run)."""
    x, y = regression()
    net = make_net(dtype)
    opt = portopt.Adam(net.parameters(), lr=lr, precision=precision)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for t in range(steps):
        index = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(net(x[index].to(dtype)).float(), y[index]).backward()
        opt.step()
        if t % 5 == 4:
            with torch.no_grad():
                losses.append(float(nn.functional.mse_loss(net(x.to(dtype)).float(), y)))
    return torch.tensor(losses)


def test_bf16_with_master_follows_fp32_far_closer_than_pure_bf16() -> None:
    """Adam at lr 1e-3 moves weights of size ~0.3 by less than half a bf16 spacing: pure bf16 rounds most
    updates away and stalls, while a fp32 master accumulates them. The loss curve of bf16 + fp32 master +
    fp32 states deviates from the fp32 run's at least 5x less than pure bf16's (about 70x here)."""
    reference = train_curve(torch.float32, None)
    mixed = train_curve(torch.bfloat16, "mixed-bf16")
    pure = train_curve(torch.bfloat16, None)
    assert reference[-1] < 0.95 * reference[0]  # the fp32 run does train
    mixed_gap = float((mixed - reference).abs().mean())
    pure_gap = float((pure - reference).abs().mean())
    assert pure_gap > 5 * mixed_gap, (pure_gap, mixed_gap)


def test_the_update_is_an_fp32_step_on_the_master() -> None:
    """The master equals torch.optim.AdamW's fp32 parameter given the same (bf16) gradients in fp32, bit for
    bit; the model's parameter is the master rounded to nearest, once per step; the model stays bf16."""
    x, y = regression(64)
    net = make_net(torch.bfloat16)
    twin = [nn.Parameter(p.detach().float()) for p in net.parameters()]
    ours = portopt.AdamW(net.parameters(), lr=0.01, weight_decay=0.1, precision="mixed-bf16", backend="torch")
    theirs = torch.optim.AdamW(twin, lr=0.01, weight_decay=0.1)
    for step in range(1, 6):
        ours.zero_grad()
        nn.functional.mse_loss(net(x.bfloat16()).float(), y).backward()
        for p, q in zip(net.parameters(), twin, strict=True):
            assert p.grad is not None
            q.grad = p.grad.float()
        ours.step()
        theirs.step()
        for p, q in zip(net.parameters(), twin, strict=True):
            state = ours.state[p]
            assert p.dtype == torch.bfloat16
            assert state["master"].dtype == torch.float32
            assert torch.equal(state["master"], q)
            assert torch.equal(p, q.detach().to(torch.bfloat16))
            assert torch.equal(state["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])
            assert float(state["step"]) == step


def test_per_group_policies_compose() -> None:
    """One optimizer, three groups: master + fp32 states, 8-bit states, torch's default."""
    torch.manual_seed(0)
    big = nn.Linear(64, 80).bfloat16()
    small = nn.Linear(80, 3)
    other = nn.Parameter(torch.randn(5000))
    groups: list[dict[str, Any]] = [
        {"params": big.parameters()},
        {"params": small.parameters(), "precision": "q8-states,min_8bit_size=200"},
        {"params": [other], "precision": None},
    ]
    opt = portopt.Adam(
        groups,
        lr=1e-3,
        precision="mixed-bf16",
    )
    assert [g.get("precision") for g in opt.param_groups] == ["mixed-bf16", "states=q8,min_8bit_size=200", None]
    for p in (*big.parameters(), *small.parameters(), other):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[big.weight]["exp_avg"].dtype == torch.float32
    assert "master" in opt.state[big.weight]
    assert type(opt.state[small.weight]["exp_avg"]).__name__ == "Q8State"
    assert opt.state[small.bias]["exp_avg"].dtype == torch.float32  # 3 elements: below the 8-bit threshold
    assert opt.state[other]["exp_avg"].dtype == torch.float32
    assert "master" not in opt.state[other]


def test_policy_objects_and_text_are_the_same_policy() -> None:
    net = make_net(torch.bfloat16)
    policy = PrecisionPolicy(param_dtype=torch.bfloat16, master_weights=True, states=StateStorage.FP32)
    opt = portopt.Adam(net.parameters(), precision=policy)
    assert opt.param_groups[0]["precision"] == "mixed-bf16"  # groups and checkpoints hold text
    opt = portopt.Adam(net.parameters(), precision="master=fp32,states=bf16,exp_avg_sq=fp32")
    assert opt.param_groups[0]["precision"] == "states=bf16,master=fp32,exp_avg_sq=fp32"
    plain = portopt.Adam(net.parameters(), precision="torch")
    assert "precision" not in plain.param_groups[0]  # the default leaves torch.optim's group layout


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "mixed-fp16"}, r"expects fp16 parameters, but param group 0, parameter 0 .* is bf16"),
        ({"precision": "momentum_buffer=q8"}, r"overrides state 'momentum_buffer', which adam does not have"),
        ({"precision": "states=q4"}, r"Invalid precision policy: states='q4' \(accepted: fp32, bf16, q8, param\)"),
        ({"precision": 3}, r"Invalid precision policy: 3 \(int\)"),
        ({"skip_nonfinite": "yes"}, r"Invalid skip_nonfinite value: 'yes' \(True or False\)"),
    ],
)
def test_bad_policies_are_refused_with_reasons(kwargs: dict[str, Any], message: str) -> None:
    net = make_net(torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        portopt.Adam(net.parameters(), **kwargs)


def test_a_group_with_wrong_dtypes_is_not_added() -> None:
    net = make_net(torch.float32)
    opt = portopt.Adam(net[0].parameters())
    with pytest.raises(PolicyError, match="expects bf16 parameters"):
        opt.add_param_group({"params": net[2].parameters(), "precision": "mixed-bf16"})
    assert len(opt.param_groups) == 1


def test_switching_master_weights_off_drops_the_masters() -> None:
    net = make_net(torch.bfloat16)
    opt = portopt.Adam(net.parameters(), lr=0.01, precision="mixed-bf16")
    for _ in range(2):
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert all("master" in opt.state[p] for p in net.parameters())
    opt.param_groups[0]["precision"] = None
    opt.step()
    assert not any("master" in opt.state[p] for p in net.parameters())


class _Counting:
    """A step function that counts its calls and runs the generic step (no precision-policy support)."""

    def __init__(self, spec: Any) -> None:
        self.inner = TorchStep(spec)
        self.calls = 0

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        self.inner(*args)


def test_backends_without_policy_support(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend without ``build_with_policy`` serves policies that need nothing from it (master weights,
    fp32 states: it steps the fp32 master); for 8-bit states ``auto`` falls back to the generic backend,
    and naming the backend is refused with the reason."""
    built: list[_Counting] = []

    def build(spec: Any) -> Any:
        built.append(_Counting(spec))
        return built[-1]

    monkeypatch.setitem(registry._BACKENDS, "plain", Backend("plain", "test", ("cpu",), build, priority=10**6))
    net = make_net(torch.bfloat16)
    opt = portopt.Adam(net.parameters(), precision="mixed-bf16")
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(built) == 1
    assert built[0].calls == 1
    assert opt.state[next(net.parameters())]["exp_avg"].dtype == torch.float32

    fp32 = make_net(torch.float32)
    opt = portopt.Adam(fp32.parameters(), precision="q8-states,min_8bit_size=64")
    for p in fp32.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(built) == 1  # the generic backend took it
    assert type(opt.state[next(fp32.parameters())]["exp_avg"]).__name__ == "Q8State"

    named = portopt.Adam(fp32.parameters(), precision="bf16-states", backend="plain")
    with pytest.raises(PolicyError, match=r"backend 'plain' cannot store states as precision policy 'states=bf16'"):
        named.step()
    assert not named.state  # refused before anything was written
