"""The case registry: (algorithm, options, hyperparameters, problem, steps) as data.

:data:`CASE_TABLE` lists, per algorithm, the option and hyperparameter combinations worth
testing (amsgrad, nesterov, centered, coupled and decoupled weight decay, maximize, RAdam's
threshold with a β2 that crosses it at step 5, LAMB without bias correction, an ε large
enough to matter, ...). Hyperparameters are chosen so that every term is visible: a
weight decay of 0.1 rather than 0.01, learning rates that move bfloat16 parameters by
about one ulp per step. An algorithm of the library that the table does not know gets a
default case and, if it has one, a weight-decay case, so a new algorithm is covered the
day it lands; an algorithm may declare its own rows with its registration (``cases=``). Rows marked ``quick=False`` run only in the full set: the quick set keeps
every algorithm with one or more rows that exercise its options (17 cases, 8 steps, the
small problem), the full set runs every row on the full problem for 40 steps, plus a
problem of more than a million elements, non-finite gradients, and the skip-step case.

Groups: group ``g`` of a problem uses the case's hyperparameters with ``lr·2^-g`` and
``β1 − 0.05·g`` (where declared), so an implementation that mixes up the groups' values
or caches a bias correction across groups is caught.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from portopt.algorithms import ALGORITHMS, REGISTRY, get_spec
from portopt.conformance.problems import FULL, LARGE, NONFINITE, QUICK, Problem
from portopt.spec.definition import OptionValue, Spec
from portopt.spec.symbols import Layout

FOUND_INF = "found_inf"
"""``Case.requires`` of the skip-step cases: a step with an inf/NaN gradient changes nothing."""
QUICK_STEPS = 8
"""Enough to cross every step-dependent branch: the first momentum step, RAdam's ρ_t at 5 and 6."""
FULL_STEPS = 40


@dataclass(frozen=True)
class Entry:
    """One row of the table: options and hyperparameters for an algorithm."""

    options: Mapping[str, OptionValue] = field(default_factory=dict)
    hypers: Mapping[str, float] = field(default_factory=dict)
    maximize: bool = False
    quick: bool = True
    note: str = ""


