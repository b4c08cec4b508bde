"""Deterministic problems: parameter sets and gradient streams generated from a seed.

A :class:`Problem` is data: a list of :class:`TensorSpec` (shape, param group, memory
layout, gradient regime, on which steps a gradient exists) and a seed. Every value is
generated in float64 on the CPU from a ``torch.Generator`` seeded by (seed, tensor,
step), then cast to the precision under test and laid out on the device, so every
implementation and the reference see bit-identical inputs.

What the problems cover, and why:

* sizes 0 and 1, a 0-d tensor, odd primes, and sizes larger than any SIMD width and not a
  multiple of it (1031, 4099; more than 2^20 in the full run), where vectorised kernels keep a tail;
* non-contiguous parameters and gradients (a transposed matrix, a strided row slice, a
  permuted 3-d tensor), where kernels that assume contiguity write the wrong elements;
* several param groups with different hyperparameters;
* parameters without gradients (never, or only on odd steps): their values and states must
  not move, and their step counters lag behind;
* gradient regimes: ``mixed`` magnitudes from 1e-10 to 10 with exact zeros in one tensor
  (so ε matters for some elements and not for others), ``tiny`` (around ε), ``huge``
  (large for the format but with squares and norms representable in float32), exactly
  ``zero`` steps, and inf/NaN for the non-finite and skip tests.

**Regimes are kept apart.** Each cause a diagnosis can name (a layout, a gradient regime, a
zero-gradient step, missing gradients, a param group) has tensors of its own: no tensor is
both strided and huge, or transposed and zero at a step, so "only the strided tensors
differ" and "a float32 overflow in the huge-gradient regime" cannot be mistaken for each
other (:mod:`portopt.conformance.patterns`). The dense tensors' sizes tell SIMD widths
apart: 7, 11, 15, 120, 481 and 1031 elements leave different tails for blocks of 4, 8, 16,
32 and 64.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

GRAD_EVERY_STEP = "all"
GRAD_NEVER = "never"
GRAD_ODD_STEPS = "odd"


class Regime(enum.Enum):
    """How a tensor's gradients are drawn."""

    NORMAL = "normal"  # N(0, 1)
    MIXED = "mixed"  # random sign times 10^U(-10, 1), 5% exact zeros
    TINY = "tiny"  # N(0, 1) * 1e-9: around sqrt of typical epsilons
    HUGE = "huge"  # N(0, 1) * the precision's huge scale
    ZERO = "zero"  # exactly zero


class Layout(enum.Enum):
    """Memory layout of a parameter (and of its gradient)."""

    CONTIGUOUS = "contiguous"
    TRANSPOSED = "transposed"  # a .t() / permuted view: strides reversed
    STRIDED = "strided"  # every other slice of a twice-as-long first axis


@dataclass(frozen=True)
class TensorSpec:
    """One parameter of a problem."""

    shape: tuple[int, ...]
    group: int = 0
    layout: Layout = Layout.CONTIGUOUS
    regime: Regime = Regime.MIXED
    grads: str = GRAD_EVERY_STEP
    zero_at: tuple[int, ...] = ()
    nonfinite_at: tuple[int, ...] = ()
    param_scale: float = 1.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def has_grad(self, step: int) -> bool:
        """Whether the gradient exists at ``step`` (1-based)."""
        if self.grads == GRAD_NEVER:
            return False
        if self.grads == GRAD_ODD_STEPS:
            return step % 2 == 1
        return True

    def describe(self) -> str:
        parts = [f"shape {self.shape}", f"group {self.group}", self.regime.value]
        if self.layout is not Layout.CONTIGUOUS:
            parts.append(self.layout.value)
        if self.grads != GRAD_EVERY_STEP:
            parts.append(f"grads: {self.grads}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Problem:
    """A parameter set with its gradient stream."""

    name: str
    tensors: tuple[TensorSpec, ...]
    seed: int
    description: str = ""
    huge_scale: float = field(default=1e12)

    @property
    def num_groups(self) -> int:
        return 1 + max((t.group for t in self.tensors), default=0)

    @property
    def total_elements(self) -> int:
        return sum(t.numel for t in self.tensors)

    def label(self, index: int) -> str:
        """A readable name of tensor ``index``: ``t4 (1031,)``."""
        return f"t{index} {self.tensors[index].shape}"

    def matrices_only(self) -> Problem:
        """The same problem keeping only tensors with at least 2 dims (for factored states)."""
        kept = tuple(t for t in self.tensors if len(t.shape) >= 2)
        return Problem(f"{self.name}-matrices", kept, self.seed, self.description, self.huge_scale)

    def with_huge_scale(self, scale: float) -> Problem:
        return Problem(self.name, self.tensors, self.seed, self.description, scale)

    # values ---------------------------------------------------------------
    def initial_param(self, index: int) -> Tensor:
        """The float64 initial value of tensor ``index`` (about N(0, 0.5²), 5% exact zeros)."""
        spec = self.tensors[index]
        gen = _generator(self.seed, index, 0)
        values = torch.randn(spec.shape, generator=gen, dtype=torch.float64) * (0.5 * spec.param_scale)
        zeros = torch.rand(spec.shape, generator=gen, dtype=torch.float64) < 0.05
        return torch.where(zeros, torch.zeros_like(values), values)

    def gradient(self, index: int, step: int) -> Tensor | None:
        """The float64 gradient of tensor ``index`` at ``step`` (1-based), or ``None``."""
        spec = self.tensors[index]
        if not spec.has_grad(step):
            return None
        if step in spec.zero_at or spec.regime is Regime.ZERO:
            return torch.zeros(spec.shape, dtype=torch.float64)
        gen = _generator(self.seed, index, step)
        normal = torch.randn(spec.shape, generator=gen, dtype=torch.float64)
        if spec.regime is Regime.MIXED:
            exponent = torch.rand(spec.shape, generator=gen, dtype=torch.float64) * 11.0 - 10.0
            zeros = torch.rand(spec.shape, generator=gen, dtype=torch.float64) < 0.05
            grad = torch.sign(normal) * torch.pow(10.0, exponent)
            grad = torch.where(zeros, torch.zeros_like(grad), grad)
        elif spec.regime is Regime.TINY:
            grad = normal * 1e-9
        elif spec.regime is Regime.HUGE:
            grad = normal * self.huge_scale
        else:
            grad = normal
        if step in spec.nonfinite_at and grad.numel() > 0:
            flat = grad.reshape(-1).clone()
            specials = (math.inf, -math.inf, math.nan)
            for i, value in enumerate(specials[: flat.numel()]):
                flat[i] = value
            grad = flat.reshape(spec.shape)
        return grad


def _generator(seed: int, index: int, step: int) -> torch.Generator:
    # A fixed mixing of (seed, tensor, step): each stream is independent of the others, so
    # adding a tensor or a step to a problem leaves every other value unchanged.
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + index * 10_007 + step * 101 + 12345) % (2**63 - 1))
    return gen


