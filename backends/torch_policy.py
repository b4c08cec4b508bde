"""The generic torch step under a precision policy: bf16 and 8-bit states, stochastic rounding.

:class:`PolicyStep` is the generic backend's :class:`~portopt.backends.torch_generic.TorchStep`
(same program, host scalars, fused forms and in-place reuse) with three hooks, so that a
state is read and written in its storage form and the arithmetic stays at compute precision:

* **creation**: a new state gets the storage that the policy gives it for the *model's*
  parameter dtype (:func:`~portopt.precision.storage.state_format`: compute precision,
  bf16, the parameter dtype, or 8-bit block-wise, with the unsigned map for states that
  :func:`~portopt.precision.signs.nonnegative_states` proves ``>= 0``); its initial value
  is computed at compute precision and encoded once. The model's dtype matters when the
  update runs on a float32 master copy: ``states=param`` then still means the parameter's
  dtype, as the memory accounting (:mod:`portopt.precision.memory`) counts it;
* **reads**: each leaf is decoded into the bucket's compute dtype (float32; float64 when
  the policy or a tensor asks for it): an 8-bit state is dequantised into a temporary, a
  bf16 state widened, a float32 state read in place;
* **stores**: each new value is encoded once: quantised (8-bit), rounded to nearest, or, for
  a bfloat16 destination under ``stochastic_rounding``, rounded stochastically with the
  noise key ``policy.rounding_key(t, index·(n + 1) + slot)``, where ``t`` is the parameter's
  new step count, ``index`` its optimizer-wide number, ``n`` the number of declared states
  and ``slot`` 0 for the parameter, ``1 + i`` for the ``i``-th state. The noise depends on
  nothing else, so a run is reproducible on any device and resumes bit-identically.

Buckets also separate 8-bit from plain states (the foreach calls need plain tensors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from portopt.backends.torch_generic import TensorList, TorchStep, Value, _Bucket, _Runner, compute_dtype
from portopt.distributed.layout import check_blocks_whole, logical_shape
from portopt.lowering.backend import Hypers, ParamState, with_inputs
from portopt.lowering.checks import check_step_inputs
from portopt.lowering.host import HostValue
from portopt.precision.policy import PrecisionPolicy
from portopt.precision.quantize import Q8State
from portopt.precision.signs import nonnegative_states
from portopt.precision.storage import allocate, decode, encode, state_format
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr

_QUANTIZED = "q8"
"""The bucket key of an 8-bit state (a plain state's key is its dtype)."""


class _PolicyRunner(_Runner):
    """The generic executor, reading and writing states in their storage form."""

    def __init__(
        self, bucket: _Bucket, host: Mapping[Expr, HostValue], keys: Mapping[str | None, list[int | None]]
    ) -> None:
        super().__init__(bucket, host)
        self.keys = keys

    def load(self, tensors: TensorList) -> TensorList:
        stored: list[Any] = tensors
        if not any(isinstance(x, Q8State) for x in stored):
            return super().load(tensors)
        return [decode(x).to(self.bucket.dtype) for x in stored]

    def store(self, name: str | None, dst: TensorList, value: Value) -> None:
        keys = self.keys.get(name)
        targets: list[Any] = dst
        if keys is None and not any(isinstance(d, Q8State) for d in targets):
            super().store(name, dst, value)
            return
        for i, into in enumerate(targets):
            if isinstance(value, list):
                new = value[i] if value[i].shape == into.shape else value[i].expand(into.shape)
            else:  # a step scalar stored into a tensor state
                new = torch.full(tuple(into.shape), float(value), dtype=self.bucket.dtype, device=into.device)
            encode(new, into, noise_key=None if keys is None else keys[i])


class PolicyStep(TorchStep):
    """The generic torch step function of ``spec``, storing states as ``policy`` says (module doc)."""

    def __init__(self, spec: Spec, policy: PrecisionPolicy) -> None:
        super().__init__(spec)
        policy.check_states(spec.state_names, spec.name)
        self.policy = policy
        self.nonnegative = nonnegative_states(spec)
        self.slots: dict[str | None, int] = {None: 0, **{name: 1 + i for i, name in enumerate(spec.state_names)}}

    def prepare(  # the policy's step also takes the model dtypes and numbers
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        param_dtypes: Sequence[torch.dtype] | None = None,
        indices: Sequence[int] | None = None,
        only_if_planned: bool = False,
    ) -> Callable[[], None] | None:
        """Check the inputs and plan the step, as :meth:`TorchStep.prepare
        <portopt.backends.torch_generic.TorchStep.prepare>` does (8-bit states accepted)."""

        def check() -> None:
            check_step_inputs(self.spec, params, grads, states, hypers, allow_quantized=True)
            for what, values in (("param_dtypes", param_dtypes), ("indices", indices)):
                if values is not None and len(values) != len(params):
                    raise ValueError(f"{self.spec.name}: got {len(values)} {what} for {len(params)} parameters")

        def unplanned() -> Callable[[], None]:
            return functools.partial(
                self.apply, params, grads, states, hypers, param_dtypes=param_dtypes, indices=indices
            )

        return self.plans_.prepare(self, params, grads, states, hypers, indices, only_if_planned, check, unplanned)

    @torch.no_grad()
    def apply(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[ParamState],
        hypers: Hypers,
        *,
        param_dtypes: Sequence[torch.dtype] | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        """The step without the input checks (run them first)."""
        hypers = with_inputs(self.spec, hypers)
        host_hypers = {name: float(value) for name, value in hypers.items()}
        dtypes = list(param_dtypes) if param_dtypes is not None else [p.dtype for p in params]
        for param, grad, state, dtype in zip(params, grads, states, dtypes, strict=True):
            if not state:
                state.update(self.initial_state(param, grad, hypers, dtype))
        numbers = list(indices) if indices is not None else list(range(len(params)))
        for bucket in self.buckets(params, grads, states, numbers):
            self.step_bucket(bucket, host_hypers)

    def initial_state(
        self, param: Tensor, grad: Tensor, hypers: Hypers, param_dtype: torch.dtype | None = None
    ) -> dict[str, Tensor]:
        """The states of a parameter before its first step, stored for a model parameter of
        ``param_dtype`` (default: ``param``'s), and ``step`` = 0."""
        model_dtype = param_dtype or param.dtype
        formats = {
            d.name: state_format(
                self.policy, d, logical_shape(param), model_dtype, nonnegative=d.name in self.nonnegative
            )
            for d in self.variant(param).states
        }
        compute = self.policy.compute_dtype_for(model_dtype)
        state: dict[str, Any] = self.new_state(
            param, grad, hypers, {name: compute if f.quantized else f.dtype for name, f in formats.items()}
        )
        for name, fmt in formats.items():
            if fmt.quantized is not None:
                check_blocks_whole(param, name, self.policy.block_size)
                stored = allocate(fmt, state[name].shape, param.device)
                encode(state[name], stored)
                state[name] = stored
        return state

    def flat_eligible(self, spec: Spec) -> bool:
        """Never: each state is read and stored in its own storage form (8-bit blocks, noise keys per tensor)."""
        return False

    def bucket_key(
        self, param: Tensor, grad: Tensor, state: ParamState, spec: Spec
    ) -> tuple[tuple[object, ...], torch.dtype]:
        """As the generic step's, with 8-bit states apart (the foreach calls need plain tensors) and the
        policy's compute dtype."""
        stored: list[Any] = [state[n] for n in self.state_names(spec)]
        forms = tuple(_QUANTIZED if isinstance(s, Q8State) else s.dtype for s in stored)
        plain = [f for f in forms if isinstance(f, torch.dtype)]
        dtype = compute_dtype([param.dtype, grad.dtype, *plain, self.policy.compute_dtype_for(param.dtype)])
        return (param.device, param.dtype, grad.dtype, forms, spec), dtype

    def runner(self, bucket: _Bucket, host: Mapping[Expr, HostValue]) -> _Runner:
        """An executor with the noise keys of this bucket's bfloat16 stores (stochastic rounding)."""
        keys: dict[str | None, list[int | None]] = {}
        if self.policy.stochastic_rounding:
            step, count = int(bucket.t), len(self.slots)
            for name, slot in self.slots.items():
                if name is not None and name not in bucket.states[0]:
                    continue  # a state these tensors do not have (shape class)
                first: object = bucket.params[0] if name is None else bucket.states[0][name]
                if isinstance(first, Tensor) and first.dtype == torch.bfloat16:
                    keys[name] = [self.policy.rounding_key(step, i * count + slot) for i in bucket.indices]
        return _PolicyRunner(bucket, host, keys)
