"""A conformance run as a vendor's CI sees it: progress in the log, reports kept up to date and
marked partial when the run is cut short, worker processes, and ``--impl X@alg`` runs only ``alg``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from portopt.conformance.cli import main
from portopt.conformance.report import read_json

MUTANT = "portopt.conformance.mutants:adam_eps_inside_sqrt@adam"
SMALL = ["--quick", "--algorithm", "sgd", "--backend", "reference", "--precision", "fp32"]


def test_an_implementation_of_one_algorithm_runs_only_that_algorithm(tmp_path: Path) -> None:
    assert (
        main(["--quick", "--impl", MUTANT, "--precision", "fp32", "--no-diagnose", "--report-dir", str(tmp_path)]) == 1
    )
    results = read_json(tmp_path / "conformance.json")
    assert results
    assert {r.algorithm for r in results} == {"adam"}
    assert all(r.status != "skip" for r in results)


def test_progress_lines_show_in_a_log(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([*SMALL, "--workers", "1", "--report-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("conformance: ")]
    assert lines[0] == "conformance: 3 runs planned"
    assert any(line.startswith("conformance: 1/3 runs") and "left" in line for line in lines), lines
    assert any(line.startswith("conformance: 3/3 runs (100% of the work)") for line in lines), lines


def test_a_run_stopped_by_its_time_limit_leaves_a_partial_report(tmp_path: Path) -> None:
    assert main([*SMALL, "--workers", "1", "--time-limit", "0.001", "--report-dir", str(tmp_path)]) == 124
    data = json.loads((tmp_path / "conformance.json").read_text())
    assert data["partial"] is True
    assert 1 <= len(data["results"]) < 3
    assert "time limit" in data["meta"]["partial_reason"]
    assert "PARTIAL REPORT" in (tmp_path / "conformance.html").read_text()
    assert "PARTIAL" in (tmp_path / "conformance.md").read_text()


def test_sigterm_leaves_a_valid_partial_report(tmp_path: Path) -> None:
    """As `timeout` or a CI job limit does: SIGTERM mid-run, then every report is readable and says partial."""
    argv = [sys.executable, "-m", "portopt.conformance", "--quick", "--algorithm", "adam", "--algorithm", "sgd"]
    argv += ["--backend", "reference", "--precision", "fp32", "--workers", "1", "--report-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    report = tmp_path / "conformance.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if report.exists() and json.loads(report.read_text())["results"]:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    data = json.loads(report.read_text())
    assert data["partial"] is True
    assert data["meta"]["partial_reason"].startswith("interrupted by SIGTERM after")
    assert 1 <= len(data["results"]) < data["meta"]["planned_runs"]
    assert "PARTIAL REPORT" in (tmp_path / "conformance.html").read_text()
    assert "partial run: interrupted by SIGTERM" in out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="worker processes need at least 2 cores to be worth testing")
def test_worker_processes_give_the_results_of_one_process(tmp_path: Path) -> None:
    argv = ["--quick", "--algorithm", "sgd", "--algorithm", "lion", "--backend", "torch", "--precision", "fp32"]
    assert main([*argv, "--workers", "1", "--report-dir", str(tmp_path / "one")]) == 0
    assert main([*argv, "--workers", "2", "--report-dir", str(tmp_path / "two")]) == 0
    one = read_json(tmp_path / "one" / "conformance.json")
    two = read_json(tmp_path / "two" / "conformance.json")
    assert [r.test_id for r in one] == [r.test_id for r in two]  # the plan's order, whatever finished first
    assert [(r.status, r.worst_lockstep, r.worst_drift) for r in one] == [
        (r.status, r.worst_lockstep, r.worst_drift) for r in two
    ]
    assert json.loads((tmp_path / "two" / "conformance.json").read_text())["meta"]["workers"] == 2
