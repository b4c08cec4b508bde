"""A golden file's manifest, validated field by field: types, ranges, and the arrays it declares.

The manifest is untrusted JSON. :func:`read_manifest` checks every field of version 1
(unknown fields are refused, so a typo cannot hide), with a :class:`GoldenError` naming the
field by its path (``cases[3].problem.tensors[2].shape``), the value and what is accepted;
each case's spec goes through the spec loader (:func:`~portopt.spec.serialize.spec_from_json`,
its own limits). Limits: :data:`MAX_CASES` cases, :data:`MAX_STEPS` steps a case,
:data:`MAX_TENSORS` tensors a problem, :data:`MAX_GROUPS` param groups, :data:`MAX_RANK`
dimensions and :data:`MAX_NUMEL` elements a tensor, strings of :data:`MAX_TEXT` characters.

:func:`member_checker` then says, from the manifest alone, which arrays the archive may
hold and with which dtype and shape (``c{c}/init/{i}``, ``c{c}/grad/{t}/{i}``,
``c{c}/traj/{t}/{i}/{param or state}``: float64, the tensor's or the state's shape), so
:mod:`~portopt.conformance.golden_archive` refuses any other member before decompressing it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from portopt.algorithms import ALGORITHMS
from portopt.conformance.golden_archive import ArrayHeader, ExpectFn, GoldenError
from portopt.conformance.problems import GRAD_EVERY_STEP, GRAD_NEVER, GRAD_ODD_STEPS, Layout, Regime, TensorSpec
from portopt.lowering.interpreter import state_shape
from portopt.spec.definition import OptionValue, Spec
from portopt.spec.errors import SpecError
from portopt.spec.limits import MAX_JSON_BYTES
from portopt.spec.serialize import spec_from_json

FORMAT = "portopt.conformance.golden"
VERSION = 1
MAX_CASES = 1_000
MAX_STEPS = 1_000
MAX_TENSORS = 256
MAX_GROUPS = 64
MAX_RANK = 8
MAX_NUMEL = 1 << 28
MAX_TEXT = 4_096
MAX_PAIRS = 64
PARAM = "param"

_TOP_KEYS = frozenset(
    {"format", "version", "portopt_version", "torch_version", "machine", "recorded_at", "cases", "checksum"}
)
_CASE_KEYS = frozenset(
    {
        "name", "algorithm", "options", "hypers", "maximize", "steps", "note", "problem",
        "group_hypers", "spec_json", "step_counters",
    }
)  # fmt: skip
_TENSOR_KEYS = frozenset({"shape", "group", "layout", "regime", "grads", "zero_at", "nonfinite_at", "param_scale"})
_GRADS = (GRAD_EVERY_STEP, GRAD_NEVER, GRAD_ODD_STEPS)
_MEMBER = re.compile(
    r"c(\d{1,9})/(?:(init)/(\d{1,9})|(grad)/(\d{1,9})/(\d{1,9})|(traj)/(\d{1,9})/(\d{1,9})/(\w{1,64}))"
)
_FLOAT64 = np.dtype("<f8")


@dataclass(frozen=True)
class CaseEntry:
    """One validated case of a manifest."""

    name: str
    algorithm: str
    options: tuple[tuple[str, OptionValue], ...]
    hypers: tuple[tuple[str, float], ...]
    maximize: bool
    steps: int
    note: str
    problem_name: str
    tensors: tuple[TensorSpec, ...]
    group_hypers: tuple[dict[str, float], ...]
    spec_json: str
    spec: Spec
    step_counters: tuple[tuple[int, ...], ...]


def _fail(field: str, message: str) -> GoldenError:
    return GoldenError(f"manifest field {field!r}: {message}")


def _show(value: Any) -> str:
    """A short, ASCII form of an untrusted value: strings and numbers as written, containers by their type."""
    scalar = isinstance(value, (str, bool, int, float)) or value is None
    text = ascii(value) if scalar else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _object(value: Any, field: str, keys: frozenset[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(field, f"must be an object, got {_show(value)}")
    unknown = sorted(str(k) for k in value if k not in keys | optional)
    if unknown:
        raise _fail(
            field, f"unknown field(s) {', '.join(map(ascii, unknown[:5]))} (allowed: {', '.join(sorted(keys))})"
        )
    missing = sorted(keys - set(value))
    if missing:
        raise _fail(field, f"missing field(s) {', '.join(missing)}")
    return value


def _text(value: Any, field: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise _fail(field, f"must be a string, got {_show(value)}")
    if len(value) > limit:
        raise _fail(field, f"has {len(value)} characters; at most {limit}")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") and c != "\n" for c in value):
        raise _fail(field, "holds control or line-separator characters")
    return value


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, f"must be an integer from {low} to {high}, got {_show(value)}")
    if not low <= value <= high:
        raise _fail(field, f"must be an integer from {low} to {high}, got {value}")
    return value


def _number(value: Any, field: str, *, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, f"must be a number, got {_show(value)}")
    number = float(value)
    if finite and not math.isfinite(number):
        raise _fail(field, f"must be a finite number, got {number}")
    return number


def _list(value: Any, field: str, limit: int, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(field, f"must be a list, got {_show(value)}")
    if len(value) > limit:
        raise _fail(field, f"has {len(value)} entries; at most {limit}")
    if length is not None and len(value) != length:
        raise _fail(field, f"has {len(value)} entries; {length} are needed")
    return value


def _choice(value: Any, field: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(field, f"must be one of {', '.join(choices)}, got {_show(value)}")
    return value


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value):
        raise _fail(field, f"must be a name (an ASCII identifier), got {_show(value)}")
    return value


def _option_pairs(value: Any, field: str) -> tuple[tuple[str, OptionValue], ...]:
    pairs = []
    for j, item in enumerate(_list(value, field, MAX_PAIRS)):
        where = f"{field}[{j}]"
        if not (isinstance(item, list) and len(item) == 2):
            raise _fail(where, f"must be a [name, value] pair, got {_show(item)}")
        key, option = _name(item[0], f"{where}[0]"), item[1]
        if isinstance(option, str):
            option = _text(option, f"{where}[1]", 256)
        elif not isinstance(option, bool):
            option = _number(option, f"{where}[1]") if isinstance(option, float) else option
            if not isinstance(option, (int, float)):
                raise _fail(f"{where}[1]", f"must be true/false, a number or a string, got {_show(option)}")
        pairs.append((key, option))
    return tuple(pairs)


def _hyper_pairs(value: Any, field: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for j, item in enumerate(_list(value, field, MAX_PAIRS)):
        where = f"{field}[{j}]"
        if not (isinstance(item, list) and len(item) == 2):
            raise _fail(where, f"must be a [name, number] pair, got {_show(item)}")
        pairs.append((_name(item[0], f"{where}[0]"), _number(item[1], f"{where}[1]", finite=False)))
    return tuple(pairs)


def _steps_list(value: Any, field: str, steps: int) -> tuple[int, ...]:
    return tuple(_integer(s, f"{field}[{j}]", 1, steps) for j, s in enumerate(_list(value, field, steps)))


def _tensor(value: Any, field: str, steps: int) -> TensorSpec:
    obj = _object(value, field, _TENSOR_KEYS)
    shape = tuple(
        _integer(n, f"{field}.shape[{j}]", 0, MAX_NUMEL)
        for j, n in enumerate(_list(obj["shape"], f"{field}.shape", MAX_RANK))
    )
    if math.prod(shape) > MAX_NUMEL:
        raise _fail(f"{field}.shape", f"{shape} has {math.prod(shape)} elements; at most {MAX_NUMEL}")
    return TensorSpec(
        shape,
        _integer(obj["group"], f"{field}.group", 0, MAX_GROUPS - 1),
        Layout(_choice(obj["layout"], f"{field}.layout", [m.value for m in Layout])),
        Regime(_choice(obj["regime"], f"{field}.regime", [m.value for m in Regime])),
        _choice(obj["grads"], f"{field}.grads", _GRADS),
        _steps_list(obj["zero_at"], f"{field}.zero_at", steps),
        _steps_list(obj["nonfinite_at"], f"{field}.nonfinite_at", steps),
        _number(obj["param_scale"], f"{field}.param_scale"),
    )


def _group_hypers(value: Any, field: str, groups: int, spec: Spec) -> tuple[dict[str, float], ...]:
    out = []
    for g, item in enumerate(_list(value, field, MAX_GROUPS, groups)):
        where = f"{field}[{g}]"
        if not isinstance(item, dict) or len(item) > MAX_PAIRS:
            raise _fail(where, f"must be an object of at most {MAX_PAIRS} hyperparameters, got {_show(item)}")
        values = {_name(k, f"{where} key"): _number(v, f"{where}.{k}", finite=False) for k, v in item.items()}
        missing = [h for h in spec.hyper_names if h not in values]
        if missing:
            raise _fail(where, f"has no value for hyperparameter(s) {', '.join(missing)} of the recorded spec")
        try:
            spec.check_hyperparameters(values)
        except ValueError as exc:
            raise _fail(where, str(exc)) from None
        out.append(values)
    return tuple(out)


def _case(value: Any, c: int) -> CaseEntry:
    field = f"cases[{c}]"
    obj = _object(value, field, _CASE_KEYS)
    steps = _integer(obj["steps"], f"{field}.steps", 1, MAX_STEPS)
    problem = _object(obj["problem"], f"{field}.problem", frozenset({"name", "tensors"}))
    raw_tensors = _list(problem["tensors"], f"{field}.problem.tensors", MAX_TENSORS)
    tensors = tuple(_tensor(t, f"{field}.problem.tensors[{i}]", steps) for i, t in enumerate(raw_tensors))
    spec_json = _text(obj["spec_json"], f"{field}.spec_json", MAX_JSON_BYTES)
    try:
        spec = spec_from_json(spec_json)
    except SpecError as exc:
        raise _fail(f"{field}.spec_json", str(exc)) from None
    groups = 1 + max((t.group for t in tensors), default=0)
    counters = []
    for t, row in enumerate(_list(obj["step_counters"], f"{field}.step_counters", steps, steps)):
        where = f"{field}.step_counters[{t}]"
        counters.append(
            tuple(
                _integer(n, f"{where}[{i}]", 0, steps)
                for i, n in enumerate(_list(row, where, MAX_TENSORS, len(tensors)))
            )
        )
    maximize = obj["maximize"]
    if not isinstance(maximize, bool):
        raise _fail(f"{field}.maximize", f"must be true or false, got {_show(maximize)}")
    return CaseEntry(
        name=_text(obj["name"], f"{field}.name", 256),
        algorithm=_choice(obj["algorithm"], f"{field}.algorithm", sorted(ALGORITHMS)),
        options=_option_pairs(obj["options"], f"{field}.options"),
        hypers=_hyper_pairs(obj["hypers"], f"{field}.hypers"),
        maximize=maximize,
        steps=steps,
        note=_text(obj["note"], f"{field}.note"),
        problem_name=_text(problem["name"], f"{field}.problem.name", 256),
        tensors=tensors,
        group_hypers=_group_hypers(obj["group_hypers"], f"{field}.group_hypers", groups, spec),
        spec_json=spec_json,
        spec=spec,
        step_counters=tuple(counters),
    )


def read_manifest(manifest: Mapping[str, Any]) -> list[CaseEntry]:
    """The validated cases of ``manifest`` (module doc); :class:`GoldenError` names the first bad field."""
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise GoldenError(
            f"it has format {_show(manifest.get('format'))} version {_show(manifest.get('version'))}; "
            f"this portopt reads {FORMAT!r} version {VERSION}"
        )
    _object(dict(manifest), "top level", _TOP_KEYS, frozenset({"signature"}))
    for key in ("portopt_version", "torch_version", "machine", "recorded_at"):
        _text(manifest[key], key, 256)
    checksum = manifest["checksum"]
    if not isinstance(checksum, str) or not re.fullmatch(r"[0-9a-f]{64}", checksum):
        raise _fail("checksum", f"must be 64 lowercase hex digits (SHA-256), got {_show(checksum)}")
    cases = _list(manifest["cases"], "cases", MAX_CASES)
    if not cases:
        raise _fail("cases", "is empty: a golden file records at least one case")
    return [_case(entry, c) for c, entry in enumerate(cases)]


def member_checker(cases: Sequence[CaseEntry]) -> ExpectFn:
    """A check that a member is one the manifest declares, float64 and of the declared shape."""

    def check(name: str, header: ArrayHeader) -> None:
        match = _MEMBER.fullmatch(name)
        if match is None:
            raise GoldenError(f"member {name[:80]!r} is not a golden array (c<case>/init|grad|traj/...)")
        c = int(match[1])
        if c >= len(cases):
            raise GoldenError(f"member {name!r}: the manifest has {len(cases)} cases")
        case = cases[c]
        if match[2]:
            step, index, quantity = 0, int(match[3]), PARAM
        elif match[4]:
            step, index, quantity = int(match[5]), int(match[6]), PARAM
        else:
            step, index, quantity = int(match[8]), int(match[9]), match[10]
        if index >= len(case.tensors) or not (match[2] or 1 <= step <= case.steps):
            raise GoldenError(
                f"member {name!r}: case {c} has {len(case.tensors)} tensors and {case.steps} steps; no such array"
            )
        shape = case.tensors[index].shape
        if quantity != PARAM:
            if quantity not in case.spec.state_names:
                raise GoldenError(f"member {name!r}: the recorded spec has no state {quantity!r}")
            shape = state_shape(case.spec.state_decl(quantity), _torch_size(shape))
        if header.dtype != _FLOAT64 or header.shape != tuple(shape):
            raise GoldenError(
                f"member {name!r}: declares a {header.dtype} array of shape {header.shape}; the manifest "
                f"declares float64 of shape {tuple(shape)}"
            )

    return check


def _torch_size(shape: tuple[int, ...]) -> Any:
    import torch

    return torch.Size(shape)
