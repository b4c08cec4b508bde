"""The torch.optim-compatible front end: ``portopt.Optimizer`` and the named classes.

The classes of the other registered algorithms (``portopt.optim.Adafactor``, ``SophiaG``, ``Adan``,
``CAME``, third-party ones) are looked up in the algorithm registry on first use
(:mod:`portopt.optim.generated`).
"""

from __future__ import annotations

from typing import Any

from portopt.optim.adabelief import AdaBelief
from portopt.optim.adagrad import Adagrad
from portopt.optim.adam import Adam, AdamW
from portopt.optim.adamax import Adamax
from portopt.optim.lamb import LAMB
from portopt.optim.lion import Lion
from portopt.optim.nadam import NAdam
from portopt.optim.optimizer import Optimizer
from portopt.optim.radam import RAdam
from portopt.optim.rmsprop import RMSprop
from portopt.optim.sgd import SGD
from portopt.optim.sparse_adam import SparseAdam

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
]


def __getattr__(name: str) -> Any:
    from portopt.optim.generated import lookup

    cls = lookup(name)
    if cls is None:
        raise AttributeError(f"module 'portopt.optim' has no attribute {name!r}")
    globals()[name] = cls
    return cls
