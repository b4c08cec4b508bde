"""The front end behaves like torch.optim: groups, skipped params, closures, hooks, lr tensors, specs.

Where torch.optim has the algorithm it is the truth (bit-identical comparisons use Adam,
whose lowering issues torch's own calls); for AdaBelief, LAMB and Lion the truth is the
float64 reference interpreter of the same spec (``backend="reference"``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import subprocess
import sys
from typing import Any, cast

import pytest
import torch
from torch import Tensor, nn

import portopt
from portopt.algorithms import adam, get_spec, lion
from portopt.spec.render import render_text


class _Generic:
    """portopt's classes on the generic backend, named: "auto" could pick another registered in the session."""

    def __getattr__(self, name: str) -> Any:
        return functools.partial(getattr(portopt, name), backend="torch")


generic: Any = _Generic()


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def data(steps: int, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(8, 4, generator=gen).to(dtype), torch.randn(8, 2, generator=gen).to(dtype)) for _ in range(steps)
    ]


def train(net: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]], sched: Any = None) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_equal_runs(a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]) -> None:
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in b[1].state[q].items():
            assert torch.equal(a[1].state[p][key], value), key


def test_params_without_grad_are_skipped() -> None:
    net = make_net()
    frozen = nn.Parameter(torch.ones(3))
    opt = portopt.Adam([*net.parameters(), frozen], lr=0.1)
    train(net, opt, data(2))
    assert frozen not in opt.state
    frozen.grad = torch.ones(3)
    opt.step()
    frozen.grad = None
    first_layer, last_layer = cast(nn.Linear, net[0]).weight, cast(nn.Linear, net[2]).weight
    state_before = {k: v.clone() for k, v in opt.state[frozen].items()}
    weight_before = first_layer.detach().clone()
    first_layer.grad = None
    last_layer.grad = torch.ones_like(last_layer)
    opt.step()
    assert torch.equal(first_layer, weight_before)
    for key, value in state_before.items():
        assert torch.equal(opt.state[frozen][key], value)
    assert float(opt.state[frozen]["step"]) == 1.0
    assert float(opt.state[last_layer]["step"]) == 4.0


def test_step_counters_may_differ_within_a_group() -> None:
    """Parameters at different steps get their own bias corrections, as in torch.optim."""
    nets = [make_net(), make_net()]
    opts = [generic.Adam(nets[0].parameters(), lr=0.05), torch.optim.Adam(nets[1].parameters(), lr=0.05)]
    for t, (x, y) in enumerate(data(6)):
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            if t % 2:
                net[0].bias.grad = None
            opt.step()
    assert_equal_runs((nets[0], opts[0]), (nets[1], opts[1]))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none: bool) -> None:
    net = make_net()
    opt = portopt.SGD(net.parameters(), lr=0.1)
    train(net, opt, data(1))
    opt.zero_grad(set_to_none=set_to_none)
    for p in net.parameters():
        assert (p.grad is None) if set_to_none else (p.grad is not None and not p.grad.any())


def test_closure_is_evaluated_with_grad_and_its_loss_returned() -> None:
    nets = [make_net(), make_net()]
    opts = [generic.Adam(nets[0].parameters(), lr=0.05), torch.optim.Adam(nets[1].parameters(), lr=0.05)]
    x, y = data(1)[0]
    losses = []
    for net, opt in zip(nets, opts, strict=True):

        def closure(net: nn.Module = net, opt: torch.optim.Optimizer = opt) -> float:
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            return float(loss.detach())

        with torch.no_grad():
            losses.append(opt.step(closure))
    assert losses[0] == losses[1]
    assert_equal_runs((nets[0], opts[0]), (nets[1], opts[1]))


def test_step_hooks() -> None:
    net = make_net()
    opt = portopt.RMSprop(net.parameters(), lr=0.01)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    train(net, opt, data(2))
    assert calls == ["pre", "post", "pre", "post"]


