"""8-bit block-wise states inside a compiled step: decode, update and encode in one pass.

:mod:`portopt.precision.quantize` defines the format and is the reference (eager, any shape).
This module computes the same numbers with plain torch ops that a compiler traces and fuses
with the optimizer's arithmetic, on *block views*: a tensor of ``n`` elements cut into blocks
of ``B`` elements in row-major order is seen as ``(n // B, B)`` rows (the whole blocks) and a
``(1, n mod B)`` row (the last, shorter block). On such a view, one row is one block:

* **decode** (:func:`dequantize_rows`): ``x̂ = M[c] · A_row``: a lookup in the 256-entry map and
  a multiplication, exactly as :func:`~portopt.precision.quantize.dequantize_blockwise`;
* **encode** (:func:`quantize_rows`): ``A_row = max |x|`` per row, then each code, with the
  reference's rules (saturation at float32's largest value, NaN poisoning its block, a non-zero
  value never coded as 0, the absmax element coded exactly as ±1), bit for bit.

The code of a normalised value ``y`` is found with one lookup in a table of ``2^16`` int32
entries (:func:`packed_code_table`), indexed by the top 16 bits of ``y``'s order key (the bit
pattern, magnitude bits flipped for negative values, so that keys sort as the values): entry
``r`` holds ``base[r] << 16 | low16(boundary[r])``, where ``base[r]`` counts the decision
boundaries below row ``r`` and ``boundary[r]`` is the one boundary inside it (``0xFFFF``: none).
Within a row the keys differ only in their low 16 bits, so ``y > boundary[r]`` is
``low16(key(y)) > low16(boundary[r])``, and the code is ``base[r] + (that comparison)``: the
reference's two-table lookup (:func:`~portopt.precision.quantize._code_table`) folded into one
gather. The map is padded to 256 entries with NaN, so that no byte, even one a corrupted
checkpoint holds, reads outside it.

A block's elements are all in one row, so the compiler reduces the row (the absmax), then codes
it, while the row is in cache: the step reads and writes every byte once.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from portopt.precision.quantize import FLOAT32_MAX, _cached_map, _code_table

SMALLEST_SUBNORMAL = 2.0**-149
"""The float32 closest to 0: where a non-zero value whose quotient underflows is moved."""
_LOW16 = 0xFFFF
_ROWS = 1 << 16
_ROW_OFFSET = 1 << 15


@functools.cache
def packed_code_table(name: str, device: torch.device) -> Tensor:
    """The one-gather code table of map ``name`` on ``device`` (module doc): int32, ``2^16`` entries."""
    table = _code_table(name, torch.device("cpu"))
    if table is None:  # every row of portopt's maps holds at most one boundary (quantize._code_table)
        raise ValueError(f"quantisation map {name!r} has two decision boundaries in one bfloat16 row")
    base, boundary = table
    low = torch.full((_ROWS,), _LOW16, dtype=torch.int64)
    has = torch.isfinite(boundary)
    low[has] = (_order_key(boundary[has]).long() & _LOW16).long()
    packed = (base.long() << 16) | low
    return packed.to(torch.int32).to(device)


@functools.cache
def padded_map(name: str, device: torch.device) -> Tensor:
    """Map ``name`` as 256 float32 entries on ``device`` (a signed map's unused 256th code reads NaN)."""
    values = _cached_map(name, torch.device("cpu"))[0]
    padded = torch.full((256,), torch.nan, dtype=torch.float32)
    padded[: values.numel()] = values
    return padded.to(device)


def _order_key(x: Tensor) -> Tensor:
    """int32 keys of float32 values that sort as the values (``-0.0`` just below ``0.0``)."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def dequantize_rows(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """float32 values of ``codes`` (uint8, ``(rows, B)``) with one ``absmax`` per row (``(rows, 1)``)."""
    return qmap[codes.long()] * absmax


def quantize_rows(value: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)`` of ``value`` (``(rows, B)``, float32 or float64): uint8 codes of its shape
    and one float32 absmax per row (``(rows, 1)``), bit for bit those of
    :func:`~portopt.precision.quantize.quantize_blockwise` for the blocks the rows are."""
    x = value if value.dtype == torch.float32 else value.clamp(-FLOAT32_MAX, FLOAT32_MAX).to(torch.float32)
    x = x.clamp(-FLOAT32_MAX, FLOAT32_MAX)  # ±inf saturates; NaN stays NaN
    absmax = x.abs().amax(dim=-1, keepdim=True)
    finite = torch.isfinite(absmax)
    usable = finite & (absmax > 0)
    scale = torch.where(usable, absmax, torch.ones_like(absmax))
    normalized = torch.where(usable, x / scale, torch.zeros_like(x))
    underflowed = (normalized == 0) & (x != 0) & usable
    normalized = torch.where(underflowed, torch.copysign(torch.full_like(x, SMALLEST_SUBNORMAL), x), normalized)
    key = _order_key(normalized)
    entry = table[((key >> 16) + _ROW_OFFSET).long()]
    codes = (entry >> 16) + ((key & _LOW16) > (entry & _LOW16)).to(torch.int32)
    return codes.to(torch.uint8), torch.where(finite, absmax, torch.full_like(absmax, torch.nan))
