"""Whole-algorithm rules for torch's fused kernels: chosen by equivalence, checked against the reference.

* Recognition: Adam/AdamW (with AMSGrad, maximized), SGD (plain, momentum, Nesterov) and
  Adagrad from the library reach the right kernel configuration; so does an AdamW written
  from scratch under another name, with other state names and another arithmetic form.
* Refusal: near misses (ε inside the square root, another bias correction, decay without
  lr, AMSGrad over the corrected v, SGD damping its first step, Adagrad's decay off by
  one step) and other algorithms (Lion, NAdam, RAdam, ...) reach no kernel; a spec named
  "adamw" that computes Lion reaches none either.
* Parity: the rules against the float64 reference backend for 50 steps (fp32), and one
  bf16 step within the kernels' documented rounding.
* Probes: a probe's verdict on a kernel and dtype agrees with an independent hand
  computation of that kernel's result (torch 2.13's CPU ``_fused_sgd_`` leaves bf16
  parameters unchanged in its vector loop: the rule must not use it there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from portopt.algorithms import get_spec
from portopt.backends.reference import build_reference_step
from portopt.backends.torch_fused import KERNELS, FusedKernel, FusedStep, build_fused_step, match_fused_kernel, probe
from portopt.lowering.backend import ParamState
from portopt.lowering.equivalence import Binding, check_equivalence, find_binding
from portopt.lowering.registry import registered_backends
from portopt.spec import G, Hyperparameter, P, Spec, StateDecl, T, hyper, maximum, sign, sqrt, square, state
from portopt.spec.expr import Expr, eq, walk
from portopt.spec.symbols import NON_NEGATIVE, UNIT_INTERVAL_OPEN_RIGHT

LIBRARY_MATCHES = [
    (("adam", {}), "torch._fused_adam_(amsgrad=False, maximize={m})"),
    (("adam", {"amsgrad": True}), "torch._fused_adam_(amsgrad=True, maximize={m})"),
    (("adam", {"decoupled_weight_decay": True}), "torch._fused_adamw_(amsgrad=False, maximize={m})"),
    (("adamw", {}), "torch._fused_adamw_(amsgrad=False, maximize={m})"),
    (("adamw", {"amsgrad": True}), "torch._fused_adamw_(amsgrad=True, maximize={m})"),
    (("sgd", {}), "torch._fused_sgd_(momentum=False, nesterov=False, maximize={m})"),
    (("sgd", {"momentum": True}), "torch._fused_sgd_(momentum=True, nesterov=False, maximize={m})"),
    (("sgd", {"momentum": True, "nesterov": True}), "torch._fused_sgd_(momentum=True, nesterov=True, maximize={m})"),
    (("adagrad", {}), "torch._fused_adagrad_(maximize={m})"),
]
NO_KERNEL: list[tuple[str, dict[str, bool]]] = [
    ("rmsprop", {}),
    ("nadam", {}),
    ("radam", {}),
    ("adamax", {}),
    ("adabelief", {}),
    ("lamb", {}),
    ("lion", {}),
]


def _case_id(case: tuple[str, dict[str, bool]]) -> str:
    name, options = case
    return "-".join([name, *(k for k, v in options.items() if v)])


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize(("case", "kernel"), LIBRARY_MATCHES, ids=[_case_id(c) for c, _ in LIBRARY_MATCHES])
def test_library_specs_reach_their_kernel(case: tuple[str, dict[str, bool]], kernel: str, maximize: bool) -> None:
    name, options = case
    spec = get_spec(name, **options)
    spec = spec.maximized() if maximize else spec
    match = match_fused_kernel(spec)
    assert match is not None
    assert match.kernel.name == kernel.format(m=maximize)


@pytest.mark.parametrize("case", NO_KERNEL, ids=[c[0] for c in NO_KERNEL])
def test_other_algorithms_reach_no_kernel(case: tuple[str, dict[str, bool]]) -> None:
    assert match_fused_kernel(get_spec(case[0], **case[1])) is None


# -- Hand-written specs: recognised by what they compute, whatever they are called ------------------


def _adam_hypers(decay: float = 1e-2) -> tuple[Hyperparameter, ...]:
    return (
        Hyperparameter("lr", 1e-3, NON_NEGATIVE),
        Hyperparameter("beta1", 0.9, UNIT_INTERVAL_OPEN_RIGHT),
        Hyperparameter("beta2", 0.999, UNIT_INTERVAL_OPEN_RIGHT),
        Hyperparameter("eps", 1e-8, NON_NEGATIVE),
        Hyperparameter("weight_decay", decay, NON_NEGATIVE),
    )


def _handwritten_adamw(
    name: str = "my_optimizer",
    *,
    eps_inside: bool = False,
    bias2: Callable[[Expr], Expr] | None = None,
    decay_without_lr: bool = False,
    first_exponent_shift: float = 0.0,
) -> Spec:
    """AdamW in the paper's form, lerp first moment, states called m and v; knobs make near misses."""
    lr, b1, b2, eps, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    m = state("m") + (1 - b1) * (G - state("m"))
    v = (1 - b2) * square(G) + b2 * state("v")
    m_hat = m / (1 - b1 ** (T + first_exponent_shift))
    v_hat = v / (1 - b2**T) if bias2 is None else bias2(v)
    denom = sqrt(v_hat + eps) if eps_inside else sqrt(v_hat) + eps
    decayed = P * (1 - wd) if decay_without_lr else P - lr * wd * P
    return Spec(
        name=name,
        title=name,
        hyperparameters=_adam_hypers(),
        states=(StateDecl("m", "m"), StateDecl("v", "v")),
        updates=(("m", m), ("v", v)),
        param_update=decayed - lr * m_hat / denom,
    )


