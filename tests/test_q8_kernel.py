"""The in-pass 8-bit codec (portopt.precision.q8_kernel) against the reference codec (quantize.py).

The compiled step encodes and decodes 8-bit states with plain torch ops on block views
(``(rows, B)``, one block per row); :mod:`portopt.precision.quantize` is the format's definition.
Encoding must give the reference's codes and absmax bit for bit, for values of every regime
(normal, subnormal quotients, zeros, ±inf, NaN, float64 beyond float32's range, -0.0), and
decoding must give the reference's values exactly.
"""

from __future__ import annotations

import pytest
import torch

from portopt.precision.q8_kernel import dequantize_rows, packed_code_table, padded_map, quantize_rows
from portopt.precision.quantize import dequantize_blockwise, quantization_map, quantize_blockwise

CPU = torch.device("cpu")
BLOCK = 64


def _values(seed: int, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of mixed regimes: normal values of several scales, zeros, tiny values next to large ones."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, BLOCK, generator=gen, dtype=torch.float64)
    x *= torch.logspace(-30, 30, rows, dtype=torch.float64).unsqueeze(1)
    x[0] = 0.0  # an all-zero block
    x[1, ::3] = 0.0
    x[2, 0] = 1e30
    x[2, 1:] = 1e-20  # quotients that underflow to 0: coded as the smallest entry, with their sign
    x[3, 5] = -0.0
    return x.to(dtype)


def _check(x: torch.Tensor, name: str) -> None:
    codes, absmax = quantize_rows(x, packed_code_table(name, CPU))
    want_codes, want_absmax = quantize_blockwise(x.reshape(-1), name, BLOCK)
    assert torch.equal(codes.reshape(-1), want_codes)
    torch.testing.assert_close(absmax.reshape(-1), want_absmax, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_codes_and_absmax_are_the_reference_s_bit_for_bit(name: str) -> None:
    x = _values(0, 40)
    if name == "unsigned":
        x = x.abs()
    _check(x, name)


@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_non_finite_values_saturate_or_poison_their_block_as_the_reference(name: str) -> None:
    x = _values(1, 8).abs() if name == "unsigned" else _values(1, 8)
    x[4, 7] = torch.inf  # saturates to float32's largest value
    x[5, 2] = torch.nan  # its block's absmax becomes NaN
    x[6, :] = -torch.inf if name == "signed" else torch.inf
    _check(x, name)


def test_float64_values_beyond_float32_range_saturate_as_the_reference() -> None:
    x = _values(2, 6, torch.float64)
    x[3, 3] = 1e300
    x[4, 1] = -1e300
    _check(x, "signed")


@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_decoding_is_the_reference_s(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    top = 255 if name == "signed" else 256
    codes = torch.randint(0, top, (12, BLOCK), generator=gen, dtype=torch.uint8)
    absmax = torch.rand(12, 1, generator=gen) * 10
    got = dequantize_rows(codes, absmax, padded_map(name, CPU))
    want = dequantize_blockwise(codes.reshape(-1), absmax.reshape(-1), quantization_map(name), BLOCK)
    assert torch.equal(got.reshape(-1), want)


def test_a_code_outside_the_signed_map_reads_nan_not_memory_past_it() -> None:
    qmap = padded_map("signed", CPU)
    assert qmap.numel() == 256
    assert torch.isnan(qmap[255])
    assert torch.equal(qmap[:255], quantization_map("signed"))
