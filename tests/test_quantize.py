"""8-bit block-wise quantisation: the dynamic maps, error bounds, exactness, edge cases, saving.

Truth used here: the map entries and gaps computed by hand from the construction of
Dettmers et al. 2022 (decimal exponent, linear fraction), brute-force nearest entries in
float64, per-block absmax computed independently, and float32 Adam moments.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from portopt.precision.quantize import (
    BLOCK_SIZE,
    MAP_NAMES,
    Q8State,
    dequantize_blockwise,
    dynamic_magnitudes,
    map_values,
    max_gap,
    num_blocks,
    quantization_map,
    quantize_blockwise,
)

SIZES = (0, 1, 255, 256, 257, 1000, 70_001)


def roundtrip(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, absmax = quantize_blockwise(x, name)
    return codes, absmax, dequantize_blockwise(codes, absmax, quantization_map(name))


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """Each element's block absmax, computed with a plain loop over blocks."""
    flat = x.reshape(-1).double()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), BLOCK_SIZE):
        out[start : start + BLOCK_SIZE] = flat[start : start + BLOCK_SIZE].abs().max()
    return out.reshape(x.shape)


def block_absmax_of(state: Q8State) -> torch.Tensor:
    """Each element's block absmax, from the absmax the state keeps (checked against block_absmax above)."""
    return state.absmax.double().repeat_interleave(BLOCK_SIZE)[: state.codes.numel()]


