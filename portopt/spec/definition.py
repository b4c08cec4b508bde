"""An algorithm spec: declarations plus the update equations, validated when built.

Semantics (pinned once, for every backend):

* every ``state(name)`` read on the right-hand side is the value *before* the step; all
  updates of one step are simultaneous (use the expression of a new value, not the
  state's name, to read it after its update, as ``m_t`` in a paper);
* ``T`` is 1 at the first step and is incremented before use;
* a state is created at the first step a parameter has a gradient, from its ``init``
  expression; then its update runs in the same step;
* a state with ``when=`` exists only for the tensors whose shape and dtype satisfy it, and a
  ``where`` whose condition reads only the shape and dtype (``ndim() >= 2``) is decided per
  tensor before the step: each tensor runs the plain spec of its *shape class*
  (:meth:`Spec.specialize`), which is checked when the spec is built for every class that
  :data:`~portopt.spec.shapes.SAMPLE_SHAPES` reach;
* ``inputs`` are numbers passed to one call of ``step`` (``step(bs=...)``); ``methods`` are
  named updates of some states run between steps (``update_hessian()``); a state updated
  only by a method keeps its value in the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from portopt.spec.analysis import LAYOUT_KIND, Kind, NodeInfo, classify, fits
from portopt.spec.errors import SpecError
from portopt.spec.expr import Expr, G, P, as_expr, state, substitute, walk
from portopt.spec.limits import check_spec_strings
from portopt.spec.ops import Op
from portopt.spec.shapes import FINFO, SAMPLE_SHAPES, TensorFacts
from portopt.spec.symbols import Hyperparameter, Input, Layout, Method, StateDecl

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
    inputs: tuple[Input, ...] = ()
    methods: tuple[Method, ...] = ()
    _info: dict[Expr, NodeInfo] = field(default_factory=dict, init=False, repr=False, compare=False)
    _static: tuple[Expr, ...] = field(default=(), init=False, repr=False, compare=False)
    _variants: dict[tuple[bool, ...], Spec] = field(default_factory=dict, init=False, repr=False, compare=False)
    _class_of: dict[TensorFacts, tuple[bool, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _normalise(self)
        object.__setattr__(self, "_info", _validate(self))
        object.__setattr__(self, "_static", _static_points(self))
        if self._static:
            _check_shape_classes(self)

    def __hash__(self) -> int:
        # The dataclass hash of the compared fields, computed once: a spec keys caches on every step
        # (its hyperparameter, state and expression tuples would be hashed again each time).
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, object]:
        # A string's hash differs between processes: an unpickled spec computes its own.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

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

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def input_defaults(self) -> dict[str, float]:
        """Default value of every extra input."""
        return {i.name: i.default for i in self.inputs}

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.methods) or "none"
        raise KeyError(f"{self.name} has no method {name!r} (has: {known})")

    # shape classes ------------------------------------------------------------------
    @property
    def shape_dependent(self) -> bool:
        """Whether a state's existence or a ``where`` depends on the tensor's shape or dtype."""
        return bool(self._static)

    def shape_class(self, facts: TensorFacts) -> tuple[bool, ...]:
        """The outcome of every static condition for a tensor (``()`` for a spec that is not shape-dependent)."""
        if not self._static:
            return ()
        found = self._class_of.get(facts)
        if found is None:
            from portopt.lowering.host import evaluate_host  # the ops' host meaning (no torch)

            values: dict[Expr, object] = {}
            evaluate_host(walk(list(self._static)), 0.0, {}, values, facts)  # type: ignore[arg-type]
            found = tuple(bool(values[c]) for c in self._static)
            if len(self._class_of) < 4096:
                self._class_of[facts] = found
        return found

    def specialize(self, facts: TensorFacts) -> Spec:
        """The plain spec a tensor of this shape and dtype runs: static ``where`` nodes resolved, the states
        whose ``when`` fails dropped (``self`` for a spec that is not shape-dependent)."""
        if not self._static:
            return self
        key = self.shape_class(facts)
        variant = self._variants.get(key)
        if variant is None:
            try:
                variant = _specialized(self, dict(zip(self._static, key, strict=True)))
            except SpecError as exc:
                raise SpecError(f"{self.name}: for a tensor of shape {facts.shape} ({facts.dtype}): {exc}") from None
            self._variants[key] = variant
        return variant

    def method_spec(self, name: str) -> Spec:
        """Method ``name`` as a spec: its updates, every other state kept, ``p`` unchanged (run it with the
        step counter put back; see :meth:`portopt.Optimizer.run_method`)."""
        return _method_spec(self, name)

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
                StateDecl(s.name, s.symbol, s.latex, substitute(s.init, mapping), s.layout, s.doc, s.when)
                for s in self.states
            ),
            updates=tuple((n, substitute(e, mapping)) for n, e in self.updates),
            param_update=substitute(self.param_update, mapping),
            options=(*self.options, ("maximize", True)),
            references=self.references,
            notes=self.notes,
            inputs=self.inputs,
            methods=tuple(
                Method(m.name, tuple((n, substitute(e, mapping)) for n, e in m.updates), m.due, m.doc)
                for m in self.methods
            ),
        )


def _typed_tuple(spec: Spec, attr: str, kind: type, what: str) -> None:
    value = getattr(spec, attr)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SpecError(f"{spec.name}: {attr}= must be a sequence of {what}, got {type(value).__name__}")
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise SpecError(f"{spec.name}: {attr}[{i}] is {item!r} ({type(item).__name__}), not a {what}")
    object.__setattr__(spec, attr, items)


def _pairs(spec: Spec, pairs: object, where: str) -> tuple[tuple[str, Expr], ...]:
    """``(state name, expression)`` pairs, numbers wrapped as constants, else a :class:`SpecError` naming the entry."""
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise SpecError(f"{spec.name}: {where} must be a sequence of (state name, expression) pairs")
    out = []
    for i, item in enumerate(pairs):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise SpecError(f"{spec.name}: {where}[{i}] must be a (state name, expression) pair, got {item!r}")
        try:
            out.append((item[0], as_expr(item[1])))
        except SpecError as exc:
            raise SpecError(f"{spec.name}: the new value of state {item[0]!r} in {where}: {exc}") from None
    return tuple(out)


def _normalise(spec: Spec) -> None:
    """Fields as tuples of the right types (numbers wrapped as constants); a state that only a method
    updates keeps its value in the step (an identity update)."""
    if not isinstance(spec.name, str):
        raise SpecError(f"a spec's name must be a string, got {spec.name!r}")
    _typed_tuple(spec, "hyperparameters", Hyperparameter, "Hyperparameter")
    _typed_tuple(spec, "states", StateDecl, "StateDecl")
    _typed_tuple(spec, "inputs", Input, "Input")
    _typed_tuple(spec, "methods", Method, "Method")
    for attr in ("options", "references"):
        object.__setattr__(spec, attr, tuple(getattr(spec, attr)))
    updates = _pairs(spec, spec.updates, "updates")
    try:
        object.__setattr__(spec, "param_update", as_expr(spec.param_update))
    except SpecError as exc:
        raise SpecError(f"{spec.name}: the parameter update: {exc}") from None
    methods = []
    for m in spec.methods:
        due = None if m.due is None else m.due
        if due is not None and not isinstance(due, Expr):
            raise SpecError(f"{spec.name}: method {m.name!r}: due= must be an expression, got {due!r}")
        methods.append(Method(m.name, _pairs(spec, m.updates, f"method {m.name!r} updates"), due, m.doc))
    object.__setattr__(spec, "methods", tuple(methods))
    for s in spec.states:
        if not isinstance(s.init, Expr):
            raise SpecError(f"{spec.name}: the initial value of state {s.name!r} is {s.init!r}; use const(...)")
        if s.when is not None and not isinstance(s.when, Expr):
            raise SpecError(f"{spec.name}: state {s.name!r}: when= must be a condition such as ndim() >= 2")
    stepped = {n for n, _ in updates}
    declared = {s.name for s in spec.states}
    by_method = [n for m in methods for n, _ in m.updates if n not in stepped and n in declared]
    updates += tuple((n, state(n)) for n in dict.fromkeys(by_method))
    object.__setattr__(spec, "updates", updates)


def _validate(spec: Spec) -> dict[Expr, NodeInfo]:
    name = spec.name
    check_spec_strings(spec)
    hyper_names = _unique([h.name for h in spec.hyperparameters], name, "hyperparameter")
    state_names = _unique([s.name for s in spec.states], name, "state")
    input_names = _unique([i.name for i in spec.inputs], name, "input")
    for reserved in RESERVED_STATE_NAMES & state_names:
        raise SpecError(f"{name}: state name {reserved!r} is reserved for the step counter; rename the state")
    for clash in input_names & (hyper_names | RESERVED_INPUT_NAMES):
        raise SpecError(
            f"{name}: input {clash!r} has the name of a hyperparameter or of step()'s closure; rename the input"
        )
    for h in spec.hyperparameters:
        h.check(h.default, name)
    for i in spec.inputs:
        i.check(i.default, name)
    _unique([m.name for m in spec.methods], name, "method")

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
            if node.op is Op.INPUT and node.value not in input_names:
                raise SpecError(
                    f"{name}: unknown input {node.value!r} in {where}; declare it in inputs= "
                    f"(declared: {', '.join(sorted(input_names)) or 'none'})"
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
    for s in spec.states:
        if s.when is not None:
            _check_static_condition(s.when, f"when= of state {s.name!r}", name)
    for m in spec.methods:
        _check_method(spec, m, layouts)
    return info


RESERVED_INPUT_NAMES = frozenset({"closure", "self"})


def _check_static_condition(cond: Expr, where: str, algorithm: str) -> None:
    info = classify([cond], {}, algorithm)[cond]
    if not info.is_bool or not info.static:
        raise SpecError(
            f"{algorithm}: {where} must be a condition on the tensor's shape and dtype only, such as ndim() >= 2 "
            "(numel, ndim, size, finfo and constants; no t, hyperparameters, states or data)"
        )


def _check_method(spec: Spec, m: Method, layouts: Mapping[str, Layout]) -> None:
    name = spec.name
    seen: set[str] = set()
    for target, _ in m.updates:
        if target not in layouts:
            raise SpecError(
                f"{name}: method {m.name!r} updates undeclared state {target!r} "
                f"(declared: {', '.join(sorted(layouts)) or 'none'})"
            )
        if target in seen:
            raise SpecError(f"{name}: method {m.name!r} updates state {target!r} twice")
        seen.add(target)
    roots = [e for _, e in m.updates] + ([m.due] if m.due is not None else [])
    for node in walk(roots):
        if node.op is Op.HYPER and node.value not in spec.hyper_names:
            raise SpecError(f"{name}: unknown hyperparameter {node.value!r} in method {m.name!r}")
        if node.op is Op.INPUT:
            raise SpecError(f"{name}: method {m.name!r} reads input {node.value!r}; inputs belong to step() only")
    info = classify(roots, layouts, name)
    for target, expr in m.updates:
        _check_fits(info[expr], layouts[target], f"the update of state {target!r} in method {m.name!r}", name)
    if m.due is not None and not (info[m.due].is_bool and info[m.due].kind.is_step_scalar):
        raise SpecError(
            f"{name}: method {m.name!r}: due= must be a condition on t and hyperparameters, e.g. eq(mod(T, k), 0)"
        )


def _static_points(spec: Spec) -> tuple[Expr, ...]:
    """The static conditions that decide a tensor's shape class: static ``where`` conditions, then the ``when`` clauses."""
    layouts = {s.name: s.layout for s in spec.states}
    roots = [*spec.roots, *(s.init for s in spec.states), *(e for m in spec.methods for _, e in m.updates)]
    info = classify(roots, layouts, spec.name)
    points = [n.args[0] for n in walk(roots) if n.op is Op.WHERE and info[n.args[0]].static]
    points += [s.when for s in spec.states if s.when is not None]
    return tuple(dict.fromkeys(points))


