"""The HTML report (``conformance.html``): a page a vendor can hand to a customer.

In order: the status (complete, or partial and why), the summary matrix (algorithms x
implementation / precision / device, each cell pass/fail/skip with the worst normalised
error), one section per failure or error (diagnosis, element pattern, variant scores,
first divergence, error-versus-step plot), the error-versus-step envelope of every
algorithm (passes included), how to read the numbers (the tolerance model, lock-step and
free-running, the precision contracts), the skipped runs grouped by reason (full texts
collapsed), every run, and the environment and command. Plots are embedded PNGs
(:mod:`portopt.conformance.plots`); without matplotlib the page says why there are none.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from portopt.conformance import plots
from portopt.conformance.precision import OP_BY_OP_HINT, PRECISIONS
from portopt.conformance.results import ERROR, FAIL, PASS, SKIP, RunResult, summarize
from portopt.conformance.summary import Matrix, build_matrix, format_score, skip_groups
from portopt.conformance.tolerance import BORDERLINE, TOLERANCES

esc = html.escape
LONG_REASON = 160
"""Reasons longer than this are shown collapsed (first words, then the whole text on a click)."""
_MARK = {PASS: "✓", FAIL: "✗", ERROR: "⚠", SKIP: "–"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.matrix td { text-align: center; min-width: 4.5em; } .matrix td.alg { text-align: left; font-weight: bold; }
.matrix a { color: inherit; text-decoration: none; } .score { font-size: 11px; color: #555; }
.pass { background: #e3f4e3; } .fail { background: #f9d6d6; } .error { background: #f7cf9c; }
.skip { background: #efefef; color: #777; } .borderline { background: #fff1bd; }
.banner { padding: 0.6em 1em; border-radius: 4px; margin: 0.8em 0; font-size: 15px; }
.banner.complete { background: #e3f4e3; } .banner.partial { background: #fff1bd; border: 1px solid #d9b600; }
.banner.failed { background: #f9d6d6; }
pre { white-space: pre-wrap; font-size: 12px; background: #f8f8f8; padding: 0.5em; border: 1px solid #eee; }
.env td:first-child { font-weight: bold; white-space: nowrap; }
details > summary { cursor: pointer; } .muted { color: #777; }
.failure { border-left: 4px solid #d62728; padding-left: 1em; margin: 1.2em 0; }
.failure.error { border-left-color: #e6550d; } .failure.borderline { border-left-color: #d9b600; }
img { max-width: 100%; } .wide { overflow-x: auto; } .matrix th { max-width: 16em; }
"""


def _reason(text: str) -> str:
    if len(text) <= LONG_REASON:
        return esc(text)
    return f"<details><summary>{esc(text[:LONG_REASON].rsplit(' ', 1)[0])} …</summary>{esc(text)}</details>"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


class HtmlPlots:
    """Plots of one report, cached so a report written again as results arrive redraws only what changed."""

    def __init__(self) -> None:
        self.palette = plots.Palette()
        self._runs: dict[str, bytes | None] = {}
        self._envelopes: dict[tuple[str, int], bytes | None] = {}

    def run(self, r: RunResult) -> bytes | None:
        if r.test_id not in self._runs:
            self._runs[r.test_id] = plots.run_plot(r, self.palette)
        return self._runs[r.test_id]

    def envelope(self, algorithm: str, results: Sequence[RunResult]) -> bytes | None:
        members = [r for r in results if r.algorithm == algorithm]
        key = (algorithm, len(members))
        if key not in self._envelopes:
            self._envelopes[key] = plots.envelope_plot(algorithm, members, self.palette)
        return self._envelopes[key]


def _banner(results: Sequence[RunResult], meta: dict[str, Any]) -> str:
    counts = summarize(list(results))
    totals = (
        f"<b>{counts[PASS]}</b> passed, <b>{counts[FAIL]}</b> failed, <b>{counts[ERROR]}</b> errors, "
        f"<b>{counts[SKIP]}</b> skipped ({counts['borderline']} borderline passes)"
    )
    planned = meta.get("planned_runs")
    if meta.get("partial"):
        why = esc(str(meta.get("partial_reason") or "the run has not finished"))
        of = f" of {planned} planned" if planned else ""
        return f"<div class='banner partial'><b>PARTIAL REPORT</b>: {len(results)}{of} runs; {why}.<br>{totals}</div>"
    cls = "failed" if counts[FAIL] or counts[ERROR] else "complete"
    word = "Complete" if cls == "complete" else "Complete, with failures"
    return f"<div class='banner {cls}'><b>{word}</b>: {len(results)} runs. {totals}</div>"


