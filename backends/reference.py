"""The float64 reference backend: the living definition of every spec's semantics.

It interprets the spec on the host, in float64, one parameter at a time, with the
primitive rules of :mod:`portopt.lowering.torch_ops`. It is small and obviously right,
not fast. States are kept in float64 on the CPU whatever the parameter's dtype and
device; the new parameter is rounded once when it is written back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from portopt.lowering.backend import Backend, Hypers, ParamState, StepFunction, step_counter_dtype, with_inputs
from portopt.lowering.interpreter import Bindings, evaluate_step, initial_state_values, tensor_facts
from portopt.lowering.registry import register_backend
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec.definition import Spec

REFERENCE_DTYPE = torch.float64


def _host64(x: Tensor) -> Tensor:
    return x.detach().to(device="cpu", dtype=REFERENCE_DTYPE)


def build_reference_step(spec: Spec) -> StepFunction:
    """A step function that interprets ``spec`` in float64 on the CPU."""

    def step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[ParamState], hypers: Hypers) -> None:
        hypers = with_inputs(spec, hypers)
        pending: list[tuple[Tensor, ParamState, dict[str, Tensor], Tensor, float]] = []
        for param, grad, state in zip(params, grads, states, strict=True):
            if grad.is_sparse:
                raise ValueError(f"{spec.name}: sparse gradients are not supported")
            p64, g64 = _host64(param), _host64(grad)
            facts = tensor_facts(param)
            current = (
                {k: _host64(v) for k, v in state.items() if k != "step"}
                if state
                else initial_state_values(spec, TORCH_RULES, p64, g64, hypers, facts)
            )
            t = float(state["step"]) + 1.0 if state else 1.0
            new_states, new_param = evaluate_step(spec, TORCH_RULES, Bindings(p64, g64, t, hypers, current, facts))
            for name in new_states:
                new_states[name] = new_states[name].expand_as(current[name]).clone()
            pending.append((param, state, new_states, new_param, t))
        # Commit only once every parameter's step has been computed: all or nothing.
        with torch.no_grad():
            for param, state, new_states, new_param, t in pending:
                param.copy_(new_param.expand(param.shape))
                state.update(new_states)
                state["step"] = torch.tensor(t, dtype=step_counter_dtype())

    return step


REFERENCE = register_backend(
    Backend(
        name="reference",
        summary="float64 interpreter on the CPU: the definition of the semantics (slow)",
        device_types=("cpu", "cuda", "xpu", "npu", "mps"),
        build=build_reference_step,
        priority=-100,
    )
)