def sample(n: int, name: str, seed: int = 0) -> torch.Tensor:
    """Values over several decades (as moments are), non-negative for the unsigned map."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))
    return x.abs() if name == "unsigned" else x


# --- the maps --------------------------------------------------------------------------------------------------------
def test_maps_by_hand() -> None:
    """Entries computed from the construction: 10^-E · (0.1 + 0.9 (k+1)/2^F) with F + E = bits − 1."""
    signed, unsigned = map_values("signed"), map_values("unsigned")
    assert (len(signed), len(unsigned)) == (255, 256)
    # Top decade, 7 magnitude bits: F = 6, so steps of 0.9/64 from just above 0.1 up to 1.
    assert signed[-1] == 1.0
    assert signed[-2] == pytest.approx(1 - 0.9 / 64, abs=1e-15)
    assert min(v for v in signed if v > 0.1) == pytest.approx(0.1 + 0.9 / 64, abs=1e-15)
    assert 0.1 in [pytest.approx(v, abs=1e-16) for v in signed]  # top of the second decade
    assert min(v for v in signed if v > 0) == pytest.approx(1e-6, rel=1e-12)  # E = 6, F = 0
    assert min(v for v in unsigned if v > 0) == pytest.approx(1e-7, rel=1e-12)  # E = 7, F = 0
    assert unsigned[-2] == pytest.approx(1 - 0.9 / 128, abs=1e-15)
    assert signed == [-v for v in reversed(signed)]  # symmetric
    assert max_gap("signed") == pytest.approx(0.9 / 64)
    assert max_gap("unsigned") == pytest.approx(0.9 / 128)
    # Decade sizes: 2^F entries per decade, F = bits − 1 − E.
    mags = dynamic_magnitudes(7)
    for exponent in range(7):
        in_decade = [v for v in mags if 0.1 * 10.0**-exponent < v <= 10.0**-exponent * (1 + 1e-12)]
        assert len(in_decade) == 2 ** (6 - exponent)


@pytest.mark.parametrize("name", MAP_NAMES)
def test_map_tensor_is_sorted_float32_with_exact_zero_and_one(name: str) -> None:
    qmap = quantization_map(name)
    assert qmap.dtype == torch.float32
    assert bool((qmap[1:] > qmap[:-1]).all())
    assert 0.0 in qmap.tolist()
    assert qmap[-1].item() == 1.0
    assert qmap[0].item() == (-1.0 if name == "signed" else 0.0)


def test_unknown_map_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid quantisation map: 'int4' \(accepted: signed, unsigned\)"):
        quantize_blockwise(torch.zeros(3), "int4")


# --- errors and nearest entries ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MAP_NAMES)
@pytest.mark.parametrize("n", SIZES)
def test_error_is_at_most_half_the_largest_gap_times_block_absmax(name: str, n: int) -> None:
    x = sample(n, name, seed=n)
    codes, absmax, y = roundtrip(x, name)
    assert codes.shape == x.shape
    assert codes.dtype == torch.uint8
    assert absmax.shape == (math.ceil(n / BLOCK_SIZE),)
    assert absmax.dtype == torch.float32
    if n:
        ref_absmax = block_absmax(x).reshape(-1)[::BLOCK_SIZE]
        assert torch.equal(absmax.double(), ref_absmax)
        bound = block_absmax(x) * (max_gap(name) / 2) * (1 + 1e-5)
        assert bool(((y.double() - x.double()).abs() <= bound).all())


@pytest.mark.parametrize("name", MAP_NAMES)
def test_codes_are_the_nearest_map_entry(name: str) -> None:
    x = sample(4096, name, seed=1)
    x[::97] *= 1e-9  # some values below half the smallest entry, relative to their block
    codes, _, _ = roundtrip(x, name)
    normalized = (x.double() / block_absmax(x)).reshape(-1, 1)
    entries = torch.tensor(map_values(name), dtype=torch.float64)
    chosen = entries[codes.reshape(-1).long()].reshape(-1, 1)
    smallest = entries[entries > 0].min()
    tiny = normalized.abs() < smallest / 2
    assert bool(tiny.any())
    assert bool((~tiny).any())
    # Below half the smallest entry: that entry, with the value's sign (never 0).
    assert torch.equal(chosen[tiny], smallest * torch.sign(normalized[tiny]))
    # Elsewhere: the nearest entry, up to float32 rounding of x / absmax and of the boundaries.
    distance = (normalized - entries).abs()
    nearest = distance.min(dim=1, keepdim=True).values
    assert bool(((normalized - chosen).abs()[~tiny] <= nearest[~tiny] + 1e-7).all())


@pytest.mark.parametrize("name", MAP_NAMES)
def test_map_entries_are_exact(name: str) -> None:
    """A block holding every map entry times a power of two dequantises to itself, code by code."""
    qmap = quantization_map(name)
    for scale in (1.0, 2.0**-20, 2.0**40):
        codes, absmax, y = roundtrip(qmap * scale, name)
        assert torch.equal(codes.long(), torch.arange(len(qmap)))
        assert absmax.item() == scale
        assert torch.equal(y, qmap * scale)


@pytest.mark.parametrize("name", MAP_NAMES)
def test_monotone(name: str) -> None:
    x = torch.sort(sample(BLOCK_SIZE, name, seed=2)).values
    codes, _, y = roundtrip(x, name)
    assert bool((codes[1:] >= codes[:-1]).all())
    assert bool((y[1:] >= y[:-1]).all())


@pytest.mark.parametrize("name", MAP_NAMES)
@pytest.mark.parametrize("n", SIZES)
def test_idempotent(name: str, n: int) -> None:
    codes, absmax, y = roundtrip(sample(n, name, seed=3), name)
    codes2, absmax2, y2 = roundtrip(y, name)
    assert torch.equal(codes, codes2)
    assert torch.equal(absmax, absmax2)
    assert torch.equal(y, y2)


def test_sign_handling() -> None:
    x = sample(3000, "signed", seed=4)
    _, _, y = roundtrip(x, "signed")
    _, _, y_neg = roundtrip(-x, "signed")
    assert torch.equal(y_neg, -y)  # the signed map is symmetric
    assert bool((torch.sign(y) * torch.sign(x) >= 0).all())  # never flips a sign
    # The unsigned map has no negative entries: a negative input is stored as 0.
    _, _, y_unsigned = roundtrip(torch.tensor([4.0, -1.0, -4.0]), "unsigned")
    assert y_unsigned.tolist() == [4.0, 0.0, 0.0]


def test_small_magnitudes_keep_relative_precision() -> None:
    """Values many decades below the absmax are not flushed to zero (the point of a dynamic map)."""
    x = torch.tensor([1.0, 1e-2, -1e-3, 1e-4, 3e-5])
    _, _, y = roundtrip(x, "signed")
    assert bool(((y - x).abs() <= x.abs() * 0.45).all())
    assert bool((y != 0).all())


@pytest.mark.parametrize(("name", "smallest"), [("signed", 1e-6), ("unsigned", 1e-7)])
def test_non_zero_values_are_never_stored_as_zero(name: str, smallest: float) -> None:
    """Below the smallest entry a value gets that entry (an 8-bit v of 0 would make m/(√v+ε) explode)."""
    x = torch.tensor([1.0, 1e-30, smallest / 3, 0.0, -0.0, smallest * 0.9])
    expected = [1.0, smallest, smallest, 0.0, 0.0, smallest]
    assert roundtrip(x, name)[2].tolist() == pytest.approx(expected, rel=1e-6)
    if name == "signed":
        assert roundtrip(-x, name)[2].tolist() == pytest.approx([-v for v in expected], rel=1e-6)


# --- edge cases --------------------------------------------------------------------------------------------------------
def test_zero_blocks_and_shapes() -> None:
    x = torch.zeros(3, 200)
    x[2, 100:] = torch.linspace(-1, 1, 100)
    codes, absmax, y = roundtrip(x, "signed")
    assert codes.shape == (3, 200)
    assert absmax.shape == (3,)
    assert absmax[0].item() == 0.0
    assert absmax[1].item() > 0
    assert torch.equal(y[x == 0], torch.zeros(int((x == 0).sum())))  # zeros stay exact zeros
    empty = torch.empty(0, 7)
    codes, absmax, y = roundtrip(empty, "unsigned")
    assert codes.shape == (0, 7)
    assert absmax.shape == (0,)
    assert y.shape == (0, 7)


def test_non_contiguous_input_uses_logical_order() -> None:
    x = sample(600, "signed", seed=5).reshape(20, 30).t()
    codes, absmax = quantize_blockwise(x, "signed")
    codes_c, absmax_c = quantize_blockwise(x.contiguous(), "signed")
    assert torch.equal(codes, codes_c)
    assert torch.equal(absmax, absmax_c)


def test_nan_poisons_only_its_block() -> None:
    x = sample(3 * BLOCK_SIZE, "signed", seed=6)
    x[BLOCK_SIZE + 7] = math.nan
    _, absmax, y = roundtrip(x, "signed")
    assert math.isnan(absmax[1].item())
    assert bool(torch.isnan(y[BLOCK_SIZE : 2 * BLOCK_SIZE]).all())
    clean = torch.cat([x[:BLOCK_SIZE], x[2 * BLOCK_SIZE :]])
    assert torch.equal(torch.cat([y[:BLOCK_SIZE], y[2 * BLOCK_SIZE :]]), roundtrip(clean, "signed")[2])


@pytest.mark.parametrize("name", MAP_NAMES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, 1e39, -1e300])
def test_overflow_saturates_at_the_float32_maximum(name: str, bad: float) -> None:
    """±inf (an overflowed state) and float64 values beyond float32's range are stored as ±float32 max."""
    x = sample(3 * BLOCK_SIZE, name, seed=6).double()
    x[BLOCK_SIZE + 7] = bad
    _, absmax, y = roundtrip(x, name)
    assert bool(torch.isfinite(absmax).all())
    assert bool(torch.isfinite(y).all())
    fmax = torch.finfo(torch.float32).max
    expected = math.copysign(fmax, bad) if name == "signed" or bad > 0 else 0.0  # unsigned: negatives are 0
    assert y[BLOCK_SIZE + 7].item() == expected
    clean = torch.cat([x[:BLOCK_SIZE], x[2 * BLOCK_SIZE :]])
    assert torch.equal(torch.cat([y[:BLOCK_SIZE], y[2 * BLOCK_SIZE :]]), roundtrip(clean, name)[2])


