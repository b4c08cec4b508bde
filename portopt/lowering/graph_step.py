"""A step as one graph of torch ops: for ``torch.compile``, CUDA graphs and autograd.

The generic backends compute step scalars (``lr/(1 − β1^t)``, RAdam's ρ_t, ...) on the host in
float64 from ``float(state["step"])``: one host synchronisation per step, and Python floats that a
tracer would bake into its graph. :class:`GraphStep` computes the same scalars with torch ops
from the step *tensors*, so a step never leaves the device and never reads a tensor on the host:

* the scalars of every parameter of a device are one vector program over the stacked step
  counters ``t`` (shape ``(n,)``), in float64 (float32 on a device without float64), with the
  hyperparameters entering by arithmetic (``1·lr``), never by ``torch.tensor(lr)``, so that
  ``torch.compile`` keeps a changing float (an LR scheduler's) as a graph input instead of
  recompiling for each value; a tensor hyperparameter (``lr=torch.tensor(...)``) enters as
  itself, and with ``requires_grad`` its gradient flows;
* the element-wise work is the spec's generated per-tensor function
  (:mod:`portopt.lowering.codegen`): it loads every operand, computes out of place in the
  compute dtype (float32 for 16-bit storage) and stores each result once with ``copy_``.

Three uses, one lowering:

* **traced** (the front end under ``torch.compile``): :meth:`GraphStep.run` is plain torch code that
  dynamo traces into the caller's graph; Inductor fuses it into one-pass kernels. A ``where``
  on a step scalar (SGD's first momentum step, RAdam's rectification) computes both branches
  and selects, exactly, since both are side-effect-free arithmetic;
* **capturable** (``capturable=True`` on an accelerator): the same calls eagerly, with
  ``state["step"]`` on the parameter's device;
* **differentiable** (``differentiable=True``): the same calls with autograd on, each operand
  copied on load (so that writing the parameter back does not invalidate a saved tensor) and
  every step-scalar ``where`` resolved on the host first (the branch not taken is not built,
  so its NaN, e.g. RAdam's ``sqrt(ρ_t − 4)`` below the threshold, cannot reach a gradient as
  ``0·NaN``).

Arithmetic: the same operations as the host path, but the scalars are computed by torch's
float64 kernels rather than by Python, and are hoisted into the kernel as float32 after the
same rounding; results agree with the generic backend to the last bit or within a float32 ulp
of a scalar (not bit for bit: ``x ± 0·y`` is computed, not skipped, which differs only for an
inf/NaN ``y``, and Inductor fuses and reorders the element-wise arithmetic).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from portopt.lowering.backend import Hypers, ParamState
from portopt.lowering.checks import check_step_inputs
from portopt.lowering.codegen import KernelFunction, opmath_dtype, plan_kernel
from portopt.lowering.host import HOST_RULES, HostValue, evaluate_host
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import Op

InitialState = Callable[[Tensor, Tensor, Hypers], dict[str, Tensor]]
"""Creates a parameter's states (and ``step`` = 0) before its first step."""

_NUMBER_RIGHT = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
"""Ops whose torch rule takes a Python number as its second operand."""
_NO_FLOAT64 = frozenset({"mps"})


@dataclass(frozen=True)
class _Instr:
    """One node of the scalar program: a leaf (``op`` is CONST/HYPER/STEP) or an op on earlier slots."""

    op: Op
    value: float | str
    args: tuple[int, ...]


@dataclass(frozen=True)
class Lowered:
    """One spec lowered: its per-tensor kernel and the scalar program that computes the kernel's ``s``."""

    kernel: KernelFunction
    program: tuple[_Instr, ...]
    outputs: tuple[int, ...]
    """The program's slots of ``s[0]``, ``s[1]``, ..."""


def lower(spec: Spec, load: Callable[[Tensor], Tensor] | None = None) -> Lowered:
    """``spec``'s generated kernel (with ``load`` for its operands, default :func:`opmath`) and its scalar program."""
    plan = plan_kernel(spec)
    slots: dict[Expr, int] = {}
    program: list[_Instr] = []
    for node in plan.host_nodes:
        if node.op is Op.CONST:
            instr = _Instr(Op.CONST, float(node.value or 0.0), ())
        elif node.op is Op.HYPER:
            instr = _Instr(Op.HYPER, str(node.value), ())
        elif node.op is Op.STEP:
            instr = _Instr(Op.STEP, 0.0, ())
        else:
            instr = _Instr(node.op, 0.0, tuple(slots[a] for a in node.args))
        slots[node] = len(program)
        program.append(instr)
    kernel = plan.make_function() if load is None else plan.make_function(load=load)
    return Lowered(kernel, tuple(program), tuple(slots[e] for e in plan.scalars))


