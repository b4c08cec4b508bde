"""Optimizer step time on real models' shape sets: portopt's optimizers against torch.optim, one process.

Run from the repository root::

    python -m bench.model_steps                                   # every shape set x workload
    python -m bench.model_steps --sets gpt2_small --workloads adamw lion --rounds 21
    python -m bench.model_steps --output model_steps_cpu_rerun    # another results file
    python -m bench.model_steps --device cuda --sets 20x1M gpt2_small   # on a GPU (bench/device_check.sh)

Each case builds, over one shape set (:mod:`bench.shape_sets`) with shared random gradients,
portopt's optimizer as a user gets it (``portopt.AdamW(params)``, the backend ``"auto"`` picks,
and for some workloads a named backend too) and the torch.optim implementation the issue's
target compares against (``AdamW(fused=True)`` in the parameters' dtype); each steps three times
to warm up (the compiled backend compiles then), then all step once per round in a shuffled
order for ``--rounds`` rounds, the learning rate changing at every step (a schedule must not
recompile). Reported per implementation: the median step time, the median over rounds of its
ratio to the baseline in the same round (noise common to a round cancels), the microseconds per
tensor, the backend chosen, and how many graphs Inductor compiled during the timed rounds (0:
no recompile across steps and learning rates).

Workloads (the issue's targets as ratios to the baseline, on GPT-2 small's shapes unless noted):

* ``adamw``: fp32, vs AdamW(fused): <= 1.02 on every shape set;
* ``adamw_bf16``: bf16 parameters and states, vs AdamW(fused) on bf16: <= 0.8;
* ``lion``: <= 0.8; ``radam``, ``nadam``, ``adabelief``: <= 1.05 (they move the same bytes or fewer);
* ``adam_q8``: Adam with ``precision="q8-states"`` vs AdamW(fused) fp32: <= 1.0;
* ``lamb``: no target (two passes: its trust ratio needs the update's norm before the update);
* on ``1000x1``: host work per step <= 2 µs per tensor.

Results: ``bench/results/<output>.json`` and ``.md`` with the CPU, its ISA (AVX-512, AVX-512 BF16,
AMX) and the torch version. This measures and reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import portopt
from bench import device_env, measure, shape_sets
from bench.step_time import machine
from portopt.backends.compiled_graphs import compilations

RESULTS = Path(__file__).resolve().parent / "results"
Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Workload:
    """One algorithm in one precision: portopt's implementations and the torch baseline."""

    name: str
    dtype: torch.dtype
    portopt: tuple[tuple[str, Factory], ...]
    baseline: tuple[str, Factory]
    target: float | None
    others: tuple[tuple[str, Factory], ...] = field(default_factory=tuple)


def _torch_adamw(p: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(p, lr=1e-3, fused=True)


def workloads() -> dict[str, Workload]:
    """The benchmarked workloads, by name (module docstring)."""
    fused = ("torch AdamW(fused)", _torch_adamw)
    f32, bf16 = torch.float32, torch.bfloat16
    table = [
        Workload("adamw", f32, (("portopt AdamW", lambda p: portopt.AdamW(p, lr=1e-3)),), fused, 1.02),
        Workload(
            "adamw_bf16",
            bf16,
            (
                ("portopt AdamW", lambda p: portopt.AdamW(p, lr=1e-3)),
                ("portopt AdamW[compiled]", lambda p: portopt.AdamW(p, lr=1e-3, backend="compiled")),
            ),
            fused,
            0.8,
        ),
        Workload("lion", f32, (("portopt Lion", lambda p: portopt.Lion(p, lr=1e-4)),), fused, 0.8),
        Workload(
            "radam",
            f32,
            (("portopt RAdam", lambda p: portopt.RAdam(p, lr=1e-3)),),
            fused,
            1.05,
            (("torch RAdam(foreach)", lambda p: torch.optim.RAdam(p, lr=1e-3, foreach=True)),),
        ),
        Workload(
            "nadam",
            f32,
            (("portopt NAdam", lambda p: portopt.NAdam(p, lr=1e-3)),),
            fused,
            1.05,
            (("torch NAdam(foreach)", lambda p: torch.optim.NAdam(p, lr=1e-3, foreach=True)),),
        ),
        Workload("adabelief", f32, (("portopt AdaBelief", lambda p: portopt.AdaBelief(p, lr=1e-3)),), fused, 1.05),
        Workload(
            "adam_q8",
            f32,
            (("portopt Adam q8-states", lambda p: portopt.Adam(p, lr=1e-3, precision="q8-states")),),
            fused,
            1.0,
        ),
        Workload("lamb", f32, (("portopt LAMB", lambda p: portopt.LAMB(p, lr=1e-3)),), fused, None),
    ]
    return {w.name: w for w in table}


def isa() -> dict[str, bool]:
    """Which of :data:`ISA_FLAGS` this CPU reports (``/proc/cpuinfo``)."""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {f: f in flags for f in ISA_FLAGS}


def _compile_count() -> int:
    return compilations()


class _Implementation:
    """One optimizer over its own copy of the parameters, with the shared gradients."""

    def __init__(self, name: str, kind: str, make: Factory, shapes: list[tuple[int, ...]], grads: list[Any]) -> None:
        gen = torch.Generator().manual_seed(1)
        self.params = [
            torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device=g.device, dtype=g.dtype))
            for s, g in zip(shapes, grads, strict=True)
        ]
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.name, self.kind = name, kind
        self.optimizer = make(self.params)
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        for group in self.optimizer.param_groups:  # a schedule: a new learning rate every step
            group["lr"] = 1e-3 / (1.0 + 1e-3 * self.steps)
        self.optimizer.step()

    def backend(self) -> str:
        chosen = getattr(self.optimizer, "chosen_backends", None)
        return ", ".join(sorted({b for d in chosen() for b in d.values()})) if chosen else "torch.optim"


