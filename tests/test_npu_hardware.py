"""The NPU backend on Ascend hardware: torch_npu's real ops against the emulation, the suite, GradScaler.

Every test needs torch_npu and an NPU (``pytest.mark.npu``: skipped elsewhere, with the
reason). They are the hardware half of the op contract: the CPU tests prove the rules
against the emulation (tests/test_npu_emulation.py, tests/test_npu_rules.py); these prove
the emulation against the silicon, kernel by kernel and dtype by dtype, and run the rules
on NPU tensors against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import portopt
from portopt.algorithms import get_spec
from portopt.backends.npu.kernels import KERNELS, NpuKernel, match_kernels
from portopt.backends.npu.ops import NpuOps, hardware_ops, load_ops_module

pytestmark = pytest.mark.npu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "npu"


def npu_table() -> NpuOps:
    ops = hardware_ops()
    assert not isinstance(ops, str), ops
    return ops


def used_by_the_library(kernel: NpuKernel) -> bool:
    """Whether the equivalence proof binds some library spec to ``kernel`` (npu_apply_adam_w's amsgrad: none)."""
    specs = [get_spec("adamw", amsgrad=a) for a in (False, True)] + [get_spec("adam", amsgrad=a) for a in (False, True)]
    specs += [get_spec("sgd", momentum=True, nesterov=n) for n in (False, True)]
    return any(m.kernel == kernel for s in specs for spec in (s, s.maximized()) for m in match_kernels(spec))


def kernel_inputs(
    kernel: NpuKernel, dtype: torch.dtype, seed: int = 0
) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in ((64, 33), (257,))]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    states = [[(torch.rand(p.shape, generator=gen) * 0.1).to(dtype) for p in params] for _ in kernel.spec.states]
    return params, grads, states


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_emulation_matches_the_npu_op(kernel: NpuKernel, dtype: torch.dtype) -> None:
    """The emulated op on CPU and torch_npu's op on the NPU, from the same inputs, for three steps."""
    hardware = npu_table()
    reason = hardware.missing_reason(kernel.op) or kernel.soc_reason(hardware.soc) or kernel.dtype_reason(dtype)
    if not used_by_the_library(kernel):
        reason = "no library spec is computed by this configuration"
    if reason is not None:
        pytest.skip(f"the rule does not use this kernel here: {reason}")
    emulation = load_ops_module("portopt.backends.npu_emulation")
    hypers = {
        "lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "eps": 1e-3,
        "weight_decay": 0.1,
        "momentum": 0.9,
        "dampening": 0.1,
    }
    values = {name: hypers[name] for name in kernel.spec.hyper_names}
    params, grads, states = kernel_inputs(kernel, dtype)
    on_npu = (
        [p.to(DEVICE) for p in params],
        [g.to(DEVICE) for g in grads],
        [[s.to(DEVICE) for s in ss] for ss in states],
    )
    for t in (1.0, 2.0, 3.0):
        kernel.launch(emulation, params, grads, states, t, values)
        kernel.launch(hardware, *on_npu, t, values)
        for got, want in zip(
            [*on_npu[0], *(s for ss in on_npu[2] for s in ss)],
            [*params, *(s for ss in states for s in ss)],
            strict=True,
        ):
            want64 = want.double()
            allowed = 4 * torch.finfo(dtype).eps * (want64.abs() + want64.abs().mean()) + torch.finfo(dtype).tiny
            gap = (got.cpu().double() - want64).abs()
            assert bool((gap <= allowed).all()), (
                f"{kernel.name} {dtype} t={t:g}: the NPU op and the emulation differ by up to "
                f"{float((gap / allowed).max()):.3g} x the allowance; the emulation must follow the hardware"
            )


def test_npu_fused_adamw_ignores_found_inf_as_documented() -> None:
    """If this fails, torch_npu has started to honour found_inf: update portopt.backends.npu_emulation."""
    if npu_table().op("_fused_adamw_") is None:
        pytest.skip(npu_table().missing_reason("_fused_adamw_") or "")
    param = torch.ones(16, device=DEVICE)
    before = param.clone()
    grad, m, v = torch.full_like(param, 0.5), torch.zeros_like(param), torch.zeros_like(param)
    torch._fused_adamw_(
        [param], [grad], [m], [v], [], [torch.tensor(1.0, device=DEVICE)],
        lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
        grad_scale=torch.tensor(1024.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE),
    )  # fmt: skip
    assert not torch.equal(param.cpu(), before.cpu()), "the step was skipped: found_inf is honoured now"


def test_npu_backend_passes_the_quick_suite() -> None:
    from portopt.backends.npu import NPU
    from portopt.conformance.candidates import BackendImplementation
    from portopt.conformance.cases import build_cases
    from portopt.conformance.precision import get_precision
    from portopt.conformance.runner import run_case

    impl = BackendImplementation(NPU)
    results = [
        run_case(case, impl, get_precision(p), DEVICE)
        for case in build_cases(["adamw", "adam", "sgd"], quick=True)
        for p in ("fp32", "bf16", "fp16+master")
    ]
    bad = [f"{r.case} {r.precision}: {r.status} {r.reason}" for r in results if r.status in ("fail", "error")]
    assert not bad, "\n".join(bad)
    assert any(r.status == "pass" for r in results)


def test_grad_scaler_protocol_on_npu_matches_the_cpu_run() -> None:
    """GradScaler's protocol (grad_scale/found_inf on the optimizer) on NPU equals the same run on CPU; overflow skipped."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 16), (16,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    runs = {}
    for device, backend in ((DEVICE, "npu"), ("cpu", "torch")):
        params = [torch.nn.Parameter(p.clone().to(device)) for p in start]
        opt = portopt.AdamW(params, backend=backend, lr=0.01, eps=1e-3, weight_decay=0.1)
        for step, gs in enumerate(grads):
            for p, g in zip(params, gs, strict=True):
                p.grad = (g * 65536.0).to(device)
            opt.grad_scale = torch.tensor(65536.0, device=device)  # type: ignore[attr-defined]
            opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0, device=device)  # type: ignore[attr-defined]
            opt.step()
            del opt.grad_scale, opt.found_inf  # type: ignore[attr-defined]
        runs[device] = [p.detach().cpu() for p in params]
        assert all(float(opt.state[p]["step"]) == len(grads) - 1 for p in params)
        if device == DEVICE:
            assert opt.chosen_backends() == [{f"{DEVICE}:0": "npu"}]
    for got, want in zip(runs[DEVICE], runs["cpu"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
