"""``foreach=``, ``fused=``, ``capturable=`` pick the implementation torch's flags pick.

Each run is compared with torch.optim given the same flag, in the same test: on the CPU the
implementation portopt maps a flag to issues torch's own calls for SGD, Adam, AdamW, Adagrad,
RMSprop, RAdam and Adamax, so the results are bit-identical to torch's implementation of that
flag (NAdam differs by a float32 rounding of one coefficient, see the README). Which aten ops
run is checked with a dispatch-mode recorder: ``foreach=False`` issues no ``_foreach_*`` op
(one tensor at a time, as torch's for-loop), ``foreach=True`` does, ``fused=True`` calls torch's
fused kernel.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import portopt

STEPS = 8
CASES: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}),
    ("Adagrad", {"lr_decay": 0.01, "weight_decay": 0.1}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.1}),
    ("NAdam", {"weight_decay": 0.1}),
    ("RAdam", {"weight_decay": 0.1}),
    ("Adamax", {"weight_decay": 0.1}),
]
FLAGS: list[dict[str, bool]] = [{"foreach": False}, {"foreach": True}, {"fused": False}, {"fused": True}]
FUSED_IN_TORCH = {"SGD", "Adam", "AdamW", "Adagrad"}


class OpRecorder(TorchDispatchMode):
    """The names of the aten ops that run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def run(library: Any, name: str, kwargs: dict[str, Any], steps: int = STEPS) -> tuple[list[torch.Tensor], Any]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3, generator=gen)), nn.Parameter(torch.randn(7, generator=gen))]
    opt = getattr(library, name)(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params], opt


def cases() -> list[Any]:
    out = []
    for name, kwargs in CASES:
        for flags in FLAGS:
            if "fused" in flags and name not in FUSED_IN_TORCH:
                continue
            out.append(pytest.param(name, kwargs, flags, id=f"{name}-{kwargs}-{flags}"))
    return out


@pytest.mark.parametrize(("name", "kwargs", "flags"), cases())
def test_each_flag_matches_torchs_implementation_of_it(
    name: str, kwargs: dict[str, Any], flags: dict[str, bool]
) -> None:
    theirs, _ = run(torch.optim, name, {**kwargs, **flags})
    ours, opt = run(portopt, name, {**kwargs, **flags})
    for a, b in zip(ours, theirs, strict=True):
        if name == "NAdam":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)
    expected = {
        "foreach": {True: "torch", False: "torch (per tensor)"},
        "fused": {True: "torch_fused", False: "torch (per tensor)"},
    }
    ((flag, value),) = flags.items()
    assert opt.chosen_backends() == [{"cpu": expected[flag][value]}]


def _ops(library: Any, name: str, flags: dict[str, bool]) -> list[str]:
    param = nn.Parameter(torch.ones(4))
    other = nn.Parameter(torch.ones(3))
    opt = getattr(library, name)([param, other], **flags)
    param.grad, other.grad = torch.ones(4), torch.ones(3)
    with OpRecorder() as recorder:
        opt.step()
    return recorder.ops


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_foreach_false_runs_one_tensor_at_a_time_and_foreach_true_multi_tensor_ops(name: str) -> None:
    def foreach_ops(ops: list[str]) -> list[str]:
        return [op for op in ops if op.startswith("_foreach_")]

    assert not foreach_ops(_ops(torch.optim, name, {"foreach": False}))  # torch's for-loop: the truth
    assert not foreach_ops(_ops(portopt, name, {"foreach": False}))
    assert foreach_ops(_ops(torch.optim, name, {"foreach": True}))
    assert foreach_ops(_ops(portopt, name, {"foreach": True}))


@pytest.mark.parametrize("name", sorted(FUSED_IN_TORCH))
def test_fused_true_calls_torchs_fused_kernel(name: str) -> None:
    kernel = {"SGD": "_fused_sgd_", "Adam": "_fused_adam_", "AdamW": "_fused_adamw_", "Adagrad": "_fused_adagrad_"}
    for library in (torch.optim, portopt):
        assert any(op.startswith(kernel[name]) for op in _ops(library, name, {"fused": True})), library
        assert not any(op.startswith("_fused_") for op in _ops(library, name, {"fused": False}))


def _compiled_unavailable() -> str | None:
    from portopt.backends import named_backend

    return named_backend("compiled").unavailable_reason()


@pytest.mark.skipif(
    _compiled_unavailable() is not None, reason=f"compiled backend unavailable: {_compiled_unavailable()}"
)
def test_fused_true_without_a_torch_kernel_takes_the_compiled_one_pass_kernel() -> None:
    """No torch kernel computes Lion: ``fused=True`` asks for the spec's compiled one-pass kernel."""
    param = nn.Parameter(torch.ones(4))
    opt = portopt.Optimizer([param], "lion", fused=True)
    assert opt.chosen_backends() == [{"cpu": "compiled"}]
    assert portopt.Optimizer([param], "adamw", fused=True).chosen_backends() == [{"cpu": "torch_fused"}]


