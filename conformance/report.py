"""Reports of a conformance run: JSON, JUnit XML, HTML, Markdown and the terminal tables.

* JSON (``conformance.json``): every result with its per-step error curves and diagnosis,
  re-readable with :func:`read_json`; ``"partial": true`` while the run is not finished.
* JUnit XML (``conformance.xml``): one ``testsuite`` per (implementation, precision,
  device), one ``testcase`` per case; failures carry the diagnosis, skips their reason.
* HTML (``conformance.html``, :mod:`~portopt.conformance.report_html`): the summary
  matrix, failures with diagnosis and plots, error envelopes, the tolerance model.
* Markdown (``conformance.md``, :mod:`~portopt.conformance.report_markdown`): the summary
  for a pull request.
* The terminal tables: :mod:`~portopt.conformance.report_terminal`.

:class:`ReportWriter` writes all of them while a run goes on (every file replaced
atomically, so a reader never sees half a file), marked partial until :meth:`finish`: a run
that is interrupted, killed or timed out leaves a valid report of what it had done.
"""

from __future__ import annotations

import json
import os
import platform
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from portopt.conformance.report_html import HtmlPlots, write_html
from portopt.conformance.report_markdown import write_markdown
from portopt.conformance.report_terminal import terminal_report
from portopt.conformance.results import ERROR, FAIL, SKIP, RunResult, summarize
from portopt.conformance.summary import format_score

JSON_NAME = "conformance.json"
JUNIT_NAME = "conformance.xml"
HTML_NAME = "conformance.html"
MARKDOWN_NAME = "conformance.md"
HTML_INTERVAL = 60.0
"""While a run goes on, the HTML report (with its plots) is rewritten at most this often (seconds)."""

__all__ = [
    "HTML_NAME",
    "JSON_NAME",
    "JUNIT_NAME",
    "MARKDOWN_NAME",
    "ReportWriter",
    "environment",
    "read_json",
    "terminal_report",
    "write_json",
    "write_junit",
    "write_reports",
]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """What the run ran on, for the report headers."""
    import torch

    import portopt

    return {
        "portopt": portopt.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "cpu": f"{_cpu()} ({os.cpu_count()} logical cores)",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def write_text(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(results: Sequence[RunResult], path: Path, meta: dict[str, Any]) -> Path:
    data = {
        "meta": meta,
        "partial": bool(meta.get("partial", False)),
        "summary": summarize(list(results)),
        "results": [r.to_dict() for r in results],
    }
    return write_text(path, json.dumps(data, indent=1, sort_keys=False))


def read_json(path: Path) -> list[RunResult]:
    """The results of a JSON report."""
    return [RunResult.from_dict(r) for r in json.loads(path.read_text())["results"]]


def write_junit(results: Sequence[RunResult], path: Path, meta: dict[str, Any] | None = None) -> Path:
    suites: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        suites.setdefault((r.implementation, r.precision, r.device), []).append(r)
    root = ET.Element("testsuites", name="portopt conformance")
    if meta and meta.get("partial"):
        root.set("partial", "true")
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
                failure.text = failure_text(r)
            elif r.status == ERROR:
                error = ET.SubElement(case, "error", message=r.reason[:500])
                error.text = "\n".join(r.notes)
            elif r.status == SKIP:
                ET.SubElement(case, "skipped", message=r.reason)
                continue  # a skipped run has no score to print
            out = [
                f"worst lock-step error {format_score(r.worst_lockstep)} x allowed, "
                f"free-running {format_score(r.worst_drift)}"
            ]
            out += [f"override: {o}" for o in r.overrides]
            ET.SubElement(case, "system-out").text = "\n".join(out)
    ET.indent(root)
    return write_text(path, ET.tostring(root, encoding="unicode", xml_declaration=True))


def failure_text(r: RunResult) -> str:
    from portopt.conformance.precision import OP_BY_OP_HINT, PRECISIONS

    lines = [r.reason]
    if r.first_failure is not None:
        lines.append(f"first divergence: {r.first_failure.describe()}")
    if r.diagnosis is not None:
        if r.diagnosis.localized:
            lines.append(f"element pattern: {r.diagnosis.localized}")
        lines.append("known variants (worst error / allowed):")
        lines += [
            f"  {s.name}: {format_score(s.worst)}{'  <- matches' if s.matched else ''}" for s in r.diagnosis.scores[:12]
        ]
    precision = PRECISIONS.get(r.precision)
    if precision is not None:
        lines.append(f"precision contract: {precision.contract}")
    if r.precision in OP_BY_OP_HINT:
        lines.append(OP_BY_OP_HINT[r.precision])
    return "\n".join(lines)


class ReportWriter:
    """Every report file of one run, written as results arrive and once more at the end.

    ``meta`` goes into every report (environment added); ``planned`` is the number of runs
    the run will make, for "123 of 780". JSON, JUnit and Markdown are rewritten at every
    :meth:`update`; HTML (plots) at most every :data:`HTML_INTERVAL` seconds, and always by
    :meth:`finish`.
    """

    def __init__(self, directory: str | Path, meta: dict[str, Any] | None = None, planned: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.meta = {**environment(), **(meta or {})}
        self.planned = planned
        self.plots = HtmlPlots()
        self._html_at = 0.0

    def paths(self) -> list[Path]:
        return [self.directory / n for n in (JSON_NAME, JUNIT_NAME, HTML_NAME, MARKDOWN_NAME)]

    def _meta(self, partial: bool, reason: str | None) -> dict[str, Any]:
        meta = dict(self.meta)
        meta["partial"] = partial
        if partial:
            meta["partial_reason"] = reason or "the run has not finished"
        if self.planned is not None:
            meta["planned_runs"] = self.planned
        return meta

    def update(self, results: Sequence[RunResult]) -> None:
        """Write what is done so far, marked partial."""
        meta = self._meta(True, None)
        write_json(results, self.directory / JSON_NAME, meta)
        write_junit(results, self.directory / JUNIT_NAME, meta)
        write_markdown(results, self.directory / MARKDOWN_NAME, meta)
        if time.monotonic() - self._html_at >= HTML_INTERVAL:
            write_html(results, self.directory / HTML_NAME, meta, self.plots)
            self._html_at = time.monotonic()

    def finish(
        self, results: Sequence[RunResult], partial_reason: str | None = None, extra: dict[str, Any] | None = None
    ) -> list[Path]:
        """The final reports: complete, or partial with the reason (an interrupted run)."""
        self.meta.update(extra or {})
        meta = self._meta(partial_reason is not None, partial_reason)
        write_json(results, self.directory / JSON_NAME, meta)
        write_junit(results, self.directory / JUNIT_NAME, meta)
        write_markdown(results, self.directory / MARKDOWN_NAME, meta)
        write_html(results, self.directory / HTML_NAME, meta, self.plots)
        return self.paths()


def write_reports(
    results: Sequence[RunResult], directory: str | Path, meta: dict[str, Any] | None = None
) -> list[Path]:
    """JSON, JUnit XML, HTML and Markdown reports of a finished run in ``directory`` (created if needed)."""
    return ReportWriter(directory, meta).finish(results)
