"""The algorithm library: one spec factory per file, looked up by name.

Each factory takes the algorithm's structural options as keyword arguments (``amsgrad``,
``nesterov``, ``centered``, ...) and returns a checked :class:`~portopt.spec.Spec`.
"""

from __future__ import annotations

from collections.abc import Callable

from portopt.algorithms.adam import adam, adamw
from portopt.algorithms.sgd import sgd
from portopt.spec.definition import OptionValue, Spec

SpecFactory = Callable[..., Spec]

ALGORITHMS: dict[str, SpecFactory] = {
    "sgd": sgd,
    "adam": adam,
    "adamw": adamw,
}


def algorithm_names() -> list[str]:
    """Names accepted by :func:`get_spec`, sorted."""
    return sorted(ALGORITHMS)


def get_spec(name: str, **options: OptionValue) -> Spec:
    """The spec of algorithm ``name`` built with ``options``; errors list what exists."""
    try:
        factory = ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(algorithm_names())}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(f"{name}: invalid options {options}: {exc}") from None