def _matrix(m: Matrix, failure_ids: dict[str, str]) -> str:
    if not m.rows:
        return "<p class='muted'>No run has finished yet.</p>"
    impls: dict[str, list[int]] = {}
    for i, c in enumerate(m.columns):
        impls.setdefault(c.implementation, []).append(i)
    head1 = "<tr><th rowspan='3'>algorithm</th>"
    for impl, idx in impls.items():
        head1 += f"<th colspan='{len(idx)}'>{_breakable(impl)}</th>"
    head2 = "<tr>" + "".join(f"<th>{esc(c.precision)}</th>" for c in m.columns) + "</tr>"
    head3 = "<tr>" + "".join(f"<th class='muted'>{esc(c.device)}</th>" for c in m.columns) + "</tr>"
    rows = [head1 + "</tr>", head2, head3]
    for algorithm in m.rows:
        cells = [f"<td class='alg'><a href='#alg-{esc(algorithm)}'>{esc(algorithm)}</a></td>"]
        for column in m.columns:
            cell = m.cell(algorithm, column)
            if not cell.results:
                cells.append("<td class='skip muted'>not planned</td>")
                continue
            status = cell.status
            cls = "borderline" if status == PASS and cell.borderline else status
            tip = "; ".join(f"{r.case}: {r.status}" + (f" ({r.reason[:80]})" if r.reason else "") for r in cell.results)
            target = next((failure_ids[r.test_id] for r in cell.results if r.test_id in failure_ids), None)
            text = f"{_MARK[status]} {cell.tally}"
            score = "" if cell.worst is None else f"<br><span class='score'>{format_score(cell.worst)}</span>"
            body = f"{text}{score}"
            if target:
                body = f"<a href='#{target}'>{body}</a>"
            cells.append(f"<td class='{cls}' title='{esc(tip)}'>{body}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    legend = (
        "<p class='muted'>Each cell: ✓ passed / ✗ failed / ⚠ error / – skipped, with passes of runs (cases of that "
        "algorithm), and below it the worst normalised error of the runs that ran (error / allowed, lock-step or "
        f"free-running; 1 is the limit, above {BORDERLINE} is borderline). A skipped cell has no score. Hover a cell "
        "for its cases; click a failing one for its diagnosis.</p>"
    )
    return "<div class='wide'><table class='matrix'>" + "\n".join(rows) + "</table></div>" + legend


def _breakable(name: str) -> str:
    """``name`` escaped, with line-break opportunities after its dots and underscores (module paths)."""
    return esc(name).replace(".", ".<wbr>").replace("_", "_<wbr>")


def _failure(r: RunResult, anchor: str, plot_html: str) -> str:
    cls = "borderline" if r.status == PASS else r.status
    precision = PRECISIONS.get(r.precision)
    out = [f"<div class='failure {cls}' id='{anchor}'>"]
    out.append(f"<h3>{esc(r.case)} — {esc(r.implementation)} — {esc(r.precision)} — {esc(r.device)}: {r.status}</h3>")
    facts = [
        ("implementation", r.implementation),
        ("precision contract", precision.contract if precision else r.precision),
        ("worst normalised error", f"lock-step {format_score(r.worst_lockstep)}, free-running {format_score(r.worst_drift)}"),
    ]  # fmt: skip
    d = r.diagnosis
    if r.status == FAIL:
        facts.append(("diagnosis", d.summary if d is not None else r.reason))
        if d is not None:
            facts.append(("element pattern", d.localized or "none found: the differing elements share no pattern"))
            facts.append(("algebraic variant", _variant_text(d)))
        if r.first_failure is not None:
            facts.append(("first divergence", r.first_failure.describe()))
        if r.failed_tensors:
            facts.append(
                ("tensors over the tolerance", ", ".join(f"{t} (from step {s})" for t, s in r.failed_tensors.items()))
            )
        if r.precision in OP_BY_OP_HINT:
            facts.append(("about this precision", OP_BY_OP_HINT[r.precision]))
    elif r.status == ERROR:
        facts.append(("error", r.reason))
    else:
        facts.append(("why it is shown", f"a pass whose worst normalised error exceeds {BORDERLINE}"))
    facts += [("tolerance override", o) for o in r.overrides]
    out.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts) + "</table>")
    if d is not None and d.scores:
        rows = "".join(
            f"<tr><td>{esc(s.name)}</td><td>{esc(s.description)}</td><td>{format_score(s.worst)}</td>"
            f"<td>{'matches' if s.matched else ''}</td></tr>"
            for s in d.scores[:8]
        )
        out.append(
            "<details><summary>known variants, closest first (worst error / allowed when the implementation is "
            "compared with each; a score above 1 is a lower bound)</summary><table><tr><th>variant</th>"
            f"<th>what it computes</th><th>score</th><th></th></tr>{rows}</table></details>"
        )
    if r.notes:
        out.append(
            f"<details><summary>notes ({len(r.notes)})</summary><pre>{esc(chr(10).join(r.notes))}</pre></details>"
        )
    out.append(plot_html)
    out.append("</div>")
    return "\n".join(out)


