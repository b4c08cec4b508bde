"""The algorithm library: one spec factory per file, looked up by name.

Each factory takes the algorithm's structural options as keyword arguments (``amsgrad``,
``nesterov``, ``centered``, ...) and returns a checked :class:`~portopt.spec.Spec`.
"""

from __future__ import annotations

from collections.abc import Callable

from portopt.algorithms.adabelief import adabelief
from portopt.algorithms.adagrad import adagrad
from portopt.algorithms.adam import adam, adamw
from portopt.algorithms.adamax import adamax
from portopt.algorithms.lamb import lamb
from portopt.algorithms.lion import lion
from portopt.algorithms.nadam import nadam
from portopt.algorithms.radam import radam
from portopt.algorithms.rmsprop import rmsprop
from portopt.algorithms.sgd import sgd
from portopt.algorithms.sparse_adam import sparse_adam
from portopt.spec.definition import OptionValue, Spec

SpecFactory = Callable[..., Spec]

ALGORITHMS: dict[str, SpecFactory] = {
    "sgd": sgd,
    "adam": adam,
    "adamw": adamw,
    "adagrad": adagrad,
    "rmsprop": rmsprop,
    "nadam": nadam,
    "adamax": adamax,
    "radam": radam,
    "adabelief": adabelief,
    "lamb": lamb,
    "lion": lion,
    "sparse_adam": sparse_adam,
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
