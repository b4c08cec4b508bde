"""portopt: optimizers written once as equations, run on any device, proven consistent.

``portopt.Adam``, ``portopt.SGD``, ... are drop-ins for their torch.optim namesakes;
``portopt.Optimizer(params, spec)`` runs any spec. They are imported on first use, so
``import portopt`` stays quick (it does not import torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def _optimizer_names() -> tuple[str, ...]:
    """``Optimizer`` and the front-end class of every registered algorithm (read from the registry: adding an
    algorithm does not touch this file; importing the registry does not import torch)."""
    from portopt.algorithms import REGISTRY

    return ("Optimizer", *sorted(a.class_name for a in REGISTRY.values() if a.class_name))


_OPTIMIZERS = _optimizer_names()
__all__ = [*_OPTIMIZERS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _OPTIMIZERS:
        value = getattr(importlib.import_module("portopt.optim"), name)  # registry classes resolve lazily there
        globals()[name] = value
        return value
    raise AttributeError(f"module 'portopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_OPTIMIZERS})
