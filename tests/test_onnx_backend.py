"""The ``onnx`` backend: onnxruntime as one more implementation under test.

``portopt conformance --quick --backend onnx`` must pass for every algorithm in float32,
bfloat16 and float16 with float32 master weights, against the float64 reference; float16
parameters stepped directly (float32 arithmetic inside the graph, one rounding on store)
must land within one float16 ulp of the float64 reference; the front end runs on it; a step
that fails writes nothing; sessions are built once per (spec, dtypes, rank); and without
onnxruntime the backend says why.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import portopt
from portopt.algorithms import ALGORITHMS, get_spec
from portopt.backends import available, named_backend, select_backend
from portopt.backends import onnx as onnx_backend
from portopt.backends.reference import build_reference_step
from portopt.conformance.candidates import BackendImplementation
from portopt.conformance.cases import build_cases
from portopt.conformance.precision import PRECISIONS, ulp
from portopt.conformance.results import PASS
from portopt.conformance.runner import RunOptions, run_matrix
from portopt.spec.symbols import Layout

ORT_REASON = onnx_backend.onnxruntime_unavailable_reason()
needs_onnxruntime = pytest.mark.skipif(ORT_REASON is not None, reason=ORT_REASON or "")


@needs_onnxruntime
def test_quick_conformance_passes_every_algorithm() -> None:
    """The issue's acceptance run, `portopt conformance --quick --backend onnx`, in-process."""
    impl = BackendImplementation(named_backend("onnx"))
    precisions = [PRECISIONS[p] for p in ("fp32", "fp16+master")]
    results = run_matrix(build_cases(), [impl], precisions, options=RunOptions(diagnose=False))
    # bfloat16 crosses onnxruntime's API as float32 (widened, rounded once on store): a few algorithms.
    results += run_matrix(build_cases(["adamw", "lamb", "lion"]), [impl], [PRECISIONS["bf16"]])
    assert [(r.case, r.precision, r.reason) for r in results if r.status != PASS] == []
    for p in precisions:
        assert {r.algorithm for r in results if r.precision == p.name} == set(ALGORITHMS)


@needs_onnxruntime
@pytest.mark.parametrize("name", ["adamw", "nadam", "radam", "lamb", "lion"])
def test_float16_parameters_are_rounded_once_from_float32_arithmetic(name: str) -> None:
    """Float16 parameter, gradient and element-wise states (NAdam's per-tensor mu_product in float32):
    one step lands within one float16 ulp of the float64 reference taken from the same float16 inputs."""
    spec = get_spec(name)
    gen = torch.Generator().manual_seed(3)
    param = (torch.randn(4, 33, generator=gen) + 0.1).half()
    grad = torch.randn(4, 33, generator=gen).half()
    hypers = {**spec.defaults(), "lr": 0.05}
    step = onnx_backend.build_onnx_step(spec)
    state: dict[str, torch.Tensor] = {}
    for _ in range(6):  # past RAdam's switch needs more steps; six exercise states that have moved
        before = {k: v.clone() for k, v in state.items()}
        start = param.clone()
        step([param], [grad], [state], hypers)
        reference_param = start.double()
        reference_state = {k: v.double() for k, v in before.items()}
        build_reference_step(spec)([reference_param], [grad.double()], [reference_state], hypers)
        assert param.dtype == torch.float16
        assert (param.double() - reference_param).abs().le(ulp(reference_param, torch.float16)).all()
        for name_, value in state.items():
            if name_ == "step":
                continue
            assert value.dtype == (torch.float32 if spec.state_decl(name_).layout is Layout.TENSOR else torch.float16)
            expected = reference_state[name_]
            assert (value.double() - expected).abs().le(ulp(expected, value.dtype) + 1e-7 * expected.abs()).all()


@needs_onnxruntime
def test_the_front_end_runs_on_it_like_torch_optim() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    twin = torch.nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    ours = portopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend="onnx")
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    assert ours.chosen_backends() == [{"cpu": "onnx"}]
    x = torch.randn(16, 6)
    for _ in range(5):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The graph's hyperparameters are float32 scalars: 1 − β2 from float32(0.999) is 1.3e-5 off relative
    # (torch takes 1 − β2 in float64), so the second moment agrees to 1e-4; the bias correction, taken from
    # the same β2, cancels it in the update.
    for a, b in zip(ours.state.values(), theirs.state.values(), strict=True):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-4, atol=1e-10)