def test_param_groups_and_add_param_group_match_torch() -> None:
    nets = [make_net(), make_net()]
    runs = []
    for library, net in zip((generic, torch.optim), nets, strict=True):
        opt = library.Adam([{"params": net[0].parameters(), "betas": (0.5, 0.9)}], lr=0.05, weight_decay=0.1)
        opt.add_param_group({"params": net[2].parameters(), "lr": 0.01, "amsgrad": True})
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 0.9**e, lambda e: 1.0 / (1 + e)])
        train(net, opt, data(6), sched)
        runs.append((net, opt))
    assert [g["lr"] for g in runs[0][1].param_groups] == [g["lr"] for g in runs[1][1].param_groups]
    assert_equal_runs(runs[0], runs[1])


def test_tensor_lr_with_a_scheduler() -> None:
    """A tensor lr is read each step (as the scheduler fills it) and used as a float64 host scalar.

    A portopt run with the same value as a Python float is bit-identical (the same kernels on the same
    values). torch.optim divides a tensor lr by the bias correction in float32, portopt in float64 (its
    rule for step scalars), so against torch.optim the step size differs by the rounding of that
    division: with gradients that do not depend on the parameters (so no difference feeds back), each
    parameter may differ by at most 4 float32 roundings of each step taken (the division, its rounding
    to float32, and the rounding of each side's addcdiv) plus one rounding of the parameter per step.
    """
    lr = torch.tensor(0.05)
    steps = 6
    gen = torch.Generator().manual_seed(5)
    shapes = ((6, 4), (6,), (2, 6), (2,))
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    moved = [torch.zeros(s) for s in shapes]  # sum of |step| per element, from the float-lr run
    largest = [p.abs() for p in start]  # the largest |p| each element takes
    for library, value in ((generic, lr.clone()), (generic, float(lr)), (torch.optim, lr.clone())):
        params = [nn.Parameter(p.clone()) for p in start]
        opt = library.Adam(params, lr=value)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for step_grads in grads:
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
            sched.step()
            if library is generic and isinstance(value, float):
                for m, big, p, b in zip(moved, largest, params, before, strict=True):
                    m += (p.detach() - b).abs()
                    torch.maximum(big, p.detach().abs(), out=big)
        runs.append((params, opt))
    assert isinstance(runs[0][1].param_groups[0]["lr"], Tensor)
    assert float(runs[0][1].param_groups[0]["lr"]) == runs[1][1].param_groups[0]["lr"] == float(lr) / 8
    for p, q in zip(runs[0][0], runs[1][0], strict=True):
        assert torch.equal(p, q)
    eps = torch.finfo(torch.float32).eps
    for p, q, m, big in zip(runs[0][0], runs[2][0], moved, largest, strict=True):
        bound = 4 * eps * m + steps * eps * big
        assert bool(((p.detach() - q.detach()).abs() <= bound).all())


def test_generic_optimizer_takes_names_or_torch_keys() -> None:
    runs = []
    for make in (
        lambda ps: generic.Optimizer(ps, adam(amsgrad=True), lr=0.05, beta1=0.5),
        lambda ps: generic.Optimizer(ps, get_spec("adam", amsgrad=True), lr=0.05, betas=(0.5, 0.999)),
        lambda ps: generic.Adam(ps, lr=0.05, betas=(0.5, 0.999), amsgrad=True),
    ):
        net = make_net()
        opt = make(net.parameters())
        train(net, opt, data(4))
        runs.append((net, opt))
    assert runs[0][1].param_groups[0]["betas"] == (0.5, 0.999)
    assert_equal_runs(runs[0], runs[2])
    assert_equal_runs(runs[1], runs[2])


