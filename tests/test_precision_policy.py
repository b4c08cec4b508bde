"""PrecisionPolicy: fields, presets, the text form (parse and canonical round trip), validation messages."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from portopt.precision.policy import (
    POLICY_KEYS,
    PRESETS,
    PolicyError,
    PrecisionPolicy,
    StateStorage,
    as_policy,
    parse_policy,
    preset,
    preset_name,
)


def test_default_is_torch_behaviour() -> None:
    policy = PrecisionPolicy()
    assert policy.states is StateStorage.PARAM
    assert not policy.master_weights
    assert policy.param_dtype is None
    assert (policy.min_8bit_size, policy.block_size, policy.compute_dtype) == (4096, 256, torch.float32)
    assert preset_name(policy) == "torch"
    assert as_policy(None) == policy


def test_presets() -> None:
    mixed = preset("mixed-bf16")
    assert (mixed.param_dtype, mixed.master_weights, mixed.states) == (torch.bfloat16, True, StateStorage.FP32)
    fp16 = preset("MIXED-FP16")
    assert (fp16.param_dtype, fp16.master_weights) == (torch.float16, True)
    assert preset("q8-states").states is StateStorage.Q8
    assert preset("bf16-states-sr").stochastic_rounding
    assert not preset("pure-bf16").master_weights
    assert preset("pure-bf16").param_dtype == torch.bfloat16
    for name, (policy, description) in PRESETS.items():
        assert description
        assert parse_policy(name) == policy
        assert preset_name(policy) == name
    with pytest.raises(PolicyError, match=r"unknown preset 'mixed-bf8' \(presets: torch, fp32, "):
        preset("mixed-bf8")


def test_parse_examples() -> None:
    policy = parse_policy("master=fp32,states=q8,exp_avg=bf16")
    assert policy.master_weights
    assert policy.states is StateStorage.Q8
    assert policy.storage_of("exp_avg") is StateStorage.BF16
    assert policy.storage_of("exp_avg_sq") is StateStorage.Q8
    with_preset = parse_policy(" mixed-bf16 , exp_avg_sq = Q8 ")
    assert with_preset == PrecisionPolicy(
        param_dtype=torch.bfloat16,
        master_weights=True,
        states=StateStorage.FP32,
        state_overrides=(("exp_avg_sq", StateStorage.Q8),),
    )
    full = parse_policy("params=fp16,master=none,states=bf16,compute=fp64,sr=true,seed=7,min_8bit_size=0,block_size=64")
    assert full == PrecisionPolicy(
        param_dtype=torch.float16,
        states=StateStorage.BF16,
        compute_dtype=torch.float64,
        stochastic_rounding=True,
        seed=7,
        min_8bit_size=0,
        block_size=64,
    )
    assert parse_policy("mixed-bf16,params=any").param_dtype is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty item"),
        ("fp32,,states=q8", "empty item"),
        ("states=q4", r"states='q4' \(accepted: fp32, bf16, q8, param\)"),
        ("exp_avg=int8", r"exp_avg='int8' \(accepted: fp32, bf16, q8, param\)"),
        ("master=bf16", r"master='bf16' \(accepted: fp32, none\)"),
        ("params=int8", r"params='int8' \(accepted: fp32, fp64, bf16, fp16\)"),
        ("compute=bf16", r"compute='bf16' \(accepted: fp32, fp64\)"),
        ("sr=maybe", r"sr='maybe' \(accepted: true, false\)"),
        ("seed=x", r"seed='x' \(an integer\)"),
        ("block_size=0", r"block_size=0 \(an integer >= 1\)"),
        ("seed=-1", r"seed=-1 \(an integer >= 0\)"),
        ("states=q8,mixed-bf16", "a preset may only come first"),
        ("exp_avg", "unknown preset 'exp_avg'"),
    ],
)
def test_parse_errors_name_field_value_and_accepted(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_constructor_normalises_and_validates() -> None:
    loose = PrecisionPolicy(
        param_dtype="bf16",  # type: ignore[arg-type]
        states="Q8",  # type: ignore[arg-type]
        state_overrides={"exp_avg": "bf16", "a": StateStorage.FP32},  # type: ignore[arg-type]
    )
    strict = PrecisionPolicy(
        param_dtype=torch.bfloat16,
        states=StateStorage.Q8,
        state_overrides=(("a", StateStorage.FP32), ("exp_avg", StateStorage.BF16)),
    )
    assert loose == strict
    assert hash(loose) == hash(strict)
    with pytest.raises(PolicyError, match=r"compute_dtype=torch.bfloat16 \(accepted: fp32, fp64\)"):
        PrecisionPolicy(compute_dtype=torch.bfloat16)
    with pytest.raises(PolicyError, match=r"param_dtype=torch.int8 \(accepted: fp32, fp64, bf16, fp16\)"):
        PrecisionPolicy(param_dtype=torch.int8)
    with pytest.raises(PolicyError, match=r"master_weights='yes' \(True or False\)"):
        PrecisionPolicy(master_weights="yes")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match=r"min_8bit_size=True \(an integer >= 0\)"):
        PrecisionPolicy(min_8bit_size=True)
    with pytest.raises(PolicyError, match=r"state_overrides entry \('exp_avg',\)"):
        PrecisionPolicy(state_overrides=(("exp_avg",),))  # type: ignore[arg-type]


policies = st.builds(
    PrecisionPolicy,
    param_dtype=st.sampled_from([None, torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    master_weights=st.booleans(),
    states=st.sampled_from(list(StateStorage)),
    state_overrides=st.dictionaries(
        st.sampled_from(["exp_avg", "exp_avg_sq", "momentum_buffer", "sum"]), st.sampled_from(list(StateStorage))
    ),
    compute_dtype=st.sampled_from([torch.float32, torch.float64]),
    stochastic_rounding=st.booleans(),
    seed=st.integers(0, 2**40),
    min_8bit_size=st.integers(0, 10**6),
    block_size=st.integers(1, 4096),
)


@given(policies)
def test_text_form_round_trips(policy: PrecisionPolicy) -> None:
    text = policy.to_text()
    assert parse_policy(text) == policy
    assert str(policy) == text
    assert pickle.loads(pickle.dumps(policy)) == policy


def test_canonical_text() -> None:
    assert PrecisionPolicy().to_text() == "states=param"
    assert preset("mixed-bf16").to_text() == "states=fp32,params=bf16,master=fp32"
    assert parse_policy("exp_avg_sq=bf16,exp_avg=q8,states=fp32,sr=on").to_text() == (
        "states=fp32,sr=true,exp_avg=q8,exp_avg_sq=bf16"
    )


def test_policy_is_a_value_for_param_groups() -> None:
    groups: list[dict[str, Any]] = [
        {"params": [], "precision": preset("q8-states")},
        {"params": [], "precision": "bf16-states"},
    ]
    resolved = [as_policy(group["precision"]) for group in groups]
    assert resolved == [preset("q8-states"), preset("bf16-states")]
    assert len({preset("fp32"), parse_policy("states=fp32"), PrecisionPolicy(states=StateStorage.FP32)}) == 1
    with pytest.raises(PolicyError, match=r"Invalid precision policy: 3 \(int\); give a PrecisionPolicy"):
        as_policy(3)  # type: ignore[arg-type]


def test_queries() -> None:
    policy = parse_policy("mixed-bf16,exp_avg=q8,sr=true,seed=11")
    assert policy.needs_master(torch.bfloat16)
    assert policy.needs_master(torch.float16)
    assert not policy.needs_master(torch.float32)
    assert not PrecisionPolicy().needs_master(torch.bfloat16)
    assert policy.compute_dtype_for(torch.bfloat16) == torch.float32
    assert policy.compute_dtype_for(torch.float64) == torch.float64
    assert parse_policy("compute=fp64").compute_dtype_for(torch.float16) == torch.float64
    key = policy.rounding_key(3, 5)
    assert key is not None
    assert key == policy.rounding_key(3, 5)
    assert (
        len({key, policy.rounding_key(4, 5), policy.rounding_key(3, 6), parse_policy("sr=true").rounding_key(3, 5)})
        == 4
    )
    assert PrecisionPolicy().rounding_key(3, 5) is None


def test_checks_against_model_and_algorithm() -> None:
    policy = parse_policy("mixed-bf16,exp_avgsq=q8")
    with pytest.raises(PolicyError, match=r"overrides state 'exp_avgsq', which adam does not have") as info:
        policy.check_states(("exp_avg", "exp_avg_sq"), "adam")
    assert "its states: exp_avg, exp_avg_sq; policy keys: " + ", ".join(POLICY_KEYS) in str(info.value)
    parse_policy("exp_avg=q8").check_states(("exp_avg",), "adam")
    policy.check_param(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(PolicyError, match=r"expects bf16 parameters, but layer.weight is fp32"):
        policy.check_param(torch.zeros(2), where="layer.weight")
    PrecisionPolicy().check_param(torch.zeros(2, dtype=torch.float16))
