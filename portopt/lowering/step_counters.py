"""The step counters of many parameters as one tensor: one increment per step, read once.

torch.optim keeps ``state["step"]`` as one 0-d tensor per parameter, and a step increments
each of them (``torch._foreach_add_`` on CPU is one kernel call per tensor, microseconds each)
and, for host-side step scalars, reads each of them. :class:`StepCounters` keeps the counters
of a fixed list of parameters as the elements of one 1-d tensor and puts a 0-d *view* of
element ``i`` into parameter ``i``'s state (:meth:`StepCounters.adopt`: the values are copied,
the dtype and device kept). Everything else sees what it saw before: ``state["step"]`` is a 0-d
tensor holding the count (``float()``, ``torch.save``, ``load_state_dict`` and torch.optim all
work on it; views share one storage, which ``torch.save`` writes once).

* :meth:`StepCounters.increment` adds 1 to every counter: one op;
* :meth:`StepCounters.values` returns the counts as Python floats, read from the tensor only
  when it changed since the last read (views share their base's version counter, so a change
  made through any ``state["step"]``, or to the base, is seen);
* :meth:`StepCounters.owns` tells whether the states still hold this object's views (a loaded
  checkpoint replaces them; the caller then adopts the new tensors again).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_

import torch
from torch import Tensor

from portopt.lowering.backend import ParamState


class StepCounters:
    """The ``step`` entries of ``states`` as views of one tensor (see the module docstring)."""

    def __init__(self, states: Sequence[ParamState]) -> None:
        first = states[0]["step"]
        self.counts = torch.empty(len(states), dtype=first.dtype, device=first.device)
        if len(states):
            torch.stack([s["step"].reshape(()) for s in states], out=self.counts)
        self.views: list[Tensor] = list(self.counts.unbind())
        self._version = -1
        self._values: list[float] = []

    @staticmethod
    def can_adopt(states: Sequence[ParamState]) -> bool:
        """Whether the counters share one dtype and device (a view of one tensor can replace each)."""
        if not states:
            return False
        first = states[0]["step"]
        return all(s["step"].dtype == first.dtype and s["step"].device == first.device for s in states)

    def adopt(self, states: Sequence[ParamState]) -> None:
        """Replace each state's ``step`` by this object's view (same value, dtype and device)."""
        for state, view in zip(states, self.views, strict=True):
            state["step"] = view

    def owns(self, steps: Sequence[Tensor]) -> bool:
        """Whether ``steps`` are exactly this object's views, in order."""
        return len(steps) == len(self.views) and all(map(is_, steps, self.views))

    def values(self) -> list[float]:
        """The counts as Python floats (read from the tensor only when it changed)."""
        version = self.counts._version
        if version != self._version:
            self._values = self.counts.tolist()
            self._version = version
        return self._values

    def increment(self) -> None:
        """Add 1 to every counter: one op (the next :meth:`values` reads the tensor once)."""
        self.counts.add_(1.0)
