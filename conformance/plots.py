"""Error-versus-step plots for the HTML report (matplotlib, optional: ``pip install 'portopt[report]'``).

Two kinds, each with one colour mapping for the whole report (a :class:`Palette` built
from every name the report shows, so a quantity or an implementation has the same colour
in every plot):

* :func:`run_plot`: one run (a failure or a borderline pass), the normalised error
  (error / allowed, log scale) of every quantity (parameter, each state, master copy)
  versus step, lock-step and free-running side by side; colour = quantity.
* :func:`envelope_plot`: one algorithm, the envelope (worst over its cases and quantities)
  of the normalised error versus step for every (implementation, precision, device) that
  ran it, passes included; colour = implementation, line style = precision.

Without matplotlib both return ``None`` and :func:`unavailable_reason` says why.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

from portopt.conformance.results import FAIL, PASS, RunResult

FLOOR = 1e-6
"""Normalised errors below this (an exact match is 0) are drawn at it, on the log scale."""
CEILING = 1e6
"""Infinite normalised errors (a missing state, inf where the reference is finite) are drawn at it."""
_LINE_STYLES = ("-", "--", ":", "-.")


@cache
def unavailable_reason() -> str | None:
    """``None`` when matplotlib can draw here, else why the report has no plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError as exc:
        return (
            f"matplotlib is not installed ({exc}); install it (pip install 'portopt[report]') "
            "for error-versus-step plots"
        )
    except Exception as exc:  # a broken backend or font cache
        return f"matplotlib cannot draw here ({type(exc).__name__}: {exc})"
    return None


class Palette:
    """A fixed colour per name (quantities and implementations), and a line style per precision.

    Names get their colour the first time they are seen and keep it (a report written again
    as results arrive keeps its colours); :meth:`of` sees a whole result set at once, in a
    stable order.
    """

    def __init__(self) -> None:
        self.colours: dict[str, str] = {}
        """Quantities (``param``, ``exp_avg``, ...): the colours of :func:`run_plot`."""
        self.implementations: dict[str, str] = {}
        """Implementations: the colours of :func:`envelope_plot` (a mapping of its own)."""
        self.styles: dict[str, str] = {}

    @staticmethod
    def of(results: Sequence[RunResult]) -> Palette:
        palette = Palette()
        palette.add(results)
        return palette

    def add(self, results: Sequence[RunResult]) -> None:
        """Give every new quantity, implementation and precision of ``results`` its colour or style."""
        quantities = {q for r in results for q in (*r.lockstep_curves, *r.drift_curves)}
        for name in sorted(quantities, key=_quantity_order):
            _assign(self.colours, name)
        for r in results:
            _assign(self.implementations, r.implementation)
            if r.precision not in self.styles:
                self.styles[r.precision] = _LINE_STYLES[len(self.styles) % len(_LINE_STYLES)]

    def colour(self, quantity: str) -> str:
        return self.colours.get(quantity, "#444444")

    def implementation(self, name: str) -> str:
        return self.implementations.get(name, "#444444")

    def style(self, precision: str) -> str:
        return self.styles.get(precision, "-")


def _assign(table: dict[str, str], name: str) -> None:
    if name not in table:
        table[name] = _BASE_COLOURS[len(table) % len(_BASE_COLOURS)]


def _quantity_order(name: str) -> tuple[int, str]:
    # The parameter first, then the master copy and the step counter, then states and implementations.
    rank = {"param": 0, "master": 1, "step": 2}
    return rank.get(name, 3), name


_BASE_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
)  # fmt: skip
"""matplotlib's tab10 and more, without its red: red is the allowance line."""


LEGEND_CHARS = 40
"""Entries of an envelope plot's legend up to this long fit three to a row (at its font size)."""


def _clip(values: Sequence[float]) -> list[float]:
    return [CEILING if not math.isfinite(v) else min(max(v, FLOOR), CEILING) for v in values]


