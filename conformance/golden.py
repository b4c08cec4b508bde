"""Golden trajectories: record the reference on one machine, check any device on another.

``portopt conformance record --out FILE`` writes, for every case, the spec's JSON, the
hyperparameters, the problem's layout, the exact float64 inputs (initial parameters and
every gradient) and the float64 reference trajectory (parameters, states and step
counters after every step) into one compressed ``.npz`` file whose ``manifest.json``
member carries a SHA-256 checksum over the manifest and every array.

``portopt conformance check --golden FILE`` reads the file as untrusted data: sizes,
member headers and every manifest field are checked before anything is decompressed or
built (:mod:`~portopt.conformance.golden_archive`, :mod:`~portopt.conformance.golden_manifest`;
every problem a :class:`GoldenError` naming the field), the recorded specs go through the
spec loader with its limits, and nothing read from the file is ever run as code. It then
verifies the checksum (a corrupted file fails with a message saying so; the SHA-256
detects accidents, not tampering, since whoever edits a file can recompute it) and, when
``PORTOPT_GOLDEN_KEY`` is set, requires and verifies an HMAC-SHA256 signature made with
that key at recording (the way to detect tampering), rebuilds each case from the file (the
recorded spec, not the library's current one), recomputes the float64 reference from the
stored inputs and checks that it reproduces the stored trajectory within the float64
tolerance model (so the reference of this machine and of the recording machine agree),
and then runs the implementations under test on the stored inputs with the usual
lock-step and free-running comparisons. Two machines that check the same golden file
against their own devices are thereby compared with each other, without ever meeting.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import portopt
from portopt.conformance.cases import Case
from portopt.conformance.chain import PARAM, Reference, Trajectory
from portopt.conformance.golden_archive import (
    ExpectFn,
    GoldenError,
    Signature,
    checksum,
    read_members,
    sign,
    signing_key,
    verify_signature,
)
from portopt.conformance.golden_manifest import FORMAT, VERSION, CaseEntry, member_checker, read_manifest
from portopt.conformance.precision import PRECISIONS
from portopt.conformance.problems import Problem, TensorSpec
from portopt.conformance.results import FAIL, PASS, Divergence, RunResult
from portopt.conformance.tolerance import TOLERANCES, compare

MANIFEST = "manifest.json"
REFERENCE_NAME = "reference (golden)"
"""The implementation name of a golden file's own reference check (:func:`verify_reference`)."""
RECORD_PRECISION = PRECISIONS["fp64"]
"""The trajectory is recorded in float64 storage: exactly the reference's arithmetic."""
INPUT_PRECISION = PRECISIONS["fp32"]
"""Inputs are generated as for float32 (huge gradients stay finite in float32 and bfloat16)."""


@dataclass
class StoredProblem:
    """A problem whose values come from a golden file (a :class:`~portopt.conformance.chain.ProblemSource`)."""

    name: str
    tensors: tuple[TensorSpec, ...]
    initial: list[Tensor]
    grads: dict[tuple[int, int], Tensor]

    def initial_param(self, index: int) -> Tensor:
        return self.initial[index].clone()

    def gradient(self, index: int, step: int) -> Tensor | None:
        g = self.grads.get((step, index))
        return None if g is None else g.clone()

    def label(self, index: int) -> str:
        return f"t{index} {self.tensors[index].shape}"


def _tensor_spec_to_dict(t: TensorSpec) -> dict[str, Any]:
    return {
        "shape": list(t.shape),
        "group": t.group,
        "layout": t.layout.value,
        "regime": t.regime.value,
        "grads": t.grads,
        "zero_at": list(t.zero_at),
        "nonfinite_at": list(t.nonfinite_at),
        "param_scale": t.param_scale,
    }


def _np(x: Tensor) -> np.ndarray:
    array: np.ndarray = x.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
    return array


def record(cases: Sequence[Case], path: str | Path, progress: Callable[[Case], None] | None = None) -> Path:
    """Write the float64 reference trajectory of every case to ``path`` (``.npz``)."""
    from portopt.spec.serialize import spec_to_json

    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    entries: list[dict[str, Any]] = []
    for c, case in enumerate(cases):
        spec = case.spec()
        source = case.problem.with_huge_scale(INPUT_PRECISION.huge_gradient())
        hypers = case.group_hypers(spec)
        trajectory = Trajectory(
            Reference(spec, source, hypers, RECORD_PRECISION, TOLERANCES["fp64"].bound_factor), keep_history=False
        )
        n = len(source.tensors)
        for i in range(n):
            arrays[f"c{c}/init/{i}"] = _np(source.initial_param(i))
        counters: list[list[int]] = []
        for t in range(1, case.steps + 1):
            rec = trajectory.step(t)
            for i, g in enumerate(rec.grads):
                if g is not None:
                    arrays[f"c{c}/grad/{t}/{i}"] = _np(g)
            for i in range(n):
                arrays[f"c{c}/traj/{t}/{i}/{PARAM}"] = _np(rec.after.params[i])
                for name, value in (rec.after.states[i] or {}).items():
                    arrays[f"c{c}/traj/{t}/{i}/{name}"] = _np(value)
            counters.append(list(rec.after.steps))
        entries.append(
            {
                "name": case.name,
                "algorithm": case.algorithm,
                "options": [[k, v] for k, v in case.options],
                "hypers": [[k, v] for k, v in case.hypers],
                "maximize": case.maximize,
                "steps": case.steps,
                "note": case.note,
                "problem": {"name": case.problem.name, "tensors": [_tensor_spec_to_dict(t) for t in source.tensors]},
                "group_hypers": hypers,
                "spec_json": spec_to_json(spec),
                "step_counters": counters,
            }
        )
        if progress is not None:
            progress(case)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "portopt_version": portopt.__version__,
        "torch_version": torch.__version__,
        "machine": platform.platform(),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": entries,
    }
    manifest["checksum"] = checksum(manifest, arrays)
    key = signing_key()
    if key is not None:
        manifest["signature"] = sign(manifest["checksum"], key)
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest, sort_keys=True).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    return path


