"""Front-end classes made from a registered algorithm's spec, for algorithms that need no hand-written one.

The constructor takes the spec's param-group keys in declaration order (tuples where several
hyperparameters share a key: ``betas=(0.9, 0.999, 0.9999)``, ``eps=(1e-30, 1e-16)``), then the
factory's structural options, ``maximize``, ``backend``, ``precision`` and ``skip_nonfinite`` as
keywords, like a torch.optim class. ``portopt.CAME`` is one.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from portopt.algorithms import REGISTRY
from portopt.optim.groups import spec_defaults
from portopt.optim.named import NamedOptimizer
from portopt.spec.definition import OptionValue

_FRONT_END = ("maximize", "backend", "precision", "skip_nonfinite")


def _options(algorithm: str) -> dict[str, Any]:
    params = inspect.signature(REGISTRY[algorithm].factory).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _make(algorithm: str, class_name: str) -> type[NamedOptimizer]:
    keys = spec_defaults(REGISTRY[algorithm].factory())
    options = _options(algorithm)
    front = {"maximize": False, "backend": "auto", "precision": None, "skip_nonfinite": False}

    def init(self: NamedOptimizer, params: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, params, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        values.pop("self")
        params = values.pop("params")
        backend, precision, skip = values.pop("backend"), values.pop("precision"), values.pop("skip_nonfinite")
        self._setup(params, values, backend, precision, skip)

    def spec_options(cls: type, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        return {name: group.get(name, default) for name, default in options.items()}

    positional = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    positional.append(inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    positional += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v) for k, v in keys.items()]
    keyword = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in {**options, **front}.items()]
    signature = inspect.Signature(positional + keyword)
    init.__signature__ = signature  # type: ignore[attr-defined]
    doc = (
        f"{REGISTRY[algorithm].factory().title}, made from its spec (:mod:`portopt.optim.generated`).\n\n"
        f"Arguments: {', '.join(keys)} (torch-style param-group keys), then keyword-only "
        f"{', '.join([*options, *_FRONT_END])}."
    )
    namespace: dict[str, Any] = {
        "__init__": init,
        "spec_options": classmethod(spec_options),
        "algorithm": algorithm,
        "option_defaults": {"maximize": False, **options},
        "__doc__": doc,
        "__module__": __name__,
        "__qualname__": class_name,
    }
    cls: type[NamedOptimizer] = type(class_name, (NamedOptimizer,), namespace)
    return cls


@functools.cache
def optimizer_class(algorithm: str) -> type[NamedOptimizer]:
    """The front-end class of a registered algorithm: its hand-written one, else one made from its spec."""
    entry = REGISTRY[algorithm]
    if entry.optimizer:
        module, _, name = entry.optimizer.partition(":")
        cls: type[NamedOptimizer] = getattr(importlib.import_module(module), name)
        return cls
    return _make(algorithm, entry.class_name or algorithm.capitalize())


def class_names() -> dict[str, str]:
    """Every front-end class name, with its algorithm."""
    return {a.class_name: a.name for a in REGISTRY.values() if a.class_name}


def lookup(class_name: str) -> type[NamedOptimizer] | None:
    """The front-end class called ``class_name``, or ``None``."""
    algorithm = class_names().get(class_name)
    return None if algorithm is None else optimizer_class(algorithm)
