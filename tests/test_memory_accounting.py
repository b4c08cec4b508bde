"""Memory accounting: bytes per parameter by hand, and measured allocations of a real model.

Truth: hand arithmetic of dtype sizes (the mixed-precision Adam recipe is 2 + 2 + 4 + 4 + 4
= 16 bytes), and the bytes of the storages actually allocated for a model's states, read
from ``untyped_storage().nbytes()`` and counted once per storage.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

import portopt
from portopt.algorithms import get_spec
from portopt.cli import main
from portopt.lowering.backend import step_counter_dtype
from portopt.precision.memory import bytes_per_parameter, memory_for_params
from portopt.precision.policy import PolicyError, parse_policy, preset
from portopt.precision.quantize import Q8State
from portopt.precision.signs import nonnegative_states
from portopt.precision.storage import allocate_state, create_master, state_nbytes

Q8 = 1 + 4 / 256


@pytest.mark.parametrize(
    ("algorithm", "policy", "param_dtype", "expected"),
    [
        ("adam", "torch", None, {"params": 4, "grads": 4, "master": 0, "exp_avg": 4, "exp_avg_sq": 4, "total": 16}),
        (
            "adam",
            "mixed-bf16",
            None,
            {"params": 2, "grads": 2, "master": 4, "exp_avg": 4, "exp_avg_sq": 4, "total": 16},
        ),
        ("adam", "torch", torch.bfloat16, {"params": 2, "grads": 2, "exp_avg": 2, "exp_avg_sq": 2, "total": 8}),
        ("adam", "bf16-states", None, {"exp_avg": 2, "exp_avg_sq": 2, "total": 12}),
        ("adam", "q8-states", None, {"exp_avg": Q8, "exp_avg_sq": Q8, "total": 8 + 2 * Q8}),
        ("adam", "mixed-bf16-q8", None, {"master": 4, "exp_avg": Q8, "total": 8 + 2 * Q8}),
        ("adam", "q8-states,block_size=64", None, {"exp_avg": 1 + 4 / 64}),
        ("adam", "mixed-fp16,exp_avg_sq=bf16", None, {"master": 4, "exp_avg": 4, "exp_avg_sq": 2, "total": 14}),
        ("adam", "fp32", torch.float64, {"params": 8, "exp_avg": 8, "total": 32}),  # fp32 means at least fp32
        ("lion", "q8-states", None, {"exp_avg": Q8, "total": 8 + Q8}),
        ("sgd", "mixed-bf16", None, {"master": 4, "total": 8}),
        ("nadam", "q8-states", None, {"exp_avg": Q8, "mu_product": 0, "total": 8 + 2 * Q8}),
        ("adamw", "mixed-bf16", torch.float32, {"master": 0, "total": 16}),  # no master for fp32 params
    ],
)
def test_bytes_per_parameter_by_hand(
    algorithm: str, policy: str, param_dtype: torch.dtype | None, expected: dict[str, float]
) -> None:
    breakdown = bytes_per_parameter(get_spec(algorithm), parse_policy(policy), param_dtype).as_dict()
    for key, value in expected.items():
        name = key if key in ("params", "grads", "master", "total") else f"state.{key}"
        assert breakdown[name] == pytest.approx(value), name


def test_per_tensor_costs_are_notes() -> None:
    breakdown = bytes_per_parameter(get_spec("nadam"), preset("fp32"))
    assert "mu_product: 4 bytes per parameter tensor" in breakdown.notes
    assert f"step: {step_counter_dtype().itemsize} bytes per parameter tensor" in breakdown.notes
    assert breakdown.per_parameter
    assert breakdown.step == 0


def test_unknown_state_override_is_refused() -> None:
    with pytest.raises(PolicyError, match="overrides state 'momentum_buffer', which adam does not have"):
        bytes_per_parameter(get_spec("adam"), parse_policy("momentum_buffer=q8"))


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    # 8192-, 128-, 4992-, 390- and 10-element tensors: both sides of the 4096-element 8-bit threshold,
    # and sizes that are not multiples of the 256-element block.
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 39, bias=False))
    model.append(torch.nn.Linear(39, 10))
    return model.to(dtype)


def storages(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize(
    ("algorithm", "policy"),
    [
        ("adam", "torch"),
        ("adam", "fp32"),
        ("adam", "bf16-states"),
        ("adam", "q8-states"),
        ("adam", "mixed-bf16"),
        ("adam", "mixed-bf16-q8"),
        ("adam", "mixed-fp16,exp_avg=q8,exp_avg_sq=bf16"),
        ("lion", "q8-states"),
        ("sgd", "mixed-bf16-q8"),
        ("nadam", "q8-states,block_size=100"),
    ],
)
def test_measured_allocation_equals_accounting(algorithm: str, policy: str) -> None:
    """Allocate every state of a real model (and its master weights, gradients and step counters) and
    compare the bytes of the allocated storages with the accounting, component by component."""
    spec = get_spec(algorithm, momentum=True) if algorithm == "sgd" else get_spec(algorithm)
    pol = parse_policy(policy)
    model = make_model(pol.param_dtype or torch.float32)
    params = list(model.parameters())
    model(torch.randn(3, 64, dtype=params[0].dtype)).sum().backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert len(grads) == len(params)
    nonnegative = nonnegative_states(spec)
    masters = [create_master(p) for p in params if pol.needs_master(p.dtype)]
    steps = [torch.zeros((), dtype=step_counter_dtype()) for _ in params]
    states = {
        decl.name: [allocate_state(decl, p, pol, nonnegative=decl.name in nonnegative) for p in params]
        for decl in spec.states
    }
    accounting = memory_for_params(spec, pol, params)
    assert accounting.params == storages(params)
    assert accounting.grads == storages(grads)
    assert accounting.master == storages(masters)
    assert accounting.step == storages(steps)
    maps: list[torch.Tensor] = []
    for name, stored in states.items():
        tensors: list[torch.Tensor] = []
        for s in stored:
            if isinstance(s, Q8State):
                tensors += [s.codes, s.absmax]
                maps.append(s.qmap)
            else:
                tensors.append(s)
        assert accounting.states[name] == storages(tensors) == sum(state_nbytes(s) for s in stored), name
    assert accounting.maps == storages(maps)
    assert accounting.total == storages(params) + storages(grads) + storages(
        masters + steps + maps + [t for s in states.values() for q in s for t in _tensors(q)]
    )


def _tensors(stored: torch.Tensor | Q8State) -> list[torch.Tensor]:
    return [stored.codes, stored.absmax] if isinstance(stored, Q8State) else [stored]


def test_eight_bit_states_take_at_most_a_third_of_fp32_states() -> None:
    model = make_model(torch.float32)
    spec = get_spec("adam")
    q8 = memory_for_params(spec, preset("q8-states"), model.parameters())
    fp32 = memory_for_params(spec, preset("fp32"), model.parameters())
    assert sum(q8.states.values()) + q8.maps <= sum(fp32.states.values()) / 3


def test_cli_memory(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["memory", "adam", "-p", "mixed-bf16", "-p", "q8-states", "--params", "1e6"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "state.exp_avg_sq" in out
    assert "16" in out
    assert "1.01562" in out
    assert "15.26 MiB" in out
    code = main(["memory", "nadam", "--model-shapes", "128x64,128", "-p", "q8-states"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "state.mu_product" in out
    assert "maps" in out
    code = main(["memory", "adam", "-p", "exp_avgs=q8"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "overrides state 'exp_avgs', which adam does not have" in err
    code = main(["memory", "adam", "--model-shapes", "12xq"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "--model-shapes: bad shape '12xq'" in err


OPTIMIZERS: dict[str, tuple[str, dict[str, float]]] = {
    "adam": ("Adam", {}),
    "adamw": ("AdamW", {}),
    "lion": ("Lion", {}),
    "sgd": ("SGD", {"momentum": 0.9}),
    "nadam": ("NAdam", {}),
    "adagrad": ("Adagrad", {}),
}


@pytest.mark.parametrize(
    ("algorithm", "policy"),
    [
        ("adam", "torch"),
        ("adam", "mixed-bf16"),
        ("adam", "q8-states"),
        ("adam", "mixed-bf16-q8"),
        ("adamw", "mixed-fp16,exp_avg=q8,exp_avg_sq=bf16"),
        ("adam", "pure-bf16-sr"),
        ("lion", "q8-states"),
        ("sgd", "mixed-bf16-q8"),
        ("nadam", "q8-states,block_size=100"),
        ("adagrad", "q8-states"),
    ],
)
def test_states_built_by_the_optimizer_take_the_accounted_bytes(algorithm: str, policy: str) -> None:
    """A real optimizer takes a step with ``precision=policy``; the storages its state holds (master copies,
    each state with 8-bit codes and absmax, step counters, the shared 8-bit maps) measure exactly what
    :func:`memory_for_params` accounts, component by component."""
    name, kwargs = OPTIMIZERS[algorithm]
    pol = parse_policy(policy)
    model = make_model(pol.param_dtype or torch.float32)
    params = list(model.parameters())
    opt = getattr(portopt, name)(params, precision=policy, **kwargs)
    model(torch.randn(3, 64, dtype=params[0].dtype)).sum().backward()
    opt.step()
    spec = opt.group_spec(opt.param_groups[0])
    accounting = memory_for_params(spec, pol, params)
    held = [opt.state[p] for p in params]
    assert accounting.master == storages([s["master"] for s in held if "master" in s])
    assert accounting.step == storages([s["step"] for s in held])
    maps: list[torch.Tensor] = []
    for decl in spec.states:
        tensors: list[torch.Tensor] = []
        for s in held:
            tensors += _tensors(s[decl.name])
            if isinstance(s[decl.name], Q8State):
                maps.append(s[decl.name].qmap)
        assert accounting.states[decl.name] == storages(tensors), decl.name
    assert accounting.maps == storages(maps)
