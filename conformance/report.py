"""Reports of a conformance run: terminal tables, JSON, JUnit XML, and HTML with error plots.

* JSON (``conformance.json``): every result with its per-step error curves and diagnosis,
  re-readable with :func:`read_json`.
* JUnit XML (``conformance.xml``): one ``testsuite`` per (implementation, precision,
  device), one ``testcase`` per case; failures carry the diagnosis, skips their reason.
* HTML (``conformance.html``): the summary, every result, and for each failing or
  borderline case the diagnosis, the variant scores and a plot of the normalised error
  (error / allowed, log scale) versus step for every quantity, lock-step and free-running.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from portopt.conformance.results import ERROR, FAIL, PASS, SKIP, RunResult, summarize

JSON_NAME = "conformance.json"
JUNIT_NAME = "conformance.xml"
HTML_NAME = "conformance.html"


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def environment() -> dict[str, str]:
    """What the run ran on, for the report headers."""
    import torch

    import portopt

    return {
        "portopt": portopt.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def write_json(results: Sequence[RunResult], path: Path, meta: dict[str, Any]) -> Path:
    data = {"meta": meta, "summary": summarize(list(results)), "results": [r.to_dict() for r in results]}
    path.write_text(json.dumps(data, indent=1, sort_keys=False))
    return path


def read_json(path: Path) -> list[RunResult]:
    """The results of a JSON report."""
    return [RunResult.from_dict(r) for r in json.loads(path.read_text())["results"]]


def write_junit(results: Sequence[RunResult], path: Path) -> Path:
    suites: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        suites.setdefault((r.implementation, r.precision, r.device), []).append(r)
    root = ET.Element("testsuites", name="portopt conformance")
    for (impl, precision, device), members in suites.items():
        counts = Counter(r.status for r in members)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"{impl} / {precision} / {device}",
            tests=str(len(members)),
            failures=str(counts[FAIL]),
            errors=str(counts[ERROR]),
            skipped=str(counts[SKIP]),
            time=f"{sum(r.seconds for r in members):.3f}",
        )
        for r in members:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"conformance.{impl}.{precision}.{device}",
                name=r.case,
                time=f"{r.seconds:.3f}",
            )
            if r.status == FAIL:
                failure = ET.SubElement(case, "failure", message=r.reason[:500])
                failure.text = _failure_text(r)
            elif r.status == ERROR:
                error = ET.SubElement(case, "error", message=r.reason[:500])
                error.text = "\n".join(r.notes)
            elif r.status == SKIP:
                ET.SubElement(case, "skipped", message=r.reason)
            out = [f"worst lock-step error {_fmt(r.worst_lockstep)} x allowed, free-running {_fmt(r.worst_drift)}"]
            out += [f"override: {o}" for o in r.overrides]
            ET.SubElement(case, "system-out").text = "\n".join(out)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _failure_text(r: RunResult) -> str:
    lines = [r.reason]
    if r.first_failure is not None:
        lines.append(f"first divergence: {r.first_failure.describe()}")
    if r.diagnosis is not None:
        lines.append("known variants (worst error / allowed):")
        lines += [f"  {s.name}: {_fmt(s.worst)}{'  <- matches' if s.matched else ''}" for s in r.diagnosis.scores]
    return "\n".join(lines)


def plot_png(r: RunResult) -> bytes | None:
    """Normalised error versus step for every quantity, as PNG bytes (``None`` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, (title, curves) in zip(
        axes, (("lock-step", r.lockstep_curves), ("free-running", r.drift_curves)), strict=True
    ):
        for quantity, values in sorted(curves.items()):
            if not any(values):  # an exact quantity (the step counter) adds nothing to the plot
                continue
            ys = [max(v, 1e-6) if math.isfinite(v) else 1e12 for v in values]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=quantity)
        ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="allowed")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("error / allowed")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{r.case} — {r.implementation} — {r.precision} — {r.device}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


