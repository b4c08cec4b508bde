"""The torch.optim-compatible front end: ``portopt.Optimizer`` and the named classes."""

from __future__ import annotations

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
