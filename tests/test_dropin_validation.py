"""Arguments, errors and object behaviour a torch.optim user relies on, each checked against torch.optim.

Every test runs torch.optim's class on the same input in the same test: where torch raises,
portopt raises the same exception type with a message that starts with torch's; where torch
silently does something that cannot be kept (a third ``betas`` entry ignored, ``lr=10**400``
failing only at the step), portopt refuses at once with an error that names the argument and
is still of torch's type.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import portopt

TORCH_ALGORITHMS = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax"]
WITH_BETAS = ["Adam", "AdamW", "NAdam", "RAdam", "Adamax", "AdaBelief", "LAMB", "Lion", "SparseAdam"]
WITH_CAPTURABLE = ["Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop"]
WITH_FUSED = ["SGD", "Adam", "AdamW", "Adagrad"]


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(3))]


def _raised(make: Callable[[], Any]) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is compared with torch's by the caller
        make()
    return info.value


def _same_error(theirs: Callable[[], Any], ours: Callable[[], Any]) -> tuple[BaseException, BaseException]:
    t, o = _raised(theirs), _raised(ours)
    assert isinstance(o, type(t)), (type(o), type(t), str(o))
    assert str(o).startswith(str(t)), (str(o), str(t))
    return t, o


# ---------------------------------------------------------------------------------------
# Validation order: what torch checks before building the param groups comes first.


@pytest.mark.parametrize("name", TORCH_ALGORITHMS)
def test_params_none_raises_torchs_type_error(name: str) -> None:
    _same_error(lambda: getattr(torch.optim, name)(None), lambda: getattr(portopt, name)(None))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("Adam", {"betas": (0.9, torch.tensor(0.999))}),
        ("AdamW", {"betas": (torch.tensor(0.9), 0.999)}),
        ("Adam", {"betas": (2.0, 0.999)}),
        ("SGD", {"lr": -1.0}),
        ("NAdam", {"momentum_decay": -1.0}),
    ],
    ids=str,
)
def test_argument_errors_come_before_the_params_are_read(name: str, kwargs: dict[str, Any]) -> None:
    """With ``params=None``, torch reports a bad argument, not the params (it checks them first)."""
    theirs, _ = _same_error(
        lambda: getattr(torch.optim, name)(None, **kwargs), lambda: getattr(portopt, name)(None, **kwargs)
    )
    assert isinstance(theirs, ValueError)


def test_lr_too_large_for_a_float_is_named_at_construction() -> None:
    """torch accepts ``lr=10**400`` and fails at the step with a bare OverflowError; portopt names lr at once
    (still an OverflowError, and a ValueError like every bad hyperparameter)."""
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([param], lr=10**400)
    param.grad = torch.ones(3)
    with pytest.raises(OverflowError):
        opt.step()
    with pytest.raises(OverflowError, match=r"Invalid learning rate: an integer of 401 digits") as info:
        portopt.Adam(_params(), lr=10**400)
    assert isinstance(info.value, ValueError)
    assert "lr must be a finite number" in str(info.value)


@pytest.mark.parametrize("name", WITH_BETAS)
def test_a_third_betas_entry_is_refused(name: str) -> None:
    """torch ignores a third entry at construction (its step then fails to unpack them, or runs with the first two)."""
    with pytest.raises(ValueError, match=r"Invalid betas: \(0\.9, 0\.99, 0\.5\) \(.*betas must hold exactly 2 values"):
        getattr(portopt, name)(_params(), betas=(0.9, 0.99, 0.5))
    if hasattr(torch.optim, name):
        param = nn.Parameter(torch.ones(3))
        opt = getattr(torch.optim, name)([param], betas=(0.9, 0.99, 0.5))  # accepted by torch
        assert opt.param_groups[0]["betas"] == (0.9, 0.99, 0.5)


@pytest.mark.parametrize("where", ["add_param_group", "set on the group"])
def test_a_third_betas_entry_is_refused_later_too(where: str) -> None:
    param = nn.Parameter(torch.ones(3))
    opt = portopt.NAdam([param])
    param.grad = torch.ones(3)
    if where == "add_param_group":
        with pytest.raises(ValueError, match="betas must hold exactly 2 values"):
            opt.add_param_group({"params": _params(), "betas": (0.9, 0.99, 0.5)})
        return
    opt.param_groups[0]["betas"] = (0.9, 0.99, 0.5)
    with pytest.raises(ValueError, match="betas must hold exactly 2 values"):
        opt.step()
    assert not opt.state
    assert torch.equal(param.detach(), torch.ones(3))


def test_a_name_next_to_its_tuple_is_refused() -> None:
    """``beta1=`` and ``betas=`` together would silently merge; like a duplicate argument, it is a TypeError."""
    with pytest.raises(TypeError, match=r"beta1=0\.7 given next to betas=\(0\.5, 0\.9\)"):
        portopt.Optimizer(_params(), "adam", betas=(0.5, 0.9), beta1=0.7)
    with pytest.raises(TypeError, match="given next to betas="):
        portopt.Optimizer(_params(), "adam").add_param_group({"params": _params(), "betas": (0.5, 0.9), "beta2": 0.8})
    merged = portopt.Optimizer(_params(), "adam", beta1=0.7)
    assert merged.param_groups[0]["betas"] == (0.7, 0.999)


# ---------------------------------------------------------------------------------------
# Device flags: torch's errors at torch's moment.


@pytest.mark.parametrize("name", WITH_FUSED)
def test_fused_with_meta_params_raises_torchs_runtime_error_at_the_step(name: str) -> None:
    def step(library: Any) -> None:
        param = nn.Parameter(torch.ones(3, device="meta"))
        opt = getattr(library, name)([param], fused=True)  # construction succeeds in torch
        param.grad = torch.ones(3, device="meta")
        opt.step()

    theirs, _ = _same_error(lambda: step(torch.optim), lambda: step(portopt))
    assert isinstance(theirs, RuntimeError)
    assert "`fused=True` requires all the params to be floating point Tensors" in str(theirs)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_fused_with_complex_params_raises_torchs_runtime_error(name: str) -> None:
    def step(library: Any) -> None:
        param = nn.Parameter(torch.ones(3, dtype=torch.complex64))
        opt = getattr(library, name)([param], fused=True)
        param.grad = torch.ones(3, dtype=torch.complex64)
        opt.step()

    _same_error(lambda: step(torch.optim), lambda: step(portopt))


@pytest.mark.parametrize("name", WITH_CAPTURABLE)
def test_capturable_on_cpu_raises_torchs_assertion_error_at_the_step(name: str) -> None:
    def step(library: Any) -> nn.Parameter:
        param = nn.Parameter(torch.ones(3))
        opt = getattr(library, name)([param], capturable=True)
        param.grad = torch.ones(3)
        try:
            opt.step()
        finally:
            assert torch.equal(param.detach(), torch.ones(3))  # nothing was written
        return param

    theirs, ours = _same_error(lambda: step(torch.optim), lambda: step(portopt))
    assert isinstance(theirs, AssertionError)
    assert isinstance(ours, ValueError)  # also a bad-input error, as every portopt step error


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("Adam", {"fused": True, "differentiable": True}), ("SGD", {"fused": True, "foreach": True})],
    ids=str,
)
def test_flag_combinations_torch_rejects(name: str, kwargs: dict[str, Any]) -> None:
    _same_error(
        lambda: getattr(torch.optim, name)(_params(), **kwargs), lambda: getattr(portopt, name)(_params(), **kwargs)
    )


def test_foreach_with_differentiable_is_refused_at_construction() -> None:
    """torch fails at the step ("_foreach ops don't support autograd"); portopt says so when built."""
    param = nn.Parameter(torch.ones(3)).clone()
    opt = torch.optim.Adam([param], foreach=True, differentiable=True)
    param.grad = torch.ones(3)
    with pytest.raises(AssertionError, match="_foreach ops don't support autograd"):
        opt.step()
    with pytest.raises(ValueError, match="foreach=True and differentiable=True cannot be combined"):
        portopt.Adam(_params(), foreach=True, differentiable=True)


# ---------------------------------------------------------------------------------------
# state_dict and copies.


def _stepped(library: Any) -> tuple[nn.Parameter, torch.optim.Optimizer]:
    param = nn.Parameter(torch.arange(3.0))
    opt = library.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    return param, opt


def test_state_dict_keeps_a_non_parameter_entry_as_torch_does() -> None:
    """Hooks and user code put other entries in ``optimizer.state``; torch keeps them in the state dict."""
    (_, theirs), (param, ours) = _stepped(torch.optim), _stepped(portopt)
    their_state: dict[Any, Any] = theirs.state
    our_state: dict[Any, Any] = ours.state
    their_state["x"] = our_state["x"] = 1
    saved = ours.state_dict()
    assert saved["state"]["x"] == theirs.state_dict()["state"]["x"] == 1
    assert saved["state"].keys() == theirs.state_dict()["state"].keys()
    fresh = portopt.Adam([nn.Parameter(torch.arange(3.0))], lr=0.1)
    fresh.load_state_dict(saved)
    fresh_state: dict[Any, Any] = fresh.state
    assert fresh_state["x"] == 1
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], ours.state[param]["exp_avg"])


def test_deepcopy_keeps_last_step_skipped_and_every_public_attribute() -> None:
    """torch.optim's copy keeps defaults, state and param groups; portopt's also every other public attribute."""
    param = nn.Parameter(torch.ones(3))
    opt = portopt.Adam([param], skip_nonfinite=True, backend="torch")
    param.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt.step()
    assert opt.last_step_skipped
    opt.custom = "kept"  # type: ignore[attr-defined]
    clone = copy.deepcopy(opt)
    assert clone.last_step_skipped is True
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public <= set(vars(clone))
    assert clone.custom == "kept"  # type: ignore[attr-defined]
    assert clone.backend == "torch"
    # what torch.optim's copy keeps (defaults, state, param groups), portopt's keeps alike
    theirs = torch.optim.Adam([nn.Parameter(torch.ones(3))])
    kept = {k for k in vars(copy.deepcopy(theirs)) if not k.startswith("_")}
    assert kept == {"defaults", "state", "param_groups"} <= set(vars(clone))
    assert clone.param_groups[0].keys() == opt.param_groups[0].keys()
    clone.param_groups[0]["params"][0].grad = torch.ones(3)
    clone.step()
    assert clone.last_step_skipped is False


def test_the_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's examples (the GradScaler one included) run as written, in a fresh folder.

    The ONNX example runs the file the README's `portopt export onnx adamw --output adamw.onnx` writes."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        if "adamw.onnx" in block:
            onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'portopt[onnx]')")
            pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'portopt[onnx]')")
            from portopt.export import to_onnx

            onnx.save(to_onnx("adamw"), "adamw.onnx")
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
