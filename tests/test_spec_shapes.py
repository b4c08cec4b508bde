"""The spec language's shape-dependent definitions, shape and dtype leaves, per-slice reductions, integer
step ops, extra inputs, methods and composition parts: built, checked, rendered, serialised and lowered."""

from __future__ import annotations

import math

import pytest
import torch

import portopt
from portopt.backends import reference, torch_generic
from portopt.spec import (
    G,
    P,
    Spec,
    SpecError,
    StateDecl,
    T,
    const,
    eq,
    hyper,
    render_latex,
    render_text,
    spec_from_json,
    spec_to_json,
    state,
    where,
)
from portopt.spec.expr import (
    col_max,
    col_mean,
    col_sum,
    finfo,
    floor,
    mod,
    ndim,
    numel,
    row_max,
    row_mean,
    row_sum,
    size,
    step_input,
)
from portopt.spec.parts import Builder, beta, cautious, clip_by_rms, learning_rate, rms
from portopt.spec.symbols import Input, Layout, Method

F64 = torch.float64


def make(**fields: object) -> Spec:
    base: dict[str, object] = {
        "name": "toy",
        "title": "Toy",
        "hyperparameters": (learning_rate(0.1),),
        "states": (),
        "updates": (),
        "param_update": P - hyper("lr") * G,
    }
    base.update(fields)
    return Spec(**base)  # type: ignore[arg-type]


def run(spec: Spec, params: list[torch.Tensor], grads: list[torch.Tensor], backend: str, steps: int = 3) -> None:
    build = {"torch": torch_generic.build_torch_step, "reference": reference.build_reference_step}[backend]
    step = build(spec)
    states: list[dict[str, torch.Tensor]] = [{} for _ in params]
    for _ in range(steps):
        step(params, grads, states, spec.defaults())


# construction errors ---------------------------------------------------------------------------
def test_structural_equality_in_where_is_a_spec_error_naming_eq() -> None:
    with pytest.raises(SpecError, match=r"Python bool False.*eq\(a, b\)"):
        where(T == 1, 1.0, 2.0)  # type: ignore[arg-type]


def test_a_non_expression_operand_is_a_spec_error() -> None:
    from portopt.spec.expr import Expr
    from portopt.spec.ops import Op

    with pytest.raises(SpecError, match="operand 2 of add"):
        Expr(Op.ADD, (G, "x"))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="axis must be an integer"):
        size(1.5)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="field 'nope'"):
        finfo("nope")


def test_a_shape_condition_may_not_read_t() -> None:
    with pytest.raises(SpecError, match="nest the two conditions"):
        make(param_update=P - where((ndim() >= 2) & (T > 1), 1.0, 0.0) * G)


def test_when_must_be_static_and_a_state_must_exist_where_it_is_read() -> None:
    with pytest.raises(SpecError, match="when= of state 'm' must be a condition on the tensor's shape"):
        make(states=(StateDecl("m", "m", when=T > 1),), updates=(("m", G),), param_update=P - state("m"))
    with pytest.raises(SpecError, match=r"for a tensor of shape \(\)|for a tensor of shape \(0,\)"):
        make(states=(StateDecl("m", "m", when=ndim() >= 1),), updates=(("m", G),), param_update=P - state("m"))


def test_inputs_and_methods_are_checked() -> None:
    with pytest.raises(SpecError, match="unknown input 'bs'"):
        make(param_update=P - step_input("bs") * G)
    with pytest.raises(SpecError, match="has the name of a hyperparameter"):
        make(inputs=(Input("lr", 1.0),), param_update=P - step_input("lr") * G)
    with pytest.raises(SpecError, match="method 'h' updates undeclared state 'x'"):
        make(methods=(Method("h", (("x", G),)),))
    with pytest.raises(SpecError, match="due= must be a condition on t"):
        make(states=(StateDecl("h", "h"),), methods=(Method("h", (("h", G),), due=G > 0),), param_update=P - state("h"))