def _variant_text(d: Any) -> str:
    if d.matched is not None:
        return f"{d.matched.description} [{d.matched.name}]"
    return "none of the known variants matches"


def explanation(precisions: Sequence[str]) -> str:
    """How to read the numbers: the tolerance model, lock-step, free-running, the precision contracts."""
    tol = TOLERANCES.get("fp32")
    k = tol.bound_factor if tol else 4.0
    drift = tol.drift_factor if tol else 2.0
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{esc(PRECISIONS[name].summary)}</td></tr>"
        for name in precisions
        if name in PRECISIONS
    )
    return f"""
<p>Every number an implementation produces (the parameter, every state of the algorithm, a master copy, the step
counter) is compared, element by element, with a <b>float64 reference</b> evaluated from the same inputs.</p>
<ul>
<li><b>Lock-step</b>: before each step the implementation is reset to the reference's state after the previous step
(rounded to the storage format), then takes one step. Each step is judged on its own, so an error cannot hide behind
(or be blamed on) an earlier one.</li>
<li><b>Free-running</b>: the implementation also runs on its own from the start, as in training, and after every step
its values are compared with the reference's under an allowance that grows with the step count (the previous
allowances carried through the algorithm's equations, plus this step's rounding).</li>
<li><b>Allowed error</b> of an element: <code>K·E + ulp(r) + tiny</code>, where <code>E</code> is the first-order
rounding-error bound of the whole step expression computed alongside the reference (its condition number computed,
not guessed), <code>K = {k:g}</code> absorbs other evaluation orders (a fused multiply-add, <code>lerp</code>),
<code>ulp(r)</code> is one rounding on store and <code>tiny</code> the smallest normal number (flushed subnormals are
not failed). Free-running allowances are multiplied by {drift:g}.</li>
<li><b>Normalised error</b> = |implementation − reference| / allowed: an element passes at ≤ 1; a correct rounding
alone reaches about 0.5, and a pass above {BORDERLINE} is reported as <i>borderline</i>. Where the reference is not
finite the implementation must not be either, and vice versa.</li>
<li><b>Discontinuous ops</b> (Lion's sign, a comparison): inputs within their error bound of the jump accept both
outcomes, and a small fraction of elements may exceed the allowance.</li>
<li>A failure is <b>diagnosed</b>: the implementation is run again against every known variant of the algorithm
(ε placements, bias corrections, weight-decay conventions, options; also two at once), and the elements that differ
are analysed for a pattern (strided tensors, SIMD-block bodies or tails, a fixed subset, huge or tiny values,
float32 overflow).</li>
</ul>
<p><b>Precision contracts</b> (what an implementation run in each precision promises):</p>
<table><tr><th>precision</th><th>contract</th></tr>{rows}</table>
<p class='muted'>bf16 means float32 arithmetic rounded once on store; an implementation whose contract is bfloat16
arithmetic (torch.optim on bfloat16 tensors rounds after every op) is checked with <code>bf16-native</code>, whose
allowance is derived from a bfloat16 rounding at every operation.</p>
"""


def _skipped(results: Sequence[RunResult]) -> str:
    groups = skip_groups(results)
    if not groups:
        return "<p class='muted'>Nothing was skipped.</p>"
    out = []
    for g in groups:
        where = ", ".join(g.algorithms)
        impls = ", ".join(g.implementations)
        items = "".join(f"<li>{esc(reason)}</li>" for reason in g.reasons)
        runs = ", ".join(esc(f"{r.case} | {r.implementation} | {r.precision} | {r.device}") for r in g.results)
        out.append(
            f"<details><summary><b>{len(g.results)} run(s)</b>: {esc(g.headline)} "
            f"<span class='muted'>({esc(impls)}; {esc(where)})</span></summary>"
            f"<p>Full reason{'s' if len(g.reasons) > 1 else ''}:</p><ul>{items}</ul>"
            f"<p class='muted'>Runs: {runs}</p></details>"
        )
    return "\n".join(out)


