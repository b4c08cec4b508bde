"""``portopt conformance`` fails a run that checked nothing, and says why in one line.

A CI gate built on the exit code must not pass when every run was skipped: a device that is
absent here, an implementation flag no class accepts. ``--allow-skips`` is the explicit opt-out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from portopt.conformance.cli import main

QUICK = ["--quick", "--algorithm", "sgd", "--precision", "fp32"]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("portopt conformance: error:")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: nothing is absent")
def test_an_absent_device_exits_1_through_the_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("portopt")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "portopt"]
    done = subprocess.run(
        [*command, "conformance", *QUICK, "--backend", "torch", "--device", "cuda"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = _error_lines(done.stderr)
    assert "nothing ran on device 'cuda': no cuda device" in line


def test_an_implementation_flag_nobody_accepts_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUICK, "--impl", "torch.optim:foo=bar"]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "--impl torch.optim:foo=bar ran nothing: torch.optim.SGD(foo='bar') has no argument 'foo'" in line
    assert "--allow-skips" in line
    # Alongside a backend that runs: the flag still ran nothing, and the run still fails.
    assert main([*QUICK, "--backend", "torch", "--impl", "torch.optim:foo=bar"]) == 1
    assert main([*QUICK, "--impl", "torch.optim:foo=bar", "--allow-skips"]) == 0


def test_an_unparseable_implementation_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUICK, "--impl", "torch.optim:fused"]) == 2
    assert main([*QUICK, "--impl", "torch.optim@sgd:x=1"]) == 2
    capsys.readouterr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: nothing is absent")
def test_allow_skips_accepts_a_run_that_skipped_everything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUICK, "--backend", "torch", "--device", "cuda", "--allow-skips"]) == 0
    assert not _error_lines(capsys.readouterr().err)


def test_a_run_that_checked_something_still_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUICK, "--backend", "torch", "--backend", "torch_fused"]) == 0  # torch_fused skips some cases
    assert not _error_lines(capsys.readouterr().err)
