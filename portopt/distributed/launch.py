"""Run a function on N local processes joined in one process group (gloo on localhost by default).

For tests and the distributed conformance mode: ``run_ranks("pkg.mod:fn", 2, payload)`` spawns two
processes, joins them through a file store in a private temporary folder (no port to collide with), calls
``fn(rank, world_size, payload)`` on each, and returns what each returned (JSON values: results cross
processes as text, never as pickles). A rank that raises makes the whole run raise
:class:`RankError` with that rank's traceback. The backend is ``gloo`` here; on a machine with
accelerators, ``backend="nccl"`` (CUDA) or ``"hccl"`` (Ascend, with torch_npu) runs the same functions.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank of :func:`run_ranks` raised; the message carries its traceback."""


def run_ranks(
    target: str, world_size: int, payload: Any = None, backend: str = "gloo", timeout_s: float = 120.0
) -> list[Any]:
    """``target`` (``"module:function"``) run on ``world_size`` processes; each rank's JSON result. A collective
    that waits longer than ``timeout_s`` (a rank failed) raises on the ranks still waiting."""
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    with tempfile.TemporaryDirectory(prefix="portopt-ranks-") as folder:
        text = json.dumps(payload)
        mp.start_processes(
            _rank_main,
            args=(world_size, backend, folder, target, text, timeout_s),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            data = json.loads(Path(folder, f"rank{rank}.json").read_text())
            if "error" in data:
                raise RankError(f"rank {rank} of {world_size} failed in {target}:\n{data['error']}")
            results.append(data["result"])
        return results


def _rank_main(rank: int, world_size: int, backend: str, folder: str, target: str, text: str, timeout_s: float) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(folder, f"rank{rank}.json")
    store = Path(folder, "store")
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        module, _, name = target.partition(":")
        fn = getattr(importlib.import_module(module), name)
        result = fn(rank, world_size, json.loads(text))
        out.write_text(json.dumps({"result": result}))
    except Exception:  # reported to the caller with the rank's traceback
        out.write_text(json.dumps({"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