ScalarValue = float | Tensor


def _apply(op: Op, args: Sequence[ScalarValue], dtype: torch.dtype) -> ScalarValue:
    """``op`` on Python floats (host rules) or on tensors (torch rules); a number that a torch rule
    does not take becomes a tensor of ``dtype``."""
    if not any(isinstance(a, Tensor) for a in args):
        return HOST_RULES[op](*args)  # constants of the spec only: exact float64, folded by a tracer
    if op is Op.WHERE and not isinstance(args[0], Tensor):
        return args[1] if args[0] else args[2]
    like = next(a for a in args if isinstance(a, Tensor))
    fixed: list[ScalarValue] = []
    for position, a in enumerate(args):
        if isinstance(a, Tensor) or (position == 1 and op in _NUMBER_RIGHT):
            fixed.append(a)
        else:
            fixed.append(torch.full_like(like, float(a), dtype=dtype))
    return TORCH_RULES[op](*fixed)


def scalar_dtype(device: torch.device) -> torch.dtype:
    """The dtype step scalars are computed in on ``device``: float64 where the device has it."""
    return torch.float32 if device.type in _NO_FLOAT64 else torch.float64


def hyper_tensor(value: float | Tensor, one: Tensor) -> Tensor:
    """A hyperparameter as a 0-d tensor like ``one``: a tensor value as itself (gradients flow), a
    number by arithmetic (a tracer keeps a changing float as an input instead of a constant)."""
    if isinstance(value, Tensor):
        return value.to(device=one.device, dtype=one.dtype).reshape(())
    return one * value


class GraphStep:
    """The step of ``spec`` as torch ops over step tensors (see the module docstring).

    ``initial_state(param, grad, hypers)`` creates a parameter's states before its first step
    (the backend's own layout, so that a run can move between backends).
    """

    def __init__(self, spec: Spec, initial_state: InitialState) -> None:
        self.spec = spec
        self.initial_state = initial_state
        self.lowered = lower(spec)
        self._branches = _step_scalar_wheres(spec)

    # eager entry points ---------------------------------------------------------------
    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        differentiable: bool = False,
        device_steps: bool = False,
    ) -> None:
        """One step, eagerly (the :class:`~portopt.lowering.backend.StepFunction` contract, all or nothing)."""
        self.prepare(params, grads, states, hypers, device_steps=device_steps, differentiable=differentiable)
        if not params:
            return
        steps = [s["step"] for s in states]
        tensors = [[s[n] for n in self.spec.state_names] for s in states]
        with torch.set_grad_enabled(differentiable):
            self.run(params, grads, steps, tensors, hypers, differentiable=differentiable)

    def prepare(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        device_steps: bool = False,
        differentiable: bool = False,
    ) -> None:
        """Check the inputs and create the states of parameters stepped for the first time.

        With ``device_steps``, ``step`` lives on each parameter's device (a step counter on the
        host is moved there), as torch.optim keeps it for ``capturable=True``.
        """
        check_step_inputs(self.spec, params, grads, states, hypers)
        if differentiable and any(s and s["step"].requires_grad for s in states):
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        with torch.no_grad():
            for param, grad, state in zip(params, grads, states, strict=True):
                if not state:
                    state.update(self.initial_state(param.detach(), grad.detach(), hypers))
                if device_steps and state["step"].device != param.device:
                    state["step"] = state["step"].to(param.device)

    # the graph ----------------------------------------------------------------------------
    def run(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        steps: Sequence[Tensor],
        states: Sequence[Sequence[Tensor]],
        hypers: Mapping[str, float | Tensor],
        *,
        differentiable: bool = False,
    ) -> None:
        """The step as torch ops on prepared inputs (``states[i]``: parameter ``i``'s states in the
        spec's order); traceable, with no host synchronisation unless ``differentiable``."""
        torch._foreach_add_(list(steps), 1.0)
        for lowered, indices in self._units(steps, hypers, differentiable):
            scalars = self.scalars([steps[i] for i in indices], hypers, lowered)
            for row, i in enumerate(indices):
                s = scalars[row].to(device=params[i].device, dtype=opmath_dtype(params[i].dtype))
                lowered.kernel(params[i], grads[i], *states[i], s)

    def _units(
        self, steps: Sequence[Tensor], hypers: Mapping[str, float | Tensor], differentiable: bool
    ) -> list[tuple[Lowered, list[int]]]:
        """The parameters by (lowering, device): one lowering, or (differentiable) one per taken branch set."""
        if not differentiable:
            return [(self.lowered, indices) for indices in _by_device(steps)]
        floats = {k: float(v.detach() if isinstance(v, Tensor) else v) for k, v in hypers.items()}
        units: dict[tuple[object, ...], tuple[Lowered, list[int]]] = {}
        for i, step in enumerate(steps):
            taken = self._taken(float(step), floats)
            key = (step.device, taken)
            if key not in units:
                units[key] = (_differentiable_lowering(_resolved(self.spec, self._branches, taken)), [])
            units[key][1].append(i)
        return list(units.values())

    def _taken(self, t: float, hypers: Mapping[str, float]) -> tuple[bool, ...]:
        """Which branch each step-scalar ``where`` takes at step ``t`` (host values)."""
        if not self._branches:
            return ()
        values: dict[Expr, HostValue] = {}
        conditions = [w.args[0] for w in self._branches]
        evaluate_host(walk(conditions), t, hypers, values)
        return tuple(bool(values[c]) for c in conditions)

    def scalars(
        self, steps: Sequence[Tensor], hypers: Mapping[str, float | Tensor], lowered: Lowered | None = None
    ) -> Tensor:
        """The kernel argument ``s`` of each parameter: a ``(len(steps), K)`` tensor, from the (already
        incremented) step counters of one device."""
        lowered = lowered or self.lowered
        first = steps[0]
        dtype = scalar_dtype(first.device)
        t = torch.stack([s.reshape(()) for s in steps]).to(dtype)
        one = torch.ones((), dtype=dtype, device=first.device)
        values: list[ScalarValue] = []
        for instr in lowered.program:
            if instr.op is Op.CONST:
                values.append(float(instr.value))
            elif instr.op is Op.HYPER:
                values.append(hyper_tensor(hypers[str(instr.value)], one))
            elif instr.op is Op.STEP:
                values.append(t)
            else:
                values.append(_apply(instr.op, [values[a] for a in instr.args], dtype))
        columns = [_column(values[k], t) for k in lowered.outputs]
        if not columns:
            return t.new_zeros((len(steps), 1))  # a kernel always takes ``s``
        return torch.stack(columns, dim=-1)


