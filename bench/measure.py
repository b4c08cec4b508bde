"""Timing, bandwidth and memory measurements for the step-time benchmark.

* :func:`stream_bandwidth`: this machine's streaming bandwidth with torch's own in-place
  kernels on arrays far larger than the caches (copy: 2 accesses per element, add: 3),
  bytes counted as reads plus writes, as the optimizer byte counts are; the best of
  the kernels is the roofline.
* :func:`interleaved`: every implementation steps once per round, in a shuffled order,
  for several rounds; per implementation the median step time, and per pair the median
  of per-round ratios (noise common to one round cancels).
* :func:`peak_step_memory`: the growth of the resident set during one step (Linux
  ``VmHWM`` after resetting it), i.e. the step's temporaries: approximate, since memory
  the allocator already holds is reused without showing up.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stream_bandwidth(elements: int = 50_000_000, repeats: int = 9) -> dict[str, float]:
    """GB/s of large in-place torch kernels (float32): copy (r+w) and add (2r+w)."""
    a = torch.ones(elements)
    b = torch.ones(elements)
    copy = 8 * elements / _median_time(lambda: a.copy_(b), repeats) / 1e9
    add = 12 * elements / _median_time(lambda: a.add_(b), repeats) / 1e9
    return {"copy_GBps": copy, "add_GBps": add, "roofline_GBps": max(copy, add)}


def interleaved(
    steps: Sequence[Callable[[], None]], rounds: int, seed: int = 0, sync: Callable[[], None] | None = None
) -> list[list[float]]:
    """Per implementation, its step times over ``rounds`` rounds (each round runs each once, shuffled).

    ``sync`` (a device's ``synchronize``) runs before the clock starts and before it stops, so that a
    step's time is the device's time to finish it, not the host's time to enqueue it."""
    order = list(range(len(steps)))
    rng = random.Random(seed)
    times: list[list[float]] = [[] for _ in steps]
    wait = sync or (lambda: None)
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            wait()
            start = time.perf_counter()
            steps[i]()
            wait()
            times[i].append(time.perf_counter() - start)
    return times


def ratio_median(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of time / baseline time."""
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def _status_kib(field: str) -> int | None:
    if not STATUS.exists():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_step_memory(step: Callable[[], None], device: str = "cpu") -> float | None:
    """MB by which memory peaked above its level before one call of ``step``: the resident set on the
    CPU (Linux only), the caching allocator's allocated bytes on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        before_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before_bytes, 0) / 2**20
    try:
        CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024