def test_a_rewritten_renamed_adamw_reaches_the_adamw_kernel() -> None:
    match = match_fused_kernel(_handwritten_adamw())
    assert match is not None
    assert match.kernel.name == "torch._fused_adamw_(amsgrad=False, maximize=False)"
    assert dict(match.binding.states) == {"exp_avg": "m", "exp_avg_sq": "v"}


NEAR_MISSES: dict[str, Spec] = {
    "eps inside the square root": _handwritten_adamw(eps_inside=True),
    "no bias correction of v": _handwritten_adamw(bias2=lambda v: v),
    "bias correction of m one step ahead": _handwritten_adamw(first_exponent_shift=1.0),
    "decay without lr": _handwritten_adamw(decay_without_lr=True),
}


def _amsgrad_over_corrected_v() -> Spec:
    lr, b1, b2, eps = (hyper(n) for n in ("lr", "beta1", "beta2", "eps"))
    g = G + hyper("weight_decay") * P
    m = b1 * state("exp_avg") + (1 - b1) * g
    v = b2 * state("exp_avg_sq") + (1 - b2) * square(g)
    vmax = maximum(state("max_exp_avg_sq"), v / (1 - b2**T))  # the max of the corrected v
    return Spec(
        "amsgrad_variant",
        "AMSGrad over v̂",
        _adam_hypers(0.0),
        (StateDecl("exp_avg", "m"), StateDecl("exp_avg_sq", "v"), StateDecl("max_exp_avg_sq", "vmax")),
        (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", vmax)),
        P - lr / (1 - b1**T) * m / (sqrt(vmax) + eps),
    )


def _sgd_damping_first_step() -> Spec:
    lr, mu, tau = hyper("lr"), hyper("momentum"), hyper("dampening")
    g = G + hyper("weight_decay") * P
    buf = mu * state("momentum_buffer") + (1 - tau) * g  # torch does not damp the first step
    return Spec(
        "sgd_variant",
        "SGD damping its first step",
        (
            Hyperparameter("lr", 1e-3, NON_NEGATIVE),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("momentum", 0.9, NON_NEGATIVE),
            Hyperparameter("dampening", 0.1, UNIT_INTERVAL_OPEN_RIGHT),
        ),
        (StateDecl("momentum_buffer", "b"),),
        (("momentum_buffer", buf),),
        P - lr * buf,
    )


def _adagrad_variant(*, eps_inside: bool = False, decay_offset: float = 1.0) -> Spec:
    lr, decay, eps = hyper("lr"), hyper("lr_decay"), hyper("eps")
    s = state("sum") + square(G)
    clr = lr / (1 + (T - decay_offset) * decay)
    denom = sqrt(s + eps) if eps_inside else sqrt(s) + eps
    return Spec(
        "adagrad_variant",
        "Adagrad variant",
        (
            Hyperparameter("lr", 1e-2, NON_NEGATIVE),
            Hyperparameter("lr_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("eps", 1e-10, NON_NEGATIVE),
        ),
        (StateDecl("sum", "s"),),
        (("sum", s),),
        P - clr * G / denom,
    )


def _lion_named_adamw() -> Spec:
    lr, b1, b2, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "weight_decay"))
    direction = sign(b1 * state("exp_avg") + (1 - b1) * G)
    return Spec(
        "adamw",
        "AdamW (really Lion)",
        (
            Hyperparameter("lr", 1e-4, NON_NEGATIVE),
            Hyperparameter("beta1", 0.9, UNIT_INTERVAL_OPEN_RIGHT),
            Hyperparameter("beta2", 0.99, UNIT_INTERVAL_OPEN_RIGHT),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        ),
        (StateDecl("exp_avg", "m"),),
        (("exp_avg", b2 * state("exp_avg") + (1 - b2) * G),),
        P * (1 - lr * wd) - lr * direction,
    )


