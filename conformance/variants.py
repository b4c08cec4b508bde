"""Known variants of a spec: the ways an implementation commonly computes something else.

Each :class:`Variant` is the case's spec transformed (by rewriting its expression DAG, by
rebuilding it with another option, or by changing a hyperparameter), so it can be run by
the reference on the same inputs as the implementation under test; the diagnosis picks
the variant the implementation follows. Transforms that do not apply to a spec (no ε next
to a square root, no ``β^t``) produce nothing.

=====================================  ====================================================
``eps-inside-sqrt``                    ``sqrt(x + ε)`` instead of ``sqrt(x) + ε``
``eps-squared-inside-sqrt``            ``sqrt(x + ε²)`` (optax's ``eps_root`` convention)
``eps-clamp``                          ``max(sqrt(x), ε)`` instead of ``sqrt(x) + ε`` (heavyball's
                                       ``m̂ / max(sqrt(v̂), ε)``)
``eps-before-bias-correction``         ``(sqrt(v) + ε)/sqrt(1 − β2^t)``
``eps-inside-sqrt-before-correction``  ``sqrt(v + ε)/sqrt(1 − β2^t)``
``no-eps``                             ε = 0
``beta-power-t-minus-1`` / ``+1``      ``β^(t−1)`` or ``β^(t+1)`` for every ``β^t``
``bias-correction-from-update-count``  ``β^t`` read as ``β^(t−1)``, and as 0 at the first step
                                       (ONNX's ``T``: the number of earlier updates)
``no-bias-correction``                 ``β^t`` read as 0
``no-first-moment-correction``         ``x/(1 − β1^t)`` read as ``x`` (m̂ = m)
``no-second-moment-correction``        ``sqrt(1 − β2^t)`` read as 1 and ``v/(1 − β2^t)`` as ``v``
                                       (an uncorrected ``sqrt(v_t)``; ρ_t keeps its ``β2^t``)
``step-plus-1``                        every ``t`` read as ``t + 1`` (an update count one ahead)
``no-weight-decay``                    λ = 0
``decoupled-weight-decay``             ``p·(1 − lr·λ)`` instead of ``g + λ·p``
``coupled-weight-decay``               ``g + λ·p`` instead of ``p·(1 − lr·λ)``
``decay-after-update``                 ``(1 − lr·λ)·(p − Δ)`` instead of ``p·(1 − lr·λ) − Δ``
``maximize-ignored``                   descending although maximize was asked
``no-first-step-special-case``         ``where(t == 1, a, b)`` read as ``b``
``betas-swapped``                      β1 and β2 exchanged
``<option>=<value>``                   the factory with one option changed (amsgrad,
                                       nesterov, centered, RAdam's threshold, ...)
``no-update``                          nothing changes at all
``<a>+<b>[+<c>]``                      several conventions of one known implementation at
                                       once (:data:`CONVENTION_SETS`: ONNX preview Adam's)
=====================================  ====================================================

Two differences at once (RAdam with the paper's threshold *and* an uncorrected ``sqrt(v_t)``)
are found by :func:`variant_pairs`: every variant applied on top of every other one.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from portopt.algorithms import ALGORITHMS, get_spec
from portopt.algorithms.common import coupled_decay_gradient, decoupled_decay
from portopt.conformance.cases import Case
from portopt.spec.definition import OptionValue, Spec
from portopt.spec.errors import SpecError
from portopt.spec.expr import Expr, G, P, T, const, eq, maximum, sqrt, square, state, walk, where
from portopt.spec.ops import Op

Rewrite = Callable[[Expr], Expr | None]
NUMERIC_ALTERNATIVES: dict[str, tuple[float, ...]] = {"threshold": (4.0, 5.0)}
"""Other values worth trying for numeric factory options (RAdam: the paper's 4, torch's 5)."""


@dataclass(frozen=True)
class Variant:
    """A named alternative computation: a spec and the group hyperparameters to run it with.

    ``options`` and ``maximize`` are set when the variant rebuilds the spec from the
    algorithm's factory (``threshold=4.0``, ``maximize-ignored``): another variant applied on
    top of it must start from those, not from the case's (:func:`variant_pairs`).
    """

    name: str
    description: str
    spec: Spec
    group_hypers: tuple[Mapping[str, float], ...]
    options: tuple[tuple[str, OptionValue], ...] | None = None
    maximize: bool | None = None


PAIR_SEPARATOR = "+"
"""Between the names of the parts of a variant of several differences: a pair found by
:func:`variant_pairs` (``threshold=4.0+no-second-moment-correction``) or a known set of conventions
(:data:`CONVENTION_SETS`)."""
PAIR_AND = "; "
"""Between their descriptions."""


def difference_count(name: str) -> int:
    """How many differences the variant called ``name`` combines (1 for a single variant)."""
    return name.count(PAIR_SEPARATOR) + 1


def strip(e: Expr) -> Expr:
    """``e`` without any display label, at any depth (for structural matching)."""
    memo: dict[Expr, Expr] = {}
    for node in walk([e]):
        args = tuple(memo[a] for a in node.args)
        memo[node] = Expr(node.op, args, node.value)
    return memo[e]


def rewrite_spec(spec: Spec, rewrite: Rewrite, param_only: Rewrite | None = None) -> Spec | None:
    """``spec`` with ``rewrite`` applied bottom-up to every expression (``param_only`` also to the
    parameter update); ``None`` when nothing changed or the result is not a valid spec."""

    def apply(root: Expr, fn: Rewrite) -> Expr:
        memo: dict[Expr, Expr] = {}
        for node in walk([root]):
            args = tuple(memo[a] for a in node.args)
            rebuilt = node if args == node.args else Expr(node.op, args, node.value, node.label)
            replaced = fn(rebuilt)
            memo[node] = replaced if replaced is not None else rebuilt
        return memo[root]

    updates = tuple((name, apply(e, rewrite)) for name, e in spec.updates)
    param_update = apply(spec.param_update, rewrite)
    if param_only is not None:
        param_update = apply(param_update, param_only)
    if updates == spec.updates and param_update == spec.param_update:
        return None
    try:
        return dataclasses.replace(spec, updates=updates, param_update=param_update)
    except SpecError:
        return None


def _is_hyper(e: Expr, name: str) -> bool:
    return e.op is Op.HYPER and e.value == name


def _split_eps(node: Expr) -> tuple[Expr, Expr] | None:
    """``(x, ε)`` when ``node`` is ``x + ε`` and ``x`` holds a square root at its top."""
    if node.op is not Op.ADD:
        return None
    a, b = node.args
    if _is_hyper(b, "eps"):
        x, eps = a, b
    elif _is_hyper(a, "eps"):
        x, eps = b, a
    else:
        return None
    if x.op is Op.SQRT or (x.op is Op.DIV and x.args[0].op is Op.SQRT):
        return x, eps
    return None


def _eps_inside(squared: bool) -> Rewrite:
    def rewrite(node: Expr) -> Expr | None:
        split = _split_eps(node)
        if split is None:
            return None
        x, eps = split
        term = square(eps) if squared else eps
        if x.op is Op.SQRT:
            return sqrt(x.args[0] + term)
        return sqrt(x.args[0].args[0] / square(x.args[1]) + term)

    return rewrite


def _eps_clamp(node: Expr) -> Expr | None:
    split = _split_eps(node)
    return None if split is None else maximum(split[0], split[1])


def _one_minus_power(node: Expr, name: str) -> bool:
    """Whether ``node`` is ``1 − h^t`` for the hyperparameter ``name``."""
    if node.op is not Op.SUB or node.args[0].op is not Op.CONST or float(node.args[0].value or 0) != 1.0:
        return False
    power = node.args[1]
    return power.op is Op.POW and _is_hyper(power.args[0], name) and power.args[1].op is Op.STEP


def _elementwise(node: Expr) -> bool:
    """Whether ``node`` reads a tensor (the parameter, the gradient or a state)."""
    return any(n.op in (Op.PARAM, Op.GRAD, Op.STATE) for n in walk([node]))


def _no_first_moment_correction(node: Expr) -> Expr | None:
    if node.op is Op.DIV and _one_minus_power(node.args[1], "beta1"):
        return node.args[0]
    return None


def _no_second_moment_correction(node: Expr) -> Expr | None:
    if node.op is Op.SQRT and _one_minus_power(node.args[0], "beta2"):
        return const(1.0)
    if node.op is Op.DIV and _one_minus_power(node.args[1], "beta2") and _elementwise(node.args[0]):
        return node.args[0]
    return None


def _eps_before_correction(inside: bool) -> Rewrite:
    def rewrite(node: Expr) -> Expr | None:
        split = _split_eps(node)
        if split is None or split[0].op is not Op.DIV:
            return None
        (root, correction), eps = split[0].args, split[1]
        numerator = sqrt(root.args[0] + eps) if inside else root + eps
        return numerator / correction

    return rewrite


def _shift_beta_power(delta: float | None) -> Rewrite:
    def rewrite(node: Expr) -> Expr | None:
        if node.op is not Op.POW or node.args[1].op is not Op.STEP or node.args[0].op not in (Op.HYPER, Op.CONST):
            return None
        if delta is None:
            return const(0.0)
        return node.args[0] ** (T + delta)

    return rewrite


def _bias_correction_from_update_count(node: Expr) -> Expr | None:
    """``β^t`` as ``β^T`` with ``T = t − 1`` the number of earlier updates, and no correction when
    ``T = 0`` (ONNX's Adam: ``T > 0 ? R·sqrt(1 − β2^T)/(1 − β1^T) : R``)."""
    if node.op is not Op.POW or node.args[1].op is not Op.STEP or node.args[0].op not in (Op.HYPER, Op.CONST):
        return None
    return where(eq(T, 1), 0.0, node.args[0] ** (T - 1))


def _step_plus_one(node: Expr) -> Expr | None:
    return T + 1 if node.op is Op.STEP else None


def _decay_after_update(spec: Spec) -> Spec | None:
    """``p·(1 − lr·λ) − Δ₁ − Δ₂`` becomes ``(p − Δ₁ − Δ₂)·(1 − lr·λ)``: the decay multiplies the updated value."""
    decayed = strip(decoupled_decay(P))
    node, steps = spec.param_update, list[Expr]()
    while node.op is Op.SUB and strip(node) != decayed:
        node, steps = node.args[0], [node.args[1], *steps]
    if strip(node) != decayed or not steps:
        return None
    updated = P
    for delta in steps:
        updated = updated - delta
    try:
        return dataclasses.replace(spec, param_update=updated * node.args[1])
    except SpecError:
        return None


SpecTransform = Callable[[Spec], "Spec | None"]
CONVENTIONS: dict[str, tuple[str, SpecTransform]] = {
    "eps-before-bias-correction": (
        "ε added before the bias correction: (sqrt(v) + ε)/sqrt(1 − β2^t)",
        lambda spec: rewrite_spec(spec, _eps_before_correction(False)),
    ),
    "bias-correction-from-update-count": (
        "bias correction from the update count T = t − 1 (none at the first step, β^(t−1) after)",
        lambda spec: rewrite_spec(spec, _bias_correction_from_update_count),
    ),
    "decay-after-update": (
        "decoupled weight decay after the update: (1 − lr·λ)·(p − Δ) instead of p·(1 − lr·λ) − Δ",
        _decay_after_update,
    ),
}
"""Conventions that are also tried together (:data:`CONVENTION_SETS`): name -> (description, transform)."""
CONVENTION_SETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "ONNX preview-training Adam",
        ("eps-before-bias-correction", "bias-correction-from-update-count", "decay-after-update"),
    ),
)
"""Known implementations whose arithmetic differs from the spec's in several conventions at once: every
combination of two or more of a set's conventions that all apply to the spec is a variant of its own."""