def _specialized(spec: Spec, decided: Mapping[Expr, bool]) -> Spec:
    """``spec`` with each static condition replaced by its outcome and absent states dropped."""
    mapping: dict[Expr, Expr] = {}
    roots = [*spec.roots, *(s.init for s in spec.states), *(e for m in spec.methods for _, e in m.updates)]
    for node in walk(roots):
        if node.op is Op.WHERE and node.args[0] in decided:
            mapping[node] = node.args[1] if decided[node.args[0]] else node.args[2]

    def resolve(e: Expr) -> Expr:
        # Repeat: a taken branch may hold another static where (nested conditions).
        while True:
            new = substitute(e, mapping)
            if new is e or new == e:
                return new
            e = new

    present = [s for s in spec.states if s.when is None or decided[s.when]]
    names = {s.name for s in present}
    return Spec(
        name=spec.name,
        title=spec.title,
        hyperparameters=spec.hyperparameters,
        states=tuple(StateDecl(s.name, s.symbol, s.latex, resolve(s.init), s.layout, s.doc) for s in present),
        updates=tuple((n, resolve(e)) for n, e in spec.updates if n in names),
        param_update=resolve(spec.param_update),
        options=spec.options,
        references=spec.references,
        notes=spec.notes,
        inputs=spec.inputs,
        methods=tuple(
            Method(m.name, tuple((n, resolve(e)) for n, e in m.updates if n in names), m.due, m.doc)
            for m in spec.methods
        ),
    )