NEAR_MISSES.update(
    {
        "AMSGrad over the bias-corrected v": _amsgrad_over_corrected_v(),
        "SGD damping its first step": _sgd_damping_first_step(),
        "Adagrad with eps inside the square root": _adagrad_variant(eps_inside=True),
        "Adagrad decaying lr one step early": _adagrad_variant(decay_offset=0.0),
        "Lion named adamw": _lion_named_adamw(),
    }
)


@pytest.mark.parametrize("what", list(NEAR_MISSES))
def test_near_misses_reach_no_kernel(what: str) -> None:
    spec = NEAR_MISSES[what]
    assert match_fused_kernel(spec) is None, f"{what} must not reach a fused kernel"


def test_adagrad_variant_without_near_miss_is_recognised() -> None:
    """The control for the Adagrad near misses: the same hand-written spec, right, does match."""
    match = match_fused_kernel(_adagrad_variant())
    assert match is not None
    assert match.kernel.name == "torch._fused_adagrad_(maximize=False)"
    assert ("weight_decay", 0.0) in match.binding.hypers  # held at its neutral value


def test_equivalence_check_reports_where_specs_differ() -> None:
    adam = get_spec("adam")
    identity = Binding(tuple((n, n) for n in adam.hyper_names), tuple((s, s) for s in adam.state_names))
    assert check_equivalence(adam, adam, identity) is None
    binding, why = find_binding(_handwritten_adamw(eps_inside=True), get_spec("adamw"))
    assert binding is None
    assert "differs" in why


# -- Parity with the reference --------------------------------------------------------------------

SHAPES = ((37,), (6, 9), (0,), (1,), (3, 4, 5))
PARITY_HYPERS = {"lr": 1e-2, "weight_decay": 0.05, "momentum": 0.9, "dampening": 0.1, "lr_decay": 0.01}


def _hypers(spec: Spec) -> dict[str, float]:
    values = spec.defaults()
    values.update({k: v for k, v in PARITY_HYPERS.items() if k in values})
    if spec.option_map.get("nesterov"):
        values["dampening"] = 0.0
    return values


