"""Loss scaling: torch.amp.GradScaler inside the step, skipped steps, and fp16 training with a master.

Truth: torch.optim (the same arithmetic on unscaled gradients), GradScaler's own scale
bookkeeping, and bit-for-bit snapshots taken before a step that must change nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import portopt
from portopt.precision.quantize import Q8State

POLICIES = ["torch", "mixed-bf16", "mixed-fp16", "q8-states", "bf16-states-sr", "mixed-bf16-q8", "pure-bf16-sr"]
PARAM_DTYPE = {
    "mixed-bf16": torch.bfloat16,
    "mixed-bf16-q8": torch.bfloat16,
    "pure-bf16-sr": torch.bfloat16,
    "mixed-fp16": torch.float16,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small models: threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """64-80-3; the 64x80 = 5120 weights are above the 4096-element 8-bit threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(64, 80)
        self.l2 = nn.Linear(80, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def make_net(dtype: torch.dtype, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def data(steps: int, seed: int = 7) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 64, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(steps)]


def scaled_step(net: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: Tensor, y: Tensor) -> None:
    dtype = next(net.parameters()).dtype
    opt.zero_grad()
    loss = nn.functional.mse_loss(net(x.to(dtype)).float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> list[Tensor]:
    """Every number the optimizer may write: parameters, states (8-bit codes and absmax), masters, steps."""
    tensors = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        for key in sorted(opt.state[p]):
            value: Any = opt.state[p][key]
            tensors += [value.codes.clone(), value.absmax.clone()] if isinstance(value, Q8State) else [value.clone()]
    return tensors


def skipped(opt: portopt.Optimizer) -> bool:
    """Whether the last step was skipped (read through a call: each step may change it)."""
    return opt.last_step_skipped


def bits(x: Tensor) -> Tensor:
    """The bytes of ``x`` (NaN compares equal to itself, -0.0 differs from 0.0)."""
    return x.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_bits_equal(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        assert x.shape == y.shape
        assert torch.equal(bits(x), bits(y))


@pytest.mark.parametrize("policy", POLICIES)
def test_inf_gradient_changes_nothing_but_the_scale(policy: str) -> None:
    """A step whose gradient holds one inf: parameters, masters, states (8-bit codes included) and step
    counters keep their bits; ``.grad`` stays scaled; GradScaler halves its scale; training goes on."""
    dtype = PARAM_DTYPE.get(policy, torch.float32)
    net = make_net(dtype)
    opt = portopt.Adam(net.parameters(), lr=1e-2, precision=policy)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    batches = data(4)
    for x, y in batches[:2]:
        scaled_step(net, opt, scaler, x, y)
    before = snapshot(net, opt)
    opt.zero_grad()
    x, y = batches[2]
    scaler.scale(nn.functional.mse_loss(net(x.to(dtype)).float(), y)).backward()
    weight = net.l1.weight
    grad = weight.grad
    assert grad is not None
    grad[3, 5] = math.inf
    scaled = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped
    assert scaler.get_scale() == 2.0**9
    assert_bits_equal(snapshot(net, opt), before)
    assert_bits_equal([p.grad for p in net.parameters() if p.grad is not None], scaled)
    assert float(opt.state[weight]["step"]) == 2.0
    scaled_step(net, opt, scaler, *batches[3])
    assert not skipped(opt)
    assert float(opt.state[weight]["step"]) == 3.0
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


@pytest.mark.parametrize("policy", ["torch", "q8-states"])
def test_skip_nonfinite_without_a_grad_scaler(policy: str) -> None:
    """``skip_nonfinite=True``: a NaN gradient skips the whole step (every group), bit for bit."""
    net = make_net(torch.float32)
    groups: list[dict[str, Any]] = [{"params": net.l1.parameters()}, {"params": net.l2.parameters(), "lr": 0.05}]
    opt = portopt.SGD(
        groups,
        lr=0.1,
        momentum=0.9,
        precision=policy,
        skip_nonfinite=True,
    )
    batches = data(3)
    for x, y in batches[:2]:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        assert not opt.last_step_skipped
    before = snapshot(net, opt)
    opt.zero_grad()
    nn.functional.mse_loss(net(batches[2][0]), batches[2][1]).backward()
    bias_grad = net.l2.bias.grad
    assert bias_grad is not None
    bias_grad[1] = math.nan  # in the second group only: the first is not stepped either
    opt.step()
    assert opt.last_step_skipped
    assert_bits_equal(snapshot(net, opt), before)


def test_without_skip_nonfinite_nan_goes_through() -> None:
    """torch.optim's behaviour is kept unless asked: a NaN gradient reaches the parameters."""
    net = make_net(torch.float32)
    opt = portopt.SGD(net.parameters(), lr=0.1)
    nn.functional.mse_loss(net(data(1)[0][0]), data(1)[0][1]).backward()
    bias_grad = net.l2.bias.grad
    assert bias_grad is not None
    bias_grad[0] = math.nan
    opt.step()
    assert not opt.last_step_skipped
    assert torch.isnan(net.l2.bias[0])


def test_grad_scaler_matches_torch_and_leaves_unscaled_grads() -> None:
    """Default policy: the same steps as torch.optim.Adam driven by GradScaler (which unscales before the
    step there, inside it here), bit for bit, including an overflowing step; ``.grad`` ends unscaled."""
    runs = []
    for library in (portopt, torch.optim):
        net = make_net(torch.float32)
        opt = library.Adam(net.parameters(), lr=0.01, **({"backend": "torch"} if library is portopt else {}))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for t, (x, y) in enumerate(data(5)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y) * (math.inf if t == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((net, opt, scaler.get_scale()))
    (ours, our_opt, our_scale), (theirs, their_opt, their_scale) = runs
    assert our_scale == their_scale == 2.0**15
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
        assert p.grad is not None
        assert q.grad is not None
        assert torch.equal(p.grad, q.grad)  # both unscaled after the last (taken) step
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(our_opt.state[p][key], their_opt.state[q][key])


def test_unscale_for_clipping_then_step() -> None:
    """``scaler.unscale_(opt)`` before the step (gradient clipping): the step takes the gradients as they are."""
    runs = []
    for library in (portopt, torch.optim):
        net = make_net(torch.float32)
        kwargs = {"backend": "torch"} if library is portopt else {}  # the generic backend: torch's arithmetic
        opt = library.AdamW(net.parameters(), lr=0.01, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for x, y in data(4):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(net(x), y)).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
        runs.append(net)
    for p, q in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p, q)


def fp16_problem() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=gen)
    return x, 0.1 * torch.tanh(x @ torch.randn(16, 1, generator=gen))


def fp16_batches(steps: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        yield torch.randint(0, 256, (32,), generator=gen)


def test_fp16_with_grad_scaler_trains_where_torch_fp16_adam_breaks() -> None:
    """fp16 parameters. torch.optim.Adam keeps fp16 moments and adds ε = 1e-8 in fp16, where it is 0:
    a small gradient's second moment underflows, ``m / (√v + ε)`` divides by 0, and the parameters turn
    inf/NaN at once (and GradScaler cannot drive it: it refuses to unscale fp16 gradients). portopt with
    ``mixed-fp16`` (fp32 master and moments) and a GradScaler trains the same model without inf/NaN."""
    assert float(torch.tensor(0.0, dtype=torch.float16) + 1e-8) == 0.0  # the underflow, in torch's own arithmetic
    x, y = fp16_problem()

    def make() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).half()

    def loss_of(net: nn.Module, index: Tensor | None = None) -> Tensor:
        rows = slice(None) if index is None else index
        return nn.functional.mse_loss(net(x[rows].half()).float(), y[rows])

    theirs = make()
    torch_adam = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(theirs)).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.step(torch_adam)
    for index in fp16_batches(5):
        torch_adam.zero_grad()
        loss_of(theirs, index).backward()
        torch_adam.step()
    assert not all(bool(torch.isfinite(p).all()) for p in theirs.parameters())

    ours = make()
    with torch.no_grad():
        initial = float(loss_of(ours))
    opt = portopt.Adam(ours.parameters(), lr=1e-3, precision="mixed-fp16")
    scaler = torch.amp.GradScaler("cpu")
    for index in fp16_batches(80):
        opt.zero_grad()
        scaler.scale(loss_of(ours, index)).backward()
        scaler.step(opt)
        scaler.update()
        assert all(bool(torch.isfinite(p).all()) for p in ours.parameters())
    assert all(p.dtype == torch.float16 for p in ours.parameters())
    with torch.no_grad():
        assert float(loss_of(ours)) < 0.1 * initial


def test_grad_scaler_state_survives_a_deepcopy_of_the_optimizer() -> None:
    """GradScaler's attributes exist only during ``step``: a copy of the optimizer carries none."""
    net = make_net(torch.float32)
    opt = portopt.Adam(net.parameters(), precision="q8-states")
    scaler = torch.amp.GradScaler("cpu")
    scaled_step(net, opt, scaler, *data(1)[0])
    twin = copy.deepcopy(opt)
    assert not hasattr(twin, "grad_scale")
    assert not hasattr(twin, "found_inf")


@pytest.mark.cuda
def test_grad_scaler_on_cuda() -> None:
    """The same protocol with a CUDA GradScaler: an inf step changes nothing, the next one trains."""
    torch.manual_seed(0)
    net = Net().cuda().half()
    opt = portopt.AdamW(net.parameters(), lr=1e-3, precision="mixed-fp16")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x, y = (t.cuda() for t in data(1)[0])
    scaled_step(net, opt, scaler, x, y)
    before = snapshot(net, opt)
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(net(x.half()).float(), y) * math.inf).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert_bits_equal(snapshot(net, opt), before)
    scaled_step(net, opt, scaler, x, y)
    assert float(opt.state[net.l1.weight]["step"]) == 2.0
