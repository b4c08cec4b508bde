"""8-bit block-wise quantisation of optimizer states (Dettmers et al., arXiv:2110.02861).

A tensor of ``n`` elements is cut, in its logical (row-major) order, into blocks of
``B = 256`` elements (the last block may be shorter). Each block ``b`` keeps its absolute
maximum ``A_b = max |x_i|`` in float32, and each element one byte: the index ``c_i`` of the
entry of a fixed, sorted *quantisation map* ``M`` nearest to ``x_i / A_b``::

    quantise:    c_i = argmin_k |M[k] − x_i / A_b|          (ties go to the lower entry)
    dequantise:  x̂_i = M[c_i] · A_b

by counting the decision boundaries between neighbouring entries that lie below ``x_i / A_b``
(what a binary search, ``torch.bucketize``, finds; here a table lookup, see
:func:`_code_table`), so the error of an element is at most ``A_b · gap/2``, with ``gap`` the largest
distance between neighbouring map entries (see :func:`max_gap`). Memory: 1 byte per element
plus 4 bytes per block (``1 + 4/256`` bytes per element); the map is shared by every tensor.

One exception to "nearest": **a non-zero value is never stored as 0**. Values whose
magnitude is below half the smallest non-zero entry (``1e−6·A_b`` signed, ``1e−7·A_b``
unsigned) get that entry, with their sign. The error bound is unchanged (these errors are
``<= 1e−6·A_b``), and it removes a failure of 8-bit Adam: an element of the second moment
``v`` many decades below its block's largest would otherwise read back as exactly 0, and
``m / (sqrt(v) + ε)`` would explode to ``m/ε``; stored as the smallest entry it gives a
smaller, safe step instead. This holds even where ``x/A_b`` underflows float32
(``|x| < 1.4e−45·A_b``, a block holding a gradient spike): such a value is moved to the
smallest subnormal with its sign before its code is found.

**The dynamic maps.** As in the paper's dynamic (tree) quantisation (introduced in Dettmers,
"8-Bit Approximations for Parallelism in Deep Learning", arXiv:1511.04561), a code's bits after the
sign are read as: ``E`` leading zeros (a decimal exponent), an indicator bit 1, then ``F``
fraction bits that split the decade linearly. With ``m`` magnitude bits a non-zero magnitude
code ``1 <= r < 2^m`` has ``F = bitlength(r) − 1``, ``E = m − bitlength(r)``,
``k = r − 2^F`` and the value::

    |M| = 10^(−E) · (0.1 + 0.9 · (k + 1) / 2^F)

i.e. the decade ``(0.1·10^−E, 10^−E]`` cut into ``2^F`` equal steps, each value the top of
its step (bitsandbytes' ``create_dynamic_map`` takes the middle; the top makes ``1`` an entry, so the element holding a
block's absmax is stored exactly, and the decades tile without gaps or overlaps). Larger
magnitudes get more fraction bits: the map is dense near 1 and spans many decades.

* ``"signed"`` (first moments, anything that may be negative): ``m = 7`` magnitude bits
  plus a sign, so 127 magnitudes in ``[1e−6, 1]`` for each sign, and 0: 255 entries,
  symmetric, with exact 0 and ±1 (the 256th code is left unused: a symmetric map that holds
  0 has an odd number of entries). Largest gap ``0.9/64 ≈ 0.0141``.
* ``"unsigned"`` (non-negative states such as second moments, where a sign bit would be
  wasted): ``m = 8``, 255 magnitudes in ``[1e−7, 1]`` and 0: 256 entries, largest gap
  ``0.9/128 ≈ 0.0070``. A negative input (never produced by a provably non-negative state)
  is stored as 0.

**Edge cases.** Size 0 gives empty codes and no blocks; a block of zeros has ``A_b = 0``
and every code that of 0, and dequantises to exact zeros.

**Overflow saturates; NaN poisons its block.** A state computed in float32 from finite
inputs can overflow: one gradient element of ``1e20`` makes Adam's ``(1 − β2)·g²`` infinite.
A float32 state would hold ``inf`` in that one element; 8 bits cannot hold an infinity next
to finite values (``A_b = inf`` would make every element of the block ``0·inf = NaN``, 256
parameters lost to one spike). So ``±inf`` and anything beyond float32's range (a float64
value over ``3.4e38``) is stored *saturated* at ``±3.4028235e38`` (float32's largest), and
its block is stored as usual around that absmax: finite inputs always give finite states,
hence finite parameters. The spike's neighbours in its block keep only its coarse scale (as
with any outlier; the rule above keeps each at least the smallest entry, so no ``v`` of a
neighbour reads back as 0). bitsandbytes' 8-bit optimizers take the absmax over the
overflowed value too, so there the block becomes non-finite; a NaN (``inf − inf``, a NaN
gradient) still does here: its absmax is stored as NaN (its codes as that of 0) and the
whole block dequantises to NaN, so a NaN state stays visibly non-finite, never silently
finite. (Under loss scaling, or ``skip_nonfinite``, steps with a non-finite gradient are
skipped before anything is stored.)
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_SIZE = 256
"""Elements per block: one float32 absmax per block."""

MAP_NAMES = ("signed", "unsigned")
_SMALLEST_SUBNORMAL = 2.0**-149  # the float32 closest to 0
FLOAT32_MAX = 3.4028234663852886e38
"""float32's largest finite value: where overflowing values saturate (module doc)."""
_MAGNITUDE_BITS = {"signed": 7, "unsigned": 8}


