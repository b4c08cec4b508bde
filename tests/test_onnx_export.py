"""The ONNX lowering: every algorithm's step as a valid, standard ONNX model with the promised interface.

What is checked against independent truth: the model validates with ``onnx.checker`` (full
check, shape inference included), uses only ``ai.onnx`` ops, carries the spec (its JSON
reloads to an equal spec), keeps hostile spec strings out of every ONNX name, grows
linearly with the spec's distinct nodes, and loads in onnxruntime at the default opset and
at the newest opset and IR version this onnxruntime accepts. Numbers are checked in
``test_onnx_runtime.py`` (onnxruntime alone against torch.optim) and ``test_onnx_backend.py``
(the conformance suite).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from portopt.backends.onnx import (
    DEFAULT_OPSET,
    MIN_OPSET,
    ONNX_RULES,
    OnnxExportError,
    onnxruntime_unavailable_reason,
)
from portopt.cli import USAGE_ERROR, main
from portopt.cli_options import build_spec, option_variants
from portopt.export import to_onnx
from portopt.spec import G, Hyperparameter, P, Spec, StateDecl, hyper, sqrt, state
from portopt.spec.errors import SpecError
from portopt.spec.ops import OP_INFO, Family, Op
from portopt.spec.render import render_text
from portopt.spec.serialize import spec_from_json

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'portopt[onnx]')")
ORT_REASON = onnxruntime_unavailable_reason()

LIBRARY = [
    pytest.param(name, options, id=f"{name}[{','.join(f'{k}={v}' for k, v in options.items())}]")
    for name in ("adabelief", "adagrad", "adam", "adamax", "adamw", "lamb", "lion", "nadam", "radam", "rmsprop", "sgd")
    for options in option_variants(name)
]
NODE_NAME = re.compile(r"n\d+_[A-Z][A-Za-z0-9]*")


def _names(model: Any) -> tuple[set[str], set[str]]:
    """Every node name, and every value name (node inputs and outputs, initializers, graph inputs/outputs)."""
    graph = model.graph
    values = {v for n in graph.node for v in [*n.input, *n.output]}
    values |= {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    return {n.name for n in graph.node}, values


@pytest.mark.parametrize(("name", "options"), LIBRARY)
def test_every_algorithm_is_a_valid_standard_model(name: str, options: dict[str, object]) -> None:
    spec = build_spec(name, options)  # type: ignore[arg-type]
    model = to_onnx(spec)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", DEFAULT_OPSET)]
    assert model.ir_version == onnx.helper.find_min_ir_version_for(list(model.opset_import))
    assert {n.domain for n in model.graph.node} <= {""}, "only standard ai.onnx ops"
    graph = model.graph
    assert [i.name for i in graph.input] == ["param", "grad", *spec.state_names, "step", *spec.hyper_names]
    assert [o.name for o in graph.output] == ["param_out", *(f"{s}_out" for s in spec.state_names)]
    props = {p.key: p.value for p in model.metadata_props}
    assert spec_from_json(props["portopt.spec"]) == spec
    assert props["portopt.equations"] == render_text(spec)
    assert props["portopt.equations.latex"].startswith("%")
    node_names, _ = _names(model)
    assert all(NODE_NAME.fullmatch(n) for n in node_names)
    if not spec.states:
        with pytest.raises(OnnxExportError, match="keeps no state: there are no initial values to write"):
            to_onnx(spec, init=True)
        return
    init = to_onnx(spec, init=True)
    onnx.checker.check_model(init, full_check=True)
    assert [o.name for o in init.graph.output] == [f"{s}_init" for s in spec.state_names]


def test_the_interface_types_and_shapes() -> None:
    """float32 scalars for step and hyperparameters; one symbolic shape for param, grad and element-wise
    states; per-tensor states (NAdam's mu_product) 0-d and float32 even for float16 parameters."""
    spec = build_spec("nadam")
    model = to_onnx(spec, dtype="float16", rank=2)
    T = onnx.TensorProto

    def described(value: Any) -> tuple[int, list[str | int]]:
        tensor = value.type.tensor_type
        return tensor.elem_type, [d.dim_param or d.dim_value for d in tensor.shape.dim]

    inputs = {i.name: described(i) for i in model.graph.input}
    assert inputs["param"] == inputs["grad"] == inputs["exp_avg"] == inputs["exp_avg_sq"] == (T.FLOAT16, ["d0", "d1"])
    assert inputs["mu_product"] == (T.FLOAT, [])
    assert all(inputs[n] == (T.FLOAT, []) for n in ("step", *spec.hyper_names))
    outputs = {o.name: described(o) for o in model.graph.output}
    assert outputs["param_out"] == (T.FLOAT16, ["d0", "d1"])
    assert outputs["mu_product_out"] == (T.FLOAT, [])
    # fp32 arithmetic inside: every float16 input is cast up once, every float16 output cast down once.
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    ups = [n for n in casts if n.input[0] in ("param", "grad", "exp_avg", "exp_avg_sq")]
    assert sorted(n.input[0] for n in ups) == ["exp_avg", "exp_avg_sq", "grad", "param"]
    assert all(a.i == T.FLOAT for n in ups for a in n.attribute)
    downs = [n for n in casts if n.output[0] in ("param_out", "exp_avg_out", "exp_avg_sq_out")]
    assert len(downs) == 3
    assert all(a.i == T.FLOAT16 for n in downs for a in n.attribute)


def test_every_primitive_has_an_onnx_rule() -> None:
    assert set(ONNX_RULES) == {op for op, info in OP_INFO.items() if info.family is not Family.LEAF}


def test_element_type_numbers_are_onnx_s() -> None:
    from portopt.backends.onnx import _ELEM

    T = onnx.TensorProto
    assert _ELEM == {
        "float32": T.FLOAT,
        "float16": T.FLOAT16,
        "float64": T.DOUBLE,
        "bfloat16": T.BFLOAT16,
        "bool": T.BOOL,
    }


@pytest.mark.skipif(ORT_REASON is not None, reason=ORT_REASON or "")
def test_onnxruntime_loads_the_default_and_its_newest_versions() -> None:
    """The installed onnxruntime's limits, found by trying: the newest ai.onnx opset and IR version it
    loads, and that the next ones are refused (so the exported default is well inside them)."""
    import onnxruntime as ort

    spec = build_spec("radam")

    def loads(model: Any) -> bool:
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:
            return False
        return True

    newest = onnx.defs.onnx_opset_version()
    accepted = [opset for opset in range(MIN_OPSET, newest + 1) if loads(to_onnx(spec, opset=opset))]
    assert DEFAULT_OPSET in accepted
    assert accepted == list(range(MIN_OPSET, accepted[-1] + 1)), "a contiguous range of opsets"
    top = to_onnx(spec, opset=accepted[-1])
    too_new = onnx.ModelProto()
    too_new.CopyFrom(top)
    too_new.ir_version = top.ir_version + 1
    assert not loads(too_new), f"onnxruntime {ort.__version__} unexpectedly loads IR {too_new.ir_version}"
    print(f"onnxruntime {ort.__version__}: opsets {accepted[0]}..{accepted[-1]}, IR <= {top.ir_version}")


def test_opset_and_dtype_choices_are_checked() -> None:
    spec = build_spec("adam")
    with pytest.raises(OnnxExportError, match=r"opset 12 is not supported: use an integer from 13 to \d+"):
        to_onnx(spec, opset=12)
    with pytest.raises(OnnxExportError, match="dtype 'int8' is not supported"):
        to_onnx(spec, dtype="int8")
    with pytest.raises(OnnxExportError, match="rank -1 is not supported"):
        to_onnx(spec, rank=-1)
    with pytest.raises(OnnxExportError, match="scalar dtype 'float16' is not supported"):
        to_onnx(spec, scalar_dtype="float16")
    with pytest.raises(ValueError, match="unknown option 'amsgrd'"):
        to_onnx("adam", options={"amsgrd": True})
    model = to_onnx(spec, opset=18, scalar_dtype="float32")
    assert not any(
        n.op_type == "Cast" and a.i == onnx.TensorProto.DOUBLE for n in model.graph.node for a in n.attribute
    )


HOSTILE = 'x\'); __import__("os").system("echo pwned") # ../../etc/passwd "\'\'\''
"""Display text a spec accepts (its loader refuses control characters and non-identifier names: SpecError)."""
SAFE_LATEX = r"\hat{m}"


def _spec_with_strings(text: str, state_name: str = "m", hyper_name: str = "lr") -> Spec:
    m = state(state_name)
    m_t = (0.9 * m + 0.1 * G).named(text, SAFE_LATEX)
    return Spec(
        name="hostile",
        title=text,
        hyperparameters=(Hyperparameter(hyper_name, 0.1, symbol=text, latex=SAFE_LATEX, doc=text, what=text),),
        states=(StateDecl(state_name, text, SAFE_LATEX, doc=text),),
        updates=((state_name, m_t),),
        param_update=P - hyper(hyper_name) * m_t / (sqrt(m_t * m_t) + 1.0),
        references=(text,),
        notes=text,
    )


def test_hostile_spec_strings_never_become_onnx_names() -> None:
    spec = _spec_with_strings(HOSTILE)
    model = to_onnx(spec)
    node_names, values = _names(model)
    assert all(NODE_NAME.fullmatch(n) for n in node_names)
    interface = {"param", "grad", "m", "step", "lr", "param_out", "m_out"}
    internal = values - interface
    assert all(re.fullmatch(r"_*v[ac]?\d+", v) for v in internal), sorted(internal)
    assert model.graph.name == "portopt_step"
    assert not any(HOSTILE in v for n in model.graph.node for v in [*n.input, *n.output, n.name])
    assert spec_from_json({p.key: p.value for p in model.metadata_props}["portopt.spec"]) == spec  # data, kept as data


@pytest.mark.parametrize("name", ["lr rate", 'x"); import os #', "a\nb"])
def test_names_that_cannot_name_an_onnx_input_are_refused_by_the_spec(name: str) -> None:
    with pytest.raises(SpecError, match="is not a name"):
        _spec_with_strings("s", hyper_name=name)
    with pytest.raises(SpecError, match="is not a name"):
        _spec_with_strings("s", state_name=name)


@pytest.mark.parametrize(
    ("state_name", "hyper_name", "message"),
    [
        ("m", "param", "would use the name 'param' twice"),
        ("m", "m_out", "would use the name 'm_out' twice"),
        ("m", "m", "would use the name 'm' twice"),
    ],
)
def test_unusable_interface_names_are_refused(state_name: str, hyper_name: str, message: str) -> None:
    spec = _spec_with_strings("s", state_name=state_name, hyper_name=hyper_name)
    with pytest.raises(OnnxExportError, match=message):
        to_onnx(spec)


def test_internal_names_avoid_the_interface_names() -> None:
    """An interface name that looks like an internal one (``v0``) moves the internal prefix."""
    model = to_onnx(_spec_with_strings("s", state_name="v0", hyper_name="v12"))
    _, values = _names(model)
    internal = values - {"param", "grad", "v0", "step", "v12", "param_out", "v0_out"}
    assert internal
    assert all(v.startswith("_v") for v in internal)


def test_the_graph_is_linear_in_distinct_nodes() -> None:
    """A chain that reuses each node twice has 2^depth paths; the graph must not."""
    x = G
    depth = 400
    for _ in range(depth):
        x = x * x + x
    spec = Spec("deep", "deep", (Hyperparameter("lr", 0.1),), (), (), P - hyper("lr") * x)
    started = time.perf_counter()
    model = to_onnx(spec)
    elapsed = time.perf_counter() - started
    assert len(model.graph.node) <= 2 * depth + 10
    assert elapsed < 60, "the lowering must not walk every path"


def test_the_init_model_is_the_states_initial_values() -> None:
    spec = build_spec("nadam")
    init = to_onnx(spec, init=True)
    assert [o.name for o in init.graph.output] == ["exp_avg_init", "exp_avg_sq_init", "mu_product_init"]
    assert [i.name for i in init.graph.input] == ["param", "grad", *spec.hyper_names]


# --- the command line ---------------------------------------------------------------------


def test_export_cli_writes_a_checked_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, init = tmp_path / "adamw.onnx", tmp_path / "adamw_init.onnx"
    code = main(["export", "onnx", "adamw", "--output", str(out), "-o", "amsgrad=true", "--init-output", str(init)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert "max_exp_avg_sq" in [i.name for i in model.graph.input]
    assert f"opset {DEFAULT_OPSET}" in printed.out
    assert "param_out" in printed.out
    assert [o.name for o in onnx.load(str(init)).graph.output] == [
        "exp_avg_init",
        "exp_avg_sq_init",
        "max_exp_avg_sq_init",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["adamw", "-o", "amsgrd=true"], "unknown option 'amsgrd'"),
        (["adamw", "--opset", "9"], "opset 9 is not supported"),
        (["nope"], "unknown algorithm 'nope'"),
    ],
)
def test_export_cli_errors_name_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "x.onnx"
    code = main(["export", "onnx", *argv, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == USAGE_ERROR
    assert message in err
    assert not out.exists()


def test_export_cli_help_names_the_default_opset_and_builds_without_torch() -> None:
    code = "import sys; from portopt.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False", "building the parser must not import torch or a backend"
    helped = subprocess.run(
        [sys.executable, "-m", "portopt", "export", "onnx", "--help"], capture_output=True, text=True, timeout=120
    )
    assert f"default: {DEFAULT_OPSET}" in " ".join(helped.stdout.split())


def test_export_cli_as_a_process(tmp_path: Path) -> None:
    out = tmp_path / "sgd.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "portopt", "export", "onnx", "sgd", "-o", "momentum=true", "--output", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [i.name for i in onnx.load(str(out)).graph.input][:3] == ["param", "grad", "momentum_buffer"]


def _every_primitive() -> Spec:
    """A spec whose update uses every primitive of the spec language."""
    from portopt.spec import (
        col_mean,
        exp,
        log,
        max_abs,
        maximum,
        minimum,
        ne,
        norm,
        row_mean,
        rsqrt,
        sign,
        square,
        tensor_mean,
        tensor_sum,
        where,
    )

    a = abs(G) + 1
    value = (
        exp(-a) + log(a) + rsqrt(a) + sign(G) + square(G) + maximum(G, 0.5) + minimum(G, -0.5) + a**1.5 - (-G)
        + tensor_sum(G) + tensor_mean(G) + norm(G) + max_abs(G) + row_mean(G) + col_mean(G)
    )  # fmt: skip
    cond = ((G < 0) | (G >= 1)) & ~(G <= 0.5) & ne(G, 0.25) & (G > -2)
    return Spec("all", "all", (Hyperparameter("lr", 0.1),), (), (), P - hyper("lr") * where(cond, value, G / a))


def test_every_primitive_exports_to_standard_ops() -> None:
    model = to_onnx(_every_primitive(), rank=2)
    used = {n.op_type for n in model.graph.node}
    assert {n.domain for n in model.graph.node} == {""}
    for op_type in ("ReduceSum", "ReduceL2", "ReduceMax", "ReduceMean", "IsNaN", "Where", "Not", "Or", "And"):
        assert op_type in used
    assert {op for op in Op if OP_INFO[op].family is not Family.LEAF} <= set(ONNX_RULES)


@pytest.mark.skipif(ORT_REASON is not None, reason=ORT_REASON or "")
@pytest.mark.parametrize("opset", [DEFAULT_OPSET, 18])  # 18: reduction axes become an input
def test_every_primitive_computes_what_the_reference_computes(opset: int) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    from portopt.backends.reference import build_reference_step

    spec = _every_primitive()
    session = ort.InferenceSession(
        to_onnx(spec, rank=2, opset=opset).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    gen = torch.Generator().manual_seed(7)
    param, grad = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen) * 2
    feeds = {"param": param.numpy(), "grad": grad.numpy(), "step": np.float32(1.0), "lr": np.float32(0.1)}
    (got,) = session.run(None, {k: np.asarray(v) for k, v in feeds.items()})
    expected = param.double()
    build_reference_step(spec)([expected], [grad.double()], [{}], {"lr": float(np.float32(0.1))})
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-5, atol=1e-6)
