"""Memory accounting: the bytes a precision policy spends on parameters, gradients and states.

Two views:

* :func:`bytes_per_parameter`: bytes per parameter element of a large tensor, from the
  spec's declared states. An element-wise state costs its storage dtype's size; an 8-bit one
  ``1 + 4/B`` bytes (a code, and a float32 absmax per block of ``B``). Per-tensor states
  (``Layout.TENSOR``) and the step counter cost bytes per *tensor*, factored states
  (``ROW``/``COL``) depend on the shape: both are 0 per element here and described in ``notes``.
  A shape-dependent spec (Adafactor) is counted for a large matrix: its vector-only states cost
  nothing there (noted).
  Mixed precision Adam (bf16 params and grads, fp32 master and moments): ``2 + 2 + 4 + 4 + 4 = 16``.
* :func:`memory_for_params`: exact bytes for given parameters (real, or ``device="meta"``
  tensors of the model's shapes), with the small-tensor rule of 8-bit states, factored state
  shapes, per-tensor states, one step counter per parameter tensor (torch.optim's float32
  ``state["step"]``) and one copy of each 8-bit map per device.

Gradients are counted in the parameter dtype, one per parameter (what autograd allocates).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from portopt.lowering.backend import step_counter_dtype
from portopt.lowering.interpreter import state_shape, tensor_facts
from portopt.precision.policy import PrecisionPolicy, dtype_name
from portopt.precision.quantize import map_values
from portopt.precision.signs import nonnegative_states
from portopt.precision.storage import state_format
from portopt.spec.definition import Spec
from portopt.spec.symbols import Layout, StateDecl


def step_bytes() -> int:
    """The step counter: a 0-d tensor per parameter tensor, in torch.optim's dtype (float32 normally)."""
    return step_counter_dtype().itemsize


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by component: per parameter element (``per_parameter``) or exact totals.

    ``states`` maps each state name to its bytes, in declaration order; ``maps`` counts the
    shared 8-bit quantisation maps; ``notes`` describe costs not counted per element.
    """

    per_parameter: bool
    params: float
    grads: float
    master: float
    states: dict[str, float]
    step: float = 0.0
    maps: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def state_total(self) -> float:
        """The optimizer's own bytes: master, states, step counters and maps."""
        return self.master + sum(self.states.values()) + self.step + self.maps

    @property
    def total(self) -> float:
        return self.params + self.grads + self.state_total

    def as_dict(self) -> dict[str, float]:
        """``params``, ``grads``, ``master``, ``state.<name>`` for each state, ``step``, ``maps``, ``total``."""
        rows = {"params": self.params, "grads": self.grads, "master": self.master}
        rows.update({f"state.{name}": value for name, value in self.states.items()})
        rows.update({"step": self.step, "maps": self.maps, "total": self.total})
        return rows


def bytes_per_parameter(spec: Spec, policy: PrecisionPolicy, param_dtype: torch.dtype | None = None) -> MemoryBreakdown:
    """Bytes per parameter element of a large tensor (module doc); ``param_dtype`` defaults to the
    policy's expected dtype, else float32."""
    policy.check_states(spec.state_names, spec.name)
    dtype = param_dtype or policy.param_dtype or torch.float32
    nonnegative = nonnegative_states(spec)
    large = (max(policy.min_8bit_size, 1),)  # a tensor big enough for every 8-bit rule
    states: dict[str, float] = {}
    notes = [f"step: {step_bytes()} bytes per parameter tensor"]
    present = _present_for_matrices(spec, dtype)
    for decl in spec.states:
        fmt = state_format(policy, decl, large, dtype, nonnegative=decl.name in nonnegative)
        if decl.name not in present:
            states[decl.name] = 0.0
            notes.append(f"{decl.name}: not kept for a large matrix (only where {_condition(spec, decl)})")
            continue
        if decl.layout is Layout.ELEMENTWISE:
            states[decl.name] = 1 + 4 / fmt.block_size if fmt.quantized else float(fmt.dtype.itemsize)
            continue
        states[decl.name] = 0.0
        if decl.layout is Layout.TENSOR:
            notes.append(f"{decl.name}: {fmt.dtype.itemsize} bytes per parameter tensor")
        else:
            notes.append(f"{decl.name}: one value per {decl.layout.value} ({dtype_name(fmt.dtype)}), depends on shapes")
    size = float(dtype.itemsize)
    master = 4.0 if policy.needs_master(dtype) else 0.0
    return MemoryBreakdown(True, size, size, master, states, notes=tuple(notes))


def _present_for_matrices(spec: Spec, dtype: torch.dtype) -> set[str]:
    """The states a large matrix keeps (every state, for a spec that is not shape-dependent)."""
    if not spec.shape_dependent:
        return set(spec.state_names)
    return set(spec.specialize(tensor_facts(torch.empty((4096, 4096), dtype=dtype, device="meta"))).state_names)


def _condition(spec: Spec, decl: StateDecl) -> str:
    from portopt.spec.render import render_expr

    return "its when= holds" if decl.when is None else render_expr(decl.when, spec)


def memory_for_params(spec: Spec, policy: PrecisionPolicy, params: Iterable[Tensor]) -> MemoryBreakdown:
    """Exact bytes for ``params`` (each with a gradient of its dtype) under ``policy`` (module doc)."""
    policy.check_states(spec.state_names, spec.name)
    nonnegative = nonnegative_states(spec)
    totals = {"params": 0, "grads": 0, "master": 0, "step": 0}
    states = dict.fromkeys(spec.state_names, 0)
    maps_used: set[tuple[str, torch.device]] = set()
    for param in params:
        size = param.numel() * param.element_size()
        totals["params"] += size
        totals["grads"] += size
        if policy.needs_master(param.dtype):
            totals["master"] += 4 * param.numel()
        totals["step"] += step_bytes()
        kept = spec.specialize(tensor_facts(param)) if spec.shape_dependent else spec
        for decl in kept.states:
            fmt = state_format(policy, decl, param.shape, param.dtype, nonnegative=decl.name in nonnegative)
            states[decl.name] += fmt.nbytes(state_shape(decl, param.shape))
            if fmt.quantized is not None:
                maps_used.add((fmt.quantized, param.device))
    maps = sum(4 * len(map_values(name)) for name, _ in maps_used)
    return MemoryBreakdown(
        False,
        totals["params"],
        totals["grads"],
        totals["master"],
        {name: float(value) for name, value in states.items()},
        step=totals["step"],
        maps=maps,
    )
