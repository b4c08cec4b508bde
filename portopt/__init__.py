"""portopt: optimizers written once as equations, run on any device, proven consistent.

``portopt.Adam``, ``portopt.SGD``, ... are drop-ins for their torch.optim namesakes;
``portopt.Optimizer(params, spec)`` runs any spec. They are imported on first use, so
``import portopt`` stays quick (it does not import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_OPTIMIZERS = (
    "Optimizer",
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "NAdam",
    "Adamax",
    "RAdam",
    "AdaBelief",
    "LAMB",
    "Lion",
    "SparseAdam",
)

__all__ = [
    "LAMB",
    "SGD",
    "AdaBelief",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "NAdam",
    "Optimizer",
    "RAdam",
    "RMSprop",
    "SparseAdam",
    "__version__",
]

if TYPE_CHECKING:
    from portopt.optim import (
        LAMB,
        SGD,
        AdaBelief,
        Adagrad,
        Adam,
        Adamax,
        AdamW,
        Lion,
        NAdam,
        Optimizer,
        RAdam,
        RMSprop,
        SparseAdam,
    )


def __getattr__(name: str) -> Any:
    if name in _OPTIMIZERS:
        value = getattr(importlib.import_module("portopt.optim"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'portopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_OPTIMIZERS})