@dataclass
class Golden:
    """A loaded, verified golden file: its manifest, validated cases, arrays and signature state."""

    path: Path
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    entries: list[CaseEntry]
    signature: Signature

    def cases(self) -> list[tuple[Case, StoredProblem]]:
        """Every recorded case, rebuilt with its recorded spec, and its stored inputs."""
        out = []
        for c, entry in enumerate(self.entries):
            tensors = entry.tensors
            initial = [self._tensor(f"c{c}/init/{i}") for i in range(len(tensors))]
            grads = {
                (t, i): self._tensor(f"c{c}/grad/{t}/{i}")
                for t in range(1, entry.steps + 1)
                for i in range(len(tensors))
                if f"c{c}/grad/{t}/{i}" in self.arrays
            }
            stored = StoredProblem(entry.problem_name, tensors, initial, grads)
            problem = Problem(entry.problem_name, tensors, seed=0, description="read from a golden file")
            case = Case(
                name=entry.name,
                algorithm=entry.algorithm,
                options=entry.options,
                hypers=entry.hypers,
                problem=problem,
                steps=entry.steps,
                maximize=entry.maximize,
                note=entry.note,
            )
            out.append((replace(case, spec_json=entry.spec_json), stored))
        return out

    def _tensor(self, name: str) -> Tensor:
        if name not in self.arrays:
            raise GoldenError(f"golden file {self.path} has no array {name!r}; it is incomplete")
        return torch.from_numpy(np.array(self.arrays[name], dtype=np.float64))

    def trajectory_value(self, case_index: int, step: int, tensor: int, quantity: str) -> Tensor | None:
        key = f"c{case_index}/traj/{step}/{tensor}/{quantity}"
        return self._tensor(key) if key in self.arrays else None


def load(path: str | Path) -> Golden:
    """Read and verify a golden file (module doc); :class:`GoldenError` says what is wrong with it."""
    path = Path(path)
    entries: list[CaseEntry] = []

    def expect(manifest: Mapping[str, Any]) -> ExpectFn:
        try:
            entries.extend(read_manifest(manifest))
        except GoldenError as exc:
            raise GoldenError(f"its manifest is malformed: {exc}") from None
        return member_checker(entries)

    manifest, arrays = read_members(path, expect)
    for c, entry in enumerate(entries):
        missing = [f"c{c}/init/{i}" for i in range(len(entry.tensors)) if f"c{c}/init/{i}" not in arrays]
        if missing:
            raise GoldenError(
                f"golden file {path} has no initial parameters {', '.join(missing[:3])}; it is incomplete"
            )
    stored, computed = manifest["checksum"], checksum(manifest, arrays)
    if stored != computed:
        raise GoldenError(
            f"golden file {path} failed its integrity check: SHA-256 checksum mismatch (stored {str(stored)[:16]}..., "
            f"computed {computed[:16]}...): the file was modified or corrupted after it was recorded; "
            "record it again with `portopt conformance record`"
        )
    try:
        signature = verify_signature(manifest, computed)
    except GoldenError as exc:
        raise GoldenError(f"golden file {path}: {exc}") from None
    return Golden(path, manifest, arrays, entries, signature)


def verify_reference(golden: Golden, case_index: int, case: Case, source: StoredProblem) -> RunResult:
    """Recompute the float64 reference from the stored inputs and compare it with the stored trajectory."""
    spec = case.spec()
    entry = golden.entries[case_index]
    hypers = [dict(h) for h in entry.group_hypers]
    tol = TOLERANCES["fp64"]
    result = RunResult(case.name, case.algorithm, REFERENCE_NAME, "fp64", "cpu", PASS, steps=case.steps)
    trajectory = Trajectory(Reference(spec, source, hypers, RECORD_PRECISION, tol.bound_factor), keep_history=False)
    for t in range(1, case.steps + 1):
        after = trajectory.step(t).after
        if list(after.steps) != list(entry.step_counters[t - 1]):
            result.status = FAIL
            result.reason = f"step {t}: step counters {list(after.steps)} differ from the recorded {list(entry.step_counters[t - 1])}"
            return result
        for i in range(len(source.tensors)):
            quantities = {PARAM: after.params[i], **(after.states[i] or {})}
            for q, value in quantities.items():
                stored = golden.trajectory_value(case_index, t, i, q)
                if stored is None:
                    result.status = FAIL
                    result.reason = f"step {t}, tensor {source.label(i)}: {q} is not in the golden file"
                    return result
                cmp = compare(value, stored, tol.drift_factor * after.drift[i][q])
                result.worst_drift = max(result.worst_drift, cmp.worst)
                if not cmp.passed:
                    result.status = FAIL
                    result.first_failure = Divergence(
                        "golden", t, source.label(i), q, list(cmp.index or ()), cmp.got, cmp.expected,
                        cmp.abs_error, cmp.allowed, cmp.worst, cmp.count_over, cmp.numel,
                    )  # fmt: skip
                    result.reason = (
                        "this machine's float64 reference does not reproduce the recorded trajectory: "
                        + result.first_failure.describe()
                    )
                    return result
    return result
