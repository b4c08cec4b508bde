"""The NPU rule's step function: one spec, the kernels proven equivalent to it, the generic lowering for the rest.

:class:`NpuStep` steps a param group. It checks everything first
(:func:`~portopt.lowering.checks.check_step_inputs`), creates new states exactly as the
generic backend does (same layout and dtypes, so a run moves between kernel and generic
lowering step by step), then picks, per call, the first matched kernel
(:func:`~portopt.backends.npu.kernels.match_kernels`, in order of preference) that can
take it:

* the op is in the op table (:mod:`portopt.backends.npu.ops`: torch_npu registers it, or
  the op module has it);
* the SoC runs it natively, and the tensors' dtype is one the rule hands it (per kernel:
  :class:`~portopt.backends.npu.kernels.NpuKernel`);
* every parameter, gradient and state is contiguous, of the parameter's dtype and on the
  rule's device type; the kernel takes the hyperparameter values (``momentum > 0``);
* a **probe** passes: before a kernel is first used for a (op table, device type, dtype),
  it runs once on a 67-element problem for two steps and is compared with its own spec in
  float64 (:func:`portopt.backends.torch_fused.probe`'s procedure); a kernel that disagrees
  is not used for that dtype.

Otherwise the step runs on the generic lowering (:class:`~portopt.backends.torch_generic.TorchStep`)
on the same device; :attr:`NpuStep.last_choice` tells which kernel ran, or why none did.
Tensors are bucketed by (device, dtype, ``t``), one op call per bucket.

**Loss scaling is portopt's, never the op's.** torch_npu's ``_fused_adamw_`` accepts
GradScaler's ``grad_scale`` and ``found_inf`` and ignores them, so the rule hands every op
``None``. ``portopt.Optimizer`` unscales the gradients and skips an overflowing step before
it calls any backend (:mod:`portopt.optim.amp`); a caller of the step function itself may
pass ``grad_scale=``/``found_inf=`` as to torch's fused kernels, and the rule honours them
the same way: with ``found_inf`` non-zero nothing changes (parameters, states, step
counters); otherwise each gradient is divided by ``grad_scale`` in float32 and the
unscaled value is left in the gradient (as torch's fused kernels leave it in ``.grad``),
then the step runs on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from portopt.backends.npu.kernels import NpuKernel, NpuMatch
from portopt.backends.npu.ops import NpuOps
from portopt.backends.torch_fused import FusedKernel, probe
from portopt.backends.torch_generic import TorchStep
from portopt.lowering.backend import Hypers, ParamState
from portopt.lowering.checks import check_step_inputs
from portopt.spec.definition import Spec

OpsSource = Callable[[], "NpuOps | str"]
"""Where a step gets its op table at each call: the table, or why there is none."""


@functools.cache
def probe_kernel(ops: NpuOps, kernel: NpuKernel, device_type: str, dtype: torch.dtype) -> str | None:
    """``None`` if ``kernel`` from ``ops`` computes its spec on ``device_type``/``dtype`` (two steps), else what differs.

    The procedure is the torch fused rules' probe; cached here per op table as well."""
    launch = kernel.launch

    def call(
        params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], t: float, h: Mapping[str, float]
    ) -> None:
        launch(ops, params, grads, states, t, h)

    adapter = FusedKernel(kernel.spec, call, kernel.refuses)
    try:
        return probe.__wrapped__(adapter, device_type, dtype)
    except (RuntimeError, TypeError, ValueError) as exc:  # an op that raises is not used
        return f"{kernel.name} fails on {device_type} {dtype}: {type(exc).__name__}: {exc}"


def kernel_reason(
    ops: NpuOps, kernel: NpuKernel, device_type: str, dtype: torch.dtype, values: Mapping[str, float] | None = None
) -> str | None:
    """``None`` if the rule can hand ``dtype`` tensors on ``device_type`` to ``kernel`` from ``ops``, else why not.

    ``values`` are the kernel's hyperparameter values (``None``: not checked)."""
    soc_limits = ops.soc is not None or not ops.emulated  # an op module that names no SoC has no SoC limits
    reason = (
        ops.missing_reason(kernel.op)
        or (kernel.soc_reason(ops.soc) if soc_limits else None)
        or kernel.dtype_reason(dtype)
        or (kernel.refuses(values) if values is not None else None)
    )
    return reason or probe_kernel(ops, kernel, device_type, dtype)


