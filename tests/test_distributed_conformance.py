"""``portopt conformance --distributed N``: the conformance cases on N gloo ranks, sharded Shard(0) and
Shard(1), compared step by step with the one-process float64 reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from portopt.conformance.cli import main

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed (this torch build lacks it)")


def _results(report_dir: Path) -> list[dict[str, object]]:
    data = json.loads(next(report_dir.glob("*.json")).read_text())
    return data["results"] if isinstance(data, dict) else data


def test_lamb_on_two_ranks_passes_against_the_reference(tmp_path: Path) -> None:
    argv = ["--quick", "--algorithm", "lamb", "--precision", "fp32", "--precision", "fp16+master", "--distributed", "2"]
    assert main([*argv, "--report-dir", str(tmp_path)]) == 0
    rows = _results(tmp_path)
    assert {str(r["implementation"]) for r in rows} == {"portopt Shard(0) x2", "portopt Shard(1) x2"}
    assert {str(r["precision"]) for r in rows} == {"fp32", "fp16+master"}
    assert rows
    assert all(r["status"] == "pass" for r in rows)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--distributed", "0"], "number of ranks >= 1"),
        (["--distributed", "2", "--backend", "torch"], "--backend does not apply"),
    ],
)
def test_bad_distributed_usage_exits_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_set_passes_on_two_ranks(tmp_path: Path) -> None:
    assert main(["--quick", "--distributed", "2", "--report-dir", str(tmp_path)]) == 0
