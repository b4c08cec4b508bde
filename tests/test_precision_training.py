"""Training under precision policies: 8-bit states, stochastic rounding, checkpoints that resume exactly.

Truth: fp32-state training of the same model on the same batches (8-bit states must reach
nearly its loss with a third of its state memory, measured from the tensors held); the
generic float32 step run on the decoded states and then encoded (a policy step is exactly
that); the documented noise key of stochastic rounding; and an uninterrupted run, which a
run saved, reloaded with ``torch.load(weights_only=True)`` and continued must equal bit for bit.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import portopt
from portopt.backends.torch_generic import TorchStep
from portopt.backends.torch_policy import PolicyStep
from portopt.precision.policy import parse_policy
from portopt.precision.quantize import Q8State
from portopt.precision.rounding import round_stochastic_bf16
from portopt.precision.signs import nonnegative_states
from portopt.precision.storage import decode, state_format


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def teacher_data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 32, generator=gen)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))
    with torch.no_grad():
        return x, teacher(x)


def student() -> nn.Sequential:
    """32-128-128-32: weights of 4096, 16384 and 4096 elements (8-bit), biases stay fp32."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors the optimizer holds (codes and absmax of 8-bit states), step counters aside."""
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key == "step":
                continue
            tensors = [value.codes, value.absmax] if isinstance(value, Q8State) else [value]
            total += sum(t.untyped_storage().nbytes() for t in tensors)
    return total


