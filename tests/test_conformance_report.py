"""The reports: summary matrix, skip groups, HTML, Markdown, JUnit and the terminal tables.

The results are built by hand (statuses, scores, reasons a vendor's run would produce), so
each property of the page is checked on its own: a skipped run never shows a perfect score,
skip reasons are whole (collapsed) and grouped, the matrix comes first, the page explains
the tolerance model, plots keep their colours, and a missing matplotlib is said.
"""

from __future__ import annotations

import io
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from portopt.conformance import plots
from portopt.conformance.report import ReportWriter, read_json, write_reports
from portopt.conformance.report_html import render
from portopt.conformance.report_markdown import render as render_markdown
from portopt.conformance.report_terminal import console, terminal_report
from portopt.conformance.results import Diagnosis, Divergence, RunResult
from portopt.conformance.summary import build_matrix, skip_groups, skip_headline

FUSED = (
    "backend torch_fused does not lower this spec: no matching fused kernel for {alg}: torch._fused_adam_"
    "(amsgrad=False, maximize=False): {alg} has no hyperparameter 'beta1' that torch._fused_adam_ needs; and "
    "a long tail of matching details that must stay available in full, word for word, at the very end"
)
LONG_IMPL = "portopt.conformance.mutants.adam_eps_inside_sqrt"


def _result(
    case: str, impl: str, status: str, precision: str = "fp32", worst: float = 0.2, reason: str = ""
) -> RunResult:
    algorithm = case.split("[")[0].split("/")[0]
    r = RunResult(case, algorithm, impl, precision, "cpu", status, reason=reason, steps=3)
    if status in ("pass", "fail"):
        r.worst_lockstep, r.worst_drift = worst, worst / 2
        r.lockstep_curves = {"param": [worst / 3, worst / 2, worst], "exp_avg": [0.1, 0.1, 0.1], "step": [0, 0, 0]}
        r.drift_curves = {"param": [worst / 4, worst / 3, worst / 2]}
    return r


def _failure() -> RunResult:
    r = _result("adam[wd=0.1]/quick", LONG_IMPL, "fail", worst=5e4, reason="mutant computes Adam with ε inside")
    r.first_failure = Divergence("lock-step", 1, "t3 (7,)", "param", [2], 1.0, 1.1, 0.1, 1e-8, 5e4, 1, 7)
    r.diagnosis = Diagnosis("mutant computes Adam with ε inside the square root [eps-inside-sqrt]", localized=None)
    r.failed_tensors = {"t3 (7,)": 1}
    return r


def _results() -> list[RunResult]:
    out = [
        _result("adam[wd=0.1]/quick", "torch", "pass"),
        _result("adam[wd=0.1]/quick", "torch", "pass", precision="bf16", worst=0.5),
        _result("lion/quick", "torch", "pass", worst=0.3),
        _failure(),
    ]
    for alg in ("lion", "rmsprop", "radam"):
        out.append(_result(f"{alg}/quick", "torch_fused", "skip", reason=FUSED.format(alg=alg)))
    out.append(_result("adam[wd=0.1]/quick", "torch_fused", "pass", worst=0.1))
    return out


def test_the_matrix_has_algorithm_rows_and_a_column_per_implementation_precision_and_device() -> None:
    m = build_matrix(_results())
    assert m.rows == ["adam", "lion", "radam", "rmsprop"]
    assert [(c.implementation, c.precision) for c in m.columns] == [
        ("torch", "fp32"),
        ("torch", "bf16"),
        (LONG_IMPL, "fp32"),
        ("torch_fused", "fp32"),
    ]
    adam_torch = m.cell("adam", m.columns[0])
    assert (adam_torch.status, adam_torch.tally, adam_torch.worst) == ("pass", "1/1", 0.2)
    skipped = m.cell("lion", m.columns[3])
    assert skipped.status == "skip"
    assert skipped.worst is None  # no score: a skip is never a perfect 0
    assert m.cell("adam", m.columns[2]).status == "fail"


