"""The algorithm library: one file per algorithm, discovered, looked up by name.

Each module declares ``ALGORITHMS`` (:class:`~portopt.algorithms.registry.Algorithm` entries:
the spec factory, the front-end class, the conformance rows); third-party packages add theirs
through the entry point group ``portopt.algorithms``. Each factory takes the algorithm's
structural options as keyword arguments (``amsgrad``, ``nesterov``, ``centered``, ...) and
returns a checked :class:`~portopt.spec.Spec`.
"""

from __future__ import annotations

import sys

# The factories, importable from here as before (``from portopt.algorithms import adam``). Registration does
# not depend on this list: the registry discovers every module, so a new algorithm needs no line here.
from portopt.algorithms.adabelief import adabelief
from portopt.algorithms.adafactor import adafactor
from portopt.algorithms.adagrad import adagrad
from portopt.algorithms.adam import adam, adamw
from portopt.algorithms.adamax import adamax
from portopt.algorithms.adan import adan
from portopt.algorithms.came import came
from portopt.algorithms.lamb import lamb
from portopt.algorithms.lion import lion
from portopt.algorithms.nadam import nadam
from portopt.algorithms.radam import radam
from portopt.algorithms.registry import Algorithm, SpecFactory, discover, load_entry_points
from portopt.algorithms.rmsprop import rmsprop
from portopt.algorithms.sgd import sgd
from portopt.algorithms.sophia import sophiag
from portopt.algorithms.sparse_adam import sparse_adam
from portopt.spec.definition import OptionValue, Spec

__all__ = [
    "ALGORITHMS",
    "REGISTRY",
    "Algorithm",
    "SpecFactory",
    "adabelief",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "adan",
    "algorithm_names",
    "came",
    "get_spec",
    "lamb",
    "lion",
    "nadam",
    "radam",
    "rmsprop",
    "sgd",
    "sophiag",
    "sparse_adam",
]

REGISTRY: dict[str, Algorithm] = discover(sys.modules[__name__])
load_entry_points(REGISTRY)
ALGORITHMS: dict[str, SpecFactory] = {name: a.factory for name, a in REGISTRY.items()}
"""Every registered algorithm's spec factory, by name."""


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
