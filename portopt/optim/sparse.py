"""Sparse gradients, taken as torch.optim takes them.

A sparse (COO) gradient ``g`` with entries at indices ``I`` is stepped in one of two ways, as
the optimizer class says (:attr:`Optimizer.sparse_gradients <portopt.optim.Optimizer.sparse_gradients>`):

* ``"dense"`` (torch.optim.SGD): the step of the densified gradient (zero outside ``I``). This is
  what torch.optim.SGD computes with a sparse gradient, momentum included (its momentum buffer
  is a sparse tensor; portopt's is dense, with the same values). ``weight_decay`` is refused, as
  torch.optim.SGD fails on it (``add(sparse, dense)``).
* ``"rows"`` (torch.optim.Adagrad, SparseAdam): only the entries at ``I`` move. The parameter's
  and each element-wise state's entries at ``I`` are gathered, stepped as a dense problem of
  ``nnz`` rows (the step counter counts every step), and scattered back; entries outside ``I``
  keep their values, also where a dense zero gradient would have changed them (Adagrad with
  ``eps=0``, Adam's moment decay). Duplicate indices are summed first (``coalesce``).
  ``weight_decay`` is refused as torch.optim.Adagrad refuses it.

Anything else raises torch.optim's ``RuntimeError`` (``"Adam does not support sparse gradients,
please consider SparseAdam instead"``); so do sparse gradients with ``fused=True``,
``capturable``/``differentiable``, complex parameters and precision policies. Under
``torch.compile`` a group with a sparse gradient is stepped eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from portopt.lowering.backend import ParamState
from portopt.lowering.checks import SparseGradientError
from portopt.optim import amp
from portopt.optim.initial_state import eager_state
from portopt.optim.torch_flags import Mode
from portopt.precision.policy import PrecisionPolicy
from portopt.spec.definition import Spec
from portopt.spec.symbols import Layout


@dataclass(frozen=True)
class Where:
    """Who takes the gradients: the optimizer class, its sparse semantics, torch's wording."""

    optimizer: str
    semantics: str | None
    hint: str
    dense_gradients: bool
    group: int


def take(
    where: Where,
    spec: Spec,
    group: Mapping[str, Any],
    hypers: Mapping[str, Any],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[ParamState],
    mode: Mode,
    policy: PrecisionPolicy,
) -> tuple[list[Tensor], list[Tensor], list[ParamState], list[Callable[[], None]]]:
    """The step's inputs with every sparse gradient taken as ``where.semantics`` says (module doc), and
    what to do after the step (scatter the gathered rows back). Raises before anything is written."""
    sparse = [i for i, g in enumerate(grads) if g.layout != torch.strided]
    if not where.dense_gradients and len(sparse) < len(grads):
        raise SparseGradientError(
            f"{where.optimizer} does not support dense gradients, please consider "
            f"{where.optimizer.removeprefix('Sparse')} instead"
        )
    if not sparse:
        return list(params), list(grads), list(states), []
    _check(where, spec, hypers, [params[i] for i in sparse], [grads[i] for i in sparse], mode, policy)
    new_params, new_grads, new_states = list(params), list(grads), list(states)
    after: list[Callable[[], None]] = []
    for i in sparse:
        grad = grads[i].coalesce()  # duplicate indices summed, as torch does
        if where.semantics == "dense":
            for name, value in list(states[i].items()):  # a torch.optim.SGD checkpoint's sparse momentum buffer
                if value.layout != torch.strided:
                    states[i][name] = value.to_dense()
            new_grads[i] = grad.to_dense()
            continue
        if not states[i]:
            states[i].update(eager_state(spec, group, params[i]))
        new_params[i], new_grads[i], new_states[i], scatter = _rows(spec, params[i], grad, states[i])
        after.append(scatter)
    return new_params, new_grads, new_states, after


def _check(
    where: Where,
    spec: Spec,
    hypers: Mapping[str, Any],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    mode: Mode,
    policy: PrecisionPolicy,
) -> None:
    if where.semantics is None:
        raise SparseGradientError(f"{where.optimizer} does not support sparse gradients{where.hint}")
    if mode is Mode.FUSED:
        raise SparseGradientError(
            f"`fused=True` does not support sparse gradients ({where.optimizer}, param group {where.group}; "
            "torch.optim: `_fused_sgd` does not support sparse gradients)"
        )
    refused = "precision policies" if policy is not amp.DEFAULT else f"{mode.value}=True" if mode.graph else ""
    if any(p.is_complex() for p in params):
        refused = "complex parameters"
    if refused:
        raise SparseGradientError(f"{where.optimizer}: sparse gradients are not supported with {refused}")
    for grad in grads:
        if grad.layout != torch.sparse_coo:
            raise SparseGradientError(
                f"{where.optimizer}: a {grad.layout} gradient; sparse gradients are supported in torch.sparse_coo "
                "layout (Tensor.to_sparse_coo())"
            )
    decay = hypers.get("weight_decay", 0.0)
    if bool(decay != 0):
        if where.semantics == "rows":
            raise SparseGradientError("weight_decay option is not compatible with sparse gradients")
        raise SparseGradientError(
            f"{where.optimizer}: weight_decay is not supported with sparse gradients (torch.optim.{where.optimizer} "
            "fails on it: add(sparse, dense) is not supported); use weight_decay=0 or dense gradients"
        )
    if any(s.layout not in (Layout.ELEMENTWISE, Layout.TENSOR) for s in spec.states) and where.semantics == "rows":
        raise SparseGradientError(f"{spec.name}: factored states cannot be updated row by row")


def _rows(
    spec: Spec, param: Tensor, grad: Tensor, state: ParamState
) -> tuple[Tensor, Tensor, ParamState, Callable[[], None]]:
    """The entries of ``param`` and its element-wise states at ``grad``'s indices, and their write-back."""
    index = tuple(grad.indices())
    rows = param.detach()[index]
    gathered: ParamState = dict(state)
    names = [s.name for s in spec.states if s.layout is Layout.ELEMENTWISE]
    for name in names:
        gathered[name] = state[name][index]

    def scatter() -> None:
        with torch.no_grad():
            param.index_put_(index, rows)
            for name in names:
                state[name].index_put_(index, gathered[name])
        for name, value in gathered.items():  # entries the step replaced (a backend's step-counter views)
            if name not in names and state.get(name) is not value:
                state[name] = value

    return rows, grad.values(), gathered, scatter