class NpuStep:
    """Steps ``spec`` on the NPU kernels matched to it, through the op table of ``ops``; see the module docstring.

    ``device_type`` is where the kernels run (``"npu"``; ``"cpu"`` for the op contract).
    """

    def __init__(self, spec: Spec, matches: Sequence[NpuMatch], ops: OpsSource, device_type: str) -> None:
        self.spec = spec
        self.matches = tuple(matches)
        self.ops = ops
        self.device_type = device_type
        self.generic = TorchStep(spec)
        self.last_choice: str | None = None
        """The kernel the last call ran (its title), or why it ran on the generic lowering."""

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> None:
        check_step_inputs(self.spec, params, grads, states, hypers)
        if not params:
            return
        if found_inf is not None and bool(found_inf.item() != 0):
            self.last_choice = "skipped: found_inf is set (an overflow); nothing changed"
            return
        ops = self.ops()
        values = {name: float(hypers[name]) for name in self.spec.hyper_names}
        match, why = self._choose(ops, params, grads, states, values)
        if grad_scale is not None:
            _unscale_in_place(grads, grad_scale)
        if match is None:
            self.last_choice = f"generic lowering: {why}"
            self.generic.apply(params, grads, states, hypers)
            return
        self.last_choice = match.kernel.name
        assert isinstance(ops, NpuOps)
        self._launch(ops, match, params, grads, states, hypers, values)

    def _choose(
        self,
        ops: NpuOps | str,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        values: Mapping[str, float],
    ) -> tuple[NpuMatch | None, str]:
        """The first matched kernel that can take this call, or ``None`` and why none can."""
        if isinstance(ops, str):
            return None, ops
        if not self.matches:
            return None, f"no NPU kernel computes {self.spec.name}"
        reasons = []
        for match in self.matches:
            reason = self._refusal(ops, match, params, grads, states, values)
            if reason is None:
                return match, ""
            reasons.append(f"{match.kernel.op}: {reason}")
        return None, "; ".join(reasons)

    def _refusal(
        self,
        ops: NpuOps,
        match: NpuMatch,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        values: Mapping[str, float],
    ) -> str | None:
        kernel = match.kernel
        names = [user for _, user in match.binding.states]
        kernel_values = match.binding.kernel_hypers(values)
        checked: set[torch.dtype] = set()
        for param, grad, param_state in zip(params, grads, states, strict=True):
            if param.device.type != self.device_type:
                return f"the NPU rule runs {self.device_type} tensors, got a {param.device.type} parameter"
            tensors = [param, grad, *(param_state[n] for n in names if param_state)]
            if any(t.dtype != param.dtype for t in tensors):
                return "the NPU kernels need the gradient and states in the parameter's dtype"
            if not all(t.is_contiguous() for t in tensors):
                return "the NPU kernels need contiguous parameters, gradients and states"
            if param.dtype not in checked:
                checked.add(param.dtype)
                reason = kernel_reason(ops, kernel, self.device_type, param.dtype, kernel_values)
                if reason is not None:
                    return reason
        return None

    @torch.no_grad()
    def _launch(
        self,
        ops: NpuOps,
        match: NpuMatch,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        values: Mapping[str, float],
    ) -> None:
        kernel, binding = match.kernel, match.binding
        kernel_values = binding.kernel_hypers(values)
        new_states = [
            None if s else self.generic.initial_state(p, g, hypers)
            for p, g, s in zip(params, grads, states, strict=True)
        ]
        buckets: dict[tuple[torch.device, torch.dtype, float], list[int]] = {}
        for i, (param, param_state) in enumerate(zip(params, states, strict=True)):
            current = new_states[i] or param_state
            buckets.setdefault((param.device, param.dtype, float(current["step"]) + 1.0), []).append(i)
        # Everything is checked and created: from here on, write.
        for (_, _, t), members in buckets.items():
            per_param = [new_states[i] or states[i] for i in members]
            kernel.launch(
                ops,
                [params[i].detach() for i in members],
                [grads[i].detach() for i in members],
                [[s[user] for s in per_param] for _, user in binding.states],
                t,
                kernel_values,
            )
        for param_state, new in zip(states, new_states, strict=True):
            if new is not None:
                param_state.update(new)
        torch._foreach_add_([s["step"] for s in states], 1.0)


def _unscale_in_place(grads: Sequence[Tensor], grad_scale: Tensor) -> None:
    """``g ← g / S`` computed in float32 (float64 for float64 gradients), rounded once into each gradient."""
    from portopt.optim.amp import unscale_gradients  # the front end's unscaling, shared

    _, widened = unscale_gradients(grads, grad_scale)
    for grad, value in widened:
        grad.copy_(value)
