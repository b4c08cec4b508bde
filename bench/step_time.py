"""Optimizer step time, effective bandwidth and step memory: portopt's lowerings against torch.optim.

Run from the repository root::

    python -m bench.step_time             # full run: 20M and 100M params, fp32 and bf16 (tens of minutes)
    python -m bench.step_time --quick     # smoke run: 2M params, a few rounds (about a minute)
    python -m bench.step_time --algorithms adamw lion --sizes 20e6 --dtypes float32
    python -m bench.step_time --device cuda         # on a GPU (bench/device_check.sh runs it)

For each algorithm, size and dtype it builds every implementation over the same
transformer-like parameter list (shared gradients, own parameters and states):
portopt's backends (``torch_fused`` where a torch fused kernel is equivalent to the
spec, ``compiled``, the generic ``torch``), torch.optim (fused where it exists, foreach,
for-loop) and third-party packages for algorithms torch lacks (pytorch-optimizer,
lion-pytorch, adabelief-pytorch, when installed). After two warm-up steps each, the
implementations step in interleaved, shuffled rounds; per implementation: the median
step time, effective GB/s (the spec's one-pass byte count / time), the fraction of this
machine's streaming bandwidth (measured in the same run), the median per-round ratio to
the baseline (torch fused where it exists, else torch foreach, else the first
third-party package), and the step's peak extra memory. ``--compile-cache`` (on by
default) times the compiled backend's first step in a fresh process with an empty and
then a warm Inductor cache.

On CUDA every timed step is bracketed by ``torch.cuda.synchronize`` (the device's time to finish
the step, launch overhead included), the roofline is the measured device-to-device copy bandwidth
(:mod:`bench.device_env`), and peak memory is the caching allocator's.

Results: ``bench/results/step_time_<device>[_quick].json`` and ``.md``, with the machine,
device, torch version and date. This measures and reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import portopt.backends.compiled
import portopt.backends.torch_fused  # noqa: F401  (registers "torch_fused")
from bench import device_env, measure, report, workloads
from portopt.backends import select_backend
from portopt.backends.torch_fused import match_fused_kernel

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def machine() -> dict[str, Any]:
    """What this ran on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _runners(
    alg: workloads.Algorithm, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: str
) -> list[workloads.Runner]:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype) for s in shapes]

    def params() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return [
            torch.randn(s, generator=g, dtype=torch.float32).mul_(0.02).to(device=device, dtype=dtype) for s in shapes
        ]

    runners: list[workloads.Runner] = []
    backends = ["compiled", "torch"]
    if match_fused_kernel(alg.spec) is not None:
        backends.insert(0, "torch_fused")
    for backend in backends:
        runners.append(workloads.PortoptRunner(backend, alg, params(), grads))
    for name, make in workloads.torch_variants(alg):
        runners.append(workloads.OptimizerRunner(name, "torch", make, params(), grads))
    for name, make in alg.third_party:
        runners.append(workloads.OptimizerRunner(name, "third-party", make, params(), grads))
    return runners


def _baseline(runners: list[workloads.Runner]) -> int:
    for key in ("(fused)", "(foreach)"):
        for i, r in enumerate(runners):
            if r.kind == "torch" and r.name.endswith(key):
                return i
    for i, r in enumerate(runners):
        if r.kind == "third-party":
            return i
    return next(i for i, r in enumerate(runners) if r.name == "portopt[torch]")