@pytest.mark.parametrize(("name", "smallest"), [("signed", 1e-6), ("unsigned", 1e-7)])
def test_a_value_whose_quotient_underflows_is_not_stored_as_zero(name: str, smallest: float) -> None:
    """Next to a spike, x/A_b underflows float32; the value still reads back as the smallest entry."""
    x = torch.tensor([3e38, 1e-10, 1e-30, 0.0])
    y = roundtrip(x, name)[2]
    assert y.tolist() == pytest.approx([3e38, smallest * 3e38, smallest * 3e38, 0.0], rel=1e-6)


def test_other_block_sizes() -> None:
    x = sample(1000, "signed", seed=7)
    codes, absmax = quantize_blockwise(x, "signed", block_size=64)
    assert absmax.shape == (num_blocks(1000, 64),) == (16,)
    y = dequantize_blockwise(codes, absmax, quantization_map("signed"), block_size=64)
    absmax64 = x.reshape(-1).abs()
    bound = torch.cat([absmax64[i : i + 64].max().expand(min(64, 1000 - i)) for i in range(0, 1000, 64)])
    assert bool(((y - x).abs() <= bound * max_gap("signed") / 2 * (1 + 1e-5)).all())


# --- Q8State -----------------------------------------------------------------------------------------------------------
def test_q8_state_store_load_and_bytes() -> None:
    state = Q8State.zeros((3, 100), "unsigned", "cpu")
    assert torch.equal(state.load(), torch.zeros(3, 100))
    codes_ptr = state.codes.data_ptr()
    value = sample(300, "unsigned", seed=8).reshape(3, 100)
    state.store(value)
    assert state.codes.data_ptr() == codes_ptr  # in place
    assert torch.equal(state.load(), roundtrip(value, "unsigned")[2])
    assert state.nbytes == 300 + 4 * 2
    assert state.shape == (3, 100)
    with pytest.raises(ValueError, match=r"shape \(300,\) in a quantised state of shape \(3, 100\)"):
        state.store(value.reshape(-1))