EIGHT_BIT = {
    "Adam": (portopt.Adam, {"lr": 1e-3}),
    "AdamW": (portopt.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
    "Lion": (portopt.Lion, {"lr": 1e-4}),
    "SGD-momentum": (portopt.SGD, {"lr": 0.05, "momentum": 0.9}),
}


@pytest.mark.parametrize("name", list(EIGHT_BIT))
def test_eight_bit_states_train_like_fp32_states_in_a_third_of_the_memory(name: str) -> None:
    """200 steps of a 3-layer regression: the final full-data loss with 8-bit states is within 5% of the loss
    with fp32 states (about 1.5% or less here), and their state tensors take at most a third of the bytes."""
    cls, kwargs = EIGHT_BIT[name]
    x, y = teacher_data()
    results = {}
    for policy in ("fp32", "q8-states"):
        net = student()
        opt = cls(net.parameters(), precision=policy, **kwargs)
        gen = torch.Generator().manual_seed(2)
        for _ in range(200):
            index = torch.randint(0, len(x), (64,), generator=gen)
            opt.zero_grad()
            nn.functional.mse_loss(net(x[index]), y[index]).backward()
            opt.step()
        with torch.no_grad():
            results[policy] = (float(nn.functional.mse_loss(net(x), y)), state_bytes(opt))
    with torch.no_grad():
        initial = float(nn.functional.mse_loss(student()(x), y))
    (fp32_loss, fp32_bytes), (q8_loss, q8_bytes) = results["fp32"], results["q8-states"]
    assert fp32_loss < 0.5 * initial  # it trains
    assert abs(q8_loss - fp32_loss) <= 0.05 * fp32_loss, (q8_loss, fp32_loss)
    assert q8_bytes <= fp32_bytes / 3, (q8_bytes, fp32_bytes)


@pytest.mark.parametrize(
    ("algorithm", "options", "policy"),
    [
        ("adam", {}, "q8-states,min_8bit_size=64,block_size=100"),
        ("adam", {}, "bf16-states"),
        ("sgd", {"momentum": True}, "q8-states,min_8bit_size=64"),
        ("lion", {}, "q8-states,min_8bit_size=64"),
        ("nadam", {}, "q8-states,min_8bit_size=64,exp_avg=bf16"),
    ],
)
def test_a_policy_step_is_the_fp32_step_between_decode_and_encode(
    algorithm: str, options: dict[str, Any], policy: str
) -> None:
    """Each step equals: decode every state to fp32, run the generic fp32 step (proven against torch.optim
    elsewhere), encode the new values into the same storage: bit for bit, for several steps."""
    from portopt.algorithms import get_spec

    spec = get_spec(algorithm, **options)
    pol = parse_policy(policy)
    hypers = {h.name: h.default for h in spec.hyperparameters}
    hypers["lr"] = 1e-2
    if algorithm == "sgd":
        hypers["momentum"] = 0.9
    torch.manual_seed(0)
    shapes = [(20, 30), (7,), (300,)]
    params = [torch.randn(s) for s in shapes]
    twins = [p.clone() for p in params]
    step, plain = PolicyStep(spec, pol), TorchStep(spec)
    states: list[dict[str, Any]] = [{} for _ in params]
    for _ in range(4):
        grads = [torch.randn(s) for s in shapes]
        if states[0]:  # the truth: fp32 states decoded from the stored ones
            twin_states = [{k: decode(v).clone() for k, v in s.items()} for s in states]
        else:
            twin_states = [{} for _ in params]
        step(params, grads, states, hypers)
        plain(twins, grads, twin_states, hypers)
        for param, twin, state, twin_state in zip(params, twins, states, twin_states, strict=True):
            assert torch.equal(param, twin)
            for key, value in state.items():
                expected = twin_state[key]
                if isinstance(value, Q8State):
                    truth = Q8State.zeros(tuple(value.shape), value.map_name, "cpu", value.block_size)
                    truth.store(expected)
                    assert torch.equal(value.codes, truth.codes), key
                    assert torch.equal(value.absmax, truth.absmax), key
                else:
                    assert torch.equal(value, expected.to(value.dtype)), key
    nonnegative = nonnegative_states(spec)
    for param, state in zip(params, states, strict=True):
        for decl in spec.states:  # the storage each state was created in is the policy's
            fmt = state_format(pol, decl, param.shape, param.dtype, nonnegative=decl.name in nonnegative)
            stored = state[decl.name]
            if fmt.quantized:
                assert isinstance(stored, Q8State)
                assert stored.map_name == fmt.quantized
            else:
                assert isinstance(stored, Tensor)
                assert stored.dtype == fmt.dtype


def test_stochastic_rounding_uses_the_documented_keys() -> None:
    """A bf16 store under ``sr=true`` is ``round_stochastic_bf16(fp32 value, policy.rounding_key(t, i·(n+1)+slot))``
    with ``i`` the optimizer-wide parameter number: the parameter (slot 0) and each bf16 state."""
    from portopt.algorithms import get_spec

    spec = get_spec("adam")
    policy = parse_policy("bf16-states-sr,seed=11")
    hypers = {h.name: h.default for h in spec.hyperparameters}
    torch.manual_seed(0)
    params = [torch.randn(50).bfloat16(), torch.randn(3, 4).bfloat16()]
    numbers = [4, 9]
    states: list[dict[str, Any]] = [{}, {}]
    step = PolicyStep(spec, policy)
    for t in (1, 2, 3):
        grads = [torch.randn(p.shape).bfloat16() for p in params]
        before = [(p.clone(), {k: v.clone() for k, v in s.items()}) for p, s in zip(params, states, strict=True)]
        step(params, grads, states, hypers, indices=numbers)
        for (param, old_state), new_param, new_state, grad, number in zip(
            before, params, states, grads, numbers, strict=True
        ):
            work = param.float()
            fp32_state: dict[str, Tensor] = {k: v.float() for k, v in old_state.items()}
            TorchStep(spec)([work], [grad.float()], [fp32_state], hypers)
            key = policy.rounding_key(t, number * 3)
            assert torch.equal(new_param, round_stochastic_bf16(work, key))  # type: ignore[arg-type]
            for slot, name in enumerate(spec.state_names, start=1):
                key = policy.rounding_key(t, number * 3 + slot)
                assert torch.equal(new_state[name], round_stochastic_bf16(fp32_state[name], key))  # type: ignore[arg-type]


def test_noise_keys_number_parameters_across_groups() -> None:
    """Through the optimizer, parameter ``i`` is the ``i``-th of all groups, counted with those without a
    gradient, so its noise does not depend on which others are stepped."""
    from portopt.algorithms import get_spec

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(40).bfloat16()) for _ in range(4)]
    groups: list[dict[str, Any]] = [{"params": params[:2]}, {"params": params[2:], "lr": 0.01}]
    opt = portopt.Adam(groups, lr=0.02, precision="pure-bf16-sr,seed=3")
    grad = torch.randn(40).bfloat16()
    params[3].grad = grad  # the only one stepped: number 3, in the second group
    start = params[3].detach().float()
    opt.step()
    work, hypers = start.clone(), {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    TorchStep(get_spec("adam"))([work], [grad.float()], [{}], hypers)
    key = parse_policy("pure-bf16-sr,seed=3").rounding_key(1, 3 * 3)
    assert key is not None
    assert torch.equal(params[3].detach(), round_stochastic_bf16(work, key))


def run_sr(seed: int | None) -> Tensor:
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(4000).bfloat16())
    policy = "pure-bf16" if seed is None else f"pure-bf16-sr,seed={seed}"
    opt = portopt.Adam([param], lr=1e-3, precision=policy)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        param.grad = torch.randn(4000, generator=gen).bfloat16()
        opt.step()
    return param.detach().clone()