def bench_case(
    alg: workloads.Algorithm, size: int, dtype_name: str, rounds: int, roofline: float, device: str = "cpu"
) -> dict[str, Any]:
    """Every implementation of ``alg`` on ``size`` parameters of ``dtype_name`` on ``device``."""
    dtype = DTYPES[dtype_name]
    shapes = workloads.transformer_layout(size)
    numel = sum(workloads._numel(s) for s in shapes)
    element = torch.finfo(dtype).bits // 8
    bytes_per_step = numel * workloads.spec_bytes_per_element(alg.spec, element, element)
    runners: list[workloads.Runner] = [workloads.StreamRunner(bytes_per_step, device)]
    if element == 2:
        runners.append(workloads.ConversionFloorRunner(numel, len(alg.spec.states), dtype, device))
    runners += _runners(alg, shapes, dtype, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else None
    rows: list[dict[str, Any]] = []
    first_steps = []
    for r in runners:
        start = time.perf_counter()
        r.step()
        if sync is not None:
            sync()
        first_steps.append(time.perf_counter() - start)
        r.step()
    peaks = [measure.peak_step_memory(r.step, device) for r in runners]
    times = measure.interleaved([r.step for r in runners], rounds, sync=sync)
    base = _baseline(runners)
    stream = times[0]
    for r, first, peak, t in zip(runners, first_steps, peaks, times, strict=True):
        median = statistics.median(t)
        rows.append(
            {
                "implementation": r.name,
                "kind": r.kind,
                "median_ms": median * 1e3,
                "q1_ms": statistics.quantiles(t, n=4)[0] * 1e3 if len(t) >= 4 else None,
                "q3_ms": statistics.quantiles(t, n=4)[2] * 1e3 if len(t) >= 4 else None,
                "GBps": bytes_per_step / median / 1e9,
                # Against the streaming time of the same bytes in the same rounds (same load).
                "roofline_fraction": 1.0 / measure.ratio_median(t, stream),
                "roofline_fraction_vs_start_bandwidth": bytes_per_step / median / 1e9 / roofline,
                "ratio_to_baseline": measure.ratio_median(t, times[base]),
                "first_step_s": first,
                "peak_step_MB": peak,
            }
        )
    del runners
    gc.collect()
    return {
        "algorithm": alg.name,
        "params": numel,
        "tensors": len(shapes),
        "dtype": dtype_name,
        "bytes_per_step": bytes_per_step,
        "roofline_ms": bytes_per_step / roofline / 1e6,
        "stream_ms": statistics.median(stream) * 1e3,
        "baseline": rows[base]["implementation"],
        # What portopt.<Algorithm>(params) uses by default for this group on this device.
        "auto_choice": select_backend(torch.device(device).type, "auto", alg.spec, numel).name,
        "rows": rows,
    }


COMPILE_PROBE = r"""
import json, sys, time
start = time.perf_counter()
import torch
from portopt.algorithms import get_spec
from portopt.backends.compiled import build_compiled_step
spec = get_spec(sys.argv[1])
dtype = getattr(torch, sys.argv[2])
step = build_compiled_step(spec)
params = [torch.randn(1000, 1000, dtype=dtype), torch.randn(1000, dtype=dtype)]
grads = [torch.randn_like(p) for p in params]
states = [{}, {}]
imported = time.perf_counter()
step(params, grads, states, spec.defaults())
first = time.perf_counter()
step(params, grads, states, spec.defaults())
second = time.perf_counter()
print(json.dumps({"import_s": imported - start, "first_step_s": first - imported, "second_step_s": second - first}))
"""


def compile_cache(algorithm: str = "adamw", dtype: str = "float32") -> dict[str, Any]:
    """First step of the compiled backend in a new process: empty Inductor cache, then warm."""
    out: dict[str, Any] = {"algorithm": algorithm, "dtype": dtype}
    with tempfile.TemporaryDirectory(prefix="portopt-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", COMPILE_PROBE, algorithm, dtype], env=env, capture_output=True, text=True
            )
            wall = time.perf_counter() - start
            if done.returncode != 0:
                out[label] = {"error": done.stderr.strip().splitlines()[-1:]}
                continue
            out[label] = {**json.loads(done.stdout.strip().splitlines()[-1]), "process_wall_s": wall}
    return out


def _write(stem: Path, result: dict[str, Any]) -> None:
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report.markdown(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2M params, fp32 and bf16, 5 rounds")
    parser.add_argument("--sizes", nargs="+", type=float, default=None, help="parameter counts (default 20e6 100e6)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--algorithms", nargs="+", default=None, help="default: all benchmarked algorithms")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, quick 5)")
    parser.add_argument("--no-compile-cache", action="store_true", help="skip the cold/warm compile measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", default=None, help="file name stem under bench/results/ (default step_time_cpu...)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; cuda on a GPU)")
    args = parser.parse_args(argv)
    device = str(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    sizes = [int(s) for s in (args.sizes or ([2e6] if args.quick else [20e6, 100e6]))]
    dtypes = args.dtypes or ["float32", "bfloat16"]
    rounds = args.rounds or (5 if args.quick else 15)
    table = workloads.algorithms()
    names = args.algorithms or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        parser.error(f"unknown algorithm(s) {unknown}; choose from {sorted(table)}")

    info = machine() | device_env.describe(device)
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load {info['load_average']}")
    if device.startswith("cuda"):
        print(f"device: {info['gpu']}, CUDA {info['cuda']}")
        copy = device_env.copy_bandwidth(device)
        bandwidth = {"copy_GBps": copy["copy_GBps"], "roofline_GBps": copy["copy_GBps"]}
    else:
        bandwidth = measure.stream_bandwidth(elements=25_000_000 if args.quick else 50_000_000)
    print(f"streaming bandwidth: {bandwidth}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    default = (
        f"step_time_{torch.device(device).type}"
        + ("_quick" if args.quick else "")
        + (f"_{args.threads}t" if args.threads else "")
    )
    stem = RESULTS / (args.output or default)
    cases: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "benchmark": "step_time",
        "command": " ".join(["python -m bench.step_time", *(argv if argv is not None else sys.argv[1:])]),
        "device": device,
        "quick": args.quick,
        "machine": info,
        "bandwidth": bandwidth,
        "rounds": rounds,
        "cases": cases,
        "complete": False,
    }
    for size in sizes:
        for dtype in dtypes:
            for name in names:
                case = bench_case(table[name], size, dtype, rounds, bandwidth["roofline_GBps"], device)
                cases.append(case)
                print(report.case_text(case))
                _write(stem, result)  # after every case: a run cut off by a time limit keeps what it measured
    result["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if not args.no_compile_cache:
        result["compile_cache"] = [compile_cache("adamw", "float32"), compile_cache("lamb", "bfloat16")]
        print(f"compile cache: {result['compile_cache']}")
    result["complete"] = True
    _write(stem, result)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
