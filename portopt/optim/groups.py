"""Where a spec's hyperparameters live in a torch-style param group.

A hyperparameter lives under :attr:`Hyperparameter.key <portopt.spec.symbols.Hyperparameter.key>`
in the group; with a ``group_index`` it is one entry of a tuple (``beta1`` is
``group["betas"][0]``), exactly as in torch.optim, so that groups, LR schedulers and
checkpoints look the same. Values are read from the group at every step (no stale copies).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from torch import Tensor

from portopt.lowering.checks import check_hyperparameter_value
from portopt.spec.definition import Spec
from portopt.spec.errors import HyperparameterError
from portopt.spec.symbols import Hyperparameter


def spec_defaults(spec: Spec) -> dict[str, Any]:
    """The default param group of ``spec``: ``{"lr": 1e-3, "betas": (0.9, 0.999), ...}``."""
    defaults: dict[str, Any] = {}
    for key, members in _keys(spec).items():
        if members[0].group_index is None:
            defaults[key] = members[0].default
        else:
            defaults[key] = indexed_tuple({_index(h): h.default for h in members})
    return defaults


def indexed_tuple(entries: Mapping[int, Any]) -> tuple[Any, ...]:
    """``{1: 1e-3}`` -> ``(None, 1e-3)``: a tuple entry no hyperparameter reads stays ``None`` (torch's
    Adafactor's ``eps=(None, 1e-3)``, whose ``None`` means the dtype's machine epsilon)."""
    return tuple(entries.get(i) for i in range(max(entries, default=-1) + 1))


def fold_names(spec: Spec, values: MutableMapping[str, Any], base: Mapping[str, Any]) -> None:
    """Rewrite hyperparameter *names* given for tuple entries (``beta1=0.5``) as their group key.

    The other entries of the tuple come from ``values`` if it has the key, else from ``base``.
    """
    for key, members in _keys(spec).items():
        if members[0].group_index is None or not any(h.name in values for h in members):
            continue
        if key in values:
            given = ", ".join(f"{h.name}={values[h.name]!r}" for h in members if h.name in values)
            raise TypeError(
                f"{spec.name}: {given} given next to {key}={values[key]!r}; give each value once, by name or "
                f"inside {key}="
            )
        current = list(values.get(key, base[key]))
        for h in members:
            if h.name in values:
                assert h.group_index is not None
                current[h.group_index] = values.pop(h.name)
        values[key] = tuple(current)


def check_known(spec: Spec, given: Iterable[str]) -> None:
    """Raise ``TypeError`` for a keyword that is not a hyperparameter of ``spec`` (by name or group key)."""
    known = {h.name for h in spec.hyperparameters} | set(_keys(spec))
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(
            f"{spec.name}: unknown hyperparameter(s) {', '.join(map(repr, unknown))}; accepted: "
            + ", ".join(_describe_key(k, m) for k, m in _keys(spec).items())
        )


def read_hyperparameter(group: Mapping[str, Any], h: Hyperparameter, algorithm: str) -> Any:
    """The value of ``h`` in ``group``; a clear error if the group lacks it."""
    try:
        value = group[h.key]
    except KeyError:
        raise HyperparameterError(
            f"{algorithm}: the param group has no {h.key!r} (needed for {h.name}); its keys: "
            f"{', '.join(sorted(k for k in group if k != 'params'))}"
        ) from None
    if h.group_index is None:
        return value
    try:
        return value[h.group_index]
    except (TypeError, IndexError):
        raise HyperparameterError(
            f"{algorithm}: group[{h.key!r}] must be a sequence with an entry {h.group_index} ({h.name}), got {value!r}"
        ) from None


def group_hypers(spec: Spec, group: Mapping[str, Any]) -> dict[str, float | Tensor]:
    """The spec's hyperparameter values, by name, read from ``group`` now."""
    return {h.name: read_hyperparameter(group, h, spec.name) for h in spec.hyperparameters}


def check_group_values(spec: Spec, group: Mapping[str, Any], order: Iterable[str] = ()) -> None:
    """Check every hyperparameter value of ``group``; names in ``order`` first (torch's order); then that
    each tuple key holds exactly its entries (``betas`` is a pair: a third entry would be ignored)."""
    first = [spec.hyperparameter(n) for n in order if n in spec.hyper_names]
    rest = [h for h in spec.hyperparameters if h not in first]
    for h in (*first, *rest):
        check_hyperparameter_value(spec, h, read_hyperparameter(group, h, spec.name))
    check_group_tuples(spec, group)


def check_group_tuples(spec: Spec, group: Mapping[str, Any]) -> None:
    """Each tuple key of ``group`` holds exactly its entries (``betas`` is a pair: a third would be ignored).

    The width is the highest ``group_index`` plus one: a spec variant may leave an entry out (Adafactor's
    ``eps=(None, eps2)`` reads ``eps1`` from the dtype) while the tuple keeps its place.
    """
    for key, members in _keys(spec).items():
        if members[0].group_index is None:
            continue
        width = 1 + max(_index(h) for h in members)
        if len(group[key]) != width:
            names = ", ".join(h.name for h in sorted(members, key=_index))
            raise HyperparameterError(
                f"Invalid {key}: {group[key]!r} ({spec.name}: {key} must hold exactly {width} values "
                f"({names}), got {len(group[key])})"
            )


def _keys(spec: Spec) -> dict[str, list[Hyperparameter]]:
    keys: dict[str, list[Hyperparameter]] = {}
    for h in spec.hyperparameters:
        keys.setdefault(h.key, []).append(h)
    return keys


def _index(h: Hyperparameter) -> int:
    return h.group_index or 0


def _describe_key(key: str, members: list[Hyperparameter]) -> str:
    if members[0].group_index is None:
        return key
    return f"{key} ({', '.join(h.name for h in sorted(members, key=_index))})"
