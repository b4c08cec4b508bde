"""Text and markdown renderings of step-time results."""

from __future__ import annotations

from typing import Any

NOTES = """\
Notes
- Ratios are medians of per-round ratios: every implementation steps once per round, rounds
  shuffled, all in one process, so load that hits one round hits all implementations in it.
  The machine is shared (2 vCPUs, other jobs running): absolute times carry that noise.
- GB/s counts the bytes a one-pass step must move (spec: p read+written, g read, each state
  read if the spec reads it and written if it updates it). "% roofline" is the median over
  rounds of (time to stream those bytes once) / (step time), where the streaming time is an
  in-place float32 `a += b` over the same byte count, timed in the same rounds (row
  "stream a += b"), so the roofline sees the same load as the implementations. The
  start-of-run bandwidth (header) is given for reference.
- portopt[torch_fused] hands the step to torch's fused kernel: it is torch fused plus portopt's
  per-step Python overhead (state bucketing, run-time checks).
- LAMB's trust ratio needs ‖p‖ and ‖u‖ before p is written, so no step can make one pass: the
  compiled kernel reads p, g, m, v to reduce, then reads them again and writes p, m, v: 44 instead
  of 28 bytes per fp32 element (a 64 % ceiling against the one-pass count used for "% roofline";
  the fewest bytes two passes can move is 40).
- "auto" names the backend `backend="auto"` picks for this group: torch_fused where a torch fused
  kernel is proven equivalent, compiled for other specs on groups of >= 2^20 elements.
- "convert-only kernel" (16-bit cases): a compiled kernel that loads p, g and the states, widens
  them to float32 and stores p and the states back, with no optimizer arithmetic: on a CPU without
  native bf16 conversion (AVX2) it is the floor a one-pass bf16 step cannot beat.
- torch 2.13's CPU `_fused_sgd_` does not update bf16/fp16 parameters in its vector loop
  (found by portopt's kernel probe): torch SGD(fused) bf16 times are of a wrong kernel, and
  portopt does not use it (falls back to its compiled kernel).
"""


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def case_text(case: dict[str, Any]) -> str:
    """A short terminal summary of one case."""
    head = (
        f"{case['algorithm']} {case['params'] / 1e6:.0f}M {case['dtype']} "
        f"(stream {case['stream_ms']:.1f} ms, baseline {case['baseline']})"
    )
    lines = [head]
    for r in case["rows"]:
        lines.append(
            f"  {r['implementation']:34s} {r['median_ms']:9.2f} ms  {r['GBps']:6.1f} GB/s "
            f"{100 * r['roofline_fraction']:5.0f}%  x{r['ratio_to_baseline']:.2f}"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The whole result as a markdown report."""
    m = result["machine"]
    bw = result["bandwidth"]
    device = result.get("device", "cpu")
    if "add_GBps" in bw:
        bandwidth = (
            f"copy {bw['copy_GBps']:.1f} GB/s, add {bw['add_GBps']:.1f} GB/s (roofline {bw['roofline_GBps']:.1f} GB/s)"
        )
    else:
        bandwidth = f"device-to-device copy {bw['copy_GBps']:.1f} GB/s (the roofline)"
    out = [
        f"# Optimizer step time ({device}{', ' + m['gpu'] if m.get('gpu') else ''})",
        "",
        *([] if result.get("complete", True) else ["**Partial: the run stopped before its last case.**", ""]),
        f"- date: {m['date']}; torch {m['torch']}; Python {m['python']}"
        + (f"; CUDA {m['cuda']}, Triton {m.get('triton')}" if m.get("cuda") else ""),
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"{m['cpu_capability']}; load average before/after: {m['load_average']} / {result.get('load_average_after')}",
        f"- bandwidth: {bandwidth}",
        f"- {result['rounds']} interleaved rounds after 2 warm-up steps; command: `{result['command']}`",
        "",
    ]
    for entry in result.get("compile_cache", []):
        cold, warm = entry.get("cold", {}), entry.get("warm", {})
        out.append(
            f"- compiled backend, {entry['algorithm']} {entry['dtype']}, first step in a new process: "
            f"cold cache {_fmt(cold.get('first_step_s'))} s, warm cache {_fmt(warm.get('first_step_s'))} s "
            f"(process wall {_fmt(cold.get('process_wall_s'))} s / {_fmt(warm.get('process_wall_s'))} s)"
        )
    out.append("")
    out.append(NOTES)
    for case in result["cases"]:
        out += [
            f"## {case['algorithm']}, {case['params'] / 1e6:.1f}M params ({case['tensors']} tensors), {case['dtype']}",
            "",
            f"{case['bytes_per_step'] / 1e6:.0f} MB per step; streaming them takes {case['stream_ms']:.2f} ms "
            f"in these rounds ({case['roofline_ms']:.2f} ms at the start-of-run bandwidth); "
            f"ratios against {case['baseline']}; auto: portopt[{case.get('auto_choice', '?')}]",
            "",
            "| implementation | median ms | q1–q3 ms | GB/s | % roofline | ratio | first step s | peak step MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in case["rows"]:
            out.append(
                f"| {r['implementation']} | {r['median_ms']:.2f} | {_fmt(r['q1_ms'])}–{_fmt(r['q3_ms'])} | "
                f"{r['GBps']:.1f} | {100 * r['roofline_fraction']:.0f} | {r['ratio_to_baseline']:.2f} | "
                f"{r['first_step_s']:.2f} | {_fmt(r['peak_step_MB'], 0)} |"
            )
        out.append("")
    return "\n".join(out) + "\n"