def _check_map_name(name: str) -> None:
    if name not in _MAGNITUDE_BITS:
        raise ValueError(f"Invalid quantisation map: {name!r} (accepted: {', '.join(MAP_NAMES)})")


def dynamic_magnitudes(magnitude_bits: int) -> list[float]:
    """The ``2^magnitude_bits − 1`` non-zero magnitudes of the dynamic map, ascending (float64).

    Code ``r`` has ``E = magnitude_bits − bitlength(r)`` leading zeros and ``F = bitlength(r) − 1``
    fraction bits; its value is ``10^−E · (0.1 + 0.9 · (r − 2^F + 1) / 2^F)``.
    """
    values = []
    for code in range(1, 2**magnitude_bits):
        fraction_bits = code.bit_length() - 1
        exponent = magnitude_bits - code.bit_length()
        k = code - (1 << fraction_bits)
        values.append(10.0**-exponent * (0.1 + 0.9 * (k + 1) / 2**fraction_bits))
    return values


def map_values(name: str) -> list[float]:
    """The entries of map ``name`` (``"signed"`` or ``"unsigned"``), ascending, as float64 numbers."""
    _check_map_name(name)
    magnitudes = dynamic_magnitudes(_MAGNITUDE_BITS[name])
    if name == "signed":
        return [-v for v in reversed(magnitudes)] + [0.0, *magnitudes]
    return [0.0, *magnitudes]


def decision_boundaries(values: list[float]) -> list[float]:
    """Where the code changes: halfway between neighbouring entries (float64, rounded once to
    float32), except around 0, where the boundaries hug zero so that only 0 gets the code of 0
    (see the module doc: a non-zero value keeps its sign and is never flushed to 0)."""
    boundaries = [(a + b) / 2 for a, b in itertools.pairwise(values)]
    zero = values.index(0.0)
    if zero > 0:
        boundaries[zero - 1] = -_SMALLEST_SUBNORMAL  # (-smallest, 0) boundary: every x < 0 is below it
    if zero < len(boundaries):
        boundaries[zero] = 0.0  # (0, smallest) boundary: every x > 0 is above it
    return boundaries


@functools.cache
def _cached_map(name: str, device: torch.device) -> tuple[Tensor, Tensor]:
    values = map_values(name)
    qmap = torch.tensor(values, dtype=torch.float32, device=device)
    return qmap, torch.tensor(decision_boundaries(values), dtype=torch.float32, device=device)


_PREFIX_BITS = 16
"""Bits of a float's order key that select a row of the code table: a bfloat16's resolution."""