def test_stochastic_rounding_is_seeded_and_unbiased_in_effect() -> None:
    """Same seed: the same bits; another seed: other bits. Pure bf16 Adam at lr 1e-3 rounds updates away;
    stochastic rounding keeps them in expectation, so the weights move about as far as in fp32."""
    assert torch.equal(run_sr(0), run_sr(0))
    assert not torch.equal(run_sr(0), run_sr(1))
    torch.manual_seed(0)
    start = torch.randn(4000).bfloat16().float()
    exact = nn.Parameter(start.clone())
    opt = portopt.Adam([exact], lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        exact.grad = torch.randn(4000, generator=gen).bfloat16().float()
        opt.step()
    travel = float((exact.detach() - start).abs().mean())
    nearest = float((run_sr(None).float() - start).abs().mean())
    stochastic = float((run_sr(0).float() - start).abs().mean())
    assert nearest < 0.5 * travel < stochastic < 2 * travel


RESUMABLE = [
    ("Adam", "torch", torch.float32),
    ("Adam", "mixed-bf16", torch.bfloat16),
    ("Adam", "mixed-fp16", torch.float16),
    ("Adam", "q8-states", torch.float32),
    ("AdamW", "mixed-bf16-q8", torch.bfloat16),
    ("Adam", "bf16-states-sr", torch.float32),
    ("Adam", "pure-bf16-sr", torch.bfloat16),
    ("Adam", "fp32", torch.bfloat16),
    ("SGD", "mixed-bf16-q8", torch.bfloat16),
    ("Lion", "q8-states,exp_avg=bf16,sr=true,seed=5", torch.float32),
    ("Adagrad", "q8-states", torch.float32),
]
KWARGS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.05, "momentum": 0.9},
    "Lion": {"lr": 1e-4},
    "Adagrad": {"lr": 0.01},
}


