"""States in their storage form, and master weights: what a backend's step calls.

A step reads each state with :func:`decode` (its value at compute precision), computes the
new value at compute precision, and writes it back with :func:`encode` (one rounding, in
place). The storage form of one state of one parameter is a :class:`StateFormat`, resolved
once from the policy by :func:`state_format`; :func:`allocate_state` makes it (zeros), and
:func:`state_nbytes` measures it.

``StoredState`` is a plain tensor (``fp32``/``fp64``, ``bf16``, ``fp16`` storage) or a
:class:`~portopt.precision.quantize.Q8State`. Master weights: :func:`create_master` copies a
low-precision parameter to float32 once; after each update, :func:`write_back` rounds the
master into the parameter (``encode`` into the parameter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from portopt.lowering.interpreter import state_shape
from portopt.precision.policy import PrecisionPolicy, StateStorage
from portopt.precision.quantize import Q8State, num_blocks
from portopt.precision.rounding import round_stochastic_bf16
from portopt.spec.definition import Spec
from portopt.spec.symbols import Layout, StateDecl

StoredState: TypeAlias = "Tensor | Q8State"


@dataclass(frozen=True)
class StateFormat:
    """The concrete storage of one state: a dtype, or an 8-bit map (``quantized``).

    ``dtype`` is the storage dtype of a plain tensor (``torch.uint8`` for a quantised state);
    ``quantized`` the map name (``"signed"``/``"unsigned"``) or ``None``; ``stochastic`` says that
    bfloat16 stores may round stochastically (when a noise key is given).
    """

    dtype: torch.dtype
    quantized: str | None = None
    block_size: int = 0
    stochastic: bool = False

    def nbytes(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Bytes of a state of ``shape`` in this format (a quantised one: codes and absmax)."""
        numel = torch.Size(shape).numel()
        if self.quantized is not None:
            return numel + 4 * num_blocks(numel, self.block_size)
        return numel * self.dtype.itemsize


def state_format(
    policy: PrecisionPolicy,
    decl: StateDecl,
    param_shape: torch.Size | tuple[int, ...],
    param_dtype: torch.dtype,
    *,
    nonnegative: bool = False,
) -> StateFormat:
    """How ``policy`` stores state ``decl`` of a parameter of ``param_shape`` and ``param_dtype``.

    ``nonnegative`` (from :func:`portopt.precision.signs.nonnegative_states`) picks the unsigned
    8-bit map. ``q8`` falls back to ``fp32`` for a state of fewer than ``policy.min_8bit_size``
    elements; per-tensor states (``Layout.TENSOR``) are kept at compute precision.
    """
    compute = policy.compute_dtype_for(param_dtype)
    storage = policy.storage_of(decl.name)
    if decl.layout is Layout.TENSOR:
        return StateFormat(compute)
    if storage is StateStorage.Q8:
        if torch.Size(state_shape(decl, torch.Size(param_shape))).numel() >= policy.min_8bit_size:
            return StateFormat(torch.uint8, "unsigned" if nonnegative else "signed", policy.block_size)
        storage = StateStorage.FP32
    dtype = {
        StateStorage.FP32: compute,
        StateStorage.BF16: torch.bfloat16,
        StateStorage.PARAM: param_dtype,
    }[storage]
    return StateFormat(dtype, stochastic=policy.stochastic_rounding and dtype == torch.bfloat16)


def stores_like_torch(policy: PrecisionPolicy, spec: Spec, param_dtype: torch.dtype) -> bool:
    """Whether any backend honours ``policy`` for ``spec``'s states of a parameter of ``param_dtype``.

    True when the policy asks for exactly what torch.optim creates for the tensor the update
    runs on (the float32 master when the policy keeps one, else the parameter itself):
    element-wise, row and column states in that tensor's dtype, per-tensor states in at least
    float32, float32 arithmetic (float64 for float64 tensors), no 8-bit state and no
    stochastically rounded store. Master weights and loss scaling need nothing from a backend
    (the front end steps the master with unscaled gradients), so ``mixed-bf16`` is such a
    policy, and ``q8-states`` or ``bf16-states`` on float32 parameters are not.
    """
    stepped = torch.float32 if policy.needs_master(param_dtype) else param_dtype
    torch_compute = torch.float64 if stepped == torch.float64 else torch.float32
    if policy.compute_dtype_for(param_dtype) != torch_compute:
        return False
    if policy.stochastic_rounding and stepped == torch.bfloat16:
        return False  # the parameter's own store rounds stochastically
    for decl in spec.states:
        if policy.storage_of(decl.name) is StateStorage.Q8 and decl.layout is not Layout.TENSOR:
            return False
        fmt = state_format(policy, decl, (1, 1), param_dtype)  # any shape: no 8-bit storage is asked here
        expected = torch.promote_types(stepped, torch.float32) if decl.layout is Layout.TENSOR else stepped
        if fmt.dtype != expected or fmt.stochastic:
            return False
    return True


def allocate(fmt: StateFormat, shape: tuple[int, ...] | torch.Size, device: torch.device | str) -> StoredState:
    """A zero state of ``shape`` in format ``fmt``."""
    if fmt.quantized is not None:
        return Q8State.zeros(tuple(shape), fmt.quantized, device, fmt.block_size)
    return torch.zeros(shape, dtype=fmt.dtype, device=device)


def allocate_state(
    decl: StateDecl, param: Tensor, policy: PrecisionPolicy, *, nonnegative: bool = False
) -> StoredState:
    """State ``decl`` of ``param`` under ``policy``, zero-filled (:func:`encode` its initial value)."""
    fmt = state_format(policy, decl, param.shape, param.dtype, nonnegative=nonnegative)
    return allocate(fmt, state_shape(decl, param.shape), param.device)


def decode(stored: StoredState) -> Tensor:
    """The value of a stored state at compute precision: float64 storage stays float64, else float32.

    A float32/float64 state is returned as is (no copy): read it, do not modify it in place.
    """
    if isinstance(stored, Q8State):
        return stored.load()
    if stored.dtype in (torch.float32, torch.float64):
        return stored
    return stored.to(torch.float32)


def encode(value: Tensor, into: StoredState, *, noise_key: int | None = None) -> None:
    """Store ``value`` (compute precision, same shape) into ``into``, in place, rounding once.

    A bfloat16 destination rounds stochastically with ``noise_key`` (from
    :meth:`~portopt.precision.policy.PrecisionPolicy.rounding_key`; ``None``: to nearest); every
    other destination rounds to nearest (float16, float32) or quantises (8-bit).
    """
    if value.shape != into.shape:
        raise ValueError(
            f"cannot store a value of shape {tuple(value.shape)} into a state of shape {tuple(into.shape)}"
        )
    if isinstance(into, Q8State):
        into.store(value)
    elif noise_key is not None and into.dtype == torch.bfloat16:
        into.copy_(round_stochastic_bf16(value.to(torch.float32), noise_key))
    else:
        into.copy_(value)


def state_nbytes(stored: StoredState) -> int:
    """Bytes a stored state holds (for a quantised state: codes and absmax, not the shared map)."""
    if isinstance(stored, Q8State):
        return stored.nbytes
    return stored.numel() * stored.element_size()


def create_master(param: Tensor) -> Tensor:
    """A float32 copy of ``param``'s values (contiguous, detached): the master weights."""
    return param.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)


def write_back(master: Tensor, param: Tensor) -> None:
    """Round the master weights into ``param`` in place: one rounding, to nearest.

    (The master carries the precision; rounding the copy stochastically would only add noise.)
    """
    with torch.no_grad():
        encode(master, param)