def _order_key(x: Tensor) -> Tensor:
    """int32 keys of float32 values, ordered as the values (``-0.0`` just below ``0.0``): the bit
    pattern, with the magnitude bits flipped for negative values."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@functools.cache
def _code_table(name: str, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """``(base, boundary)``: the code of ``y`` is ``base[r] + (y > boundary[r])`` for the row ``r`` of
    ``y``'s order key, its top 16 bits; ``base[r]`` counts the decision boundaries below the row,
    ``boundary[r]`` is the one boundary inside it (+inf if none). Exact: every row holds at most one
    boundary (``None`` otherwise, and quantisation searches instead); neighbouring boundaries of
    the maps are further apart than a bfloat16 spacing. Two gathers and a comparison per element
    instead of a binary search: several times faster on a CPU.
    """
    boundaries = _cached_map(name, torch.device("cpu"))[1]
    keys = _order_key(boundaries).long()
    rows = keys >> _PREFIX_BITS
    if rows.unique().numel() != rows.numel():
        return None
    offset = 1 << (31 - _PREFIX_BITS)
    starts = (torch.arange(2 * offset, dtype=torch.int64) - offset) << _PREFIX_BITS
    base = torch.searchsorted(keys, starts).to(torch.uint8)  # boundaries whose key is below the row's first key
    boundary = torch.full((2 * offset,), torch.inf, dtype=torch.float32)
    boundary[rows + offset] = boundaries
    return base.to(device), boundary.to(device)


def _codes(normalized: Tensor, name: str) -> Tensor:
    """uint8 codes of float32 values in ``[-1, 1]`` (finite): the number of decision boundaries below each."""
    table = _code_table(name, normalized.device)
    if table is None:
        return torch.bucketize(normalized, _cached_map(name, normalized.device)[1], out_int32=True).to(torch.uint8)
    base, boundary = table
    rows = (_order_key(normalized) >> _PREFIX_BITS).long() + (1 << (31 - _PREFIX_BITS))
    return base[rows] + (normalized > boundary[rows]).to(torch.uint8)


def quantization_map(name: str, device: torch.device | str = "cpu") -> Tensor:
    """Map ``name`` as a float32 tensor on ``device``; one shared tensor per (name, device): do not modify it."""
    return _cached_map(name, torch.device(device))[0]


def max_gap(name: str) -> float:
    """Largest distance between neighbouring entries of map ``name`` (error bound: ``absmax · max_gap / 2``)."""
    values = map_values(name)
    return max(b - a for a, b in itertools.pairwise(values))


def num_blocks(numel: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks for ``numel`` elements: ``ceil(numel / block_size)``."""
    return -(-numel // block_size)


def _padded_blocks(flat: Tensor, block_size: int) -> Tensor:
    """``flat`` (1-d) zero-padded to whole blocks and viewed as ``(blocks, block_size)``."""
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_blockwise(x: Tensor, name: str, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)``: uint8 codes of ``x``'s shape and float32 absmax per block (see the module doc)."""
    _check_map_name(name)
    n = x.numel()
    # Saturate (module doc): ±inf and float64 values beyond float32's range become ±FLOAT32_MAX; NaN stays.
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.clamp(-FLOAT32_MAX, FLOAT32_MAX).to(torch.float32)
    blocks = _padded_blocks(flat, block_size).clamp(-FLOAT32_MAX, FLOAT32_MAX)
    absmax = blocks.abs().amax(dim=1)
    finite = torch.isfinite(absmax)
    # Divide (never multiply by a reciprocal) so that the absmax element becomes exactly ±1; zero and
    # NaN blocks are divided by 1 and zeroed: their codes are those of 0.
    usable = finite & (absmax > 0)
    scale = torch.where(usable, absmax, torch.ones_like(absmax))
    normalized = torch.where(usable.unsqueeze(1), blocks / scale.unsqueeze(1), torch.zeros_like(blocks))
    # A non-zero value whose quotient underflowed to ±0 keeps its sign and gets the smallest entry.
    underflowed = (normalized == 0) & (blocks != 0) & usable.unsqueeze(1)
    normalized = torch.where(underflowed, torch.copysign(torch.tensor(_SMALLEST_SUBNORMAL), blocks), normalized)
    codes = _codes(normalized, name)
    absmax = torch.where(finite, absmax, torch.full_like(absmax, math.nan))
    return codes.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """float32 values ``M[c_i] · A_b`` of ``codes``'s shape."""
    values = qmap[codes.reshape(-1).long()]
    blocks = _padded_blocks(values, block_size) * absmax.unsqueeze(1)
    return blocks.reshape(-1)[: codes.numel()].reshape(codes.shape)


@dataclass(eq=False)
class Q8State:
    """One 8-bit block-wise quantised state: plain tensors, updated in place by :meth:`store`.

    ``codes`` (uint8) has the state's shape; ``absmax`` (float32) one entry per block of
    ``block_size`` elements in row-major order; ``qmap`` is the shared map ``map_name``.
    """

    codes: Tensor
    absmax: Tensor
    map_name: str
    block_size: int = BLOCK_SIZE

    @classmethod
    def zeros(
        cls, shape: tuple[int, ...], map_name: str, device: torch.device | str, block_size: int = BLOCK_SIZE
    ) -> Q8State:
        """A state holding zeros (codes of 0, absmax 0)."""
        _check_map_name(map_name)
        zero_code = map_values(map_name).index(0.0)
        codes = torch.full(shape, zero_code, dtype=torch.uint8, device=device)
        absmax = torch.zeros(num_blocks(codes.numel(), block_size), dtype=torch.float32, device=device)
        return cls(codes, absmax, map_name, block_size)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def qmap(self) -> Tensor:
        return quantization_map(self.map_name, self.codes.device)

    def load(self) -> Tensor:
        """The dequantised value, float32."""
        return dequantize_blockwise(self.codes, self.absmax, self.qmap, self.block_size)

    def store(self, value: Tensor) -> None:
        """Quantise ``value`` (same shape) into this state's tensors, in place."""
        if value.shape != self.codes.shape:
            raise ValueError(
                f"cannot store a value of shape {tuple(value.shape)} in a quantised state of shape {tuple(self.shape)}"
            )
        codes, absmax = quantize_blockwise(value, self.map_name, self.block_size)
        self.codes.copy_(codes)
        self.absmax.copy_(absmax)

    @property
    def nbytes(self) -> int:
        """Bytes held by this state (codes and absmax; the shared map is not counted)."""
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()

    def to_dict(self) -> dict[str, Tensor | str | int]:
        """A plain dict of tensors, strings and ints (``torch.load(weights_only=True)`` reads it back).

        The map itself is saved (``qmap``) so that a checkpoint says what its codes mean.
        """
        return {
            "codes": self.codes,
            "absmax": self.absmax,
            "qmap": self.qmap,
            "map_name": self.map_name,
            "block_size": self.block_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Tensor | str | int], device: torch.device | str | None = None) -> Q8State:
        """Rebuild a state saved by :meth:`to_dict` (bit-exact), optionally on another ``device``."""
        codes, absmax, qmap = data.get("codes"), data.get("absmax"), data.get("qmap")
        map_name, block_size = data.get("map_name"), data.get("block_size")
        if not (isinstance(codes, Tensor) and codes.dtype == torch.uint8):
            raise ValueError(f"quantised state: 'codes' must be a uint8 tensor, got {_describe(codes)}")
        if not (isinstance(absmax, Tensor) and absmax.dtype == torch.float32 and absmax.dim() == 1):
            raise ValueError(f"quantised state: 'absmax' must be a 1-d float32 tensor, got {_describe(absmax)}")
        if not isinstance(map_name, str) or map_name not in MAP_NAMES:
            raise ValueError(f"quantised state: 'map_name' must be one of {', '.join(MAP_NAMES)}, got {map_name!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"quantised state: 'block_size' must be a positive integer, got {block_size!r}")
        if absmax.numel() != num_blocks(codes.numel(), block_size):
            raise ValueError(
                f"quantised state: {codes.numel()} codes in blocks of {block_size} need "
                f"{num_blocks(codes.numel(), block_size)} absmax values, got {absmax.numel()}"
            )
        if qmap is not None and not (isinstance(qmap, Tensor) and torch.equal(qmap.cpu(), quantization_map(map_name))):
            raise ValueError(f"quantised state: the saved map differs from portopt's {map_name!r} map")
        target = codes.device if device is None else torch.device(device)
        return cls(codes.to(target), absmax.to(target), map_name, block_size)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)