_CSS = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
.pass { background: #e6f4e6; } .fail { background: #fbe0e0; } .error { background: #f9d0a0; }
.skip { background: #eeeeee; color: #666; } .borderline { background: #fff3c4; }
pre { white-space: pre-wrap; font-size: 12px; }
"""


def write_html(results: Sequence[RunResult], path: Path, meta: dict[str, Any]) -> Path:
    esc = html.escape
    counts = summarize(list(results))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>portopt conformance</title><style>{_CSS}</style>"
    ]
    parts.append("</head><body><h1>portopt conformance report</h1>")
    parts.append("<p>" + ", ".join(f"{esc(k)}: {esc(str(v))}" for k, v in meta.items()) + "</p>")
    parts.append("<p>" + ", ".join(f"<b>{k}</b>: {v}" for k, v in counts.items()) + "</p>")
    parts.append(
        "<p>Errors are normalised: error / allowed, where the allowance is the tolerance model's (see "
        "<code>portopt.conformance.tolerance</code>); 1 is the limit.</p>"
    )
    parts.append(
        "<table><tr><th>case</th><th>implementation</th><th>precision</th><th>device</th><th>status</th>"
        "<th>lock-step</th><th>free-running</th><th>seconds</th><th>details</th></tr>"
    )
    for n, r in enumerate(results):
        cls = "borderline" if r.borderline else r.status
        link = f"<a href='#r{n}'>{esc(r.case)}</a>" if r.status == FAIL or r.borderline else esc(r.case)
        parts.append(
            f"<tr class='{cls}'><td>{link}</td><td>{esc(r.implementation)}</td><td>{esc(r.precision)}</td>"
            f"<td>{esc(r.device)}</td><td>{r.status}{' (borderline)' if r.borderline else ''}</td>"
            f"<td>{_fmt(r.worst_lockstep)}</td><td>{_fmt(r.worst_drift)}</td><td>{r.seconds:.2f}</td>"
            f"<td>{esc(r.reason[:300])}</td></tr>"
        )
    parts.append("</table>")
    for n, r in enumerate(results):
        if not (r.status == FAIL or r.borderline):
            continue
        parts.append(f"<h2 id='r{n}'>{esc(r.case)} — {esc(r.implementation)} — {r.precision} — {r.device}</h2>")
        parts.append(f"<pre>{esc(_failure_text(r) if r.status == FAIL else 'borderline pass')}</pre>")
        png = plot_png(r)
        if png is not None:
            parts.append(f"<img alt='error versus step' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        for o in r.overrides:
            parts.append(f"<p>override: {esc(o)}</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_reports(
    results: Sequence[RunResult], directory: str | Path, meta: dict[str, Any] | None = None
) -> list[Path]:
    """JSON, JUnit XML and HTML reports in ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), **(meta or {})}
    return [
        write_json(results, directory / JSON_NAME, meta),
        write_junit(results, directory / JUNIT_NAME),
        write_html(results, directory / HTML_NAME, meta),
    ]


def terminal_report(results: Sequence[RunResult], console: Any | None = None) -> None:
    """A summary table per (implementation, precision, device), then failures and skip reasons."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    summary = Table(title="portopt conformance", show_lines=False)
    for column in (
        "implementation",
        "precision",
        "device",
        "pass",
        "fail",
        "error",
        "skip",
        "worst lock-step",
        "worst drift",
    ):
        summary.add_column(
            column, justify="right" if column not in ("implementation", "precision", "device") else "left"
        )
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.implementation, r.precision, r.device), []).append(r)
    for (impl, precision, device), members in groups.items():
        counts = Counter(r.status for r in members)
        ran = [r for r in members if r.status in (PASS, FAIL)]
        worst_lock = max((r.worst_lockstep for r in ran), default=0.0)
        worst_drift = max((r.worst_drift for r in ran), default=0.0)
        style = "red" if counts[FAIL] or counts[ERROR] else ("dim" if counts[PASS] == 0 else "green")
        summary.add_row(
            Text(impl), precision, device, str(counts[PASS]), str(counts[FAIL]), str(counts[ERROR]), str(counts[SKIP]),
            _fmt(worst_lock), _fmt(worst_drift), style=style,
        )  # fmt: skip
    console.print(summary)
    bad = [r for r in results if r.status in (FAIL, ERROR) or r.borderline]
    if bad:
        table = Table(title="failures, errors and borderline passes", show_lines=True)
        for column in ("case", "implementation", "precision", "status", "lock-step", "drift", "why"):
            table.add_column(column, overflow="fold")
        for r in bad:
            table.add_row(
                Text(r.case), Text(r.implementation), r.precision, r.status + (" (borderline)" if r.borderline else ""),
                _fmt(r.worst_lockstep), _fmt(r.worst_drift), Text(r.reason[:400]),
            )  # fmt: skip
        console.print(table)
    reasons = Counter(r.reason for r in results if r.status == SKIP)
    if reasons:
        table = Table(title="skipped", show_lines=False)
        table.add_column("runs", justify="right")
        table.add_column("reason", overflow="fold")
        for reason, count in reasons.most_common():
            table.add_row(str(count), Text(reason))
        console.print(table)
    totals = summarize(list(results))
    console.print(
        f"[bold]{totals[PASS]} passed, {totals[FAIL]} failed, {totals[ERROR]} errors, {totals[SKIP]} skipped "
        f"({totals['borderline']} borderline)[/bold]"
    )