@needs_onnxruntime
def test_a_failing_step_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime fails on the second tensor: the first tensor's parameter and state are unchanged."""
    spec = get_spec("adam")
    step = onnx_backend.build_onnx_step(spec)
    params = [torch.randn(5), torch.randn(2, 3)]
    grads = [torch.randn(5), torch.randn(2, 3)]
    states: list[dict[str, torch.Tensor]] = [{}, {}]
    hypers = spec.defaults()
    step(params, grads, states, hypers)
    before = [p.clone() for p in params], [{k: v.clone() for k, v in s.items()} for s in states]
    real = onnx_backend._session

    def failing_on_rank_2(spec_: object, sig: onnx_backend._Signature) -> object:
        session = real(spec_, sig)
        if sig.rank < 2:
            return session

        class Broken:
            def run(self, *args: object) -> object:
                raise RuntimeError("onnxruntime failed")

        return Broken()

    monkeypatch.setattr(onnx_backend, "_session", failing_on_rank_2)
    with pytest.raises(RuntimeError, match="onnxruntime failed"):
        step(params, grads, states, hypers)
    for p, old in zip(params, before[0], strict=True):
        assert torch.equal(p, old)
    for s, old_state in zip(states, before[1], strict=True):
        assert all(torch.equal(s[k], v) for k, v in old_state.items())


@needs_onnxruntime
def test_sessions_are_built_once_per_spec_dtypes_and_rank() -> None:
    spec = get_spec("lion")
    onnx_backend._session.cache_clear()
    for _ in range(3):
        step = onnx_backend.build_onnx_step(spec)  # a new step function each time: the cache is shared
        step([torch.randn(7), torch.randn(3)], [torch.randn(7), torch.randn(3)], [{}, {}], spec.defaults())
        step([torch.randn(2, 2)], [torch.randn(2, 2)], [{}], spec.defaults())
        step([torch.randn(4).double()], [torch.randn(4).double()], [{}], spec.defaults())
    info = onnx_backend._session.cache_info()
    assert info.currsize == 3  # float32 rank 1, float32 rank 2, float64 rank 1
    assert info.hits >= 6


def test_it_is_reachable_by_name_only() -> None:
    backend = named_backend("onnx")
    assert not backend.auto_select
    assert select_backend("cpu", "auto", get_spec("adamw")).name != "onnx"
    row = next(r for r in available() if r.name == "onnx")
    assert row.usable == (ORT_REASON is None)
    assert row.reason == (ORT_REASON or row.reason)


def test_without_onnxruntime_the_backend_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def hide(name: str, *args: object) -> object:
        return None if name == "onnxruntime" else real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    onnx_backend.onnxruntime_unavailable_reason.cache_clear()
    try:
        reason = onnx_backend.onnxruntime_unavailable_reason()
        assert reason == "package onnxruntime is not installed (pip install 'portopt[onnx]')"
        with pytest.raises(ValueError, match="backend 'onnx' is not usable here: package onnxruntime is not installed"):
            select_backend("cpu", "onnx", get_spec("adam"))
    finally:
        onnx_backend.onnxruntime_unavailable_reason.cache_clear()


def test_a_spec_it_cannot_lower_is_refused_with_the_reason() -> None:
    """Interface names that would clash in the graph: the backend declines with the reason, never builds."""
    from portopt.spec import G, Hyperparameter, P, Spec, hyper

    spec = Spec("odd", "odd", (Hyperparameter("param_out", 0.1),), (), (), P - hyper("param_out") * G)
    reason = named_backend("onnx").unsupported_reason(spec)
    assert reason is not None
    assert "would use the name 'param_out' twice" in reason
    with pytest.raises(ValueError, match="would use the name 'param_out' twice"):
        onnx_backend.build_onnx_step(spec)