def _combined(spec: Spec) -> list[tuple[str, str, Spec]]:
    out: list[tuple[str, str, Spec]] = []
    for source, names in CONVENTION_SETS:
        for size in range(2, len(names) + 1):
            for combo in itertools.combinations(names, size):
                variant: Spec | None = spec
                for name in combo:
                    variant = CONVENTIONS[name][1](variant) if variant is not None else None
                if variant is None:
                    continue
                whole = "" if size < len(names) else f"{source}'s conventions: "
                text = whole + PAIR_AND.join(CONVENTIONS[n][0] for n in combo)
                out.append((PAIR_SEPARATOR.join(combo), text, variant))
    return out


def _replace_structure(target: Expr, replacement: Expr) -> Rewrite:
    pattern = strip(target)

    def rewrite(node: Expr) -> Expr | None:
        return replacement if node.op is pattern.op and strip(node) == pattern else None

    return rewrite


def _no_first_step_case(node: Expr) -> Expr | None:
    if node.op is not Op.WHERE or node.args[0].op is not Op.EQ:
        return None
    a, b = node.args[0].args
    if {a.op, b.op} == {Op.STEP, Op.CONST}:
        return node.args[2]
    return None


def _coupled_to_decoupled(spec: Spec) -> Spec | None:
    if "weight_decay" not in spec.hyper_names or strip(coupled_decay_gradient()) not in {
        strip(n) for n in walk(list(spec.roots))
    }:
        return None
    # g' = g + λ·p becomes g everywhere; the parameter the update starts from becomes p·(1 − lr·λ).
    return rewrite_spec(
        spec,
        _replace_structure(coupled_decay_gradient(), G),
        param_only=lambda n: decoupled_decay(P) if n.op is Op.PARAM else None,
    )


