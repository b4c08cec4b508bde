"""portopt: optimizers written once as equations, run on any device, proven consistent.

``portopt.Adam``, ``portopt.SGD``, ... are drop-ins for their torch.optim namesakes;
``portopt.Optimizer(params, spec)`` runs any spec. They are imported on first use, so
``import portopt`` stays quick (it does not import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _optimizer_names() -> tuple[str, ...]:
    """``Optimizer`` and the front-end class of every registered algorithm (read from the registry: adding an
    algorithm does not touch this file; importing the registry does not import torch)."""
    from portopt.algorithms import REGISTRY

    return ("Optimizer", *sorted(a.class_name for a in REGISTRY.values() if a.class_name))


_OPTIMIZERS = _optimizer_names()
__all__ = [*_OPTIMIZERS, "__version__"]


if TYPE_CHECKING:  # the hand-written classes, typed (the others resolve through the registry)
    from portopt.optim import LAMB as LAMB
    from portopt.optim import SGD as SGD
    from portopt.optim import AdaBelief as AdaBelief
    from portopt.optim import Adagrad as Adagrad
    from portopt.optim import Adam as Adam
    from portopt.optim import Adamax as Adamax
    from portopt.optim import AdamW as AdamW
    from portopt.optim import Lion as Lion
    from portopt.optim import NAdam as NAdam
    from portopt.optim import Optimizer as Optimizer
    from portopt.optim import RAdam as RAdam
    from portopt.optim import RMSprop as RMSprop
    from portopt.optim import SparseAdam as SparseAdam


def __getattr__(name: str) -> Any:
    if name in _OPTIMIZERS:
        value = getattr(importlib.import_module("portopt.optim"), name)  # registry classes resolve lazily there
        globals()[name] = value
        return value
    raise AttributeError(f"module 'portopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_OPTIMIZERS})