def _excess(a: Tensor, b: Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> float:
    a, b = a.double(), b.double().expand_as(a)
    if a.numel() == 0:
        return 0.0
    scale = b.square().mean().sqrt()
    return float(((a - b).abs() / (atol + rtol * (b.abs() + scale))).max())


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("case", [c for c, _ in LIBRARY_MATCHES], ids=[_case_id(c) for c, _ in LIBRARY_MATCHES])
def test_rule_parity_with_reference_fp32(case: tuple[str, dict[str, bool]], maximize: bool) -> None:
    spec = get_spec(case[0], **case[1])
    spec = spec.maximized() if maximize else spec
    step = build_fused_step(spec)
    assert isinstance(step, FusedStep)
    reference = build_reference_step(spec)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    copies = [p.clone() for p in params]
    states: list[ParamState] = [{} for _ in params]
    ref_states: list[ParamState] = [{} for _ in params]
    hypers = _hypers(spec)
    for t in range(1, 51):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        h = {**hypers, "lr": hypers["lr"] * (0.5 + 0.5 * math.cos(math.pi * t / 50))}
        step(params, grads, states, h)
        assert step.last_delegation is None, step.last_delegation
        reference(copies, grads, ref_states, h)
        for i, (p, q) in enumerate(zip(params, copies, strict=True)):
            assert _excess(p, q) <= 1, f"parameter {i} at t={t}"
            for s in spec.state_names:
                assert _excess(states[i][s], ref_states[i][s]) <= 1, f"state {s!r} of parameter {i} at t={t}"
            assert float(states[i]["step"]) == t


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_rule_bf16_step_matches_reference_at_bf16_resolution(name: str) -> None:
    """One bf16 step agrees with the float64 result at bf16 resolution (relative to the tensor's scale).

    Adam's kernels compute in float32 and round once. Adagrad's and SGD's round lr, ε and λ
    to bf16 first (3x over the conformance tolerance): the rule refuses them for bf16.
    """
    spec = get_spec(name)
    step = build_fused_step(spec)
    assert isinstance(step, FusedStep)
    hypers = {**_hypers(spec), "lr": 0.05}
    gen = torch.Generator().manual_seed(1)
    n = 1001
    param = torch.randn(n, generator=gen).bfloat16()
    state: ParamState = {}
    step([param.clone()], [torch.randn(n, generator=gen).bfloat16()], [state], hypers)
    for s in spec.state_names:
        state[s].copy_(torch.rand(n, generator=gen).bfloat16())
    grad = torch.randn(n, generator=gen).bfloat16()
    reference = build_reference_step(spec)
    ref_param = param.double()
    ref_state: ParamState = {s: state[s].double() for s in spec.state_names}
    ref_state["step"] = state["step"].clone()
    reference([ref_param], [grad.double()], [ref_state], hypers)
    step([param], [grad], [state], hypers)
    assert step.last_delegation is None
    for got, want in [(param, ref_param), *((state[s], ref_state[s]) for s in spec.state_names)]:
        assert got.dtype == torch.bfloat16
        assert _excess(got, want, rtol=2.0**-7, atol=0.0) <= 1


# -- Probes and delegation ------------------------------------------------------------------------


def _hand_computed(kernel: FusedKernel, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` on ``dtype`` updates parameters as its algorithm says (independent of probe())."""
    n, lr, mu = 67, 0.5, 0.5
    gen = torch.Generator().manual_seed(2)
    p64 = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    g64 = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    param, grad = p64.to(dtype), g64.to(dtype)
    p64, g64 = param.double(), grad.double()
    spec = kernel.spec
    values = {"lr": lr, "weight_decay": 0.0, "momentum": mu, "dampening": 0.0, "lr_decay": 0.0}
    values.update({"beta1": 0.5, "beta2": 0.5, "eps": 0.5})
    states = [torch.zeros(n, dtype=dtype) for _ in spec.states]
    kernel.launch([param], [grad], [[s] for s in states], 1.0, values)
    sign = -1.0 if spec.option_map["maximize"] else 1.0
    if spec.name == "torch._fused_sgd_":
        # t = 1: the buffer is the gradient; Nesterov steps along g + μ·buffer.
        expected = p64 - lr * sign * g64 * (1 + mu if spec.option_map["nesterov"] else 1)
    elif spec.name == "torch._fused_adagrad_":
        expected = p64 - lr * sign * g64 / (g64.abs() + 0.5)
    else:  # Adam(W) at t = 1 from zero moments: m̂ = g, v̂ = g²
        expected = p64 - lr * sign * g64 / (g64.abs() + 0.5)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}[dtype]
    return bool(((param.double() - expected).abs() <= tol * (expected.abs() + 1)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel", KERNELS, ids=[k.name for k in KERNELS])
def test_probe_agrees_with_a_hand_computation(kernel: FusedKernel, dtype: torch.dtype) -> None:
    verdict = probe(kernel, "cpu", dtype)
    assert (verdict is None) == _hand_computed(kernel, dtype), verdict


def test_bf16_sgd_runs_correctly_whatever_the_kernel_does() -> None:
    spec = get_spec("sgd", momentum=True)
    step = build_fused_step(spec)
    assert isinstance(step, FusedStep)
    hypers = {**_hypers(spec), "lr": 0.1}
    param = torch.randn(1001).bfloat16()
    expected = param.double()
    grad = torch.randn(1001).bfloat16()
    step([param], [grad], [{}], hypers)
    expected = expected - 0.1 * (grad.double() + 0.05 * expected)  # t = 1: buffer = g + λp
    assert bool(((param.double() - expected).abs() <= expected.abs() * 2.0**-7 + 1e-6).all())
    assert step.match is not None
    # SGD's kernel rounds lr and λ to bf16, so the rule hands bf16 to the next backend.
    assert step.last_delegation is not None
    assert "rounds lr, eps and weight decay to torch.bfloat16" in step.last_delegation


@pytest.mark.parametrize(
    "trouble",
    ["momentum 0", "non-contiguous gradient", "gradient of another dtype"],
)
def test_calls_the_kernel_cannot_take_are_delegated_and_still_correct(trouble: str) -> None:
    spec = get_spec("sgd", momentum=True)
    hypers = _hypers(spec)
    base, grad = torch.randn(6, 8), torch.randn(8, 6)
    grads = [grad.t()]
    if trouble == "momentum 0":
        hypers["momentum"] = 0.0
        grads = [grad.t().contiguous()]
    elif trouble == "gradient of another dtype":
        base, grads = base.double(), [grad.t().contiguous()]
    step, reference = build_fused_step(spec), build_reference_step(spec)
    assert isinstance(step, FusedStep)
    params, copies = [base.clone()], [base.clone()]
    states: list[ParamState] = [{}]
    ref_states: list[ParamState] = [{}]
    for _ in range(3):
        step(params, grads, states, hypers)
        reference(copies, grads, ref_states, hypers)
    assert step.last_delegation is not None
    assert _excess(params[0], copies[0]) <= 1


def test_priorities_put_vendor_kernels_first_then_compiled_then_generic() -> None:
    import portopt.backends.compiled  # noqa: F401  (registers "compiled")

    backends = registered_backends()
    assert backends["torch_fused"].priority > backends["compiled"].priority > backends["torch"].priority


def test_every_kernel_spec_names_a_torch_function() -> None:
    for kernel in KERNELS:
        assert callable(getattr(torch, kernel.spec.name.removeprefix("torch.")))
    # SGD's first step is t = 1 in the spec (the rule passes is_first_step = t == 1).
    sgd = next(k for k in KERNELS if k.spec.option_map.get("momentum"))
    assert any(node == eq(T, 1) for _, e in sgd.spec.updates for node in walk([e]))