def materialise(values: Tensor, spec: TensorSpec, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``values`` cast to ``dtype`` on ``device``, laid out as ``spec.layout`` says.

    A transposed layout is the ``.t()`` (or reversed-axes permute) view of a contiguous
    buffer; a strided layout takes every other slice of a first axis twice as long.
    """
    shape = tuple(values.shape)
    cast = values.to(dtype=dtype)
    if spec.layout is Layout.TRANSPOSED and len(shape) >= 2:
        order = tuple(reversed(range(len(shape))))
        buffer = cast.permute(order).contiguous().to(device)
        return buffer.permute(order)
    if spec.layout is Layout.STRIDED and len(shape) >= 1:
        buffer = torch.zeros((2 * shape[0], *shape[1:]), dtype=dtype, device=device)
        view = buffer[::2]
        view.copy_(cast.to(device))
        return view
    return cast.to(device).clone()


def memory_order(t: Tensor) -> Tensor:
    """The flat (row-major) indices of ``t``'s elements in the order they lie in memory.

    For a contiguous tensor this is ``arange(numel)``; for a transposed view it is the order of
    the buffer behind it, which is what a vectorised kernel walks (its SIMD blocks and tail).
    """
    offsets = torch.zeros(tuple(t.shape), dtype=torch.long)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        shape = [1] * t.dim()
        shape[dim] = size
        offsets = offsets + torch.arange(size, dtype=torch.long).view(shape) * stride
    return torch.argsort(offsets.reshape(-1), stable=True)


def _quick_tensors() -> tuple[TensorSpec, ...]:
    return (
        TensorSpec((0,), group=0),
        TensorSpec((1,), group=0, regime=Regime.NORMAL),
        TensorSpec((), group=0, regime=Regime.NORMAL),
        TensorSpec((7,), group=0, regime=Regime.TINY),
        TensorSpec((1031,), group=1, regime=Regime.MIXED, param_scale=4.0),
        TensorSpec((13, 37), group=1, layout=Layout.TRANSPOSED, regime=Regime.MIXED),
        TensorSpec((6, 11), group=1, layout=Layout.STRIDED, regime=Regime.NORMAL),
        TensorSpec((5,), group=0, grads=GRAD_NEVER),
        TensorSpec((3, 5), group=1, grads=GRAD_ODD_STEPS, regime=Regime.NORMAL),
        TensorSpec((11,), group=0, regime=Regime.HUGE),
        TensorSpec((120,), group=1, regime=Regime.NORMAL, zero_at=(3,)),
    )


QUICK = Problem(
    "quick",
    _quick_tensors(),
    seed=20240601,
    description="sizes 0, 1, 0-d, 7, 11, 120, 1031; transposed and strided views; huge and tiny gradients; "
    "a zero-gradient step; two groups; no-grad and odd-step params",
)
FULL = Problem(
    "full",
    (
        *_quick_tensors(),
        TensorSpec((2,), group=0, regime=Regime.ZERO),
        TensorSpec((31,), group=2, regime=Regime.NORMAL, param_scale=100.0),
        TensorSpec((127,), group=2, regime=Regime.TINY),
        TensorSpec((4099,), group=2, regime=Regime.MIXED),
        TensorSpec((3, 5, 7), group=2, layout=Layout.TRANSPOSED, regime=Regime.MIXED),
        TensorSpec((64, 129), group=0, layout=Layout.STRIDED, regime=Regime.NORMAL),
    ),
    seed=20240602,
    description="the quick set plus zero gradients, three groups, sizes 31, 127, 4099, a permuted 3-d view",
)
LARGE = Problem(
    "large",
    (TensorSpec((1024, 1031), group=0, regime=Regime.MIXED),),
    seed=20240603,
    description="one matrix of 1,055,744 elements: more than 2^20 (where kernels split work into chunks and "
    "threads), rows not a multiple of any SIMD width; factored states see a matrix",
)
NONFINITE = Problem(
    "nonfinite",
    (
        TensorSpec((17,), group=0, regime=Regime.NORMAL, nonfinite_at=(2,)),
        TensorSpec((33,), group=0, regime=Regime.NORMAL),
    ),
    seed=20240604,
    description="inf, -inf and NaN gradients at step 2 in one tensor: they must propagate as in the reference",
)
PROBLEMS: dict[str, Problem] = {p.name: p for p in (QUICK, FULL, LARGE, NONFINITE)}