def _decoupled_to_coupled(spec: Spec) -> Spec | None:
    pattern = strip(decoupled_decay(P))
    if not any(strip(n) == pattern for n in walk([spec.param_update])):
        return None
    without = rewrite_spec(spec, _replace_structure(decoupled_decay(P), P))
    if without is None:
        return None
    return rewrite_spec(without, lambda n: coupled_decay_gradient() if n.op is Op.GRAD else None)


def _no_update(spec: Spec) -> Spec | None:
    try:
        return dataclasses.replace(spec, updates=tuple((n, state(n)) for n, _ in spec.updates), param_update=P)
    except SpecError:
        return None


def _factory_variants(case: Case) -> list[tuple[str, str, Spec, dict[str, OptionValue]]]:
    factory = ALGORITHMS.get(case.algorithm)
    if factory is None:
        return []  # a spec that is not from the library (a random one)
    current = case.option_map
    out: list[tuple[str, str, Spec, dict[str, OptionValue]]] = []
    for name, param in inspect.signature(factory).parameters.items():
        default = param.default
        value = current.get(name, default)
        if isinstance(default, bool):
            alternatives: Sequence[object] = (not value,)
        elif name in NUMERIC_ALTERNATIVES:
            alternatives = [v for v in NUMERIC_ALTERNATIVES[name] if v != value]
        else:
            continue
        for alt in alternatives:
            try:
                spec = get_spec(case.algorithm, **{**current, name: alt})  # type: ignore[arg-type]
            except (ValueError, SpecError):
                continue
            if case.maximize:
                spec = spec.maximized()
            description = f"{case.algorithm} built with {name}={alt} (the case uses {value})"
            out.append((f"{name}={alt}", description, spec, {**current, name: alt}))  # type: ignore[dict-item]
    return out


