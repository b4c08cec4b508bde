"""``torch.compile`` of a whole training step with ``opt.step()`` inside, on every backend ``auto`` picks.

What a torch.optim user relies on, each checked against torch.optim.AdamW in the same test:

* **no graph break in portopt's code**: ``torch._dynamo.explain`` of the training step lists
  breaks only where torch.optim's own step has them (``loss.backward()``, torch's
  ``zero_grad``), never a frame of portopt; the step's arithmetic is in a graph;
* **no recompile across 20 steps with an LR scheduler**: with ``lr=torch.tensor(...)`` (torch's
  recipe; the scheduler fills it in place) nothing recompiles after the first step; with a
  float ``lr`` dynamo compiles the first value as a constant and recompiles once when the
  scheduler changes it (its automatic-dynamic floats), exactly as many times as for torch.optim;
* **the same numbers**: the compiled run matches eager torch.optim to float32 rounding.

The structural tests use dynamo alone (``backend="eager"``: no Inductor code generation, a
second or two each) or AOTAutograd (``backend="aot_eager"``, a few seconds); the Inductor runs
compile a small model (marked slow: 12-18 s each with a warm Inductor cache, about 50 s cold,
on a loaded 2-core CPU).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import portopt
import portopt.backends
import portopt.optim.graph

STEPS = 20
PORTOPT_DIRS = tuple(str(Path(p).resolve()) for p in (*portopt.__path__, *portopt.backends.__path__))
TORCH_DIR = str(Path(torch.__file__).resolve().parent)

CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("AdamW", {}, "torch_fused"),  # auto: a torch fused kernel is proven equivalent
    ("Adam", {"backend": "torch_fused", "amsgrad": True}, "torch_fused"),
    ("Adam", {"backend": "compiled"}, "compiled"),
    ("NAdam", {}, "torch"),  # auto on a small group: the generic backend
    ("SGD", {"momentum": 0.9}, "torch_fused"),
    ("RAdam", {"betas": (0.9, 0.9)}, "torch"),  # crosses the rectification threshold at step 6
    ("Lion", {"backend": "torch"}, "torch"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)) for _ in range(STEPS)]


def setup(
    library: Any, name: str, kwargs: dict[str, Any], lr: float | torch.Tensor, device: str = "cpu"
) -> tuple[nn.Module, Any, Any]:
    net = model().to(device)
    opt = getattr(library, name)(net.parameters(), lr=lr, **kwargs)
    return net, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)


def eager_truth(
    name: str, kwargs: dict[str, Any], data: list[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu"
) -> nn.Module:
    """The same training, eagerly, on torch.optim (or, for an algorithm torch lacks, portopt's float64 reference)."""
    options = {k: v for k, v in kwargs.items() if k != "backend"}
    if hasattr(torch.optim, name):
        net, opt, sched = setup(torch.optim, name, options, lr=torch.tensor(0.01), device=device)
    else:
        net, opt, sched = setup(
            portopt, name, {**options, "backend": "reference"}, lr=torch.tensor(0.01), device=device
        )
    for x, y in data:
        step_fn(net, opt)(x, y)
        sched.step()
    return net


def step_fn(net: nn.Module, opt: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return train_step


def in_portopt(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(PORTOPT_DIRS)


@contextmanager
def graph_break_sites() -> Iterator[list[str]]:
    """Every ``file:line`` where dynamo breaks a graph while the block runs, from its ``graph_breaks`` log
    (``explain`` leaves out breaks in frames that have no graph, such as a call of a disabled function)."""
    sites: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"Graph break in user code at (\S+)", record.getMessage())
            if found:
                sites.append(found.group(1))

    handler = Collect()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    torch._logging.set_logs(graph_breaks=True)
    try:
        yield sites
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)


def outside_torch(sites: list[str]) -> set[str]:
    return {s for s in sites if not str(Path(s.rsplit(":", 1)[0]).resolve()).startswith(TORCH_DIR)}


@pytest.fixture(scope="module")
def torch_break_sites() -> set[str]:
    """Where the same training step with torch.optim.AdamW breaks, outside torch's own code."""
    torch._dynamo.reset()
    net, opt, _ = setup(torch.optim, "AdamW", {}, lr=0.01)
    with graph_break_sites() as sites:
        torch._dynamo.explain(step_fn(net, opt))(*batches()[0])
    torch._dynamo.reset()
    return outside_torch(sites)


def counting_backend() -> tuple[Callable[..., Any], list[int]]:
    """A dynamo backend that runs graphs eagerly and counts how many it is given."""
    compiled: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled.append(len(gm.graph.nodes))
        return gm.forward

    return backend, compiled


@pytest.mark.parametrize(("name", "kwargs", "chosen"), CONFIGS, ids=[f"{n}-{c}" for n, _, c in CONFIGS])
def test_no_graph_break_in_portopt_code(
    name: str, kwargs: dict[str, Any], chosen: str, torch_break_sites: set[str]
) -> None:
    net, opt, _ = setup(portopt, name, kwargs, lr=0.01)
    assert opt.chosen_backends() == [{"cpu": chosen}]
    with graph_break_sites() as sites:
        explained = torch._dynamo.explain(step_fn(net, opt))(*batches()[0])
    frames = [f"{f.filename}:{f.lineno}" for reason in explained.break_reasons for f in reason.user_stack]
    assert not [s for s in sites + frames if in_portopt(s.rsplit(":", 1)[0])]
    assert outside_torch(sites) <= torch_break_sites  # loss.backward() and zero_grad, as with torch.optim
    assert all(p in opt.state for p in net.parameters())  # the step was traced (its states created)
    assert max(len(ops) for ops in explained.ops_per_graph) > 10  # the update is in a graph


@pytest.mark.parametrize(("name", "kwargs", "chosen"), CONFIGS, ids=[f"{n}-{c}" for n, _, c in CONFIGS])
def test_no_recompile_across_steps_with_a_scheduler_and_a_tensor_lr(
    name: str, kwargs: dict[str, Any], chosen: str
) -> None:
    net, opt, sched = setup(portopt, name, kwargs, lr=torch.tensor(0.01))
    backend, compiled = counting_backend()
    train_step = torch.compile(step_fn(net, opt), backend=backend)
    data = batches()
    train_step(*data[0])
    sched.step()
    torch.compiler.set_stance("fail_on_recompile")  # from here on a recompile raises
    for x, y in data[1:]:
        train_step(x, y)
        sched.step()
    assert compiled  # the step ran compiled
    for p, q in zip(net.parameters(), eager_truth(name, kwargs, data).parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_float_lr_recompiles_once_as_for_torch_optim() -> None:
    """dynamo compiles a float lr as a constant, then (once the scheduler changed it) as an input."""
    counts = {}
    for lib in (torch.optim, portopt):
        torch._dynamo.reset()
        net, opt, sched = setup(lib, "AdamW", {}, lr=0.01)
        backend, compiled = counting_backend()
        train_step = torch.compile(step_fn(net, opt), backend=backend)
        data = batches()
        for x, y in data[:2]:
            train_step(x, y)
            sched.step()
        first = len(compiled)
        torch.compiler.set_stance("fail_on_recompile")
        for x, y in data[2:]:
            train_step(x, y)
            sched.step()
        torch.compiler.set_stance("default")
        counts[lib.__name__] = first
    assert counts["portopt"] <= counts["torch.optim"]


@pytest.mark.parametrize("options", [{"precision": "q8-states"}, {"skip_nonfinite": True}], ids=str)
def test_under_compile_what_the_traced_step_cannot_take_runs_eagerly(options: dict[str, Any]) -> None:
    """Precision policies and step skipping need host decisions: such a group is stepped outside the graph
    (the one documented break), with the numbers of an eager run."""
    net, opt, _ = setup(portopt, "AdamW", options, lr=0.01)
    eager_net, eager_opt, _ = setup(portopt, "AdamW", options, lr=0.01)
    train_step = torch.compile(step_fn(net, opt), backend="eager")
    data = batches()[:3]
    with graph_break_sites() as sites:
        for x, y in data:
            train_step(x, y)
    for x, y in data:
        step_fn(eager_net, eager_opt)(x, y)
    ours = {s.rsplit(":", 1)[0] for s in sites if in_portopt(s.rsplit(":", 1)[0])}
    assert ours == {str(Path(portopt.optim.graph.__file__).resolve())}  # the documented break, and only it
    for p, q in zip(net.parameters(), eager_net.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.last_step_skipped is eager_opt.last_step_skipped is False


@pytest.mark.parametrize(
    ("name", "kwargs", "chosen"), [CONFIGS[0], CONFIGS[3]], ids=["AdamW-torch_fused", "NAdam-torch"]
)
def test_aot_autograd_functionalizes_the_traced_step(name: str, kwargs: dict[str, Any], chosen: str) -> None:
    """AOTAutograd (what Inductor compiles from) turns the step's in-place updates into a functional graph
    and writes them back: the numbers are eager torch.optim's."""
    net, opt, sched = setup(portopt, name, kwargs, lr=torch.tensor(0.01))
    train_step = torch.compile(step_fn(net, opt), backend="aot_eager")
    data = batches()
    for x, y in data:
        train_step(x, y)
        sched.step()
    for p, q in zip(net.parameters(), eager_truth(name, kwargs, data).parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_complex_params_in_a_compiled_step() -> None:
    """The traced step views complex parameters as real, as the eager one; states stay complex."""
    results = []
    for compiled in (True, False):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        weight = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=gen))
        bias = nn.Parameter(torch.randn(3, generator=gen))
        opt = portopt.Adam([weight, bias], lr=torch.tensor(0.01))
        x = torch.randn(5, 4, dtype=torch.complex64, generator=gen)

        def train_step(x: torch.Tensor = x, w: nn.Parameter = weight, b: nn.Parameter = bias, o: Any = opt) -> None:
            ((x @ w).abs() + b).sum().backward()
            o.step()
            o.zero_grad()

        run = torch.compile(train_step, backend="eager") if compiled else train_step
        run()
        torch.compiler.set_stance("fail_on_recompile" if compiled else "default")
        for _ in range(4):
            run()
        torch.compiler.set_stance("default")
        assert opt.state[weight]["exp_avg"].dtype == torch.complex64
        results.append((weight.detach().clone(), bias.detach().clone()))
    (w1, b1), (w2, b2) = results
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b1, b2, rtol=1e-6, atol=1e-7)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")),
]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PORTOPT_NO_COMPILE", "") not in ("", "0"), reason="PORTOPT_NO_COMPILE is set")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "kwargs", "chosen"), CONFIGS[:4], ids=[f"{n}-{c}" for n, _, c in CONFIGS[:4]])
def test_inductor_compiled_training_matches_eager_torch(
    name: str, kwargs: dict[str, Any], chosen: str, device: str
) -> None:
    """Inductor (C++ on the CPU, Triton on CUDA) compiles the whole step; 20 steps, no recompile after the first."""
    net, opt, sched = setup(portopt, name, kwargs, lr=torch.tensor(0.01), device=device)
    train_step = torch.compile(step_fn(net, opt))
    data = [(x.to(device), y.to(device)) for x, y in batches()]
    train_step(*data[0])
    sched.step()
    torch.compiler.set_stance("fail_on_recompile")
    for x, y in data[1:]:
        train_step(x, y)
        sched.step()
    torch.compiler.set_stance("default")
    for p, q in zip(net.parameters(), eager_truth(name, kwargs, data, device).parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