CASE_TABLE: dict[str, tuple[Entry, ...]] = {
    "sgd": (
        Entry(hypers={"lr": 0.05}, quick=False),
        Entry(hypers={"lr": 0.05, "weight_decay": 0.1}, maximize=True),
        Entry({"momentum": True}, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}),
        Entry({"momentum": True, "nesterov": True}, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    ),
    "adam": (
        Entry(hypers={"lr": 0.01}, quick=False),
        Entry(hypers={"lr": 0.01, "weight_decay": 0.1}),
        Entry({"amsgrad": True}, {"lr": 0.01, "weight_decay": 0.1}),
        Entry({"decoupled_weight_decay": True}, {"lr": 0.01, "weight_decay": 0.1}, quick=False),
        Entry(hypers={"lr": 0.01, "eps": 1e-3}, maximize=True, note="an ε large enough to matter"),
    ),
    "adamw": (
        Entry(hypers={"lr": 0.01, "weight_decay": 0.1}),
        Entry({"amsgrad": True}, {"lr": 0.01, "weight_decay": 0.1}, maximize=True, quick=False),
    ),
    "adagrad": (
        Entry(hypers={"lr": 0.05}, quick=False),
        Entry(
            hypers={"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-6}
        ),
    ),
    "rmsprop": (
        Entry(hypers={"lr": 0.01}, quick=False),
        Entry({"centered": True}, {"lr": 0.01, "weight_decay": 0.1}),
        Entry({"centered": True, "momentum": True}, {"lr": 0.01, "momentum": 0.9}),
        Entry({"momentum": True}, {"lr": 0.01, "momentum": 0.5}, maximize=True, quick=False),
    ),
    "nadam": (
        Entry(hypers={"lr": 0.01}, quick=False),
        Entry(hypers={"lr": 0.01, "weight_decay": 0.1}),
        Entry({"decoupled_weight_decay": True}, {"lr": 0.01, "weight_decay": 0.1}, quick=False),
    ),
    "adamax": (
        Entry(hypers={"lr": 0.01}, quick=False),
        Entry(hypers={"lr": 0.01, "weight_decay": 0.1}, maximize=True),
    ),
    "radam": (
        Entry(hypers={"lr": 0.01, "beta2": 0.9}, note="β2 = 0.9: ρ_t crosses 4 at step 5 and 5 at step 6"),
        Entry({"threshold": 4.0}, {"lr": 0.01, "beta2": 0.9}, note="the paper's threshold"),
        Entry({"decoupled_weight_decay": True}, {"lr": 0.01, "weight_decay": 0.1}, quick=False),
        Entry(hypers={"lr": 0.01, "weight_decay": 0.1}, quick=False),
    ),
    "adabelief": (
        Entry(hypers={"lr": 0.01, "weight_decay": 0.1}),
        Entry({"decoupled_weight_decay": False}, {"lr": 0.01, "weight_decay": 0.1}, quick=False),
    ),
    "lamb": (
        Entry(hypers={"lr": 0.01, "weight_decay": 0.1}),
        Entry({"bias_correction": False}, {"lr": 0.01}, quick=False),
    ),
    "lion": (
        Entry(hypers={"lr": 0.01}, quick=False),
        Entry(hypers={"lr": 0.01, "weight_decay": 0.1}),
    ),
}


@dataclass(frozen=True)
class Case:
    """One conformance case: an algorithm with options, hyperparameters, a problem and a step count."""

    name: str
    algorithm: str
    options: tuple[tuple[str, OptionValue], ...]
    hypers: tuple[tuple[str, float], ...]
    problem: Problem
    steps: int
    maximize: bool = False
    quick: bool = True
    note: str = ""
    requires: str | None = None
    spec_json: str | None = field(default=None, compare=False, repr=False)
    """A recorded spec (a golden file's) that replaces the library's."""

    @property
    def option_map(self) -> dict[str, OptionValue]:
        return dict(self.options)

    def spec(self) -> Spec:
        """The spec under test (maximised when the case says so), or the recorded one."""
        if self.spec_json is not None:
            from portopt.spec.serialize import spec_from_json

            return spec_from_json(self.spec_json)
        spec = get_spec(self.algorithm, **self.option_map)
        return spec.maximized() if self.maximize else spec

    def group_hypers(self, spec: Spec) -> list[dict[str, float]]:
        """The hyperparameter values of every param group of the problem."""
        base = {**spec.defaults(), **dict(self.hypers)}
        groups = []
        for g in range(self.problem.num_groups):
            values = dict(base)
            values["lr"] = base["lr"] * 0.5**g if "lr" in base else 0.0
            if "lr" not in spec.hyper_names:
                values.pop("lr")
            if "beta1" in values:
                values["beta1"] = max(0.0, values["beta1"] - 0.05 * g)
            groups.append(values)
        return groups

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options) or "default options"
        hyp = ", ".join(f"{k}={v:g}" for k, v in self.hypers)
        extra = ", maximize" if self.maximize else ""
        return f"{self.algorithm} ({opts}{extra}; {hyp}) on {self.problem.name}, {self.steps} steps"


def _case_name(algorithm: str, entry: Entry, suffix: str) -> str:
    defaults = _factory_defaults(algorithm)
    parts: list[str] = []
    for key, value in entry.options.items():
        if defaults.get(key) == value:
            continue
        if isinstance(value, bool):
            parts.append(key if value else f"no-{key}")
        else:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    for key in ("weight_decay", "eps", "beta2", "lr_decay", "dampening"):
        if entry.hypers.get(key):
            parts.append(f"{'wd' if key == 'weight_decay' else key}={entry.hypers[key]:g}")
    if entry.maximize:
        parts.append("maximize")
    label = f"[{','.join(parts)}]" if parts else ""
    return f"{algorithm}{label}/{suffix}"


def _factory_defaults(algorithm: str) -> dict[str, object]:
    params = inspect.signature(ALGORITHMS[algorithm]).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def _entries(algorithm: str) -> tuple[Entry, ...]:
    if algorithm in CASE_TABLE:
        return CASE_TABLE[algorithm]
    rows = REGISTRY[algorithm].cases if algorithm in REGISTRY else ()
    if rows:  # declared with the algorithm (portopt.algorithms.registry.CaseRow)
        return tuple(Entry(dict(r.options), dict(r.hypers), r.maximize, r.quick, r.note) for r in rows)
    spec = get_spec(algorithm)
    entries = [Entry(note="default case (the algorithm is not in CASE_TABLE)")]
    if "weight_decay" in spec.hyper_names:
        entries.append(Entry(hypers={"weight_decay": 0.1}, note="weight decay (not in CASE_TABLE)"))
    return tuple(entries)