class Run:
    """A small model trained with GradScaler (also for bf16/fp32: it must not disturb them)."""

    def __init__(self, name: str, policy: str | None, dtype: torch.dtype, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.dtype = dtype
        self.net = nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 3)).to(dtype)
        self.opt = getattr(portopt, name)(self.net.parameters(), precision=policy, **KWARGS.get(name, {"lr": 1e-3}))
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)

    def train(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in batches:
            self.opt.zero_grad()
            loss = nn.functional.mse_loss(self.net(x.to(self.dtype)).float(), y)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()

    def save(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {"model": self.net.state_dict(), "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict()}, buffer
        )
        return buffer.getvalue()

    def load(self, blob: bytes) -> None:
        checkpoint = torch.load(io.BytesIO(blob), weights_only=True)
        self.net.load_state_dict(checkpoint["model"])
        self.opt.load_state_dict(checkpoint["opt"])
        self.scaler.load_state_dict(checkpoint["scaler"])

    def numbers(self) -> list[Tensor]:
        out = [p.detach() for p in self.net.parameters()]
        for p in self.net.parameters():
            for key in sorted(self.opt.state[p]):
                value: Any = self.opt.state[p][key]
                out += [value.codes, value.absmax] if isinstance(value, Q8State) else [value]
        return out


@pytest.mark.parametrize(("name", "policy", "dtype"), RESUMABLE, ids=[f"{n}-{p}" for n, p, _ in RESUMABLE])
def test_save_and_load_mid_training_resumes_bit_identically(name: str, policy: str, dtype: torch.dtype) -> None:
    """Train 4 steps, save (model, optimizer, GradScaler), load into fresh objects built *without* the policy
    (the checkpoint carries it), train 4 more: every parameter, master, state and step equals, bit for bit,
    those of a run that was never interrupted. An overflowing step (loss x inf) sits in each half."""
    gen = torch.Generator().manual_seed(9)
    batches = [(torch.randn(16, 64, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(8)]
    batches[2] = (batches[2][0], batches[2][1] * torch.inf)
    batches[6] = (batches[6][0], batches[6][1] * torch.inf)
    whole = Run(name, policy, dtype)
    whole.train(batches)
    first = Run(name, policy, dtype)
    first.train(batches[:4])
    blob = first.save()
    resumed = Run(name, None, dtype, seed=1)
    resumed.load(blob)
    assert resumed.opt.param_groups[0].get("precision") == first.opt.param_groups[0].get("precision")
    resumed.train(batches[4:])
    ours, theirs = resumed.numbers(), whole.numbers()
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a, b)
    assert resumed.scaler.get_scale() == whole.scaler.get_scale()


def test_checkpoint_state_keeps_storage_dtypes_and_eight_bit_layout() -> None:
    run = Run("Adam", "mixed-bf16-q8,exp_avg=bf16", torch.bfloat16)
    gen = torch.Generator().manual_seed(9)
    run.train([(torch.randn(16, 64, generator=gen), torch.randn(16, 3, generator=gen))])
    saved = torch.load(io.BytesIO(run.save()), weights_only=True)["opt"]
    assert saved["param_groups"][0]["precision"] == "states=q8,params=bf16,master=fp32,exp_avg=bf16"
    weight = saved["state"][0]
    assert weight["master"].dtype == torch.float32
    assert weight["exp_avg"].dtype == torch.bfloat16
    q8 = weight["exp_avg_sq"]
    assert set(q8) == {"codes", "absmax", "qmap", "map_name", "block_size"}
    assert (q8["codes"].dtype, q8["absmax"].dtype, q8["map_name"], q8["block_size"]) == (
        torch.uint8,
        torch.float32,
        "unsigned",
        256,
    )
    assert saved["state"][1]["exp_avg_sq"].dtype == torch.float32  # an 80-element bias: below the threshold


def test_corrupt_eight_bit_checkpoint_is_refused() -> None:
    run = Run("Adam", "q8-states", torch.float32)
    gen = torch.Generator().manual_seed(9)
    run.train([(torch.randn(16, 64, generator=gen), torch.randn(16, 3, generator=gen))])
    saved = run.opt.state_dict()
    saved["state"][0]["exp_avg"] = {**saved["state"][0]["exp_avg"], "absmax": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"param group 0, parameter 0 .*state 'exp_avg': .*need 20 absmax values"):
        run.opt.load_state_dict(saved)
    saved = run.opt.state_dict()
    saved["state"][0]["master"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"the master weights are a torch.float32 tensor of shape \(3,\)"):
        run.opt.load_state_dict(saved)