def test_skip_reasons_of_several_algorithms_form_one_group_with_every_full_reason() -> None:
    assert skip_headline(FUSED.format(alg="lion"), "lion") == (
        "backend torch_fused does not lower this spec: no matching fused kernel"
    )
    assert skip_headline("torch.optim has no lion optimizer", "lion") == "torch.optim has no <algorithm> optimizer"
    # A part that only names the algorithm gives way to the one that says why.
    compiled = "backend compiled does not lower this spec: {alg}: it reads the tensor's shape; use backend='torch'"
    assert (
        skip_headline(compiled.format(alg="came"), "came")
        == skip_headline(compiled.format(alg="adafactor"), "adafactor")
        == "backend compiled does not lower this spec: it reads the tensor's shape; use backend='torch'"
    )
    (group,) = skip_groups(_results())
    assert len(group.results) == 3
    assert group.reasons == [FUSED.format(alg=a) for a in ("lion", "rmsprop", "radam")]


def test_html_puts_the_matrix_first_explains_the_model_and_keeps_skip_reasons_whole() -> None:
    page = render(_results(), {"command": "portopt conformance --quick", "torch": "2.13.0", "workers": 2})
    summary, failures = page.index("id='matrix'"), page.index("id='failures'")
    assert summary < failures < page.index("id='reading'") < page.index("id='environment'")
    matrix = page[summary:failures]
    assert "<table class='matrix'>" in matrix
    assert "no score" in matrix  # the legend says a skipped cell has none
    for term in ("Lock-step", "Free-running", "K·E + ulp(r) + tiny", "Normalised error", "float32 arithmetic rounded"):
        assert term in page, term
    assert "portopt conformance --quick" in page[page.index("id='environment'") :]
    for alg in ("lion", "rmsprop", "radam"):  # the whole reason, in a collapsed block
        assert FUSED.format(alg=alg).replace("'", "&#x27;") in page
    assert "<details><summary><b>3 run(s)</b>" in page


def test_a_skipped_run_shows_no_score_in_any_table() -> None:
    page = render(_results(), {})
    rows = re.findall(r"<tr class='skip'>(.*?)</tr>", page, flags=re.S)
    assert len(rows) == 3
    for row in rows:
        cells = re.findall(r"<td>(.*?)</td>", row, flags=re.S)
        assert cells[5] == cells[6] == "—"  # lock-step, free-running
    md = render_markdown(_results(), {})
    lion = next(line for line in md.splitlines() if line.startswith("| lion "))
    assert "⏭️ skip" in lion
    assert "0.0" not in lion.split("⏭️ skip")[1].split("|")[0]


@pytest.mark.skipif(plots.unavailable_reason() is not None, reason=str(plots.unavailable_reason()))
def test_html_has_envelopes_for_passes_and_a_plot_per_failure_with_fixed_colours() -> None:
    page = render(_results(), {})
    envelopes = page[page.index("id='envelopes'") : page.index("id='reading'")]
    assert envelopes.count("data:image/png;base64,") == 2  # adam and lion ran; radam and rmsprop only skipped
    failures = page[page.index("id='failures'") : page.index("id='envelopes'")]
    assert failures.count("data:image/png;base64,") == 1
    palette = plots.Palette.of(_results())
    assert palette.colour("param") == plots.Palette.of(list(reversed(_results()))).colour("param")
    quantities = [palette.colour(n) for n in ("param", "exp_avg")]
    implementations = [palette.implementation(n) for n in ("torch", "torch_fused", LONG_IMPL)]
    assert len(set(quantities)) == len(quantities)
    assert len(set(implementations)) == len(implementations)
    before = (dict(palette.colours), dict(palette.implementations))
    palette.add([_result("sgd/quick", "compiled", "pass")])
    assert {k: palette.colours[k] for k in before[0]} == before[0]  # new names never recolour old ones
    assert {k: palette.implementations[k] for k in before[1]} == before[1]


def test_without_matplotlib_the_report_says_why_there_are_no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    plots.unavailable_reason.cache_clear()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    try:
        page = render(_results(), {})
    finally:
        plots.unavailable_reason.cache_clear()
    assert "data:image/png" not in page
    assert "No plots in this report: matplotlib is not installed" in page
    assert "pip install" in page


def test_markdown_summary_for_a_pull_request() -> None:
    md = render_markdown(_results(), {"command": "portopt conformance --quick", "torch": "2.13.0"})
    assert md.startswith("## portopt conformance: ❌ failures")
    assert "| algorithm |" in md
    assert f"**adam[wd=0.1]/quick** on `{LONG_IMPL}`" in md
    assert "<details><summary>Skipped: 3 runs, 1 reasons</summary>" in md
    assert "portopt conformance --quick" in md


