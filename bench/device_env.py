"""The device a run is on, and its measured copy bandwidth (for the device check and the step-time roofline).

Run from the repository root::

    python -m bench.device_env --device cuda --out env.json

Bandwidth: a device-to-device ``copy_`` of a float32 array far larger than the last-level cache (1 GiB
on a GPU, 200 MB on a CPU), bytes counted as read plus written (8 per element), the median of repeated
copies. On CUDA the copies are timed with CUDA events around the kernels alone (no host overhead); on
the CPU with ``perf_counter``. This measures and reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(device: str) -> dict[str, Any]:
    """Versions, device name and ISA: what a result must carry to be compared with another."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info |= {
            "gpu": props.name,
            "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def copy_bandwidth(device: str, elements: int | None = None, repeats: int = 20) -> dict[str, float]:
    """GB/s of ``a.copy_(b)`` on ``device`` (float32, read + write bytes), the median of ``repeats``."""
    cuda = device.startswith("cuda")
    n = elements or (2**28 if cuda else 50_000_000)
    a = torch.empty(n, device=device)
    b = torch.ones(n, device=device)
    times: list[float] = []
    for _ in range(3):
        a.copy_(b)
    if cuda:
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a.copy_(b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            a.copy_(b)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"elements": n, "copy_GBps": 8 * n / median / 1e9, "copy_ms": median * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print only)")
    args = parser.parse_args(argv)
    info = describe(args.device) | {"bandwidth": copy_bandwidth(args.device)}
    text = json.dumps(info, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