def test_q8_state_saves_and_loads_exactly_with_weights_only() -> None:
    state = Q8State.zeros((1000,), "signed", "cpu")
    state.store(sample(1000, "signed", seed=9))
    buffer = io.BytesIO()
    torch.save({"exp_avg": state.to_dict()}, buffer)
    buffer.seek(0)
    loaded = Q8State.from_dict(torch.load(buffer, weights_only=True)["exp_avg"])
    assert torch.equal(loaded.codes, state.codes)
    assert torch.equal(loaded.absmax, state.absmax)
    assert torch.equal(loaded.load(), state.load())
    assert loaded.map_name == "signed"


def test_q8_state_from_dict_rejects_bad_data() -> None:
    good = Q8State.zeros((300,), "signed", "cpu").to_dict()
    with pytest.raises(ValueError, match=r"'codes' must be a uint8 tensor, got a torch\.float32 tensor"):
        Q8State.from_dict({**good, "codes": torch.zeros(300)})
    with pytest.raises(ValueError, match="300 codes in blocks of 256 need 2 absmax values, got 1"):
        Q8State.from_dict({**good, "absmax": torch.zeros(1)})
    with pytest.raises(ValueError, match="'map_name' must be one of signed, unsigned, got 'nf4'"):
        Q8State.from_dict({**good, "map_name": "nf4"})
    with pytest.raises(ValueError, match="the saved map differs from portopt's 'signed' map"):
        Q8State.from_dict({**good, "qmap": quantization_map("unsigned")})


# --- moments over many steps -------------------------------------------------------------------------------------------
def test_adam_moments_do_not_drift() -> None:
    """Adam's moments kept in 8 bits (decoded, updated in float32, re-encoded each step) against float32.

    Each step adds at most half a gap of the current block absmax to the error, and the EMA
    shrinks older errors by β, so |m̂_t − m_t| <= Σ_k β^(t−k) · A_k · gap/2 (A_k: the block
    absmax at step k): a bound that holds however long the run, checked on every step.
    """
    n, steps, b1, b2 = 2048, 300, 0.9, 0.999
    gen = torch.Generator().manual_seed(10)
    scales = torch.exp(2 * torch.randn(n, generator=gen))  # per-element gradient scales over decades
    m, v, m_hat, v_hat = (torch.zeros(n) for _ in range(4))
    m_q = Q8State.zeros((n,), "signed", "cpu")
    v_q = Q8State.zeros((n,), "unsigned", "cpu")
    bound_m = torch.zeros(n, dtype=torch.float64)
    bound_v = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        g = (0.3 + torch.randn(n, generator=gen)) * scales
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_q.store(b1 * m_hat + (1 - b1) * g)
        v_q.store(b2 * v_hat + (1 - b2) * g * g)
        m_hat, v_hat = m_q.load(), v_q.load()
        bound_m = b1 * bound_m + block_absmax_of(m_q) * max_gap("signed") / 2
        bound_v = b2 * bound_v + block_absmax_of(v_q) * max_gap("unsigned") / 2
        assert bool(((m_hat - m).abs() <= bound_m * 1.001 + 1e-6 * m.abs()).all())
        assert bool(((v_hat - v).abs() <= bound_v * 1.001 + 1e-6 * v.abs()).all())
    # Gradient scales spread over ~5 decades in a block put some v far below the block's absmax: stored
    # as 0 they would turn m/(√v + ε) into m/ε (an error ~1e6 times the step here). The 8-bit step must
    # stay closer to the float32 step than no step at all is.
    bc1, bc2 = 1 - b1**steps, 1 - b2**steps
    direction = (m / bc1) / ((v / bc2).sqrt() + 1e-8)
    direction_q = (m_hat / bc1) / ((v_hat / bc2).sqrt() + 1e-8)
    assert (direction_q - direction).norm() < direction.norm()


@pytest.mark.cuda
@pytest.mark.parametrize("name", MAP_NAMES)
def test_cuda_codes_equal_cpu_codes(name: str) -> None:
    x = sample(70_001, name, seed=11)
    codes, absmax = quantize_blockwise(x, name)
    codes_cuda, absmax_cuda = quantize_blockwise(x.cuda(), name)
    assert torch.equal(codes_cuda.cpu(), codes)
    assert torch.equal(absmax_cuda.cpu(), absmax)
    y = dequantize_blockwise(codes_cuda, absmax_cuda, quantization_map(name, "cuda"))
    assert torch.equal(y.cpu(), dequantize_blockwise(codes, absmax, quantization_map(name)))