def _check_shape_classes(spec: Spec) -> None:
    """Build the plain spec of every shape class the sample shapes reach (its own checks name what is wrong)."""
    factored = {s.name for s in spec.states if s.layout in (Layout.ROW, Layout.COL)}
    for shape in SAMPLE_SHAPES:
        for dtype in FINFO:
            facts = TensorFacts(shape, dtype)
            key = spec.shape_class(facts)
            if key in spec._variants:
                continue
            present = {s.name for s, ok in zip(spec.states, _state_presence(spec, key), strict=True) if ok}
            if len(shape) < 2 and present & factored:
                continue  # such a tensor is refused at the step (a factored state needs a matrix)
            spec.specialize(facts)


def _state_presence(spec: Spec, key: tuple[bool, ...]) -> list[bool]:
    decided = dict(zip(spec._static, key, strict=True))
    return [s.when is None or decided[s.when] for s in spec.states]


def _method_spec(spec: Spec, name: str) -> Spec:
    cached = _METHOD_SPECS.get((spec, name))
    if cached is not None:
        return cached
    m = spec.method(name)
    touched = {n for n, _ in m.updates}
    updates = (*m.updates, *((s.name, state(s.name)) for s in spec.states if s.name not in touched))
    derived = Spec(
        name=f"{spec.name}.{m.name}",
        title=f"{spec.title} {m.name}()",
        hyperparameters=spec.hyperparameters,
        states=spec.states,
        updates=updates,
        param_update=P,
        options=spec.options,
        references=spec.references,
        inputs=(),
    )
    if len(_METHOD_SPECS) < 256:
        _METHOD_SPECS[(spec, name)] = derived
    return derived


