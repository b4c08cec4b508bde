"""A user's own spec everywhere (``--spec module:factory``), third-party algorithms through the
``portopt.algorithms`` entry point group, and the README's "write your own optimizer"."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import portopt
from portopt.algorithms import registry
from portopt.cli import main
from portopt.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
MODULE = """
from portopt.spec import G, P, sign
from portopt.spec.parts import Builder, beta, cautious, decoupled_decay, learning_rate, weight_decay


def make(cautious_mask: bool = True):
    b = Builder("my_lion", "My cautious Lion")
    lr, b1, b2, wd = b.hypers(learning_rate(1e-3), beta(1, 0.9), beta(2, 0.99), weight_decay(0.0))
    m = b.state("exp_avg", "m")
    b.update("exp_avg", b2 * m + (1 - b2) * G)
    u = sign(b1 * m + (1 - b1) * G)
    return b.build(decoupled_decay(P, lr, wd) - lr * (cautious(u, G) if cautious_mask else u))
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"user_spec_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def test_show_a_user_spec(user_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--spec", f"{user_module}:make"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("My cautious Lion (my_lion)")
    assert "sum(φ)" in out
    assert main(["show", "--spec", f"{user_module}:make", "-o", "cautious_mask=false", "--latex"]) == 0
    assert "sum" not in capsys.readouterr().out


def test_conformance_quick_on_a_user_spec(user_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["conformance", "--quick", "--spec", f"{user_module}:make", "--precision", "fp32", "--no-diagnose"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"\b([1-9]\d*) passed, 0 failed, 0 errors", out)
    assert "my_lion" in out


def test_memory_and_export_of_a_user_spec(user_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--spec", f"{user_module}:make"]) == 0
    assert "state.exp_avg" in capsys.readouterr().out
    pytest.importorskip("onnx", reason="onnx (the onnx extra) is not installed")
    assert main(["export", "onnx", "--spec", f"{user_module}:make", "--output", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show"], "one of the arguments algorithm --spec is required"),
        (["show", "adam", "--spec", "x:y"], "not allowed with argument algorithm"),
        (["show", "--spec", "nomodule_xyz:make"], "cannot import module 'nomodule_xyz'"),
        (["show", "--spec", "portopt.spec:Spec"], "TypeError"),
        (["show", "--spec", "portopt:__version__"], "not a spec factory"),
        (["show", "--spec", "nocolon"], "write it as module:factory"),
    ],
)
def test_bad_spec_sources_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_third_party_algorithm_registers_through_the_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from portopt.algorithms import get_spec

    algorithm = registry.Algorithm("thirdparty_sgd", lambda: get_spec("sgd"), class_name="ThirdPartySGD")

    class Entry:
        name, value = "thirdparty", "thirdparty_pkg:ALGORITHMS"

        def load(self) -> object:
            return (algorithm,)

    class Broken(Entry):
        name, value = "broken", "broken_pkg:ALGORITHMS"

        def load(self) -> object:
            raise ImportError("no module named broken_pkg")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Entry(), Broken()])
    table: dict[str, registry.Algorithm] = {}
    registry.load_entry_points(table)
    assert table == {"thirdparty_sgd": algorithm}
    assert "no module named broken_pkg" in registry.ENTRY_POINT_FAILURES["broken"]


def test_every_algorithm_module_registers_itself() -> None:
    """Adding a built-in is one file: the registry finds each module's ALGORITHMS, the front end its class."""
    from portopt.algorithms import REGISTRY

    assert {"adafactor", "came", "sophiag", "adan", "adam", "sgd"} <= set(REGISTRY)
    for entry in REGISTRY.values():
        assert getattr(portopt, entry.class_name).spec().name == entry.name
    assert set(portopt.__all__) >= {"Adafactor", "CAME", "SophiaG", "Adan", "Optimizer"}


def test_a_generated_class_has_the_reference_signature() -> None:
    """portopt.CAME is made from its spec: came-pytorch's argument order and defaults (but a default lr)."""
    params = list(inspect.signature(portopt.CAME).parameters)
    assert params[:6] == ["params", "lr", "eps", "clip_threshold", "betas", "weight_decay"]
    assert inspect.signature(portopt.CAME).parameters["eps"].default == (1e-30, 1e-16)
    p = torch.ones(2, 3, requires_grad=True)
    opt = portopt.CAME([p], 1e-2, (1e-30, 1e-16), 1.0, (0.9, 0.999, 0.9999), 0.1)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999, 0.9999)
    with pytest.raises(TypeError):
        portopt.CAME([p], nonsense=1)


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Write your own optimizer", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_readme_write_your_own_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 20
    namespace: dict[str, object] = {}
    exec(compile(textwrap.dedent(code), "README.md", "exec"), namespace)
    spec = namespace["spec"]
    assert isinstance(spec, Spec)
    assert "RMS(u)/d" in capsys.readouterr().out