def test_junit_skips_carry_their_reason_and_no_score(tmp_path: Path) -> None:
    write_reports(_results(), tmp_path, {"command": "x"})
    root = ET.parse(tmp_path / "conformance.xml").getroot()
    skipped = [(c, s) for c in root.iter("testcase") if (s := c.find("skipped")) is not None]
    assert len(skipped) == 3
    assert all(c.find("system-out") is None for c, _ in skipped)
    assert {s.get("message") for _, s in skipped} == {FUSED.format(alg=a) for a in ("lion", "rmsprop", "radam")}


def test_json_has_null_scores_for_skips_and_round_trips(tmp_path: Path) -> None:
    write_reports(_results(), tmp_path, {})
    data = json.loads((tmp_path / "conformance.json").read_text())
    assert data["partial"] is False
    skips = [r for r in data["results"] if r["status"] == "skip"]
    assert skips
    assert all(r["worst_lockstep"] is None and r["worst_drift"] is None for r in skips)
    for raw in data["results"]:
        assert RunResult.from_dict(raw).to_dict() == raw
    assert [r.status for r in read_json(tmp_path / "conformance.json")] == [r.status for r in _results()]


def test_a_report_written_while_the_run_goes_on_is_marked_partial(tmp_path: Path) -> None:
    writer = ReportWriter(tmp_path, {"command": "x"}, planned=20)
    writer.update(_results()[:2])
    data = json.loads((tmp_path / "conformance.json").read_text())
    assert data["partial"] is True
    assert data["meta"]["planned_runs"] == 20
    assert len(data["results"]) == 2
    assert "PARTIAL" in (tmp_path / "conformance.md").read_text()
    assert "PARTIAL REPORT" in (tmp_path / "conformance.html").read_text()
    writer.finish(_results(), "interrupted by SIGTERM after 8 of 20 runs")
    assert "interrupted by SIGTERM after 8 of 20 runs" in (tmp_path / "conformance.html").read_text()
    writer.finish(_results())
    assert json.loads((tmp_path / "conformance.json").read_text())["partial"] is False
    assert "PARTIAL" not in (tmp_path / "conformance.html").read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_terminal_tables_in_a_log_are_not_cut_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    buffer = io.StringIO()  # not a terminal, as in a CI log
    terminal_report(_results(), console(buffer))
    text = buffer.getvalue()
    assert "…" not in text
    assert LONG_IMPL in text
    assert "torch_fused" in text
    assert max(len(line) for line in text.splitlines()) > 80
    # the three fused-kernel reasons are one row, not three blocks of matching details
    assert text.count("no matching fused kernel") == 1


def test_terminal_tables_on_a_narrow_page_wrap_instead_of_truncating() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    terminal_report(_results(), Console(file=buffer, width=80))
    text = buffer.getvalue()
    assert "torch_…" not in text
    assert "compil…" not in text
    assert "torch_fu" in text


def test_a_backend_labelled_as_an_emulation_says_so_in_every_report(tmp_path: Path) -> None:
    """An op-contract emulation must never read as the vendor's kernel itself: its backend's ``label``
    is part of the implementation's name, in the matrix, the JSON, JUnit, Markdown and the terminal."""
    import dataclasses

    from portopt.backends import named_backend
    from portopt.conformance.candidates import BackendImplementation
    from portopt.conformance.cases import build_cases
    from portopt.conformance.precision import PRECISIONS
    from portopt.conformance.runner import run_matrix

    label = "CPU emulation of a vendor op's documented semantics, not the vendor kernel"
    backend = dataclasses.replace(named_backend("torch"), name="vendor-contract", label=label)
    results = run_matrix(build_cases(["sgd"])[:1], [BackendImplementation(backend)], [PRECISIONS["fp32"]])
    named = f"vendor-contract ({label})"
    assert [r.implementation for r in results] == [named]
    write_reports(results, tmp_path, {})
    html = (tmp_path / "conformance.html").read_text()
    matrix = html[html.index("<table class='matrix'>") :]
    assert "vendor-contract (CPU emulation of a vendor op&#x27;s" in matrix.replace("<wbr>", "")
    assert json.loads((tmp_path / "conformance.json").read_text())["results"][0]["implementation"] == named
    assert label in (tmp_path / "conformance.xml").read_text()
    assert label in (tmp_path / "conformance.md").read_text()
    buffer = io.StringIO()
    terminal_report(results, console(buffer))
    assert label in buffer.getvalue()