_METHOD_SPECS: dict[tuple[Spec, str], Spec] = {}


def _labelled_roots(spec: Spec) -> list[tuple[str, Expr]]:
    roots = [(f"the update of state {n!r}", e) for n, e in spec.updates]
    roots += [(f"the initial value of state {s.name!r}", s.init) for s in spec.states]
    roots += [(f"when= of state {s.name!r}", s.when) for s in spec.states if s.when is not None]
    roots += [(f"method {m.name!r}", e) for m in spec.methods for _, e in m.updates]
    roots += [(f"due= of method {m.name!r}", m.due) for m in spec.methods if m.due is not None]
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
            what = "the step counter" if node.op is Op.STEP else f"state {node.value!r}"
            raise SpecError(
                f"{algorithm}: the initial value of state {s.name!r} reads {what}; an initial value may use only "
                "constants, hyperparameters, inputs, p, g and the tensor's shape"
            )
    info = classify([s.init], {}, algorithm)
    _check_fits(info[s.init], s.layout, f"the initial value of state {s.name!r}", algorithm)


def _check_fits(node: NodeInfo, layout: Layout, where: str, algorithm: str) -> None:
    target = LAYOUT_KIND[layout]
    if node.is_bool:
        raise SpecError(f"{algorithm}: {where} is a boolean; wrap it in where(cond, 1.0, 0.0)")
    if not fits(node.kind, target):
        raise SpecError(
            f"{algorithm}: shape mismatch in {where}: the value is {node.kind.name.lower()}-shaped "
            f"but the state is stored with layout {layout.value!r}; reduce the value "
            "(row_mean/col_mean/norm) or change the state's layout"
        )
