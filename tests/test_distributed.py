"""portopt under torch.distributed on 2 gloo ranks (localhost): FSDP2, ZeRO-1 and DCP equal to one process.

One process group of 2 spawned ranks runs every case (one start-up for the module, see
:func:`portopt.distributed.parity.suite`); rank 0 compares with the independent truths in one process on
whole tensors: the same portopt optimizer, and torch.optim's where it has the algorithm. "Equal" is
torch.testing's float32 tolerance (``atol + rtol·|truth|``) over 8 steps, parameters and every state
(DTensor states gathered, 8-bit states dequantised and gathered).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist

from portopt.distributed import parity
from portopt.distributed.launch import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed (this torch build lacks it)")

SHAPES = [[12, 8], [8], [7, 5], [2, 6, 4]]
"""A matrix (cut evenly along either dimension), a vector, a matrix FSDP2 cuts unevenly (4 + 3 rows) and a
3-D tensor whose trailing 2-D slices are cut along their rows under ``Shard(1)``."""


def _case(case_id: str, optimizer: str, dim: int, hypers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": case_id,
        "optimizer": optimizer,
        "hypers": hypers,
        "shard_dim": dim,
        "steps": 8,
        "shapes": SHAPES,
        **extra,
    }


FSDP_CASES = [
    _case("lamb-shard0", "LAMB", 0, {"lr": 0.01, "weight_decay": 0.1}),
    _case("lamb-shard1", "LAMB", 1, {"lr": 0.01, "weight_decay": 0.1}),
    _case("adamw-shard0", "AdamW", 0, {"lr": 0.01, "weight_decay": 0.1}, torch="AdamW"),
    _case("adamw-shard1", "AdamW", 1, {"lr": 0.01, "weight_decay": 0.1}, torch="AdamW"),
    _case("adafactor-shard0", "Adafactor", 0, {"lr": 0.01}, torch="Adafactor"),
    _case("adafactor-shard1", "Adafactor", 1, {"lr": 0.01}, torch="Adafactor"),
    # 16 x 256 = 4096 elements: 8-bit by the logical size (min_8bit_size), though each rank holds 2048;
    # each rank's 8 rows are 8 whole blocks of 256
    {
        "id": "adamw-q8-shard0",
        "optimizer": "AdamW",
        "hypers": {"lr": 0.01, "weight_decay": 0.1},
        "precision": "q8-states",
        "shard_dim": 0,
        "steps": 8,
        "shapes": [[16, 256], [8], [3, 5]],
    },
    # 7 x 600: rank 0 holds 4 rows = 2400 elements, not whole blocks of 256: refused, nothing written
    {
        "id": "adamw-q8-misaligned",
        "optimizer": "AdamW",
        "hypers": {"lr": 0.01},
        "precision": "q8-states",
        "shard_dim": 0,
        "steps": 1,
        "shapes": [[7, 600]],
        "expect_error": "ShardingError",
    },
    # an inf in rank 1's rows only at step 3: every rank skips that step (the decision is agreed over the mesh)
    _case("lamb-skip-nonfinite", "LAMB", 0, {"lr": 0.01, "skip_nonfinite": True}, inf_at=[[3, 0, 95]]),
    # the compiled backend's LAMB kernel reduces inside the kernel: refused for sharded pieces
    _case("lamb-compiled-refused", "LAMB", 0, {"lr": 0.01}, backend="compiled", expect_error="ShardingError"),
]
ZERO_CASES = [
    {
        "id": "zero-adamw",
        "optimizer": "AdamW",
        "hypers": {"lr": 0.01, "weight_decay": 0.1},
        "steps": 8,
        "shapes": SHAPES,
        "torch": "AdamW",
    },
    {"id": "zero-lamb", "optimizer": "LAMB", "hypers": {"lr": 0.01, "weight_decay": 0.1}, "steps": 8, "shapes": SHAPES},
]
TRAIN_CASES = [
    {"id": "ddp-lamb", "wrap": "ddp", "optimizer": "LAMB", "hypers": {"lr": 0.01, "weight_decay": 0.1}, "steps": 8},
    {"id": "fsdp2-lamb", "wrap": "fsdp2", "optimizer": "LAMB", "hypers": {"lr": 0.01, "weight_decay": 0.1}, "steps": 8},
]
DCP_CASES = [
    _case("dcp-lamb-shard0", "LAMB", 0, {"lr": 0.01, "weight_decay": 0.1}),
    _case("dcp-adafactor-shard1", "Adafactor", 1, {"lr": 0.01}),  # row factors resharded, column factors replicated
]
SAVED_AT = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    saves: list[dict[str, Any]] = [
        {"case": c, "saved_at": SAVED_AT, "path": str(tmp_path_factory.mktemp(c["id"]))} for c in DCP_CASES
    ]
    payload = {"fsdp": FSDP_CASES, "zero": ZERO_CASES, "train": TRAIN_CASES, "dcp": saves}
    results = run_ranks("portopt.distributed.parity:suite", 2, payload)[0]
    results["dcp_paths"] = {s["case"]["id"]: s["path"] for s in saves}
    return results


def _by_id(rows: list[dict[str, Any]], case_id: str) -> dict[str, Any]:
    return next(r for r in rows if r["id"] == case_id)


def _within(report: dict[str, Any], key: str) -> None:
    figures = report[key]
    assert figures["excess"] <= 0.0, (
        f"{report['id']}: {key} differ by {figures['error']:.3g} (beyond float32 tolerance)"
    )


@pytest.mark.parametrize("case", [c for c in FSDP_CASES if "expect_error" not in c], ids=lambda c: c["id"])
def test_fsdp2_equals_one_process(runs: dict[str, Any], case: dict[str, Any]) -> None:
    report = _by_id(runs["fsdp"], case["id"])
    dim = case["shard_dim"]
    assert f"Shard(dim={dim})" in report["placements"][0]  # the case is sharded as it says
    _within(report, "params")
    _within(report, "states")
    if case.get("torch"):
        _within(report, "torch")
    assert report["storage"] == report["storage_1p"]  # each state stored as one process stores it


def test_q8_eligibility_is_decided_on_the_logical_tensor(runs: dict[str, Any]) -> None:
    report = _by_id(runs["fsdp"], "adamw-q8-shard0")
    assert report["storage"][0] == {"exp_avg": "q8", "exp_avg_sq": "q8"}  # 2048 local, 4096 logical
    assert report["storage"][2]["exp_avg"] == "torch.float32"  # 15 elements: below min_8bit_size


@pytest.mark.parametrize("case_id", ["adamw-q8-misaligned", "lamb-compiled-refused"])
def test_inexact_sharded_steps_are_refused_before_anything_changes(runs: dict[str, Any], case_id: str) -> None:
    report = _by_id(runs["fsdp"], case_id)
    assert report["error"].startswith("ShardingError"), report["error"]
    assert report["unchanged"]


def test_lamb_shard0_chooses_the_generic_backend(runs: dict[str, Any]) -> None:
    assert _by_id(runs["fsdp"], "lamb-shard0")["backends"] == [{"cpu": "torch"}]


@pytest.mark.parametrize("case", ZERO_CASES, ids=lambda c: c["id"])
def test_zero1_equals_one_process(runs: dict[str, Any], case: dict[str, Any]) -> None:
    report = _by_id(runs["zero"], case["id"])
    _within(report, "params")
    if case.get("torch"):
        _within(report, "torch")


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c["id"])
def test_training_under_ddp_and_fsdp2_equals_one_process(runs: dict[str, Any], case: dict[str, Any]) -> None:
    """Forward, backward and step, every rank on the same batches: the averaged gradients are one process's,
    and so are the parameters after 8 steps (gradient averaging rounds: compared within float32 tolerance)."""
    _within(_by_id(runs["train"], case["id"]), "params")


@pytest.mark.parametrize("case", DCP_CASES, ids=lambda c: c["id"])
def test_dcp_saved_on_two_ranks_resumes_on_one(runs: dict[str, Any], case: dict[str, Any]) -> None:
    report = parity.dcp_resume(case, runs["dcp_paths"][case["id"]], SAVED_AT)
    # the dummy step of set_state_dict (zero gradients, lr = 0) moved nothing, and its step was overwritten
    assert report["steps_after_load"] == [float(SAVED_AT)] * len(SHAPES)
    _within(report, "loaded")
    _within(report, "params")
    _within(report, "states")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 4])
@pytest.mark.parametrize("case", DCP_CASES, ids=lambda c: c["id"])
def test_dcp_saved_on_two_ranks_resumes_under_fsdp2_on_another_world_size(
    runs: dict[str, Any], case: dict[str, Any], world_size: int
) -> None:
    payload = {"case": case, "saved_at": SAVED_AT, "path": runs["dcp_paths"][case["id"]]}
    report = run_ranks("portopt.distributed.parity:dcp_load", world_size, payload)[0]
    assert report["steps_after_load"] == [float(SAVED_AT)] * len(SHAPES)
    _within(report, "params")
    _within(report, "states")


def _registry_cases() -> list[dict[str, Any]]:
    """Every registered algorithm with a front-end class, at its defaults, under Shard(0) and Shard(1)."""
    from portopt.algorithms import REGISTRY

    cases = []
    for name, alg in sorted(REGISTRY.items()):
        if not alg.class_name or name == "sparse_adam":  # SparseAdam takes sparse gradients only
            continue
        for dim in (0, 1):
            extra = {"torch": alg.torch_class} if alg.torch_class else {}
            cases.append(_case(f"{name}-shard{dim}", alg.class_name, dim, {}, **extra))
    return cases


@pytest.mark.slow
def test_every_algorithm_under_fsdp2_equals_one_process() -> None:
    cases = _registry_cases()
    reports = run_ranks("portopt.distributed.parity:fsdp", 2, cases)[0]
    for report in reports:
        _within(report, "params")
        _within(report, "states")
        if "torch" in report:
            _within(report, "torch")
        assert report["storage"] == report["storage_1p"], report["id"]