def test_generic_optimizer_maximize() -> None:
    spec = lion()
    runs = []
    for make in (
        lambda ps: portopt.Optimizer(ps, spec, lr=0.01, maximize=True),
        lambda ps: portopt.Optimizer(ps, spec.maximized(), lr=0.01),
    ):
        net = make_net()
        opt = make(net.parameters())
        train(net, opt, data(3))
        runs.append((net, opt))
    assert_equal_runs(runs[0], runs[1])


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("AdaBelief", {"lr": 0.01, "weight_decay": 0.1}),
        ("AdaBelief", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": False, "maximize": True}),
        ("LAMB", {"lr": 0.01, "weight_decay": 0.1}),
        ("LAMB", {"lr": 0.01, "bias_correction": False, "betas": (0.8, 0.99)}),
        ("Lion", {"lr": 0.001, "weight_decay": 0.5}),
        ("Lion", {"lr": 0.001, "betas": (0.95, 0.98), "maximize": True}),
    ],
)
def test_algorithms_without_torch_counterpart_match_the_reference(name: str, kwargs: dict[str, Any]) -> None:
    """The generic backend against the float64 interpreter, on the same float64 gradient stream."""
    nets = [make_net(dtype=torch.float64), make_net(dtype=torch.float64)]
    opts = [
        getattr(portopt, name)(net.parameters(), backend=b, **kwargs)
        for net, b in zip(nets, ("torch", "reference"), strict=True)
    ]
    pairs = list(zip(nets[0].parameters(), nets[1].parameters(), strict=True))
    for x, y in data(30, torch.float64):
        opts[1].zero_grad()
        nn.functional.mse_loss(nets[1](x), y).backward()
        for mine, ref in pairs:
            assert ref.grad is not None
            mine.grad = ref.grad.clone()
        for opt in opts:
            opt.step()
    for mine, ref in pairs:
        scale = max(ref.detach().abs().max().item(), 1e-300)
        assert (mine - ref).abs().max().item() <= 1e-12 * scale
        for key, value in opts[1].state[ref].items():
            assert torch.allclose(opts[0].state[mine][key], value, rtol=1e-12, atol=0), key


def test_docstrings_carry_the_rendered_equations() -> None:
    for cls in (portopt.SGD, portopt.Adam, portopt.AdamW, portopt.RAdam, portopt.LAMB, portopt.Lion):
        assert cls.__doc__ is not None
        assert render_text(cls.spec()).splitlines()[-1] in cls.__doc__
    assert "p ← p − α·m/d" in (portopt.Adam.__doc__ or "")
    assert portopt.AdamW.spec().name == "adamw"
    assert portopt.SGD.spec(momentum=0.9, nesterov=True).title == "SGD with Nesterov momentum"


def test_import_portopt_does_not_import_torch() -> None:
    code = "import sys, portopt; assert 'torch' not in sys.modules; portopt.Adam; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deepcopy_keeps_the_spec_and_backend() -> None:
    net = make_net()
    opt = portopt.Optimizer(net.parameters(), lion(), backend="reference", lr=0.01)
    train(net, opt, data(2))
    twin_net = copy.deepcopy(net)
    twin = portopt.Optimizer(twin_net.parameters(), lion(), backend="reference", lr=0.01)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    clone = copy.deepcopy(opt)
    assert clone.backend == "reference"
    assert clone.base_spec(clone.param_groups[0]) == lion()


def test_unknown_backend_is_reported_with_the_known_ones() -> None:
    net = make_net()
    with pytest.raises(ValueError, match=r"unknown backend 'no-such-backend'; registered backends: .*reference.*torch"):
        portopt.Adam(net.parameters(), backend="no-such-backend")


def test_grad_scaler_unscales_and_skips_like_torch() -> None:
    """torch.amp.GradScaler drives a portopt optimizer as it drives torch's (inf steps skipped)."""
    runs = []
    for library in (generic, torch.optim):
        net = make_net()
        opt = library.Adam(net.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for t, (x, y) in enumerate(data(5)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y) * (math.inf if t == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((net, opt))
        assert scaler.get_scale() == 2.0**9  # halved once, by the inf step
    assert_equal_runs(runs[0], runs[1])
    assert float(runs[0][1].state[next(runs[0][0].parameters())]["step"]) == 4.0


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "Adamax", "RAdam"])
def test_constructor_signature_is_torchs(name: str) -> None:
    """Same parameter names, kinds (positional or keyword-only), order and defaults; plus portopt's additions."""
    theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
    ours = dict(inspect.signature(getattr(portopt, name).__init__).parameters)
    for added in ("backend", "precision", "skip_nonfinite"):  # portopt's keyword-only additions
        assert ours.pop(added).kind is inspect.Parameter.KEYWORD_ONLY
    assert list(ours) == list(theirs)
    for key, parameter in theirs.items():
        assert ours[key].kind == parameter.kind, key
        assert ours[key].default == parameter.default, key
