"""Golden files: recorded in one process, checked in another; tampering fails clearly."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from portopt.conformance import golden
from portopt.conformance.cases import build_cases
from portopt.conformance.cli import main
from portopt.conformance.golden import GoldenError, load
from portopt.conformance.report import read_json

CLI = [sys.executable, "-m", "portopt.conformance"]
CASES = ("--case", "adam[wd=0.1]/quick", "--case", "sgd[momentum,wd=0.1,dampening=0.1]/quick")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A golden file written by a separate process."""
    directory = tmp_path_factory.mktemp("golden")
    path = directory / "quick.npz"
    done = _cli("record", "--out", str(path), "--quick", *CASES, cwd=directory)
    assert done.returncode == 0, done.stdout + done.stderr
    return path


def test_a_golden_file_recorded_in_one_process_passes_in_another(recorded: Path, tmp_path: Path) -> None:
    done = _cli(
        "check", "--golden", str(recorded), "--backend", "torch", "--backend", "reference",
        "--precision", "fp32", "--precision", "bf16", "--report-dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "conformance.json").read_text())["results"]
    verified = [r for r in results if r["implementation"] == "reference (golden)"]
    assert verified
    assert all(r["status"] == "pass" for r in verified)
    ran = [r for r in results if r["implementation"] in ("torch", "reference")]
    assert len(ran) == 2 * 2 * len(verified)
    assert all(r["status"] == "pass" for r in ran)


def test_the_golden_file_holds_the_spec_inputs_and_trajectory(recorded: Path) -> None:
    g = load(recorded)
    cases = g.cases()
    assert [c.name for c, _ in cases] == [CASES[1], CASES[3]]
    case, source = cases[0]
    assert case.spec() == build_cases(["adam"])[0].spec()  # the recorded spec, read back from its JSON
    assert source.gradient(4, 1) is not None
    assert source.gradient(7, 1) is None
    assert g.trajectory_value(0, case.steps, 4, "exp_avg_sq") is not None


def test_a_wrong_implementation_fails_the_golden_check(recorded: Path, tmp_path: Path) -> None:
    impl = "portopt.conformance.mutants:adam_eps_inside_sqrt@adam"
    argv = ["check", "--golden", str(recorded), "--impl", impl, "--precision", "fp32", "--case", "adam*"]
    assert main([*argv, "--report-dir", str(tmp_path)]) == 1
    (result,) = [r for r in read_json(tmp_path / "conformance.json") if r.implementation.endswith("inside_sqrt")]
    assert result.status == "fail"
    assert "ε inside the square root" in result.reason


def _rewrite(source: Path, target: Path, change: str) -> None:
    with np.load(source, allow_pickle=False) as data:
        arrays = {name: np.array(data[name]) for name in data.files}
    if change == "array":
        arrays["c0/traj/3/4/param"][5] += 1e-3
    elif change == "manifest":
        manifest = json.loads(arrays["manifest.json"].tobytes().decode())
        manifest["cases"][0]["group_hypers"][0]["lr"] *= 2
        arrays["manifest.json"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    elif change == "dropped":
        del arrays["c0/grad/2/4"]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    target.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("change", ["array", "manifest", "dropped"])
def test_a_tampered_golden_file_is_refused(recorded: Path, tmp_path: Path, change: str) -> None:
    tampered = tmp_path / "tampered.npz"
    _rewrite(recorded, tampered, change)
    with pytest.raises(GoldenError, match="failed its integrity check: SHA-256 checksum mismatch"):
        load(tampered)


def test_checking_a_tampered_golden_file_fails_with_a_clear_message(recorded: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.npz"
    _rewrite(recorded, tampered, "array")
    done = _cli("check", "--golden", str(tampered), "--backend", "reference", "--precision", "fp32", cwd=tmp_path)
    assert done.returncode == 1
    message = " ".join(done.stderr.split())
    assert f"golden file {tampered} failed its integrity check" in message
    assert "the file was modified or corrupted after it was recorded" in message


def test_a_truncated_or_foreign_file_is_refused(recorded: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(recorded.read_bytes()[:1000])
    with pytest.raises(GoldenError, match=r"not a readable \.npz archive"):
        load(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(GoldenError, match="not a portopt golden file"):
        load(foreign)
    with pytest.raises(GoldenError, match="does not exist"):
        load(tmp_path / "missing.npz")


def test_record_and_load_in_process(tmp_path: Path) -> None:
    path = golden.record(build_cases(["lion"]), tmp_path / "lion.npz")
    g = load(path)
    ((case, source),) = g.cases()
    assert golden.verify_reference(g, 0, case, source).status == "pass"


@pytest.mark.cuda
def test_recorded_on_cpu_checked_on_cuda(recorded: Path, tmp_path: Path) -> None:
    """The golden file was recorded on the CPU; a CUDA device checks against it."""
    argv = ["check", "--golden", str(recorded), "--backend", "torch", "--device", "cuda", "--precision", "fp32"]
    assert main([*argv, "--report-dir", str(tmp_path)]) == 0
    ran = [r for r in read_json(tmp_path / "conformance.json") if r.device == "cuda"]
    assert ran
    assert all(r.status == "pass" for r in ran)