def _every_run(results: Sequence[RunResult], failure_ids: dict[str, str]) -> str:
    rows = []
    for r in results:
        cls = "borderline" if r.borderline else r.status
        ran = r.status in (PASS, FAIL)
        lock = format_score(r.worst_lockstep) if ran else "—"
        drift = format_score(r.worst_drift) if ran else "—"
        name = esc(r.case)
        if r.test_id in failure_ids:
            name = f"<a href='#{failure_ids[r.test_id]}'>{name}</a>"
        rows.append(
            f"<tr class='{cls}'><td>{name}</td><td>{esc(r.implementation)}</td><td>{esc(r.precision)}</td>"
            f"<td>{esc(r.device)}</td><td>{r.status}{' (borderline)' if r.borderline else ''}</td>"
            f"<td>{lock}</td><td>{drift}</td><td>{r.seconds:.2f}</td><td>{_reason(r.reason)}</td></tr>"
        )
    return (
        f"<details><summary>every run ({len(results)}); skipped runs have no score (—), not a perfect one</summary>"
        "<table><tr><th>case</th><th>implementation</th><th>precision</th><th>device</th><th>status</th>"
        "<th>lock-step</th><th>free-running</th><th>seconds</th><th>details</th></tr>"
        + "\n".join(rows)
        + "</table></details>"
    )


def environment_block(meta: dict[str, Any]) -> str:
    order = ("command", "portopt", "torch", "python", "machine", "cpu", "cuda", "workers", "created", "wall_seconds")
    keys = [k for k in order if k in meta] + [
        k for k in meta if k not in order and k not in ("partial", "partial_reason", "planned_runs")
    ]
    rows = "".join(f"<tr><td>{esc(k)}</td><td><code>{esc(str(meta[k]))}</code></td></tr>" for k in keys)
    return f"<table class='env'>{rows}</table>"


def render(results: Sequence[RunResult], meta: dict[str, Any], cache: HtmlPlots | None = None) -> str:
    """The whole page."""
    cache = cache or HtmlPlots()
    cache.palette.add(results)
    matrix = build_matrix(results)
    shown = [r for r in results if r.status in (FAIL, ERROR)] + [r for r in results if r.borderline]
    failure_ids = {r.test_id: f"run{n}" for n, r in enumerate(shown)}
    no_plots = plots.unavailable_reason()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>portopt conformance report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>portopt conformance report</h1>",
        f"<div class='muted'>{esc(str(meta.get('created', '')))} · torch {esc(str(meta.get('torch', '?')))} · "
        f"{esc(str(meta.get('machine', '')))}</div>",
        _banner(results, meta),
        "<p><a href='#matrix'>summary</a> · <a href='#failures'>failures</a> · <a href='#envelopes'>error versus "
        "step</a> · <a href='#reading'>how to read this</a> · <a href='#skipped'>skipped</a> · <a href='#runs'>every "
        "run</a> · <a href='#environment'>environment and command</a></p>",
        "<h2 id='matrix'>Summary</h2>",
        _matrix(matrix, failure_ids),
    ]
    if no_plots:
        parts.append(f"<p class='banner partial'>No plots in this report: {esc(no_plots)}.</p>")
    parts.append("<h2 id='failures'>Failures, errors and borderline passes</h2>")
    if not shown:
        parts.append("<p>None: every run that ran passed within its tolerance, none borderline.</p>")
    for r in shown:
        png = cache.run(r) if r.status != ERROR else None
        plot_html = _img(png, f"normalised error versus step, {r.test_id}")
        parts.append(_failure(r, failure_ids[r.test_id], plot_html))
    parts.append("<h2 id='envelopes'>Error versus step, every algorithm (passes included)</h2>")
    parts.append(
        "<p class='muted'>For each algorithm, the worst normalised error over its cases and quantities at every step, "
        "for each implementation (colour, the same in every plot) and precision (line style). The dashed red line is "
        "the allowance.</p>"
    )
    for algorithm in matrix.rows:
        png = None if no_plots else cache.envelope(algorithm, results)
        body = _img(png, f"{algorithm} error envelope") or "<p class='muted'>nothing ran.</p>"
        parts.append(f"<h3 id='alg-{esc(algorithm)}'>{esc(algorithm)}</h3>{body}")
    parts.append("<h2 id='reading'>How to read this report</h2>")
    parts.append(explanation(sorted({r.precision for r in results} or {"fp32", "bf16"})))
    parts.append("<h2 id='skipped'>Skipped runs, by reason</h2>")
    parts.append(_skipped(results))
    parts.append("<h2 id='runs'>Every run</h2>")
    parts.append(_every_run(results, failure_ids))
    parts.append("<h2 id='environment'>Environment and command</h2>")
    parts.append(environment_block(meta))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(results: Sequence[RunResult], path: Path, meta: dict[str, Any], cache: HtmlPlots | None = None) -> Path:
    from portopt.conformance.report import write_text

    return write_text(path, render(results, meta, cache))
