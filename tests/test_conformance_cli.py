"""``portopt conformance``: exit codes, reports, skips with reasons, and the pytest plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from portopt.cli import build_parser
from portopt.cli import main as portopt_main
from portopt.conformance.cli import main
from portopt.conformance.precision import PRECISIONS, policy_unavailable_reason
from portopt.conformance.report import read_json
from portopt.conformance.results import RunResult
from portopt.lowering.registry import registered_backends

MUTANT = "portopt.conformance.mutants:adam_eps_inside_sqrt@adam"


def test_a_passing_run_exits_0_and_writes_json_junit_and_html(tmp_path: Path) -> None:
    argv = ["--quick", "--algorithm", "sgd", "--backend", "torch", "--backend", "reference", "--precision", "fp32"]
    assert main([*argv, "--report-dir", str(tmp_path)]) == 0
    results = read_json(tmp_path / "conformance.json")
    assert {r.implementation for r in results} == {"torch", "reference"}
    assert results
    assert all(r.status == "pass" for r in results)
    suites = ET.parse(tmp_path / "conformance.xml").getroot().findall("testsuite")
    assert {s.get("name") for s in suites} == {"torch / fp32 / cpu", "reference / fp32 / cpu"}
    assert all(s.get("failures") == "0" for s in suites)
    assert "<table>" in (tmp_path / "conformance.html").read_text()


def test_a_failing_implementation_exits_1_with_diagnosis_and_plot(tmp_path: Path) -> None:
    argv = [
        "--quick",
        "--impl",
        MUTANT,
        "--precision",
        "fp32",
        "--case",
        "adam[wd=0.1]/quick",
        "--report-dir",
        str(tmp_path),
    ]
    assert main(argv) == 1
    (result,) = read_json(tmp_path / "conformance.json")
    assert result.status == "fail"
    assert result.diagnosis is not None
    assert result.diagnosis.matched is not None
    assert result.diagnosis.matched.name == "eps-inside-sqrt"
    assert result.lockstep_curves["param"][0] > 1  # the per-step curve behind the plot
    failure = ET.parse(tmp_path / "conformance.xml").getroot().find("testsuite/testcase/failure")
    assert failure is not None
    assert "ε inside the square root" in (failure.get("message") or "")
    html = (tmp_path / "conformance.html").read_text()
    assert "data:image/png;base64," in html
    assert "eps-inside-sqrt" in html


def test_json_round_trip_keeps_every_field(tmp_path: Path) -> None:
    main(
        [
            "--quick",
            "--impl",
            MUTANT,
            "--precision",
            "fp32",
            "--case",
            "adam[wd=0.1]/quick",
            "--report-dir",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "conformance.json").read_text())["results"][0]
    assert RunResult.from_dict(data).to_dict() == data


def test_an_absent_device_is_skipped_with_the_reason_and_fails_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: nothing to skip")
    argv = ["--quick", "--algorithm", "sgd", "--backend", "torch", "--device", "cuda", "--precision", "fp32"]
    assert main([*argv, "--report-dir", str(tmp_path)]) == 1  # a gate that checked nothing does not pass
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("portopt conformance: error:")]
    assert "nothing ran on device 'cuda'" in line
    assert "--allow-skips" in line
    results = read_json(tmp_path / "conformance.json")
    assert results
    assert all(r.status == "skip" and "cuda" in r.reason for r in results)
    assert main([*argv, "--allow-skips"]) == 0


def test_master_weights_run_on_a_backend_without_policy_support(tmp_path: Path) -> None:
    """The front end steps the fp32 master with any backend, so fp16+master needs no build_with_policy."""
    argv = ["--quick", "--algorithm", "sgd", "--backend", "reference", "--precision", "fp16+master"]
    assert main([*argv, "--report-dir", str(tmp_path)]) == 0
    results = read_json(tmp_path / "conformance.json")
    assert results
    assert registered_backends()["reference"].build_with_policy is None
    api = policy_unavailable_reason(PRECISIONS["fp16+master"])
    for r in results:
        if api is not None:  # no precision-policy API at all (before issue 5)
            assert (r.status, r.reason) == ("skip", api)
        else:
            assert r.status == "pass", r.reason


def test_bad_usage_exits_2_and_says_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backend", "nonesuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend(s) nonesuch" in err
    assert "reference" in err
    assert main(["--precision", "fp8"]) == 2
    assert "known precisions: fp32" in capsys.readouterr().err
    assert main(["--impl", "no.such.module:Thing@adam"]) == 2
    assert main(["--algorithm", "adamz"]) == 2


def test_the_subcommand_is_registered_in_portopt_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert "conformance" in build_parser().format_help()
    assert portopt_main(["conformance", "list"]) == 0
    out = capsys.readouterr().out
    assert "quick cases" in out
    assert "fp16+master" in out


def test_the_pytest_plugin_runs_the_suite_as_tests(tmp_path: Path) -> None:
    """One test per (case, implementation, precision, device); a failure's message is the diagnosis."""
    argv = [sys.executable, "-m", "pytest", "--pyargs", "portopt.conformance", "-q", "-p", "no:cacheprovider", "-rfE"]
    argv += [
        "--portopt-backend=torch",
        f"--portopt-impl={MUTANT}",
        "--portopt-algorithm=adam",
        "--portopt-precision=fp32",
    ]
    env = {**os.environ, "COLUMNS": "300"}
    done = subprocess.run(
        [*argv, "-k", "wd"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 failed, 2 passed" in done.stdout  # adam[wd=0.1] and adam[amsgrad,wd=0.1] on torch and on the mutant
    assert "FAILED" in done.stdout
    assert "ε inside the square root" in done.stdout
    assert "test_conformance[adam[wd=0.1]/quick|torch|fp32|cpu] PASSED" not in done.stdout


@pytest.mark.slow
def test_quick_run_passes_every_algorithm_on_every_available_backend(tmp_path: Path) -> None:
    """The issue's acceptance run: `portopt conformance --quick` (its wall time is reported, not asserted)."""
    from portopt.algorithms import ALGORITHMS
    from portopt.conformance.candidates import BackendImplementation
    from portopt.conformance.runner import backend_implementations

    done = subprocess.run(
        [sys.executable, "-m", "portopt.conformance", "--quick", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = read_json(tmp_path / "conformance.json")
    backends = [b for b in backend_implementations() if isinstance(b, BackendImplementation)]
    usable = {b.name for b in backends if b.backend.unavailable_reason() is None}
    assert {"reference", "torch"} <= usable
    for precision in ("fp32", "bf16"):
        passed = {(r.algorithm, r.implementation) for r in results if r.precision == precision and r.status == "pass"}
        assert passed == {(a, b) for a in ALGORITHMS for b in usable}
    for r in (r for r in results if r.precision == "fp16+master"):
        assert r.status in ("pass", "skip"), r.reason
        assert r.status == "pass" or "issue 5" in r.reason