def known_variants(case: Case, spec: Spec, group_hypers: Sequence[Mapping[str, float]]) -> list[Variant]:
    """Every variant of ``spec`` that differs from it, for the diagnosis."""
    groups = tuple(dict(h) for h in group_hypers)
    out: list[Variant] = []

    def add(
        name: str,
        description: str,
        variant: Spec | None,
        hypers: tuple[Mapping[str, float], ...] = groups,
        options: Mapping[str, OptionValue] | None = None,
        maximize: bool | None = None,
    ) -> None:
        if variant is not None:
            built = None if options is None else tuple(options.items())
            out.append(Variant(name, description, variant, hypers, built, maximize))

    add(
        "eps-inside-sqrt",
        "ε inside the square root: sqrt(x + ε) instead of sqrt(x) + ε",
        rewrite_spec(spec, _eps_inside(False)),
    )
    add("eps-squared-inside-sqrt", "ε² inside the square root: sqrt(x + ε²)", rewrite_spec(spec, _eps_inside(True)))
    add(
        "eps-clamp",
        "ε as a floor of the denominator: max(sqrt(x), ε) instead of sqrt(x) + ε (heavyball's m̂/max(sqrt(v̂), ε))",
        rewrite_spec(spec, _eps_clamp),
    )
    add(
        "eps-inside-sqrt-before-correction",
        "ε inside the square root before the bias correction: sqrt(v + ε)/sqrt(1 − β2^t)",
        rewrite_spec(spec, _eps_before_correction(True)),
    )
    add("beta-power-t-minus-1", "bias correction β^(t−1) instead of β^t", rewrite_spec(spec, _shift_beta_power(-1.0)))
    add("beta-power-t-plus-1", "bias correction β^(t+1) instead of β^t", rewrite_spec(spec, _shift_beta_power(1.0)))
    add("no-bias-correction", "no bias correction (β^t read as 0)", rewrite_spec(spec, _shift_beta_power(None)))
    add(
        "no-first-moment-correction",
        "no bias correction of the first moment (m̂ = m: x/(1 − β1^t) read as x)",
        rewrite_spec(spec, _no_first_moment_correction),
    )
    add(
        "no-second-moment-correction",
        "an uncorrected second moment (sqrt(v_t) instead of sqrt(v_t/(1 − β2^t)))",
        rewrite_spec(spec, _no_second_moment_correction),
    )
    for name, (description, transform) in CONVENTIONS.items():
        add(name, description, transform(spec))
    add("decoupled-weight-decay", "decoupled weight decay p·(1 − lr·λ) instead of g + λ·p", _coupled_to_decoupled(spec))
    add("coupled-weight-decay", "coupled weight decay g + λ·p instead of p·(1 − lr·λ)", _decoupled_to_coupled(spec))
    add(
        "no-first-step-special-case",
        "no special first step (where(t == 1, ...) always takes the later-step formula)",
        rewrite_spec(spec, _no_first_step_case),
    )
    # After the specific variants above: where both match (SGD's t == 1 test), ties name the specific one.
    add(
        "step-plus-1",
        "the step counter one ahead: every t read as t + 1 (an update count that starts at 1, not 0)",
        rewrite_spec(spec, _step_plus_one),
    )
    if case.maximize and case.algorithm in ALGORITHMS:
        add(
            "maximize-ignored",
            "maximize ignored (it descends the objective)",
            get_spec(case.algorithm, **case.option_map),
            options=case.option_map,
            maximize=False,
        )
    for name, description, variant, options in _factory_variants(case):
        add(name, description, variant, options=options, maximize=case.maximize)
    if "eps" in spec.hyper_names:
        add("no-eps", "no ε (ε = 0)", spec, tuple({**h, "eps": 0.0} for h in groups))
    if any(h.get("weight_decay", 0.0) for h in groups):
        add("no-weight-decay", "no weight-decay term (λ = 0)", spec, tuple({**h, "weight_decay": 0.0} for h in groups))
    if "beta1" in spec.hyper_names and "beta2" in spec.hyper_names:
        swapped = tuple({**h, "beta1": h["beta2"], "beta2": h["beta1"]} for h in groups)
        add("betas-swapped", "β1 and β2 exchanged", spec, swapped)
    add("no-update", "no update at all (parameters and states never change)", _no_update(spec))
    for name, description, variant in _combined(spec):
        add(name, description, variant)
    return out


