"""The algorithm registry: each module of :mod:`portopt.algorithms` declares its algorithms.

A module declares ``ALGORITHMS = (Algorithm("adan", adan, class_name="Adan", ...),)``; the
package discovers every module (no list to extend), and third-party packages register through
the entry point group :data:`ENTRY_POINT_GROUP` (``portopt.algorithms``), whose entry points
name an :class:`Algorithm`, a sequence of them, or a module that declares ``ALGORITHMS``. So
adding a built-in algorithm is one file plus its tests: the spec factory, the front-end class
name (``portopt.Adan``: a class written in :mod:`portopt.optim` when ``optimizer`` names one,
else one generated from the spec's hyperparameters and options), the torch.optim class that
computes it (``torch_class``), and the conformance rows (``cases``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from portopt.spec.definition import OptionValue, Spec

SpecFactory = Callable[..., Spec]
ENTRY_POINT_GROUP = "portopt.algorithms"
_NOT_ALGORITHMS = frozenset({"common", "registry"})


@dataclass(frozen=True)
class CaseRow:
    """A conformance row of an algorithm: options, hyperparameters, whether in the quick set, why."""

    options: Mapping[str, OptionValue] = field(default_factory=dict)
    hypers: Mapping[str, float] = field(default_factory=dict)
    maximize: bool = False
    quick: bool = True
    note: str = ""


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm.

    ``factory(**options)`` builds its spec; ``class_name`` is its front-end class
    (``portopt.<class_name>``), ``optimizer`` the ``module:Class`` that defines it (empty: a
    class generated from the spec, :func:`portopt.optim.generated.optimizer_class`);
    ``torch_class`` names the ``torch.optim`` class computing the same algorithm (where torch
    has it and this torch provides it); ``cases`` are its conformance rows.
    """

    name: str
    factory: SpecFactory
    class_name: str = ""
    optimizer: str = ""
    torch_class: str = ""
    cases: tuple[CaseRow, ...] = ()


def _declared(module: ModuleType | Any) -> list[Algorithm]:
    found = getattr(module, "ALGORITHMS", None)
    if isinstance(found, Algorithm):
        return [found]
    if isinstance(found, (tuple, list)) and all(isinstance(a, Algorithm) for a in found):
        return list(found)
    return []


def discover(package: ModuleType) -> dict[str, Algorithm]:
    """Every algorithm declared by the modules of ``package`` (in module order)."""
    table: dict[str, Algorithm] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_ALGORITHMS:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for algorithm in _declared(module):
            table[algorithm.name] = algorithm
    return table


ENTRY_POINT_FAILURES: dict[str, str] = {}
"""Entry points that failed to load, with why (reported, never raised: a broken plug-in breaks nothing else)."""


def load_entry_points(table: dict[str, Algorithm]) -> None:
    """Add the algorithms of the ``portopt.algorithms`` entry points to ``table`` (built-ins win a clash)."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            items: Iterable[Any] = (
                _declared(loaded)
                if isinstance(loaded, ModuleType)
                else (loaded if isinstance(loaded, (tuple, list)) else [loaded])
            )
            for item in items:
                if not isinstance(item, Algorithm):
                    raise TypeError(f"{item!r} is not a portopt.algorithms.registry.Algorithm")
                table.setdefault(item.name, item)
        except Exception as exc:  # a broken plug-in must not break the others
            ENTRY_POINT_FAILURES[entry.name] = (
                f"entry point {entry.value!r} failed to load: {type(exc).__name__}: {exc}"
            )
