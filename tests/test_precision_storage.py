"""States in their storage form (format resolution, allocate, encode/decode) and master weights.

Truth: torch's own casts (round to nearest), the quantiser and stochastic rounding tested in
their own files, and hand arithmetic of bf16 spacing for the master-weight test.
"""

from __future__ import annotations

import pytest
import torch

from portopt.precision.policy import parse_policy, preset
from portopt.precision.quantize import Q8State, quantize_blockwise
from portopt.precision.rounding import noise_key, round_stochastic_bf16
from portopt.precision.storage import (
    StateFormat,
    allocate_state,
    create_master,
    decode,
    encode,
    state_format,
    state_nbytes,
    write_back,
)
from portopt.spec.expr import const
from portopt.spec.symbols import Layout, StateDecl

M = StateDecl("exp_avg", "m")
V = StateDecl("exp_avg_sq", "v")
MU = StateDecl("mu_product", "Π", init=const(1.0), layout=Layout.TENSOR)
ROW = StateDecl("row", "r", layout=Layout.ROW)
BIG, SMALL = (128, 64), (63, 64)  # 8192 and 4032 elements: either side of min_8bit_size = 4096


@pytest.mark.parametrize(
    ("policy", "decl", "shape", "param_dtype", "expected"),
    [
        ("torch", M, BIG, torch.bfloat16, StateFormat(torch.bfloat16)),
        ("torch", M, BIG, torch.float32, StateFormat(torch.float32)),
        ("fp32", M, BIG, torch.bfloat16, StateFormat(torch.float32)),
        ("fp32", M, BIG, torch.float64, StateFormat(torch.float64)),  # at least fp32
        ("bf16-states", M, BIG, torch.float32, StateFormat(torch.bfloat16)),
        ("bf16-states-sr", M, BIG, torch.float32, StateFormat(torch.bfloat16, stochastic=True)),
        ("pure-bf16-sr", M, BIG, torch.float32, StateFormat(torch.float32)),  # "param" storage of fp32: no SR
        ("q8-states", M, BIG, torch.float32, StateFormat(torch.uint8, "signed", 256)),
        ("q8-states,block_size=64", M, BIG, torch.bfloat16, StateFormat(torch.uint8, "signed", 64)),
        ("q8-states", M, SMALL, torch.float32, StateFormat(torch.float32)),  # small: fp32
        ("q8-states,min_8bit_size=0", M, SMALL, torch.float32, StateFormat(torch.uint8, "signed", 256)),
        ("q8-states", MU, BIG, torch.bfloat16, StateFormat(torch.float32)),  # per-tensor: compute precision
        ("bf16-states", MU, BIG, torch.float64, StateFormat(torch.float64)),
        ("q8-states,min_8bit_size=0", ROW, BIG, torch.float32, StateFormat(torch.uint8, "signed", 256)),
        ("fp32,exp_avg=bf16", M, BIG, torch.float32, StateFormat(torch.bfloat16)),
        ("fp32,exp_avg=param", M, BIG, torch.float16, StateFormat(torch.float16)),
    ],
)
def test_state_format(
    policy: str, decl: StateDecl, shape: tuple[int, ...], param_dtype: torch.dtype, expected: StateFormat
) -> None:
    assert state_format(parse_policy(policy), decl, shape, param_dtype) == expected


def test_nonnegative_states_get_the_unsigned_map() -> None:
    fmt = state_format(preset("q8-states"), V, BIG, torch.float32, nonnegative=True)
    assert fmt == StateFormat(torch.uint8, "unsigned", 256)


@pytest.mark.parametrize("policy", ["torch", "fp32", "bf16-states", "q8-states", "mixed-bf16", "pure-bf16"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_allocate_encode_decode(policy: str, param_dtype: torch.dtype) -> None:
    param = torch.zeros(BIG, dtype=param_dtype)
    stored = allocate_state(M, param, parse_policy(policy))
    fmt = state_format(parse_policy(policy), M, BIG, param_dtype)
    assert stored.shape == BIG
    assert torch.equal(decode(stored), torch.zeros(BIG))
    assert state_nbytes(stored) == fmt.nbytes(BIG)
    value = torch.randn(BIG)
    encode(value, into=stored)
    if isinstance(stored, Q8State):
        codes, absmax = quantize_blockwise(value, "signed")
        assert torch.equal(stored.codes, codes)
        assert torch.equal(stored.absmax, absmax)
    else:
        assert stored.dtype == fmt.dtype
        assert torch.equal(stored, value.to(fmt.dtype))
    assert decode(stored).dtype == torch.float32


def test_decode_does_not_copy_full_precision_and_encode_is_in_place() -> None:
    stored = torch.zeros(10)
    assert decode(stored) is stored
    bf16 = torch.zeros(10, dtype=torch.bfloat16)
    pointer = bf16.data_ptr()
    encode(torch.randn(10), into=bf16)
    assert bf16.data_ptr() == pointer
    assert decode(torch.zeros(3, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match=r"cannot store a value of shape \(3,\) into a state of shape \(10,\)"):
        encode(torch.zeros(3), into=stored)


def test_stochastic_store() -> None:
    value = torch.randn(1000)
    stored = torch.zeros(1000, dtype=torch.bfloat16)
    key = noise_key(1, 2, 3)
    encode(value, into=stored, noise_key=key)
    assert torch.equal(stored, round_stochastic_bf16(value, key))
    assert not torch.equal(stored, value.to(torch.bfloat16))
    fp16 = torch.zeros(1000, dtype=torch.float16)
    encode(value, into=fp16, noise_key=key)  # only bf16 stores are stochastic
    assert torch.equal(fp16, value.to(torch.float16))


def test_per_tensor_state_allocation() -> None:
    stored = allocate_state(MU, torch.zeros(5, 6, dtype=torch.bfloat16), preset("q8-states"))
    assert isinstance(stored, torch.Tensor)
    assert stored.shape == ()
    assert stored.dtype == torch.float32


def test_master_weights_keep_updates_that_bf16_loses() -> None:
    """Adding 1e-4 to 1.0 a hundred times: bf16's spacing at 1 is 2^-7, half of it 0.0039 > 1e-4, so a bf16
    parameter never moves; an fp32 master reaches 1.01 and writes back round(1.01) = 1 + 2^-7 (1.0078125)."""
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = create_master(param)
    assert master.dtype == torch.float32
    assert torch.equal(master, param.float())
    assert master.data_ptr() != param.data_ptr()
    assert not master.requires_grad
    plain = param.detach().clone()
    for _ in range(100):
        master += 1e-4
        write_back(master, param)
        plain.copy_(plain.float() + 1e-4)
    assert bool((plain == 1).all())
    assert master[0].item() == pytest.approx(1.01, abs=1e-5)
    assert bool((param == 1 + 2**-7).all())
    assert torch.equal(param.detach(), master.to(torch.bfloat16))


def test_master_of_non_contiguous_param() -> None:
    param = torch.randn(8, 6, dtype=torch.float16).t()
    master = create_master(param)
    assert master.is_contiguous()
    assert torch.equal(master, param.float())
    master.mul_(2)
    write_back(master, param)
    assert torch.equal(param, master.to(torch.float16))
