"""``portopt conformance --backend npu-contract``: the NPU rules through the emulated op contract, labelled as such.

A few representative cases run by default (CI); the full AdamW/Adam/SGD matrix (every case of
the full set, skip-nonfinite included, in fp32, bf16 and fp16+master) is behind ``slow`` and in
the CLI (README, "Ascend NPU"). Every report must say that npu-contract is an emulation, not
hardware: the terminal table, the JSON results and the HTML page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from portopt.backends.npu import CONTRACT_LABEL
from portopt.backends.npu.ops import OPS_VARIABLE
from portopt.cli import main as portopt_main

LABELLED = f"npu-contract ({CONTRACT_LABEL})"


def conformance(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str
) -> tuple[int, str, list[dict[str, Any]]]:
    code = portopt_main(["conformance", "--backend", "npu-contract", *argv, "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    return code, out, json.loads((tmp_path / "conformance.json").read_text())["results"]


def test_representative_cases_pass_and_every_report_says_emulation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OPS_VARIABLE, "portopt.backends.npu_emulation")
    monkeypatch.setenv("COLUMNS", "240")
    code, out, results = conformance(
        capsys, tmp_path, "--quick", "--algorithm", "adamw", "--algorithm", "sgd",
        "--case", "adamw*", "--case", "sgd[momentum*", "--precision", "fp32", "--precision", "bf16",
    )  # fmt: skip
    assert code == 0, out
    assert {r["status"] for r in results} == {"pass"}
    assert {r["case"] for r in results} == {
        "adamw[wd=0.1]/quick",
        "sgd[momentum,wd=0.1,dampening=0.1]/quick",
        "sgd[momentum,nesterov,wd=0.01]/quick",
    }
    assert {r["implementation"] for r in results} == {LABELLED}
    assert CONTRACT_LABEL in out
    assert CONTRACT_LABEL in (tmp_path / "conformance.html").read_text(encoding="utf-8")
    assert CONTRACT_LABEL in (tmp_path / "conformance.xml").read_text(encoding="utf-8")


def test_a_bad_ops_module_skips_every_case_with_the_variable_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OPS_VARIABLE, "no_such_vendor.ops")
    code, out, results = conformance(capsys, tmp_path, "--quick", "--algorithm", "adamw", "--precision", "fp32")
    assert code == 1, out  # a requested implementation that ran nothing is a failure (--allow-skips opts out)
    assert "npu-contract" in out
    assert results
    assert all(r["status"] == "skip" for r in results)
    assert all(OPS_VARIABLE in r["reason"] for r in results)


def test_device_npu_without_torch_npu_is_skipped_with_the_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Before torch_npu is imported torch cannot even parse "npu": the suite must say what is missing, not crash."""
    from portopt.backends import device_unavailable_reason

    missing = device_unavailable_reason("npu")
    if missing is None:
        pytest.skip("an NPU is present here")
    code = portopt_main(
        [
            "conformance",
            "--quick",
            "--case",
            "adamw*",
            "--precision",
            "fp32",
            "--device",
            "npu",
            "--report-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "conformance.json").read_text())["results"]
    assert code == 1, out  # a requested device that ran nothing is a failure (--allow-skips opts out)
    assert results
    assert {r["status"] for r in results} == {"skip"}
    assert any(missing in r["reason"] for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("soc", ["Ascend950PR", "Ascend910A"])  # every kernel; npu_apply_adam_w in fp32
def test_the_full_adamw_adam_sgd_matrix_passes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, soc: str
) -> None:
    monkeypatch.setenv(OPS_VARIABLE, "portopt.backends.npu_emulation")
    monkeypatch.setenv("PORTOPT_NPU_EMULATED_SOC", soc)
    code, out, results = conformance(
        capsys, tmp_path, "--algorithm", "adamw", "--algorithm", "adam", "--algorithm", "sgd",
        "--precision", "fp32", "--precision", "bf16", "--precision", "fp16+master",
    )  # fmt: skip
    assert code == 0, out
    assert {r["status"] for r in results} == {"pass"}
    assert {r["precision"] for r in results} == {"fp32", "bf16", "fp16+master"}
    assert {"adamw[wd=0.1]/skip-nonfinite", "adam/skip-nonfinite", "sgd/skip-nonfinite"} <= {r["case"] for r in results}