def _column(value: ScalarValue, t: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        return torch.full_like(t, value)
    return value.to(t.dtype).expand(t.shape)


def _by_device(steps: Sequence[Tensor]) -> list[list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for index, step in enumerate(steps):
        groups.setdefault(step.device, []).append(index)
    return list(groups.values())


def _load_copy(x: Tensor) -> Tensor:
    """A load that never aliases its storage (autograd saves it; the store overwrites the storage)."""
    return x.float() if x.dtype not in (torch.float32, torch.float64) else x.clone()


@functools.lru_cache(maxsize=256)
def _differentiable_lowering(spec: Spec) -> Lowered:
    """``spec`` lowered with copying loads."""
    return lower(spec, load=_load_copy)


def _step_scalar_wheres(spec: Spec) -> tuple[Expr, ...]:
    """Every ``where`` whose condition depends only on the step and the hyperparameters."""
    return tuple(n for n in walk(list(spec.roots)) if n.op is Op.WHERE and spec.kind(n.args[0]).is_step_scalar)


@functools.lru_cache(maxsize=256)
def _resolved(spec: Spec, branches: tuple[Expr, ...], taken: tuple[bool, ...]) -> Spec:
    """``spec`` with each of ``branches`` replaced by the branch ``taken`` says."""
    choice = dict(zip(branches, taken, strict=True))
    memo: dict[Expr, Expr] = {}
    for node in walk(list(spec.roots)):
        if node in choice:
            memo[node] = memo[node.args[1] if choice[node] else node.args[2]]
        elif node.args:
            args = tuple(memo[a] for a in node.args)
            same = all(x is y for x, y in zip(args, node.args, strict=True))
            memo[node] = node if same else Expr(node.op, args, node.value, node.label)
        else:
            memo[node] = node
    return Spec(
        name=spec.name,
        title=spec.title,
        hyperparameters=spec.hyperparameters,
        states=spec.states,
        updates=tuple((name, memo[e]) for name, e in spec.updates),
        param_update=memo[spec.param_update],
        options=spec.options,
    )
