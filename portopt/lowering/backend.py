"""The contract between the front end (or the conformance suite) and a backend.

A backend turns a :class:`~portopt.spec.definition.Spec` into a :class:`StepFunction`.
A step function receives parallel lists of parameters, gradients and torch-style
per-parameter state dicts, and the hyperparameter values of their group. It
initialises empty state dicts, increments ``state["step"]`` before use, and writes the
new parameters and states in place. It is all-or-nothing: if it raises, no parameter
and no state has changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from portopt.spec.definition import Spec

ParamState = MutableMapping[str, Tensor]
Hypers = Mapping[str, float | Tensor]


class StepFunction(Protocol):
    """One optimizer step over a list of parameters of one param group."""

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
    ) -> None: ...


@dataclass(frozen=True)
class Backend:
    """A registered lowering target.

    ``device_types`` lists the torch device types it runs on; ``unavailable_reason``
    returns ``None`` when it can run here, else why not (missing package or device).
    """

    name: str
    summary: str
    device_types: tuple[str, ...]
    build: Callable[[Spec], StepFunction]
    unavailable_reason: Callable[[], str | None] = lambda: None
    priority: int = 0


def step_counter_dtype() -> torch.dtype:
    """torch.optim's dtype for ``state["step"]``: float64 under a float64 default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
