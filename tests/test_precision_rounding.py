"""Rounding float32 to bfloat16: to nearest (torch's cast) and stochastically (unbiased, reproducible).

Truth used here: the bf16 neighbours of a float32 read off its bit pattern, the exact
expectation ``x`` of an unbiased rounding (checked with a binomial confidence bound), and a
pure-Python implementation of the noise hash (lowbias32 on Python integers).
"""

from __future__ import annotations

import math

import pytest
import torch

from portopt.precision.rounding import noise_key, random_bits16, round_nearest_bf16, round_stochastic_bf16

BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def python_lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def python_bits16(index: int, key: int) -> int:
    x = python_lowbias32((index & 0xFFFFFFFF) ^ (key & 0xFFFFFFFF))
    x = python_lowbias32(x ^ (index >> 32) ^ ((key >> 32) & 0xFFFFFFFF))
    return x >> 16


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just toward zero and just away from zero of float32 ``x`` (bit truncation)."""
    bits = x.view(torch.int32)
    toward = (bits & -(1 << 16)).view(torch.float32)
    away = ((bits & -(1 << 16)) + (1 << 16)).view(torch.float32)
    return toward, away


def test_nearest_is_torch_cast() -> None:
    x = torch.randn(1000) * 1e3
    assert torch.equal(round_nearest_bf16(x), x.to(torch.bfloat16))


def test_noise_hash_matches_python_reference() -> None:
    key = noise_key(1234, 7, 3)
    bits = random_bits16((5, 7), key, "cpu")
    assert bits.dtype == torch.int32
    assert bits.shape == (5, 7)
    assert bits.reshape(-1).tolist() == [python_bits16(i, key) for i in range(35)]


def test_noise_is_uniform() -> None:
    bits = random_bits16((1 << 16,), noise_key(0, 1, 0), "cpu").long()
    n = bits.numel()
    # Each of the 16 bits is set half of the time (5 standard deviations: sqrt(n/4) = 128).
    for position in range(16):
        assert abs(int(((bits >> position) & 1).sum()) - n / 2) < 5 * math.sqrt(n / 4)
    # 16 equal bins of the value: a chi-square with 15 degrees of freedom, far below its 1e-6 quantile (~57).
    counts = torch.bincount(bits >> 12, minlength=16).double()
    assert float(((counts - n / 16) ** 2 / (n / 16)).sum()) < 57


def test_noise_key_mixes_its_inputs_and_checks_them() -> None:
    keys = {noise_key(seed, step, index) for seed in range(3) for step in range(3) for index in range(3)}
    assert len(keys) == 27
    assert all(0 <= k < 2**64 for k in keys)
    with pytest.raises(ValueError, match=r"Invalid step for stochastic rounding: -1 \(a non-negative integer\)"):
        noise_key(0, -1, 0)
    with pytest.raises(ValueError, match=r"Invalid seed for stochastic rounding: 1\.5"):
        noise_key(1.5, 0, 0)  # type: ignore[arg-type]


def test_stochastic_gives_one_of_the_two_neighbours() -> None:
    x = torch.randn(10_000) * torch.exp(3 * torch.randn(10_000))
    y = round_stochastic_bf16(x, noise_key(0, 1, 0)).float()
    toward, away = neighbours(x)
    assert bool(((y == toward) | (y == away)).all())
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(round_stochastic_bf16(exact, noise_key(0, 1, 0)).float(), exact)  # bf16 values stay


@pytest.mark.parametrize("x", [1 + 2.0**-10, 1 + 3 * 2.0**-9, -(1 + 2.0**-12), 3.3e-3, -7.77e5])
def test_stochastic_is_unbiased(x: float) -> None:
    """Over many draws the mean is x: the away-neighbour is drawn with probability f = (|x| − |lo|)/ulp."""
    n = 200_000
    values = torch.full((n,), x)
    y = round_stochastic_bf16(values, noise_key(5, 1, 0)).double()
    toward, away = (t[0].item() for t in neighbours(values[:1]))
    f = (abs(x) - abs(toward)) / (abs(away) - abs(toward))
    # Up to the float32 rounding of x itself; 5 binomial standard deviations of the mean.
    x32 = values[0].item()
    tolerance = 5 * abs(away - toward) * math.sqrt(f * (1 - f) / n)
    assert abs(y.mean().item() - x32) < tolerance
    assert abs(float((y == away).double().mean()) - (abs(x32) - abs(toward)) / abs(away - toward)) < 5 * math.sqrt(
        f * (1 - f) / n
    )


def test_stochastic_is_reproducible_and_keyed() -> None:
    x = torch.randn(4096)
    a = round_stochastic_bf16(x, noise_key(1, 2, 3))
    assert torch.equal(a, round_stochastic_bf16(x.clone(), noise_key(1, 2, 3)))
    assert not torch.equal(a, round_stochastic_bf16(x, noise_key(1, 3, 3)))
    assert torch.equal(round_stochastic_bf16(-x, noise_key(1, 2, 3)), -a)  # magnitudes round alike
    # Noise follows the logical element order, so layout does not matter.
    m = torch.randn(64, 32)
    assert torch.equal(round_stochastic_bf16(m.t(), 9), round_stochastic_bf16(m.t().contiguous(), 9))


def test_stochastic_special_values() -> None:
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-40, 3.4e38, -3.4e38])
    y = round_stochastic_bf16(x, noise_key(0, 0, 0)).float()
    assert y[0].item() == math.inf
    assert y[1].item() == -math.inf
    assert math.isnan(y[2].item())
    assert y[3].item() == 0.0
    assert math.copysign(1, y[4].item()) == -1.0
    assert y[5].item() in neighbours(x[5:6])[0].tolist() + neighbours(x[5:6])[1].tolist()  # subnormal
    assert y[6].item() in (BF16_MAX, math.inf)
    assert y[7].item() in (-BF16_MAX, -math.inf)
    with pytest.raises(ValueError, match=r"stochastic rounding takes a float32 tensor, got torch\.float64"):
        round_stochastic_bf16(torch.zeros(2, dtype=torch.float64), 0)


def test_stochastic_rounding_keeps_small_updates_that_nearest_loses() -> None:
    """Adding 1e-4 to 1.0 a hundred times in bf16: to nearest stays at 1 (half an ulp is 2^-8), stochastic
    rounding tracks 1.01 on average."""
    n = 20_000
    nearest = torch.ones(n, dtype=torch.bfloat16)
    stochastic = torch.ones(n, dtype=torch.bfloat16)
    for step in range(100):
        nearest = round_nearest_bf16(nearest.float() + 1e-4)
        stochastic = round_stochastic_bf16(stochastic.float() + 1e-4, noise_key(0, step, 0))
    assert bool((nearest == 1).all())
    assert abs(stochastic.double().mean().item() - 1.01) < 1e-3


@pytest.mark.cuda
def test_cuda_noise_and_rounding_equal_cpu() -> None:
    x = torch.randn(100_003)
    key = noise_key(3, 4, 5)
    assert torch.equal(random_bits16(x.shape, key, "cuda").cpu(), random_bits16(x.shape, key, "cpu"))
    assert torch.equal(round_stochastic_bf16(x.cuda(), key).cpu(), round_stochastic_bf16(x, key))