def test_fused_true_where_no_fused_implementation_runs_raises_a_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch raises RuntimeError where its fused kernels cannot run; so does portopt where neither a torch kernel
    nor a compiled one-pass kernel can (here: compiling switched off, an algorithm torch has no kernel for)."""
    monkeypatch.setenv("PORTOPT_NO_COMPILE", "1")
    param = nn.Parameter(torch.ones(4))
    opt = portopt.Optimizer([param], "lion", fused=True)
    param.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="fused=True: no fused implementation of Lion runs here"):
        opt.step()
    assert torch.equal(param.detach(), torch.ones(4))
    assert not opt.state


@pytest.mark.parametrize(
    ("backend", "flags", "message"),
    [
        ("torch", {"fused": True}, "fused=True asks for a fused implementation"),
        ("torch_fused", {"foreach": True}, "foreach=True asks for the foreach lowering"),
        ("compiled", {"foreach": False}, "foreach=False/fused=False ask for torch's per-tensor loop"),
        ("torch_fused", {"fused": False}, "foreach=False/fused=False ask for torch's per-tensor loop"),
        ("reference", {"capturable": True}, "capturable=True asks for a step without host synchronisation"),
        ("reference", {"differentiable": True}, "differentiable=True asks for a step autograd can go through"),
    ],
    ids=str,
)
def test_a_backend_that_contradicts_a_flag_is_refused(backend: str, flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"backend='{backend}' contradicts the param group's flags: {message}"):
        portopt.Adam([nn.Parameter(torch.ones(3))], backend=backend, **flags)
    opt = portopt.Adam([nn.Parameter(torch.ones(3))], backend=backend)
    with pytest.raises(ValueError, match="contradicts the param group's flags"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], **flags})


@pytest.mark.parametrize(
    ("backend", "flags", "chosen"),
    [
        ("torch", {"foreach": False}, "torch (per tensor)"),
        ("torch", {"foreach": True}, "torch"),
        ("torch_fused", {"fused": True}, "torch_fused"),
        ("compiled", {"fused": True}, "compiled"),
    ],
    ids=str,
)
def test_a_backend_that_provides_the_flag_keeps_it(backend: str, flags: dict[str, Any], chosen: str) -> None:
    opt = portopt.Adam([nn.Parameter(torch.ones(3))], backend=backend, **flags)
    assert opt.chosen_backends() == [{"cpu": chosen}]


def test_flags_from_another_optimizers_checkpoint_do_not_override_a_named_backend() -> None:
    """torch.optim.Adam(fused=True)'s checkpoint loaded into portopt.Adam(backend="torch"): the backend stays."""
    theirs_param = nn.Parameter(torch.ones(3))
    theirs = torch.optim.Adam([theirs_param], fused=True)
    theirs_param.grad = torch.ones(3)
    theirs.step()
    param = nn.Parameter(theirs_param.detach().clone())
    ours = portopt.Adam([param], backend="torch")
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["fused"] is True
    assert ours.chosen_backends() == [{"cpu": "torch"}]
    param.grad = torch.ones(3)
    ours.step()
    theirs.step()
    assert torch.equal(param.detach(), theirs_param.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: capturable=True needs a CUDA device")
@pytest.mark.parametrize("name", ["Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop"])
def test_capturable_on_cuda_matches_torch_and_captures_in_a_cuda_graph(name: str) -> None:
    def make(library: Any) -> tuple[list[nn.Parameter], Any]:
        gen = torch.Generator().manual_seed(0)
        params = [
            nn.Parameter(torch.randn(33, generator=gen).cuda()),
            nn.Parameter(torch.randn(4, 5, generator=gen).cuda()),
        ]
        return params, getattr(library, name)(params, lr=0.01, capturable=True)

    results = []
    for library in (torch.optim, portopt):
        params, opt = make(library)
        gen = torch.Generator().manual_seed(1)
        grads = [[torch.randn(p.shape, generator=gen).cuda() for p in params] for _ in range(6)]
        for p, g in zip(params, grads[0], strict=True):
            p.grad = g.clone()
        opt.step()  # states created eagerly, then captured
        assert all(s["step"].device.type == "cuda" for s in opt.state.values())
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            opt.step()
        for step_grads in grads[1:]:
            for p, g in zip(params, step_grads, strict=True):
                assert p.grad is not None
                p.grad.copy_(g)
            graph.replay()
        torch.cuda.synchronize()
        results.append([p.detach().cpu() for p in params])
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)
