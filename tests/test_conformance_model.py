"""The conformance suite's building blocks: ULPs, error bounds, comparisons, problems and cases.

Independent truths: ULPs from the bit patterns of the formats, the float64 reference
backend's own output, an actual float32 evaluation of every library spec (which the
first-order bound must cover), and hand-built inputs for the discontinuities.
"""

from __future__ import annotations

import math

import pytest
import torch

from portopt.algorithms import ALGORITHMS, get_spec
from portopt.algorithms.sgd import sgd
from portopt.backends.reference import build_reference_step
from portopt.conformance import cases as cases_module
from portopt.conformance.bounds import Bounded, bounded_step, has_discontinuity, initial_states
from portopt.conformance.cases import CASE_TABLE, build_cases
from portopt.conformance.precision import PRECISIONS, significand_bits, ulp, unit_roundoff
from portopt.conformance.problems import FULL, LARGE, QUICK, Layout, Regime, materialise
from portopt.conformance.tolerance import Override, compare, resolve
from portopt.lowering.backend import with_inputs
from portopt.lowering.interpreter import Bindings, Evaluator, initial_state_values
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec import G, P, Spec, hyper, sign
from portopt.spec.ops import Op
from portopt.spec.shapes import TensorFacts
from portopt.spec.symbols import Hyperparameter

INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def _next_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The next representable value above |x| in ``dtype``, from the bit pattern."""
    stored = x.abs().to(dtype).contiguous()
    return (stored.view(INT_VIEW[dtype]) + 1).view(dtype).to(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_ulp_is_the_spacing_to_the_next_representable_value(dtype: torch.dtype) -> None:
    tiny = torch.finfo(dtype).tiny
    values = torch.tensor([0.0, tiny / 8, tiny, 1.0, 1.5, -3.0, 1e-3, 0.1, 1000.0], dtype=torch.float64)
    representable = values.to(dtype).to(torch.float64)
    expected = _next_up(representable, dtype) - representable.abs()
    assert torch.equal(ulp(representable, dtype), expected)
    assert unit_roundoff(dtype) == torch.finfo(dtype).eps / 2
    assert significand_bits(dtype) == -round(math.log2(torch.finfo(dtype).eps)) + 1


def test_ulp_of_non_finite_is_nan() -> None:
    assert torch.isnan(ulp(torch.tensor([math.inf, math.nan], dtype=torch.float64), torch.float32)).all()


def _inputs(spec: Spec, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.pow(
        10.0, -6 * torch.rand(shape, generator=gen, dtype=torch.float64)
    )
    return p, g


@pytest.mark.parametrize("case", build_cases(), ids=lambda c: c.name)
def test_bounded_values_are_the_reference_backends(case: cases_module.Case) -> None:
    """The bounded evaluator's values are bit-identical to the reference backend's, over 3 steps."""
    spec = case.spec()
    hypers = case.group_hypers(spec)[0]
    p, g = _inputs(spec, (5, 7), 0)
    param = p.clone()
    state: dict[str, torch.Tensor] = {}  # the reference backend's torch-style state
    step = build_reference_step(spec)
    states = initial_states(spec, 2.0**-24, p, g, hypers)
    x = p.clone()
    for t in range(1, 4):
        step([param], [g], [state], hypers)
        new_states, new_param = bounded_step(spec, 2.0**-24, x, g, float(t), hypers, states)
        assert torch.equal(new_param.value, param)
        for name, b in new_states.items():
            assert torch.equal(b.value, state[name]), name
        x, states = new_param.value, {k: Bounded.exact(v.value) for k, v in new_states.items()}


def _float32_step(
    spec: Spec, p: torch.Tensor, g: torch.Tensor, t: float, hypers: dict[str, float], states: dict[str, torch.Tensor]
):
    f32 = torch.float32
    facts = TensorFacts(tuple(p.shape), "float32")
    spec = spec.specialize(facts)  # the tensor's shape class (Adafactor's factors for a matrix)
    hyp32 = {k: torch.tensor(v, dtype=f32) for k, v in with_inputs(spec, hypers).items()}

    class Ev32(Evaluator):
        def _compute(self, node):  # every leaf in float32, every op on float32 tensors
            if node.op is Op.CONST:
                return torch.tensor(float(node.value or 0.0), dtype=f32)
            if node.op in (Op.HYPER, Op.INPUT):
                return hyp32[str(node.value)]
            if node.op is Op.STEP:
                return torch.tensor(t, dtype=f32)
            return super()._compute(node)

    ev = Ev32(
        spec, TORCH_RULES, Bindings(p.to(f32), g.to(f32), t, hyp32, {k: v.to(f32) for k, v in states.items()}, facts)
    )
    return {n: ev(e) for n, e in spec.updates}, ev(spec.param_update)


@pytest.mark.parametrize("case", build_cases(), ids=lambda c: c.name)
def test_error_bound_covers_a_float32_evaluation(case: cases_module.Case) -> None:
    """Evaluating the spec with every operation (scalars too) rounded to float32 stays within the
    first-order bound E, with no safety factor, for every element of every state and the parameter."""
    spec = case.spec()
    hypers = case.group_hypers(spec)[0]
    p, g = _inputs(spec, (9, 11), 1)
    p, g = p.to(torch.float32).double(), g.to(torch.float32).double()  # inputs exact in float32
    facts = TensorFacts(tuple(p.shape), "float32")  # the dtype float32's finfo reads
    initial = initial_state_values(spec, TORCH_RULES, p, g, with_inputs(spec, hypers), facts)
    states64 = {k: v.to(torch.float32).double() for k, v in initial.items()}
    u = unit_roundoff(torch.float32)
    for t in (1.0, 2.0, 7.0):
        bounded = {k: Bounded.exact(v) for k, v in states64.items()}
        new_states, new_param = bounded_step(spec, u, p, g, t, hypers, bounded, facts=facts)
        f32_states, f32_param = _float32_step(spec, p, g, t, hypers, states64)
        pairs = [(new_param, f32_param), *((new_states[n], f32_states[n]) for n in new_states)]
        for reference, got in pairs:
            err = (got.double().expand(reference.value.shape) - reference.value).abs()
            assert bool((err <= reference.error).all()), f"step {t}: max excess {float((err - reference.error).max())}"
        states64 = {k: b.value.to(torch.float32).double() for k, b in new_states.items()}


def test_sign_is_uncertain_only_near_zero() -> None:
    """sign(g − c): the bound is 2 exactly where g − c is within its rounding error of 0."""
    spec = Spec(
        "signs",
        "signs",
        (Hyperparameter("c", 0.0), Hyperparameter("lr", 1.0)),
        (),
        (),
        P - sign(G - hyper("c")) * hyper("lr"),
    )
    c = 0.3
    g = torch.tensor([c, c * (1 + 2**-30), c * (1 + 2**-10), -1.0], dtype=torch.float64)
    _, out = bounded_step(spec, 2.0**-24, torch.zeros(4, dtype=torch.float64), g, 1.0, {"c": c, "lr": 1.0}, {})
    near, far = out.error[:2], out.error[2:]
    assert bool(((near >= 2.0) & (near < 2.0 + 1e-6)).all())  # |g − c| below its error: either sign
    assert bool((far < 1e-6).all())
    assert has_discontinuity(spec)
    assert has_discontinuity(get_spec("lion"))
    assert not has_discontinuity(get_spec("adam"))


def test_compare_non_finite_and_mismatch_fraction() -> None:
    expected = torch.tensor([1.0, math.nan, math.inf, 2.0], dtype=torch.float64)
    allowed = torch.full((4,), 1e-6, dtype=torch.float64)
    ok = compare(torch.tensor([1.0, math.nan, math.nan, 2.0 + 5e-7], dtype=torch.float64), expected, allowed)
    assert ok.passed
    assert ok.worst == pytest.approx(0.5, rel=1e-3)
    finite_for_nan = compare(torch.tensor([1.0, 0.0, math.inf, 2.0]), expected, allowed)
    assert not finite_for_nan.passed
    assert finite_for_nan.worst == math.inf
    assert finite_for_nan.index == (1,)
    nan_for_finite = compare(torch.tensor([math.nan, math.nan, math.inf, 2.0]), expected, allowed)
    assert not nan_for_finite.passed
    one_off = compare(torch.tensor([1.1, math.nan, math.inf, 2.0]), expected, allowed, mismatch_fraction=0.25)
    assert one_off.passed
    assert one_off.count_over == 1
    with pytest.raises(ValueError, match="shape"):
        compare(torch.zeros(3), expected, allowed)


def test_overrides_are_scoped_and_carry_reasons() -> None:
    overrides = (
        Override("adam*", "torch", "bf16", reason="example: looser for a reason", factor=3.0),
        Override("lion*", "*", "fp32", reason="example: skipped", skip=True),
    )
    hit = resolve("adam/quick", "torch", "bf16", False, overrides)
    assert hit.tolerance.bound_factor == 12.0
    assert hit.reasons == ("example: looser for a reason",)
    assert resolve("adam/quick", "reference", "bf16", False, overrides).reasons == ()
    assert resolve("lion/quick", "torch", "fp32", True, overrides).skip_reason == "example: skipped"
    assert resolve("adam/quick", "torch", "fp32", False, overrides).tolerance.drift_mismatch == 0.0
    assert resolve("lion/quick", "torch", "bf16", True, overrides).tolerance.drift_mismatch > 0.0


def test_problems_cover_the_required_shapes_and_layouts() -> None:
    sizes = {t.numel for p in (QUICK, FULL, LARGE) for t in p.tensors}
    assert {0, 1} <= sizes
    assert any(t.shape == () for t in QUICK.tensors)
    odd_primes = {n for n in sizes if n > 2 and all(n % k for k in range(2, int(n**0.5) + 1))}
    assert {7, 31, 127, 1031, 4099} <= odd_primes  # odd primes; 1031 and 4099 exceed any SIMD width
    assert max(sizes) >= 1_000_000
    assert {t.layout for t in QUICK.tensors} >= {Layout.TRANSPOSED, Layout.STRIDED, Layout.CONTIGUOUS}
    assert QUICK.num_groups >= 2
    assert FULL.num_groups >= 3
    assert any(t.grads == "never" for t in QUICK.tensors)
    assert any(t.grads == "odd" for t in QUICK.tensors)
    assert {t.regime for t in FULL.tensors} >= {Regime.MIXED, Regime.TINY, Regime.HUGE, Regime.ZERO, Regime.NORMAL}


def test_problem_values_are_deterministic_float64_and_cast_once() -> None:
    huge = QUICK.with_huge_scale(PRECISIONS["fp32"].huge_gradient())
    for i, spec in enumerate(huge.tensors):
        p = huge.initial_param(i)
        assert p.dtype == torch.float64
        assert torch.equal(p, huge.initial_param(i))
        g = huge.gradient(i, 3)
        assert (g is None) == (not spec.has_grad(3))
        if g is None:
            continue
        assert torch.equal(g, huge.gradient(i, 3))  # type: ignore[arg-type]
        assert g.dtype == torch.float64
        if 3 in spec.zero_at:
            assert not g.any()
        if spec.regime is Regime.TINY:
            assert float(g.abs().max()) < 1e-7
        if spec.regime is Regime.HUGE:
            assert float(g.abs().max()) > 1e12
        laid = materialise(g, spec, torch.bfloat16, "cpu")
        assert torch.equal(laid, g.to(torch.bfloat16))
        if spec.layout is not Layout.CONTIGUOUS and spec.numel > 1:
            assert not laid.is_contiguous()
    first, second = QUICK.gradient(4, 1), QUICK.gradient(4, 2)
    assert first is not None
    assert second is not None
    assert not torch.equal(first, second)


def test_every_algorithm_has_cases_and_the_table_matches_the_specs() -> None:
    quick, full = build_cases(), build_cases(quick=False)
    assert {c.algorithm for c in quick} == set(ALGORITHMS) == {c.algorithm for c in full}
    assert len({c.name for c in full}) == len(full)
    for algorithm, entries in CASE_TABLE.items():
        for entry in entries:
            spec = get_spec(algorithm, **entry.options)
            assert set(entry.hypers) <= set(spec.hyper_names), (algorithm, entry)
    assert any(c.problem.total_elements >= 1_000_000 for c in full)
    assert any(c.requires == "found_inf" for c in full)
    options = {(c.algorithm, k) for c in full for k, v in c.options if v}
    assert {
        ("adam", "amsgrad"),
        ("sgd", "nesterov"),
        ("rmsprop", "centered"),
        ("adam", "decoupled_weight_decay"),
    } <= options
    assert any(c.maximize for c in quick)


def test_an_algorithm_missing_from_the_table_gets_default_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ALGORITHMS, "sgd_copy", sgd)
    names = [c.name for c in build_cases(["sgd_copy"])]
    assert names == ["sgd_copy/quick", "sgd_copy[wd=0.1]/quick"]
    with pytest.raises(ValueError, match="unknown algorithm"):
        build_cases(["no_such_algorithm"])


def test_compare_never_reports_an_accepted_element_as_the_worst() -> None:
    inf, nan = math.inf, math.nan
    expected = torch.tensor([inf, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    got = torch.tensor([inf, 1.0, 2.0, 3.5, 4.0 + 1e-7], dtype=torch.float32)
    # both infinite (NaN allowance); exact under a zero allowance; finite under a NaN allowance;
    # 0.5 off under an allowance of 1.0: the worst, a ratio of 0.5; the last at 1e-7 / 1e-6 (allowed)
    allowed = torch.tensor([nan, 0.0, nan, 1.0, 1e-6], dtype=torch.float64)
    result = compare(got, expected, allowed)
    assert result.count_over == 0
    assert result.index == (3,)
    assert result.worst == pytest.approx(0.5)
    one_infinite = compare(torch.tensor([inf, 1.0]), torch.tensor([1.0, 1.0], dtype=torch.float64), torch.ones(2))
    assert one_infinite.count_over == 1
    assert one_infinite.worst == inf
    assert one_infinite.index == (0,)
    off_under_zero = compare(torch.tensor([1.5]), torch.tensor([1.0], dtype=torch.float64), torch.zeros(1))
    assert off_under_zero.count_over == 1
    assert off_under_zero.worst == inf
