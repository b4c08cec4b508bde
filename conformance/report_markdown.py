"""The Markdown summary (``conformance.md``), for a pull request or a CI job summary.

Status and totals, the summary matrix (one row per algorithm, one column per
implementation / precision / device), one line per failure with its diagnosis, the skip
reasons grouped (collapsed), and the environment and command. Long texts are cut at a
word boundary; the HTML and JSON reports carry them whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from portopt.conformance.results import ERROR, FAIL, PASS, SKIP, RunResult, summarize
from portopt.conformance.summary import build_matrix, format_score, skip_groups

_MARK = {PASS: "✅", FAIL: "❌", ERROR: "⚠️", SKIP: "⏭️"}
FAILURE_TEXT = 600


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: Sequence[RunResult], meta: dict[str, Any]) -> str:
    counts = summarize(list(results))
    totals = (
        f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[ERROR]} errors, {counts[SKIP]} skipped "
        f"({counts['borderline']} borderline)"
    )
    if meta.get("partial"):
        planned = meta.get("planned_runs")
        of = f" of {planned}" if planned else ""
        status = f"⚠️ **PARTIAL**: {len(results)}{of} runs ({meta.get('partial_reason') or 'not finished'})"
    else:
        status = "❌ failures" if counts[FAIL] or counts[ERROR] else "✅ all passed"
    lines = [f"## portopt conformance: {status}", "", totals, ""]
    matrix = build_matrix(results)
    if matrix.rows:
        header = ["algorithm", *(_cell(f"{c.implementation}<br>{c.precision} · {c.device}") for c in matrix.columns)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for algorithm in matrix.rows:
            row = [algorithm]
            for column in matrix.columns:
                cell = matrix.cell(algorithm, column)
                if not cell.results:
                    row.append("")
                    continue
                score = "" if cell.worst is None else f" {format_score(cell.worst)}"
                row.append(f"{_MARK[cell.status]} {cell.tally}{score}")
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            "Cells: passes / runs of the algorithm's cases, then the worst normalised error (error / allowed, "
            "1 is the limit) of the runs that ran; a skipped cell has none.",
            "",
        ]
    bad = [r for r in results if r.status in (FAIL, ERROR)]
    if bad:
        lines += [f"### Failures and errors ({len(bad)})", ""]
        for r in bad:
            why = r.diagnosis.summary if r.diagnosis is not None else r.reason
            lines.append(
                f"- **{r.case}** on `{r.implementation}`, {r.precision}, {r.device}: {_cut(why, FAILURE_TEXT)}"
            )
        lines.append("")
    groups = skip_groups(results)
    if groups:
        lines += [f"<details><summary>Skipped: {counts[SKIP]} runs, {len(groups)} reasons</summary>", ""]
        for g in groups:
            lines.append(
                f"- {len(g.results)} × {g.headline} ({', '.join(g.implementations)}; {', '.join(g.algorithms)})"
            )
        lines += ["", "</details>", ""]
    env = ", ".join(f"{k} {meta[k]}" for k in ("portopt", "torch", "python", "cuda", "wall_seconds") if k in meta)
    lines += [f"Environment: {env}; machine `{meta.get('machine', '')}`.", ""]
    if meta.get("command"):
        lines += ["```", str(meta["command"]), "```", ""]
    return "\n".join(lines)


def write_markdown(results: Sequence[RunResult], path: Path, meta: dict[str, Any]) -> Path:
    from portopt.conformance.report import write_text

    return write_text(path, render(results, meta))
