"""ONNX's own optimizer ops, put under test: ``ai.onnx.preview.training`` Adam, Adagrad and Momentum.

onnxruntime implements none of them (its session refuses the model: "not a registered
function/op"; its discontinued training build had optimizer ops of its own, com.microsoft's); the
reference evaluator of the ``onnx`` package (:class:`onnx.reference.ReferenceEvaluator`) does, in
numpy, following the operators' documented pseudo code. Each class here is a
torch.optim-style optimizer that steps every parameter through a one-node ONNX model of the
op, so the conformance suite runs it like any third-party optimizer::

    portopt conformance --impl onnx.preview                 # every algorithm it has
    portopt conformance --impl onnx.preview:AdamW@adamw     # one class
    portopt conformance --impl onnx.preview:Adam@adam:first_t=1

The ops' inputs are ``R`` (learning rate), ``T`` (the update count), the tensor ``X``, its
gradient ``G`` and its state; the rest are attributes. With torch's hyperparameters::

    Adam      alpha = β1, beta = β2, epsilon = ε, norm_coefficient = λ (Adam's L2 decay,
              g + λ·p), or norm_coefficient_post = lr·λ (AdamW: X ← (1 − lr·λ)·X after the update)
    Adagrad   decay_factor = lr_decay, epsilon = ε, norm_coefficient = λ; H starts at
              initial_accumulator_value
    Momentum  alpha = momentum, beta = 1 − dampening, norm_coefficient = λ,
              mode = "nesterov" or "standard" (``mode=`` forces one)

``T`` is the number of updates done before this one (ONNX: "the number of training
iterations conducted"; Momentum's "should be zero in the first training iteration"), so the
first update gets ``T = 0``; ``first_t=1`` hands it ``T = 1`` instead (Adagrad's doc allows
both). What the ops then compute, against torch's arithmetic:

* **Adam**: ``X − R·sqrt(1 − β^T)/(1 − α^T) · V/(sqrt(H) + ε)``: ε is added to ``sqrt(H)``
  *before* the bias correction; with ``T = t − 1`` the bias correction is one step behind and
  absent at the first step (``T > 0 ? ... : R``); AdamW's decay multiplies the *updated*
  value. The diagnosis names each of these conventions.
* **Adagrad** with ``T = t − 1``: torch's Adagrad exactly (``lr/(1 + (t − 1)·lr_decay)``,
  ε outside the square root).
* **Momentum** with ``T = t − 1``: torch's SGD with momentum, Nesterov's too: the first
  update takes the whole gradient (``beta_adjusted = 1``), as torch's first buffer is ``g``.

Parameters in float16 or bfloat16 are stepped in float32 (the ops take float and double) and
rounded once on store; states are kept in float32 (float64 for float64 parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper
from onnx.reference import ReferenceEvaluator

DOMAIN = "ai.onnx.preview.training"
_MODES = ("standard", "nesterov")


def preview_model(op_type: str, states: tuple[str, ...], attributes: Mapping[str, Any], elem: int) -> onnx.ModelProto:
    """A one-node model of ``op_type`` for one tensor: inputs R, T, X, G, states; outputs X_new, states_new."""
    outputs = ["X_new", *(f"{s}_new" for s in states)]
    node = helper.make_node(op_type, ["R", "T", "X", "G", *states], outputs, domain=DOMAIN, **attributes)
    inputs = [
        helper.make_tensor_value_info("R", onnx.TensorProto.FLOAT, []),
        helper.make_tensor_value_info("T", onnx.TensorProto.INT64, []),
        *(helper.make_tensor_value_info(n, elem, None) for n in ("X", "G", *states)),
    ]
    graph = helper.make_graph(
        [node], f"preview_{op_type}", inputs, [helper.make_tensor_value_info(n, elem, None) for n in outputs]
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


class _PreviewOptimizer(torch.optim.Optimizer):
    """One ONNX preview-training op per parameter, evaluated by :class:`onnx.reference.ReferenceEvaluator`.

    A subclass names the op, the spec's names of its state inputs (in the op's order), the
    attributes for a param group and each state's initial value.
    """

    op_type = ""
    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], first_t: int) -> None:
        if first_t not in (0, 1):
            raise ValueError(f"first_t must be 0 or 1 (the T of the first update), got {first_t!r}")
        self.first_t = first_t
        self._evaluators: dict[tuple[object, ...], ReferenceEvaluator] = {}
        super().__init__(params, defaults)

    def attributes(self, group: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def keeps(self, name: str, group: Mapping[str, Any]) -> bool:
        """Whether state ``name`` is kept for this group (else the op reads zeros and its new value is dropped)."""
        return True

    def initial(self, name: str, group: Mapping[str, Any]) -> float:
        """The value state ``name`` starts at."""
        return 0.0

    def _evaluator(self, group: Mapping[str, Any], elem: int) -> ReferenceEvaluator:
        attributes = self.attributes(group)
        key = (tuple(sorted(attributes.items())), elem)
        if key not in self._evaluators:
            self._evaluators[key] = ReferenceEvaluator(preview_model(self.op_type, self.state_names, attributes, elem))
        return self._evaluators[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            kept = [name for name in self.state_names if self.keeps(name, group)]
            for p in group["params"]:
                if p.grad is None:
                    continue
                wide = torch.float64 if p.dtype == torch.float64 else torch.float32
                elem = onnx.TensorProto.DOUBLE if wide == torch.float64 else onnx.TensorProto.FLOAT
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for name in kept:
                        state[name] = torch.full_like(p, self.initial(name, group), dtype=wide)
                t = float(state["step"]) + 1.0
                feeds = {
                    "R": np.asarray(group["lr"], dtype=np.float32),
                    "T": np.asarray(int(t) - 1 + self.first_t, dtype=np.int64),
                    "X": p.detach().to(device="cpu", dtype=wide).numpy(),
                    "G": p.grad.detach().to(device="cpu", dtype=wide).numpy(),
                }
                for name in self.state_names:
                    held = state[name] if name in kept else torch.zeros_like(p, dtype=wide)
                    feeds[name] = held.detach().to(device="cpu", dtype=wide).numpy()
                new_x, *new_states = self._evaluator(group, elem).run(None, feeds)
                p.copy_(torch.from_numpy(np.asarray(new_x)))
                for name, value in zip(self.state_names, new_states, strict=True):
                    if name in kept:
                        state[name].copy_(torch.from_numpy(np.asarray(value)))
                state["step"].fill_(t)
        return loss


class Adam(_PreviewOptimizer):
    """ONNX's ``Adam`` op; ``weight_decay`` is its ``norm_coefficient`` (Adam's coupled L2 decay), or with
    ``decoupled_weight_decay`` its ``norm_coefficient_post = lr·weight_decay``. Defaults are the op's."""

    op_type = "Adam"
    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool | None = None,
        first_t: int = 0,
    ) -> None:
        decoupled = self.decoupled if decoupled_weight_decay is None else decoupled_weight_decay
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "decoupled": decoupled}
        super().__init__(params, defaults, first_t)

    def attributes(self, group: Mapping[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        decay = float(group["weight_decay"])
        return {
            "alpha": float(beta1),
            "beta": float(beta2),
            "epsilon": float(group["eps"]),
            "norm_coefficient": 0.0 if group["decoupled"] else decay,
            "norm_coefficient_post": float(group["lr"]) * decay if group["decoupled"] else 0.0,
        }


class AdamW(Adam):
    """ONNX's ``Adam`` op as AdamW: ``norm_coefficient_post = lr·weight_decay`` (decay after the update)."""

    decoupled = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
        *,
        first_t: int = 0,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True, first_t=first_t)


class Adagrad(_PreviewOptimizer):
    """ONNX's ``Adagrad`` op; ``lr_decay`` is its ``decay_factor``, ``weight_decay`` its ``norm_coefficient``."""

    op_type = "Adagrad"
    state_names = ("sum",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-6,
        *,
        first_t: int = 0,
    ) -> None:
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "eps": eps,
        }
        super().__init__(params, defaults, first_t)

    def attributes(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "decay_factor": float(group["lr_decay"]),
            "epsilon": float(group["eps"]),
            "norm_coefficient": float(group["weight_decay"]),
        }

    def initial(self, name: str, group: Mapping[str, Any]) -> float:
        return float(group["initial_accumulator_value"])


class Momentum(_PreviewOptimizer):
    """ONNX's ``Momentum`` op as SGD: ``alpha = momentum``, ``beta = 1 − dampening``, ``mode`` from
    ``nesterov`` unless ``mode=`` forces it. With ``momentum = 0`` no buffer is kept (as torch)."""

    op_type = "Momentum"
    state_names = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        mode: str | None = None,
        first_t: int = 0,
    ) -> None:
        if mode is not None and mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        chosen = mode or ("nesterov" if nesterov else "standard")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "mode": chosen}, first_t)

    def attributes(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "alpha": float(group["momentum"]),
            "beta": 1.0 - float(group["dampening"]),
            "mode": group["mode"],
            "norm_coefficient": float(group["weight_decay"]),
        }

    def keeps(self, name: str, group: Mapping[str, Any]) -> bool:
        return bool(group["momentum"])