def _problem_for(spec: Spec, problem: Problem) -> Problem:
    # Matrices only when a factored state exists for every tensor (Adafactor's exist only where ndim >= 2).
    factored = any(s.layout in (Layout.ROW, Layout.COL) and s.when is None for s in spec.states)
    return problem.matrices_only() if factored else problem


def build_cases(algorithms: Iterable[str] | None = None, quick: bool = True) -> list[Case]:
    """Every case of ``algorithms`` (default: the whole library, read at call time).

    The quick set runs each table row on the quick problem; the full set runs each row on
    the full problem for more steps, plus one large (>= 1M elements) and one non-finite
    case per algorithm and the skip-step case.
    """
    names = sorted(ALGORITHMS) if algorithms is None else list(algorithms)
    unknown = [a for a in names if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {', '.join(unknown)}; known: {', '.join(sorted(ALGORITHMS))}")
    cases: list[Case] = []
    for algorithm in names:
        for entry in _entries(algorithm):
            if quick and not entry.quick and any(e.quick for e in _entries(algorithm)):
                continue
            problem = QUICK if quick else FULL
            spec = get_spec(algorithm, **entry.options)
            cases.append(_make(algorithm, entry, _problem_for(spec, problem), QUICK_STEPS if quick else FULL_STEPS))
        if not quick:
            first = _entries(algorithm)[0]
            spec = get_spec(algorithm, **first.options)
            cases.append(_make(algorithm, first, _problem_for(spec, LARGE), 3, suffix="large"))
            cases.append(_make(algorithm, first, _problem_for(spec, NONFINITE), 4, suffix="nonfinite"))
            skip = _make(algorithm, first, _problem_for(spec, NONFINITE), 4, suffix="skip-nonfinite")
            cases.append(replace(skip, requires=FOUND_INF, note="a step with inf/NaN gradients is skipped"))
    return cases


def _make(algorithm: str, entry: Entry, problem: Problem, steps: int, suffix: str | None = None) -> Case:
    get_spec(algorithm, **entry.options)  # refuse a table row whose options the factory rejects
    return Case(
        name=_case_name(algorithm, entry, suffix or problem.name),
        algorithm=algorithm,
        options=tuple(entry.options.items()),
        hypers=tuple(entry.hypers.items()),
        problem=problem,
        steps=steps,
        maximize=entry.maximize,
        quick=entry.quick,
        note=entry.note,
    )


def find_case(name: str, cases: Iterable[Case]) -> Case:
    """The case called ``name``; the error lists the names."""
    table = {c.name: c for c in cases}
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown case {name!r}; cases: {', '.join(sorted(table))}") from None


def spec_cases(spec: Spec, quick: bool = True) -> list[Case]:
    """Cases for a spec that is not in the library (``portopt conformance --spec module:factory``).

    The default row and, where the spec has one, a weight-decay row, on the quick or full problem
    (matrices only where every tensor keeps a factored state); the spec travels with each case
    (``spec_json``), so every implementation and the reference run exactly it.
    """
    from portopt.spec.serialize import spec_to_json

    text = spec_to_json(spec)
    entries = [Entry(note=f"a spec of your own ({spec.name})")]
    if "weight_decay" in spec.hyper_names:
        entries.append(Entry(hypers={"weight_decay": 0.1}, note="weight decay"))
    problem = _problem_for(spec, QUICK if quick else FULL)
    steps = QUICK_STEPS if quick else FULL_STEPS
    cases = []
    for entry in entries:
        label = "[wd=0.1]" if entry.hypers else ""
        cases.append(
            Case(
                name=f"{spec.name}{label}/{problem.name}",
                algorithm=spec.name,
                options=tuple(spec.options),
                hypers=tuple(entry.hypers.items()),
                problem=problem,
                steps=steps,
                note=entry.note,
                spec_json=text,
            )
        )
    return cases