def _figure(title: str, legend_rows: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

    legend_height = 0.2 * legend_rows
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.0 + legend_height), sharey=True)
    fig.suptitle(title, fontsize=9)
    # A fixed layout and major ticks only: tight_layout and minor log ticks cost seconds per figure.
    bottom = (0.45 + legend_height) / (3.0 + legend_height)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=bottom, top=1 - 0.45 / (3.0 + legend_height), wspace=0.06)
    for ax, mode in zip(
        axes, ("lock-step (one step from the reference's state)", "free-running (its own trajectory)"), strict=True
    ):
        ax.axhline(1.0, color="#d62728", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step", labelpad=1)
        ax.set_title(mode, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("error / allowed (dashed: allowed)")
    return fig, axes


def _legend(fig: Any, axes: Any, columns: int) -> None:
    """One legend for both panels, below them (every name once)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), fontsize=7, loc="lower center", ncol=columns, frameon=False)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def run_plot(r: RunResult, palette: Palette) -> bytes | None:
    """The normalised error of every quantity of one run versus step (``None`` without matplotlib)."""
    if unavailable_reason() is not None:
        return None
    shown = sorted(
        {q for curves in (r.lockstep_curves, r.drift_curves) for q, v in curves.items() if any(v)}, key=_quantity_order
    )
    columns = 6
    fig, axes = _figure(f"{r.case} — {r.implementation} — {r.precision} — {r.device}", _rows(len(shown), columns))
    for ax, curves in zip(axes, (r.lockstep_curves, r.drift_curves), strict=True):
        for quantity in shown:
            values = curves.get(quantity, [])
            if not any(values):  # an exact quantity (the step counter) adds nothing to the plot
                continue
            steps = range(1, len(values) + 1)
            ax.plot(steps, _clip(values), marker="o", markersize=3, color=palette.colour(quantity), label=quantity)
    _legend(fig, axes, columns)
    return _png(fig)


def _rows(entries: int, columns: int) -> int:
    return max(1, -(-entries // columns))


def envelope(results: Iterable[RunResult], mode: str) -> list[float]:
    """The worst normalised error at each step over ``results`` and all their quantities."""
    out: list[float] = []
    for r in results:
        curves = r.lockstep_curves if mode == "lock-step" else r.drift_curves
        for values in curves.values():
            for t, v in enumerate(values):
                if t == len(out):
                    out.append(0.0)
                out[t] = max(out[t], v)
    return out


def envelope_plot(algorithm: str, results: Sequence[RunResult], palette: Palette) -> bytes | None:
    """Per (implementation, precision, device), the worst normalised error of ``algorithm``'s runs per step."""
    if unavailable_reason() is not None:
        return None
    ran = [r for r in results if r.algorithm == algorithm and r.status in (PASS, FAIL)]
    if not ran:
        return None
    columns: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in ran:
        columns.setdefault((r.implementation, r.precision, r.device), []).append(r)
    labels = {key: f"{key[0]} · {key[1]}" + (f" · {key[2]}" if key[2] != "cpu" else "") for key in columns}
    # Three entries a row; two, each wrapped, when a name is long (a backend's label: "npu-contract
    # (emulated Ascend ops on CPU, not hardware)"), so that no entry runs off the figure.
    longest = max(len(text) for text in labels.values())
    per_row = 3 if longest <= LEGEND_CHARS else 2
    wrapped = {key: textwrap.fill(text, 2 * LEGEND_CHARS) for key, text in labels.items()}
    lines = max(text.count("\n") + 1 for text in wrapped.values())
    fig, axes = _figure(
        f"{algorithm}: worst error over its cases and quantities, every run that ran",
        _rows(len(columns), per_row) * lines,
    )
    for ax, mode in zip(axes, ("lock-step", "free-running"), strict=True):
        for (impl, precision, device), members in columns.items():
            values = envelope(members, mode)
            if not values:
                continue
            label = wrapped[(impl, precision, device)]
            ax.plot(
                range(1, len(values) + 1), _clip(values), color=palette.implementation(impl),
                linestyle=palette.style(precision), linewidth=1.2, label=label,
            )  # fmt: skip
    _legend(fig, axes, per_row)
    return _png(fig)