def variant_pairs(case: Case, singles: Sequence[Variant]) -> list[Variant]:
    """Every variant ``a+b`` of two differences, ``b`` applied on top of ``a``.

    ``b`` is looked up among the variants of ``a``'s spec (with ``a``'s hyperparameters, and
    ``a``'s factory options when ``a`` rebuilt the spec), so any variant of
    :func:`known_variants` combines with any other; a factory variant comes first (it rebuilds
    the spec). Pairs that do not combine (ε inside the square root and ε clamped: the second
    finds no ``sqrt(x) + ε`` left), that equal one of their parts, or that a known set of
    conventions already tried (:data:`CONVENTION_SETS`) are left out.
    """
    by_name = {v.name: v for v in singles if difference_count(v.name) == 1}
    seen: set[frozenset[str]] = {frozenset(v.name.split(PAIR_SEPARATOR)) for v in singles if v.name not in by_name}
    out: list[Variant] = []
    for first in by_name.values():
        base = case
        if first.options is not None:
            base = dataclasses.replace(case, options=first.options, maximize=bool(first.maximize))
        for second in known_variants(base, first.spec, first.group_hypers):
            key = frozenset((first.name, second.name))
            if second.name == first.name or key in seen or second.name not in by_name:
                continue
            if by_name[second.name].options is not None and first.options is None:
                continue  # built from the other side: the factory variant first
            if any(_same(second, v) for v in (first, by_name[second.name])):
                continue
            seen.add(key)
            out.append(
                Variant(
                    f"{first.name}{PAIR_SEPARATOR}{second.name}",
                    f"{first.description}{PAIR_AND}{by_name[second.name].description}",
                    second.spec,
                    second.group_hypers,
                    second.options,
                    second.maximize,
                )
            )
    return out


def _same(a: Variant, b: Variant) -> bool:
    return a.spec == b.spec and [dict(h) for h in a.group_hypers] == [dict(h) for h in b.group_hypers]
