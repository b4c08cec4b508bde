"""ONNX's own optimizer ops under test (``ai.onnx.preview.training`` Adam, Adagrad, Momentum).

Facts checked: onnxruntime does not implement the ops; ``onnx.reference`` does, as the
operators' documented pseudo code says (transcribed here in numpy, independently). Then the
conformance suite judges them against the float64 reference: Adagrad and Momentum (with
ONNX's update count ``T = t − 1``) are torch's algorithms and pass; Adam and its AdamW use
differ, and the diagnosis names each convention that differs (ε before the bias correction,
the bias correction from the update count, the decay after the update). The catalogue's
combined ONNX-Adam variant is checked to be ONNX's Adam exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch

from portopt.backends.onnx import onnxruntime_unavailable_reason
from portopt.backends.reference import build_reference_step
from portopt.conformance.candidates import parse_implementation
from portopt.conformance.cases import build_cases, find_case
from portopt.conformance.precision import PRECISIONS
from portopt.conformance.results import FAIL, PASS, SKIP
from portopt.conformance.runner import RunOptions, run_case, run_matrix
from portopt.conformance.variants import known_variants

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'portopt[onnx]')")
preview = pytest.importorskip("portopt.conformance.onnx_preview")
ORT_REASON = onnxruntime_unavailable_reason()

FP32 = PRECISIONS["fp32"]
CASES = build_cases(["adam", "adamw", "adagrad", "sgd"])
ADAM_ATTRS = {"alpha": 0.8, "beta": 0.95, "epsilon": 1e-3, "norm_coefficient": 0.1, "norm_coefficient_post": 0.02}


@pytest.mark.skipif(ORT_REASON is not None, reason=ORT_REASON or "")
@pytest.mark.parametrize(("op", "states"), [("Adam", ("V", "H")), ("Adagrad", ("H",)), ("Momentum", ("V",))])
def test_onnxruntime_does_not_implement_the_preview_training_ops(op: str, states: tuple[str, ...]) -> None:
    import onnxruntime as ort

    attrs = {
        "Adam": {},
        "Adagrad": {},
        "Momentum": {"alpha": 0.9, "beta": 1.0, "mode": "standard", "norm_coefficient": 0.0},
    }
    model = preview.preview_model(op, states, attrs[op], onnx.TensorProto.FLOAT)
    with pytest.raises(Exception, match=rf"ai\.onnx\.preview\.training:{op}\(-?\d+\) is not a registered function/op"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run_op(op: str, states: tuple[str, ...], attrs: Mapping[str, object], r: float, t: int, x, g, *held):
    from onnx.reference import ReferenceEvaluator

    model = preview.preview_model(op, states, attrs, onnx.TensorProto.DOUBLE)
    feeds = {"R": np.float32(r), "T": np.int64(t), "X": x, "G": g, **dict(zip(states, held, strict=True))}
    return ReferenceEvaluator(model).run(None, feeds)


@pytest.mark.parametrize("t", [0, 3])
def test_onnx_reference_adam_is_its_documented_pseudo_code(t: int) -> None:
    rng = np.random.default_rng(0)
    x, g, v, h = rng.normal(size=(4, 7)), rng.normal(size=(4, 7)), rng.normal(size=(4, 7)), rng.random((4, 7))
    a = ADAM_ATTRS
    r = 0.01
    got = _run_op("Adam", ("V", "H"), a, r, t, x, g, v, h)
    # The operator's documentation, line by line (float32 attributes, as the model stores them):
    alpha, beta, eps, nc, post = (float(np.float32(a[k])) for k in ADAM_ATTRS)
    r32 = float(np.float32(r))
    g_reg = nc * x + g
    v_new = alpha * v + (1 - alpha) * g_reg
    h_new = beta * h + (1 - beta) * g_reg * g_reg
    h_sqrt = np.sqrt(h_new) + eps
    r_adjusted = r32 * np.sqrt(1 - beta**t) / (1 - alpha**t) if t > 0 else r32
    x_final = (1 - post) * (x - r_adjusted * v_new / h_sqrt)
    # rtol: the evaluator forms 1 − alpha and 1 − beta in float32 (numpy keeps its attributes' float32).
    for ours, theirs in zip(got, (x_final, v_new, h_new), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("mode", ["standard", "nesterov"])
@pytest.mark.parametrize("t", [0, 2])
def test_onnx_reference_momentum_and_adagrad_are_their_documented_pseudo_code(mode: str, t: int) -> None:
    rng = np.random.default_rng(1)
    x, g, v = rng.normal(size=9), rng.normal(size=9), rng.normal(size=9)
    alpha, beta, nc, r = 0.875, 0.75, 0.125, 0.5  # exact in float32
    x_new, v_new = _run_op(
        "Momentum", ("V",), {"alpha": alpha, "beta": beta, "mode": mode, "norm_coefficient": nc}, r, t, x, g, v
    )
    g_reg = nc * x + g
    v_expected = alpha * v + (beta if t > 0 else 1.0) * g_reg
    x_expected = x - r * (g_reg + alpha * v_expected if mode == "nesterov" else v_expected)
    np.testing.assert_allclose(v_new, v_expected, rtol=1e-12)
    np.testing.assert_allclose(x_new, x_expected, rtol=1e-12)
    h = rng.random(9)
    decay, eps = 0.25, 0.0625
    x_new, h_new = _run_op(
        "Adagrad", ("H",), {"decay_factor": decay, "epsilon": eps, "norm_coefficient": nc}, r, t, x, g, h
    )
    h_expected = h + g_reg * g_reg
    np.testing.assert_allclose(h_new, h_expected, rtol=1e-12)
    np.testing.assert_allclose(x_new, x - r / (1 + t * decay) * g_reg / (np.sqrt(h_expected) + eps), rtol=1e-12)


@pytest.mark.parametrize(
    ("case_name", "cls", "variant"),
    [
        (
            "adamw[wd=0.1]/quick",
            "AdamW",
            "eps-before-bias-correction+bias-correction-from-update-count+decay-after-update",
        ),
        ("adam[wd=0.1]/quick", "Adam", "eps-before-bias-correction+bias-correction-from-update-count"),
    ],
)
def test_the_catalogued_onnx_adam_convention_is_onnx_s_adam(case_name: str, cls: str, variant: str) -> None:
    """The combined variant, run by portopt's float64 reference, equals ONNX's op in float64 for several steps."""
    case = find_case(case_name, CASES)
    spec = case.spec()
    hypers = {**spec.defaults(), **dict(case.hypers), "eps": 1e-3, "beta2": 0.99}
    (found,) = [v for v in known_variants(case, spec, [hypers]) if v.name == variant]
    gen = torch.Generator().manual_seed(5)
    ours = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    theirs = ours.clone().requires_grad_(False)
    optimizer = getattr(preview, cls)(
        [theirs], lr=hypers["lr"], betas=(hypers["beta1"], hypers["beta2"]), eps=hypers["eps"],
        weight_decay=hypers["weight_decay"],
    )  # fmt: skip
    step = build_reference_step(found.spec)
    state: dict[str, torch.Tensor] = {}
    for _ in range(5):
        grad = torch.randn(6, 5, generator=gen, dtype=torch.float64)
        step([ours], [grad], [state], found.group_hypers[0])
        theirs.grad = grad
        optimizer.step()
        # ONNX stores attributes as float32; everything else is float64 on both sides.
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(optimizer.state[theirs]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-6, atol=1e-12)


def test_onnx_adagrad_and_momentum_are_torch_s() -> None:
    results = run_matrix(CASES, [parse_implementation("onnx.preview")], [FP32], options=RunOptions(diagnose=False))
    by_case = {r.case: r for r in results}
    for name in (
        "adagrad[wd=0.1,eps=1e-06,lr_decay=0.01]/quick",
        "sgd[momentum,wd=0.1,dampening=0.1]/quick",
        "sgd[momentum,nesterov,wd=0.01]/quick",
    ):
        assert by_case[name].status == PASS, by_case[name].reason
    assert by_case["adam[amsgrad,wd=0.1]/quick"].status == SKIP
    assert "has no option 'amsgrad'" in by_case["adam[amsgrad,wd=0.1]/quick"].reason
    assert by_case["sgd[wd=0.1,maximize]/quick"].reason == "onnx.preview.Momentum has no maximize option"


@pytest.mark.parametrize(
    ("impl", "case_name", "matched", "phrases"),
    [
        (
            "onnx.preview:AdamW@adamw",
            "adamw[wd=0.1]/quick",
            "eps-before-bias-correction+bias-correction-from-update-count+decay-after-update",
            [
                "ONNX preview-training Adam's conventions",
                "ε added before the bias correction: (sqrt(v) + ε)/sqrt(1 − β2^t)",
                "bias correction from the update count T = t − 1 (none at the first step",
                "decoupled weight decay after the update",
            ],
        ),
        (
            "onnx.preview:Adam@adam",
            "adam[wd=0.1]/quick",
            "eps-before-bias-correction+bias-correction-from-update-count",
            ["ε added before the bias correction", "bias correction from the update count T = t − 1"],
        ),
        ("onnx.preview:Adam@adam:first_t=1", "adam[wd=0.1]/quick", "eps-before-bias-correction", []),
        (
            "onnx.preview:Adagrad@adagrad:first_t=1",
            "adagrad[wd=0.1,eps=1e-06,lr_decay=0.01]/quick",
            "step-plus-1",
            ["every t read as t + 1"],
        ),
        (
            "onnx.preview:Momentum@sgd:first_t=1",
            "sgd[momentum,wd=0.1,dampening=0.1]/quick",
            "no-first-step-special-case",
            ["no special first step"],
        ),
        ("onnx.preview:Momentum@sgd:mode=standard", "sgd[momentum,nesterov,wd=0.01]/quick", "nesterov=False", []),
    ],
)
def test_the_diagnosis_names_each_onnx_convention(impl: str, case_name: str, matched: str, phrases: list[str]) -> None:
    result = run_case(find_case(case_name, CASES), parse_implementation(impl), FP32, options=RunOptions(drift=False))
    assert result.status == FAIL
    assert result.diagnosis is not None
    assert result.diagnosis.matched is not None, result.diagnosis.summary
    assert result.diagnosis.matched.name == matched, result.diagnosis.summary
    assert f"[{matched}]" in result.diagnosis.summary
    for phrase in phrases:
        assert phrase in result.diagnosis.summary


def test_first_t_and_mode_are_checked() -> None:
    with pytest.raises(ValueError, match="first_t must be 0 or 1"):
        preview.Adam([torch.zeros(1)], first_t=2)
    with pytest.raises(ValueError, match="mode must be one of standard, nesterov"):
        preview.Momentum([torch.zeros(1)], mode="heavy-ball")