def bench_case(set_name: str, work: Workload, rounds: int, device: str = "cpu") -> dict[str, Any]:
    """Every implementation of ``work`` over shape set ``set_name`` on ``device``, interleaved (module
    docstring; on CUDA each timed step ends with the device's synchronize)."""
    shapes = shape_sets.SHAPE_SETS[set_name]()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=work.dtype) for s in shapes]
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else None
    specs = [(n, "portopt", f) for n, f in work.portopt] + [(work.baseline[0], "baseline", work.baseline[1])]
    specs += [(n, "torch", f) for n, f in work.others]
    impls = [_Implementation(n, k, f, shapes, grads) for n, k, f in specs]
    first = []
    for impl in impls:
        start = time.perf_counter()
        impl.step()
        first.append(time.perf_counter() - start)
        impl.step()
        impl.step()
    compiles_before = _compile_count()
    times = measure.interleaved([impl.step for impl in impls], rounds, sync=sync)
    recompiles = _compile_count() - compiles_before
    base = next(i for i, impl in enumerate(impls) if impl.kind == "baseline")
    rows = []
    for impl, t, f in zip(impls, times, first, strict=True):
        median = statistics.median(t)
        rows.append(
            {
                "implementation": impl.name,
                "kind": impl.kind,
                "backend": impl.backend(),
                "median_ms": median * 1e3,
                "q1_ms": statistics.quantiles(t, n=4)[0] * 1e3,
                "q3_ms": statistics.quantiles(t, n=4)[2] * 1e3,
                "us_per_tensor": median * 1e6 / len(shapes),
                "ratio_to_baseline": measure.ratio_median(t, times[base]),
                "first_step_s": f,
            }
        )
    del impls, grads
    gc.collect()
    return {
        "shape_set": set_name,
        "workload": work.name,
        "dtype": str(work.dtype).removeprefix("torch."),
        "tensors": len(shapes),
        "params": shape_sets.numel(shapes),
        "baseline": work.baseline[0],
        "target": work.target,
        "graphs_compiled_during_rounds": recompiles,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table (one line per portopt implementation and case)."""
    m = result["machine"]
    lines = [
        f"# Model step times ({result['command']})",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, ISA {m['cpu_capability']} "
        f"({', '.join(k for k, v in result['isa'].items() if v)}), {m['date']}, load {m['load_average']}; "
        f"{result['rounds']} interleaved rounds, medians.",
        "",
        "| shape set | workload | implementation (backend) | ms | baseline ms | ratio | target | µs/tensor | recompiles |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in result["cases"]:
        base = next(r for r in case["rows"] if r["kind"] == "baseline")
        for row in case["rows"]:
            if row["kind"] == "baseline":
                continue
            target = "" if case["target"] is None or row["kind"] != "portopt" else f"{case['target']:.2f}"
            lines.append(
                f"| {case['shape_set']} | {case['workload']} | {row['implementation']} ({row['backend']}) | "
                f"{row['median_ms']:.2f} | {base['median_ms']:.2f} | {row['ratio_to_baseline']:.2f} | {target} | "
                f"{row['us_per_tensor']:.2f} | {case['graphs_compiled_during_rounds']} |"
            )
    lines.append("")
    lines.append(
        "Baseline: torch AdamW(fused=True) in the workload's dtype; ratio = median over rounds of time/baseline."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    table = workloads()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(shape_sets.SHAPE_SETS), default=None)
    parser.add_argument("--workloads", nargs="+", choices=list(table), default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--output", default=None, help="file name stem under bench/results/ (default model_steps_<device>)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; cuda on a GPU)")
    args = parser.parse_args(argv)
    device = str(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine() | device_env.describe(device)
    flags = isa()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, ISA {flags}")
    cases: list[dict[str, Any]] = []
    result = {
        "benchmark": "model_steps",
        "command": " ".join(["python -m bench.model_steps", *(argv if argv is not None else sys.argv[1:])]),
        "device": device,
        "machine": info,
        "isa": flags,
        "rounds": args.rounds,
        "cases": cases,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (args.output or f"model_steps_{torch.device(device).type}")
    for set_name in args.sets or list(shape_sets.SHAPE_SETS):
        for name in args.workloads or list(table):
            case = bench_case(set_name, table[name], args.rounds, device)
            cases.append(case)
            base = next(r for r in case["rows"] if r["kind"] == "baseline")
            for row in case["rows"]:
                print(
                    f"{set_name:12s} {name:11s} {row['implementation']:28s} {row['backend']:12s} "
                    f"{row['median_ms']:9.2f} ms  x{row['ratio_to_baseline']:.2f} (base {base['median_ms']:.2f} ms)"
                    f"  {row['us_per_tensor']:.2f} us/tensor  recompiles {case['graphs_compiled_during_rounds']}",
                    flush=True,
                )
            # written after every case: a long run stopped early keeps what it measured
            stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
            stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