# semantics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_per_slice_reductions_match_torch(backend: str) -> None:
    """row_*/col_* reduce one axis of each trailing 2-D slice; col_mean of a row factor is per slice."""
    g = torch.randn(3, 4, 5, dtype=F64)
    cases = [
        (col_mean(row_mean(G * G)), (g * g).mean(-1, keepdim=True).mean(-2, keepdim=True)),
        (row_sum(G) + col_sum(G), g.sum(-1, keepdim=True) + g.sum(-2, keepdim=True)),
        (row_max(G) - col_max(G), g.amax(-1, keepdim=True) - g.amax(-2, keepdim=True)),
    ]
    for expr, expected in cases:
        p = torch.zeros(3, 4, 5, dtype=F64)
        run(make(param_update=P + expr), [p], [g], backend, steps=1)
        torch.testing.assert_close(p, expected.expand(3, 4, 5), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_shape_leaves_and_dtype_constants(backend: str, dtype: torch.dtype) -> None:
    spec = make(param_update=P * 0 + numel() + 10 * ndim() + 100 * size(-1) + 1000 * size(-3) + finfo("eps") * 1e4)
    p = torch.zeros(2, 3, 4, dtype=dtype)
    run(spec, [p], [torch.zeros_like(p)], backend, steps=1)
    expected = 24 + 30 + 400 + 2000 + torch.finfo(dtype).eps * 1e4
    assert float(p[0, 0, 0]) == pytest.approx(float(torch.tensor(expected, dtype=dtype)), rel=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_integer_step_ops(backend: str) -> None:
    spec = make(param_update=P + where(eq(mod(T, 3), 1), 1.0, 0.0) + floor(T / 2) * 0.5 + mod(G, 0.75))
    p = torch.zeros(4, dtype=F64)
    g = torch.tensor([-1.0, 0.5, 2.0, -0.25], dtype=F64)
    run(spec, [p], [g], backend, steps=4)
    # steps 1..4: mod(t,3)==1 at t=1,4; floor(t/2)*0.5 = 0, .5, .5, 1; mod(g, 0.75) four times (Python's %)
    base = 2 + 0.5 * (0 + 1 + 1 + 2)
    torch.testing.assert_close(p, torch.tensor([base + 4 * (x % 0.75) for x in g.tolist()], dtype=F64))


def _rank_spec() -> Spec:
    factored = ndim() >= 2
    r_t = 0.5 * state("r") + 0.5 * row_mean(G * G)
    v_t = 0.5 * state("v") + 0.5 * G * G
    return make(
        states=(StateDecl("r", "r", layout=Layout.ROW, when=factored), StateDecl("v", "v", when=~factored)),
        updates=(("r", r_t), ("v", v_t)),
        param_update=P - hyper("lr") * where(factored, r_t, v_t),
    )


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_state_layout_chosen_by_rank(backend: str) -> None:
    spec = _rank_spec()
    assert spec.shape_dependent
    params = [torch.ones(3, dtype=F64), torch.ones(2, 3, dtype=F64), torch.ones((), dtype=F64)]
    grads = [torch.full_like(p, 2.0) for p in params]
    step = (torch_generic.build_torch_step if backend == "torch" else reference.build_reference_step)(spec)
    states: list[dict[str, torch.Tensor]] = [{} for _ in params]
    step(params, grads, states, spec.defaults())
    assert set(states[0]) == {"v", "step"}
    assert set(states[1]) == {"r", "step"}
    assert set(states[2]) == {"v", "step"}
    assert states[1]["r"].shape == (2, 1)
    for p in params:
        torch.testing.assert_close(p, torch.full_like(p, 1 - 0.1 * 2.0))


# parts -----------------------------------------------------------------------------------------
def test_parts_compute_what_they_say() -> None:
    g = torch.randn(5, 4, dtype=F64) * 3
    b = Builder("parts", "Parts")
    (_lr,) = b.hypers(learning_rate(1.0))
    spec = b.build(P * 0 + clip_by_rms(G, 0.5) + 10 * cautious(G - 0.3, G) + 100 * rms(G))
    p = torch.zeros_like(g)
    run(spec, [p], [g], "reference", steps=1)
    u = g - 0.3
    mask = (u * g > 0).to(F64)
    expected = g / max(1.0, float(g.norm() / math.sqrt(g.numel())) / 0.5)
    expected = expected + 10 * u * mask * (g.numel() / (mask.sum() + 1)) + 100 * g.norm() / math.sqrt(g.numel())
    torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)


def test_a_spec_built_from_parts_renders_as_one_set_of_equations() -> None:
    b = Builder("m", "M")
    lr, b1 = b.hypers(learning_rate(0.1), beta(1, 0.9))
    m = b.ema("exp_avg", "m", G, b1)
    text = render_text(b.build(P - lr * clip_by_rms(m, 1.0)))
    assert "m ← β1·m + (1 − β1)·g" in text
    assert "RMS(u)/d = " in text
    assert text.splitlines()[-1].startswith("p ← ")


# rendering and serialisation -------------------------------------------------------------------
def test_new_nodes_render_and_round_trip() -> None:
    from portopt.algorithms import get_spec

    spec = make(
        inputs=(Input("bs", 64.0, symbol="B"),),
        param_update=P - step_input("bs") * numel() * size(-1) * finfo("tiny") * floor(mod(T, 3)) * row_sum(G),
    )
    text = render_text(spec)
    assert "numel(p)" in text
    assert "size(p, −1)" in text
    assert "tiny(dtype)" in text
    assert "⌊mod(t, 3)⌋" in text
    assert "inputs: B = 64 (step(bs=...))" in text
    latex = render_latex(spec)
    assert r"\operatorname{numel}(\theta)" in latex
    assert r"\lfloor" in latex
    for s in (spec, _rank_spec(), get_spec("sophiag"), get_spec("adafactor")):
        assert spec_from_json(spec_to_json(s)) == s


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"op": "finfo", "value": "epsilon"}, "finfo field"),
        ({"op": "size", "value": 0.5}, "axis must be an integer"),
        ({"op": "size", "value": "inf"}, "finite number"),
        ({"op": "input", "value": "no way"}, "is not a name"),
    ],
)
def test_hostile_new_nodes_are_refused(node: dict[str, object], message: str) -> None:
    import json

    data = json.loads(spec_to_json(make()))
    data["nodes"].append(node)
    with pytest.raises(SpecError, match=message):
        spec_from_json(json.dumps(data))


# front end -------------------------------------------------------------------------------------
def test_step_inputs_are_checked() -> None:
    p = torch.ones(3, requires_grad=True)
    opt = portopt.SophiaG([p])
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="unexpected input"):
        portopt.Optimizer([p], _rank_spec()).step(bs=3)
    with pytest.raises(ValueError, match="Invalid bs value: -1"):
        opt.step(bs=-1)
    assert not opt.state  # nothing was written


def test_composed_optimizer_runs_as_torch_optimizer() -> None:
    b = Builder("signum", "Signum")
    lr, b1 = b.hypers(learning_rate(0.1), beta(1, 0.9))
    m = b.ema("exp_avg", "m", G, b1)
    from portopt.spec import sign

    model = torch.nn.Linear(4, 2)
    opt = portopt.Optimizer(model.parameters(), b.build(P - lr * sign(m)), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert model.weight.grad is not None
    torch.testing.assert_close(model.weight.detach(), before - 0.01 * torch.sign(model.weight.grad))


def test_constant_is_a_leaf() -> None:
    assert const(2).value == 2.0
