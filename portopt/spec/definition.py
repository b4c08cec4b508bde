"""An algorithm spec: declarations plus the update equations, validated when built.

Semantics (pinned once, for every backend):

* every ``state(name)`` read on the right-hand side is the value *before* the step; all
  updates of one step are simultaneous (use the expression of a new value, not the
  state's name, to read it after its update, as ``m_t`` in a paper);
* ``T`` is 1 at the first step and is incremented before use;
* a state is created at the first step a parameter has a gradient, from its ``init``
  expression; then its update runs in the same step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from portopt.spec.analysis import LAYOUT_KIND, Kind, NodeInfo, classify
from portopt.spec.errors import SpecError
from portopt.spec.expr import Expr, G, substitute, walk
from portopt.spec.limits import check_spec_strings
from portopt.spec.ops import Op
from portopt.spec.symbols import Hyperparameter, Layout, StateDecl

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_SMALLEST_NORMAL = 1.1754943508222875e-38
RESERVED_STATE_NAMES = frozenset({"step"})

OptionValue = bool | int | float | str


@dataclass(frozen=True)
class Spec:
    """One optimizer algorithm written as equations.

    ``updates`` pairs each state name with its new value; ``param_update`` is the new
    parameter. ``options`` records the structural choices the spec was built with
    (``amsgrad=True``, ``nesterov=True``, ...) so that it can be named and rebuilt.
    """

    name: str
    title: str
    hyperparameters: tuple[Hyperparameter, ...]
    states: tuple[StateDecl, ...]
    updates: tuple[tuple[str, Expr], ...]
    param_update: Expr
    options: tuple[tuple[str, OptionValue], ...] = ()
    references: tuple[str, ...] = ()
    notes: str = ""
    _info: dict[Expr, NodeInfo] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for attr in ("hyperparameters", "states", "updates", "options", "references"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        object.__setattr__(self, "_info", _validate(self))

    # lookups ------------------------------------------------------------------
    def hyperparameter(self, name: str) -> Hyperparameter:
        for h in self.hyperparameters:
            if h.name == name:
                return h
        raise KeyError(f"{self.name} has no hyperparameter {name!r} (has: {', '.join(self.hyper_names)})")

    def state_decl(self, name: str) -> StateDecl:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no state {name!r} (has: {', '.join(self.state_names)})")

    @property
    def hyper_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hyperparameters)

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def update_map(self) -> dict[str, Expr]:
        return dict(self.updates)

    @property
    def roots(self) -> tuple[Expr, ...]:
        """Every expression the step evaluates: state updates, then the parameter update."""
        return (*(e for _, e in self.updates), self.param_update)

    @property
    def option_map(self) -> dict[str, OptionValue]:
        return dict(self.options)

    def defaults(self) -> dict[str, float]:
        """Default value of every hyperparameter."""
        return {h.name: h.default for h in self.hyperparameters}

    @property
    def node_kinds(self) -> Mapping[Expr, NodeInfo]:
        """Analysis of every node the step evaluates (one entry per distinct node)."""
        return self._info

    def kind(self, node: Expr) -> Kind:
        """Analysis kind of a node of this spec (see :mod:`portopt.spec.analysis`)."""
        return self._info[node].kind

    def check_hyperparameters(self, values: Mapping[str, float]) -> None:
        """Raise if a declared hyperparameter is missing or violates its constraint (extra keys are ignored)."""
        for h in self.hyperparameters:
            if h.name not in values:
                raise SpecError(f"{self.name}: hyperparameter {h.name!r} has no value")
            h.check(float(values[h.name]), self.name)

    def maximized(self) -> Spec:
        """The same algorithm ascending the objective: every read of ``g`` becomes ``-g``."""
        mapping = {G: -G}
        return Spec(
            name=self.name,
            title=self.title,
            hyperparameters=self.hyperparameters,
            states=tuple(
                StateDecl(s.name, s.symbol, s.latex, substitute(s.init, mapping), s.layout, s.doc) for s in self.states
            ),
            updates=tuple((n, substitute(e, mapping)) for n, e in self.updates),
            param_update=substitute(self.param_update, mapping),
            options=(*self.options, ("maximize", True)),
            references=self.references,
            notes=self.notes,
        )


def _validate(spec: Spec) -> dict[Expr, NodeInfo]:
    name = spec.name
    check_spec_strings(spec)
    hyper_names = _unique([h.name for h in spec.hyperparameters], name, "hyperparameter")
    state_names = _unique([s.name for s in spec.states], name, "state")
    for reserved in RESERVED_STATE_NAMES & state_names:
        raise SpecError(f"{name}: state name {reserved!r} is reserved for the step counter; rename the state")
    for h in spec.hyperparameters:
        h.check(h.default, name)

    layouts = {s.name: s.layout for s in spec.states}
    updated: set[str] = set()
    for target, _ in spec.updates:
        if target not in state_names:
            raise SpecError(
                f"{name}: update of undeclared state {target!r}; declare it in states= "
                f"(declared: {', '.join(sorted(state_names)) or 'none'})"
            )
        if target in updated:
            raise SpecError(f"{name}: state {target!r} is updated twice; give each state exactly one update")
        updated.add(target)

    for where, root in _labelled_roots(spec):
        for node in walk([root]):
            if node.op is Op.HYPER and node.value not in hyper_names:
                raise SpecError(
                    f"{name}: unknown hyperparameter {node.value!r} in {where}; declare it in "
                    f"hyperparameters= (declared: {', '.join(sorted(hyper_names)) or 'none'})"
                )
            if node.op is Op.CONST:
                _check_constant(float(node.value or 0.0), name, where)

    info = classify(spec.roots, layouts, name)
    read = {str(n.value) for n in info if n.op is Op.STATE}
    for s in spec.states:
        if s.name in read and s.name not in updated:
            raise SpecError(
                f"{name}: state {s.name!r} is read but never updated; add ({s.name!r}, <new value>) to updates="
            )
        if s.name not in read and s.name not in updated:
            raise SpecError(f"{name}: state {s.name!r} is declared but never used; remove it from states=")
        _check_init(s, name)
    for target, expr in spec.updates:
        _check_fits(info[expr], layouts[target], f"the update of state {target!r}", name)
    if info[spec.param_update].is_bool:
        raise SpecError(f"{name}: the parameter update is a boolean; it must be a number")
    return info


def _labelled_roots(spec: Spec) -> list[tuple[str, Expr]]:
    roots = [(f"the update of state {n!r}", e) for n, e in spec.updates]
    roots += [(f"the initial value of state {s.name!r}", s.init) for s in spec.states]
    roots.append(("the parameter update", spec.param_update))
    return roots


def _unique(names: Sequence[str], algorithm: str, what: str) -> frozenset[str]:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise SpecError(f"{algorithm}: {what} {n!r} is declared twice; declare each {what} once")
        seen.add(n)
    return frozenset(seen)


def _check_constant(value: float, algorithm: str, where: str) -> None:
    if not math.isfinite(value):
        raise SpecError(f"{algorithm}: constant {value} in {where} is not finite; use a finite number")
    if abs(value) > FLOAT32_MAX:
        raise SpecError(
            f"{algorithm}: constant {value} in {where} overflows float32 (max {FLOAT32_MAX:.4g}); "
            "rescale the expression"
        )
    if 0.0 < abs(value) < FLOAT32_SMALLEST_NORMAL:
        raise SpecError(
            f"{algorithm}: constant {value} in {where} is below float32's smallest normal number "
            f"({FLOAT32_SMALLEST_NORMAL:.4g}) and would flush to zero on some devices; rescale it "
            "or make it a hyperparameter"
        )


def _check_init(s: StateDecl, algorithm: str) -> None:
    for node in walk([s.init]):
        if node.op in (Op.STEP, Op.STATE):
            raise SpecError(
                f"{algorithm}: the initial value of state {s.name!r} reads "
                f"{'the step counter' if node.op is Op.STEP else 'state ' + repr(node.value)}; "
                "an initial value may use only constants, hyperparameters, p and g"
            )
    info = classify([s.init], {}, algorithm)
    _check_fits(info[s.init], s.layout, f"the initial value of state {s.name!r}", algorithm)


def _check_fits(node: NodeInfo, layout: Layout, where: str, algorithm: str) -> None:
    target = LAYOUT_KIND[layout]
    if node.is_bool:
        raise SpecError(f"{algorithm}: {where} is a boolean; wrap it in where(cond, 1.0, 0.0)")
    fits = node.kind <= Kind.TENSOR or node.kind == target or target is Kind.ELEMENT
    if not fits:
        raise SpecError(
            f"{algorithm}: shape mismatch in {where}: the value is {node.kind.name.lower()}-shaped "
            f"but the state is stored with layout {layout.value!r}; reduce the value "
            "(row_mean/col_mean/norm) or change the state's layout"
        )
