"""What a conformance run produces: one :class:`RunResult` per (case, implementation, precision, device).

Plain dataclasses that round-trip through JSON (:meth:`RunResult.to_dict` /
:meth:`RunResult.from_dict`), so a report can be re-rendered or compared later.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from portopt.conformance.tolerance import BORDERLINE

PASS = "pass"
FAIL = "fail"
SKIP = "skip"
ERROR = "error"
STATUSES = (PASS, FAIL, SKIP, ERROR)

LOCKSTEP = "lock-step"
DRIFT = "free-running"


def _fmt(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)


@dataclass
class Divergence:
    """Where an implementation first left the tolerance: mode, step, tensor, quantity, element."""

    mode: str
    step: int
    tensor: str
    quantity: str
    index: list[int]
    got: float
    expected: float
    abs_error: float
    allowed: float
    normalised: float
    count_over: int
    numel: int
    message: str = ""

    def describe(self) -> str:
        if self.message:
            return f"{self.mode} step {self.step}, tensor {self.tensor}, {self.quantity}: {self.message}"
        where = f"[{', '.join(map(str, self.index))}]" if self.index else ""
        if math.isfinite(self.expected) != math.isfinite(self.got):
            return (
                f"{self.mode} step {self.step}, tensor {self.tensor}, {self.quantity}{where}: got {_fmt(self.got)}, "
                f"expected {_fmt(self.expected)} (finite where the reference is not, or the reverse; "
                f"{self.count_over} of {self.numel} elements over)"
            )
        return (
            f"{self.mode} step {self.step}, tensor {self.tensor}, {self.quantity}{where}: got {_fmt(self.got)}, "
            f"expected {_fmt(self.expected)} (error {_fmt(self.abs_error)} = {_fmt(self.normalised)} x the "
            f"allowed {_fmt(self.allowed)}; {self.count_over} of {self.numel} elements over)"
        )


@dataclass
class VariantScore:
    """How closely the implementation follows one known variant of the spec."""

    name: str
    description: str
    worst: float
    matched: bool


@dataclass
class Diagnosis:
    """Why a run failed: first divergence, the element pattern (``localized``), and the variant it
    computes (``matched``: one variant, or several joined by ``+``)."""

    summary: str
    first_divergence: Divergence | None = None
    localized: str | None = None
    matched: VariantScore | None = None
    scores: list[VariantScore] = field(default_factory=list)
    pattern: str | None = None
    """The kind of the element pattern (``overflow``, ``fixed-subset``, ``tensors:strided``,
    ``simd-body:16``, ``values:small``, ...); ``localized`` says it in words."""


@dataclass
class RunResult:
    """The outcome of one case on one implementation in one precision on one device."""

    case: str
    algorithm: str
    implementation: str
    precision: str
    device: str
    status: str
    reason: str = ""
    worst_lockstep: float = 0.0
    worst_drift: float = 0.0
    steps: int = 0
    lockstep_curves: dict[str, list[float]] = field(default_factory=dict)
    drift_curves: dict[str, list[float]] = field(default_factory=dict)
    first_failure: Divergence | None = None
    diagnosis: Diagnosis | None = None
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    failed_tensors: dict[str, int] = field(default_factory=dict)
    """Every tensor that left the tolerance (in either mode), with the first step it did."""

    @property
    def borderline(self) -> bool:
        return self.status == PASS and max(self.worst_lockstep, self.worst_drift) > BORDERLINE

    @property
    def test_id(self) -> str:
        return f"{self.case}|{self.implementation}|{self.precision}|{self.device}"

    @property
    def ran(self) -> bool:
        """Whether it was compared at all (a skipped or crashed run has no score)."""
        return self.status in (PASS, FAIL)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; a run that did not run has ``null`` scores, never a perfect 0."""
        data = asdict(self)
        data["borderline"] = self.borderline
        if not self.ran:
            data["worst_lockstep"] = data["worst_drift"] = None
        out: dict[str, Any] = _jsonable(data)
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RunResult:
        data = {k: v for k, v in data.items() if k != "borderline"}
        if data.get("first_failure"):
            data["first_failure"] = _divergence(data["first_failure"])
        if data.get("diagnosis"):
            d = dict(data["diagnosis"])
            d["first_divergence"] = _divergence(d["first_divergence"]) if d.get("first_divergence") else None
            d["matched"] = _score(d["matched"]) if d.get("matched") else None
            d["scores"] = [_score(s) for s in d.get("scores", [])]
            data["diagnosis"] = Diagnosis(**d)
        for key in ("worst_lockstep", "worst_drift"):
            data[key] = 0.0 if data.get(key) is None else float(data[key])
        for key in ("lockstep_curves", "drift_curves"):
            data[key] = {q: [float(x) for x in v] for q, v in data.get(key, {}).items()}
        return RunResult(**data)


_DIVERGENCE_FLOATS = ("got", "expected", "abs_error", "allowed", "normalised")


def _divergence(d: dict[str, Any]) -> Divergence:
    fields: dict[str, Any] = {k: float(v) if k in _DIVERGENCE_FLOATS else v for k, v in d.items()}
    return Divergence(**fields)


def _score(d: dict[str, Any]) -> VariantScore:
    return VariantScore(**{**d, "worst": float(d["worst"])})


def _jsonable(x: Any) -> Any:
    """Non-finite floats become the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def summarize(results: list[RunResult]) -> dict[str, int]:
    """Counts per status, plus borderline passes."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    counts["borderline"] = sum(r.borderline for r in results)
    return counts
