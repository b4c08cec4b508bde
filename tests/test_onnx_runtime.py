"""Exported steps run by onnxruntime alone follow torch.optim.

AdamW, RAdam (across its ρ_t switch) and SGD with momentum (and Nesterov's) are exported with
``portopt export onnx``; a separate process that imports only numpy and onnxruntime
(``tests/onnx_standalone_driver.py``) starts the states from the exported init model and steps
the exported file 20 times; torch.optim, given the same gradients, must agree to 1e-5 relative
in every parameter element after every step (float32 both sides).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from portopt.backends.onnx import onnxruntime_unavailable_reason
from portopt.cli import main

ORT_REASON = onnxruntime_unavailable_reason()
pytestmark = pytest.mark.skipif(ORT_REASON is not None, reason=ORT_REASON or "")

STEPS = 20
DRIVER = Path(__file__).with_name("onnx_standalone_driver.py")
CASES: dict[str, tuple[list[str], Any, dict[str, Any]]] = {
    "adamw": (["adamw"], torch.optim.AdamW, {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}),
    "radam": (["radam"], torch.optim.RAdam, {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}),
    "sgd-momentum": (
        ["sgd", "-o", "momentum=true"],
        torch.optim.SGD,
        {"lr": 1e-3, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    ),
    "sgd-nesterov": (
        ["sgd", "-o", "momentum=true", "nesterov=true"],
        torch.optim.SGD,
        {"lr": 1e-3, "momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.01},
    ),
}
GROUP_KEYS = {"betas": ("beta1", "beta2")}


def _hypers(name: str, group: dict[str, object]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in group.items():
        if key in GROUP_KEYS:
            out.update(zip(GROUP_KEYS[key], value, strict=True))  # type: ignore[call-overload]
        elif key != "nesterov":
            out[key] = float(value)  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnxruntime_alone_follows_torch_optim(case: str, tmp_path: Path) -> None:
    argv, torch_class, group = CASES[case]
    step_file, init_file = tmp_path / "step.onnx", tmp_path / "init.onnx"
    assert main(["export", "onnx", *argv, "--output", str(step_file), "--init-output", str(init_file)]) == 0
    gen = torch.Generator().manual_seed(12)
    magnitude = torch.rand(257, generator=gen, dtype=torch.float64) + 1.0
    sign = torch.where(torch.rand(257, generator=gen) < 0.5, -1.0, 1.0).double()
    # |p| in [1, 2], and steps that move it by less than 1 in 20 steps: the relative error stays meaningful.
    initial = (magnitude * sign).float()
    grads = torch.randn(STEPS, 257, generator=gen) * torch.logspace(-4, 0, 257)  # tiny to large
    data = tmp_path / "data.npz"
    np.savez(
        data,
        param=initial.numpy(),
        grads=grads.numpy(),
        **{f"hyper_{k}": np.float32(v) for k, v in _hypers(case, group).items()},
    )
    out = tmp_path / "out.npz"
    done = subprocess.run(
        [sys.executable, "-I", str(DRIVER), str(step_file), str(init_file), str(data), str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    ours = np.load(out)["param_out"]

    param = initial.clone().requires_grad_(False)
    optimizer = torch_class([param], **group)
    worst = 0.0
    for t in range(STEPS):
        param.grad = grads[t].clone()
        optimizer.step()
        expected = param.detach().double().numpy()
        assert np.abs(expected).min() > 0.1
        error = np.abs(ours[t].astype(np.float64) - expected) / np.abs(expected)
        worst = max(worst, float(error.max()))
        assert float(error.max()) <= 1e-5, f"step {t + 1}: worst relative error {float(error.max()):.3g}"
    if case == "radam":  # the 20 steps cross RAdam's rho_t > 5 switch
        beta2 = group["betas"][1]
        rho_inf = 2 / (1 - beta2) - 1
        rho = [rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in range(1, STEPS + 1)]
        assert min(rho) <= 5 < max(rho)
    assert math.isfinite(worst)
    print(f"{case}: worst relative error against torch.optim over {STEPS} steps: {worst:.3g}")


def test_the_readme_example_runs_on_onnxruntime_alone(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## ONNX export") :]
    example = re.search(r"```python\n(import numpy as np\nimport onnxruntime as ort\n.*?)```", section, re.S)
    assert example is not None, "the README's ONNX section has an onnxruntime example"
    assert main(["export", "onnx", "adamw", "--output", str(tmp_path / "adamw.onnx")]) == 0
    check = "\nassert float((p**2).sum()) < 0.5 * float((np.random.default_rng(0).normal(size=1000) ** 2).sum())\n"
    check += "import sys; assert not any(m.split('.')[0] in ('portopt', 'torch') for m in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-I", "-c", example.group(1) + check],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
