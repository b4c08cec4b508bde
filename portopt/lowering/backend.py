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
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from portopt.spec.definition import Spec

if TYPE_CHECKING:
    from portopt.lowering.graph_step import GraphStep
    from portopt.precision.policy import PrecisionPolicy

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


class PolicyStepFunction(Protocol):
    """A step that stores states as a precision policy says (see :attr:`Backend.build_with_policy`).

    ``params`` are the tensors updated (a parameter, or its float32 master copy); ``param_dtypes``
    are the dtypes of the model's parameters, for which the policy chooses each state's storage
    (``None``: those of ``params``); ``indices`` number the parameters stably across the whole
    optimizer, for the noise of stochastic rounding (``None``: their positions in ``params``).
    States may hold :class:`~portopt.precision.quantize.Q8State` values.
    """

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        param_dtypes: Sequence[torch.dtype] | None = None,
        indices: Sequence[int] | None = None,
    ) -> None: ...


def no_step() -> None:
    """The prepared step of an empty parameter list."""


class PreparedStep:
    """A step function that checks and plans first (:meth:`prepare`), then runs what it prepared.

    Calling it is ``prepare(...)()``; the front end calls :meth:`prepare` itself with
    ``only_if_planned=True`` to learn, at the cost of a cheap confirmation, whether a plan built for
    these very inputs can run unchecked. Keywords beyond those of :class:`StepFunction` (a policy
    step's ``param_dtypes`` and ``indices``) are passed on to :meth:`prepare`.
    """

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        **options: Any,
    ) -> None:
        run = self.prepare(params, grads, states, hypers, **options)
        assert run is not None  # not only_if_planned: a step is always prepared
        run()

    def prepare(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        only_if_planned: bool = False,
    ) -> Callable[[], None] | None:
        """Check the inputs and plan the step; nothing is written. Returns the step itself, or, with
        ``only_if_planned``, ``None`` when the inputs are not those of a plan already built."""
        raise NotImplementedError


@dataclass(frozen=True)
class Backend:
    """A registered lowering target.

    ``device_types`` lists the torch device types it runs on; ``unavailable_reason``
    returns ``None`` when it can run here, else why not (missing package or device).

    Precision policies (:mod:`portopt.precision`): the front end handles master weights and
    loss scaling for every backend (a backend steps the master copy, with unscaled
    gradients). A backend without ``build_with_policy`` creates states as torch.optim does
    (in the stepped tensor's dtype, per-tensor states in at least float32) and serves only
    the policies that ask for exactly that; ``build_with_policy(spec, policy)`` returns a
    :class:`PolicyStepFunction` that stores every state as ``policy`` says (bf16, 8-bit,
    stochastic rounding). The front end refuses, with the reason, a policy that a named
    backend cannot honour; ``backend="auto"`` then picks the best usable backend that can.

    Automatic selection (:func:`portopt.backends.select_backend`) takes, per device, spec
    and param-group size, the usable backend of highest ``priority`` with ``auto_select``,
    whose ``unsupported_reason(spec)`` is ``None`` and whose ``min_auto_numel()`` the group
    reaches. ``build(spec)`` raises ``ValueError`` with that reason for a spec it does not
    lower.

    Implementations torch.optim lets a user pin: ``build_per_tensor(spec)`` steps one tensor at a
    time in torch.optim's single-tensor op order (``foreach=False``); ``build_graph(spec)`` returns
    the :class:`~portopt.lowering.graph_step.GraphStep` the front end runs under ``torch.compile``,
    for ``capturable=True`` and for ``differentiable=True`` (step scalars as tensors, no host
    synchronisation). A backend without one is run eagerly in those cases (outside the traced
    graph) or refused.
    """

    name: str
    summary: str
    device_types: tuple[str, ...]
    build: Callable[[Spec], StepFunction]
    unavailable_reason: Callable[[], str | None] = lambda: None
    priority: int = 0
    auto_select: bool = True
    """Whether ``backend="auto"`` may choose it; ``False`` keeps it reachable by name only."""
    build_with_policy: Callable[[Spec, PrecisionPolicy], PolicyStepFunction] | None = None
    unsupported_reason: Callable[[Spec], str | None] = lambda spec: None
    """``None`` if the backend lowers ``spec``, else why not (a vendor kernel computes something else)."""
    min_auto_numel: Callable[[], int] = lambda: 0
    """``backend="auto"`` takes it only for a group with at least this many elements on one device:
    its one-off cost (compiling) pays for itself only over enough bytes."""
    label: str = ""
    """Said with the name wherever results are reported, when the name alone would mislead (an
    emulation of a vendor's ops says that it is one, not the hardware)."""
    torch_flag: str = ""
    """The torch.optim flag that asks for this kind of implementation: ``"fused"`` (one pass over each
    tensor: a vendor kernel or a compiled one; ``fused=True``), ``"foreach"`` (multi-tensor ops;
    ``foreach=True``), or ``""``."""
    build_per_tensor: Callable[[Spec], StepFunction] | None = None
    build_graph: Callable[[Spec], GraphStep] | None = None
    shards: bool = False
    """Whether its eager step takes the local pieces of sharded parameters (:mod:`portopt.distributed`) with
    reductions and shape facts of the logical tensor. A backend without it steps a sharded group only when
    the spec is element-wise throughout (no reduction, no shape fact), where local pieces are exact."""


def with_inputs(spec: Spec, hypers: Hypers) -> Hypers:
    """``hypers`` with the default of every declared input the step was not given (inputs travel with the
    hyperparameter values: a step function reads both from one mapping)."""
    if not spec.inputs or all(name in hypers for name in spec.input_names):
        return hypers
    return {**spec.input_defaults(), **hypers}


def step_counter_dtype() -> torch.dtype:
    """torch.optim's dtype for ``state["step"]``: float64 under a float64 default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
