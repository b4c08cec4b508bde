"""Rounding float32 to bfloat16: to nearest (ties to even), or stochastically (unbiased).

bfloat16 is the top half of a float32: the same sign and 8-bit exponent, 7 of the 23
mantissa bits. Rounding drops the low 16 bits of the float32 bit pattern ``b``:

* **to nearest** (:func:`round_nearest_bf16`): torch's cast, ties to even;
* **stochastically** (:func:`round_stochastic_bf16`): add a uniform random integer
  ``r ∈ [0, 2^16)`` to ``b`` and truncate the low 16 bits. Let ``x`` lie between the
  neighbouring bf16 values ``lo`` and ``hi`` (``lo`` nearer zero), ``f = (|x| − |lo|) /
  (|hi| − |lo|)``; the addition carries into the kept bits exactly when ``r >= 2^16 (1 − f)``,
  that is with probability ``f``, so ``E[round(x)] = lo + f (hi − lo) = x``: unbiased. The
  bit pattern holds the magnitude, so the same holds for negative numbers. bf16 values are
  kept exactly; ±inf stays ±inf, NaN stays NaN; a finite value above the largest bf16 rounds
  up to inf with probability ``f`` (to-nearest would always give inf at and above
  ``max + ulp/2``).

**Reproducible noise, identical on every device.** The random integers are not drawn from
a device generator (CPU's Mersenne Twister and CUDA's Philox differ); they are a hash of
``(key, element index)``, computed with int64 tensor ops on the tensor's own device::

    x = lowbias32((i mod 2^32) xor key_lo)
    x = lowbias32(x xor floor(i / 2^32) xor key_hi)
    r = floor(x / 2^16)

where ``i`` is the element's index in row-major order, ``key_lo``/``key_hi`` the low/high
32 bits of the 64-bit ``key``, and ``lowbias32`` C. Wellons' 32-bit integer hash (xor-shift
16, multiply by 0x7feb352d, xor-shift 15, multiply by 0x846ca68b, xor-shift 16, all mod
2^32). The key comes from :func:`noise_key`: ``(seed, step, tensor_index)`` mixed by
SplitMix64, so every store of every step draws fresh, reproducible noise, and a run
rounds the same way on CPU, CUDA or any other device.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_HIGH_HALF_INT32 = -(1 << 16)  # 0xFFFF0000 as an int32: keeps the bits bfloat16 holds


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014) on a 64-bit integer."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def noise_key(seed: int, step: int, tensor_index: int) -> int:
    """64-bit key of the rounding noise of one store: ``splitmix(splitmix(splitmix(seed) ^ step) ^ index)``."""
    values: tuple[tuple[str, object], ...] = (("seed", seed), ("step", step), ("tensor_index", tensor_index))
    for name, value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {name} for stochastic rounding: {value!r} (a non-negative integer)")
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ tensor_index)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x · c mod 2^32`` for int64 ``x`` in ``[0, 2^32)`` and ``c < 2^32``, without int64 overflow.

    With ``c = c' + 2^31``: ``x · 2^31 mod 2^32 = (x mod 2) · 2^31``, and ``x · c' < 2^63``.
    """
    if c < 1 << 31:
        return (x * c) & _MASK32
    return (x * (c - (1 << 31)) + ((x & 1) << 31)) & _MASK32


def _lowbias32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits16(shape: torch.Size | tuple[int, ...], key: int, device: torch.device | str) -> Tensor:
    """Uniform integers in ``[0, 2^16)`` (int32) of ``shape``: a hash of ``(key, element index)``."""
    index = torch.arange(torch.Size(shape).numel(), dtype=torch.int64, device=device)
    x = _lowbias32((index & _MASK32) ^ (key & _MASK32))
    x = _lowbias32(x ^ (index >> 32) ^ ((key >> 32) & _MASK32))
    return (x >> 16).to(torch.int32).reshape(shape)


def round_nearest_bf16(x: Tensor) -> Tensor:
    """``x`` rounded to bfloat16, to nearest with ties to even (torch's cast)."""
    return x.to(torch.bfloat16)


def round_stochastic_bf16(x: Tensor, key: int) -> Tensor:
    """``x`` (float32) rounded to bfloat16 stochastically and without bias, with the noise of ``key``."""
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic rounding takes a float32 tensor, got {x.dtype}")
    nan = torch.isnan(x)
    # NaN patterns are replaced by 0 before the integer addition (which could carry into the sign bit).
    bits = x.view(torch.int32).masked_fill(nan, 0)
    bits = (bits + random_bits16(x.shape, key, x.device)) & _HIGH_HALF_INT32
    # The low 16 bits are zero, so the cast to bfloat16 is exact.
    rounded = bits.view(torch.float32).to(torch.bfloat16)
    return rounded.masked_fill(nan, torch.nan)
