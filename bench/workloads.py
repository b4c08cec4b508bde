"""What the step-time benchmark runs: parameter layouts, byte accounting, implementations.

Layout: a transformer-like list of tensors (embedding, then blocks of ``d = 1024`` with
qkv, output, two MLP matrices, their biases and two LayerNorms), sized to a total count,
so that per-tensor overheads of small tensors are part of the measurement.

Bytes per step come from the spec (:func:`spec_bytes_per_element`): the parameter is read
and written, the gradient read, each state read if the spec reads its old value and
written if the spec updates it. This is the one-pass minimum, the roofline's numerator.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from portopt.algorithms import get_spec
from portopt.lowering.backend import ParamState, StepFunction
from portopt.lowering.registry import lookup_backend
from portopt.spec.definition import Spec
from portopt.spec.expr import walk
from portopt.spec.ops import Op
from portopt.spec.symbols import Layout

D_MODEL = 1024


def transformer_layout(total: int, d: int = D_MODEL) -> list[tuple[int, ...]]:
    """Tensor shapes of a transformer-like model with about ``total`` parameters."""
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    per_block = sum(_numel(s) for s in block)
    layers = max((total - d * 4096) // per_block, 0)
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        shapes.extend(block)
    vocab = max((total - layers * per_block - 2 * d) // d, 1)
    return [(vocab, d), *shapes, (d,), (d,)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def spec_bytes_per_element(spec: Spec, param_bytes: int, state_bytes: int) -> int:
    """Bytes one step must move per parameter element, in one pass (see the module docstring)."""
    read_states = {str(n.value) for n in walk(list(spec.roots)) if n.op is Op.STATE}
    written = {name for name, e in spec.updates if not (e.op is Op.STATE and e.value == name)}
    total = 3 * param_bytes  # p read and written, g read
    for decl in spec.states:
        if decl.layout is not Layout.ELEMENTWISE:
            continue  # per tensor / per row: negligible
        total += state_bytes * ((decl.name in read_states) + (decl.name in written))
    return total


@dataclass(frozen=True)
class Algorithm:
    """One benchmarked algorithm: its spec, hyperparameters and the baselines to time against."""

    name: str
    spec: Spec
    hypers: dict[str, float]
    torch_class: type[torch.optim.Optimizer] | None = None
    torch_kwargs: dict[str, Any] = field(default_factory=dict)
    torch_fused: bool = False
    third_party: tuple[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]], ...] = ()


def _third_party(name: str) -> tuple[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]], ...]:
    """Third-party optimizers for algorithms torch lacks (the packages are optional)."""
    found: list[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]] = []
    with contextlib.suppress(ImportError):
        import pytorch_optimizer as po

        if name == "lamb":
            found.append(("pytorch-optimizer Lamb", lambda p: po.Lamb(p, lr=1e-3, max_grad_norm=0.0)))
        if name == "adabelief":
            found.append(("pytorch-optimizer AdaBelief", lambda p: po.AdaBelief(p, lr=1e-3)))
        if name == "lion":
            found.append(("pytorch-optimizer Lion", lambda p: po.Lion(p, lr=1e-4)))
    if name == "lion":
        with contextlib.suppress(ImportError):
            from lion_pytorch import Lion  # type: ignore[import-untyped]

            found.append(("lion-pytorch", lambda p: Lion(p, lr=1e-4)))
    if name == "adabelief":
        with contextlib.suppress(ImportError), contextlib.redirect_stdout(io.StringIO()):
            from adabelief_pytorch import AdaBelief  # type: ignore[import-untyped]

            def make(p: list[Tensor]) -> torch.optim.Optimizer:
                with contextlib.redirect_stdout(io.StringIO()):
                    optimizer: torch.optim.Optimizer = AdaBelief(p, lr=1e-3, rectify=False, print_change_log=False)
                return optimizer

            found.append(("adabelief-pytorch", make))
    return tuple(found)


def algorithms() -> dict[str, Algorithm]:
    """The benchmarked algorithms, by name."""
    sgd = get_spec("sgd", momentum=True)
    table = [
        Algorithm("adamw", get_spec("adamw"), get_spec("adamw").defaults(), torch.optim.AdamW, {}, True),
        Algorithm("adam", get_spec("adam"), get_spec("adam").defaults(), torch.optim.Adam, {}, True),
        Algorithm(
            "sgd_momentum",
            sgd,
            {**sgd.defaults(), "momentum": 0.9},
            torch.optim.SGD,
            {"momentum": 0.9, "lr": 1e-3},
            True,
        ),
        Algorithm("adagrad", get_spec("adagrad"), get_spec("adagrad").defaults(), torch.optim.Adagrad, {}, True),
        Algorithm("radam", get_spec("radam"), get_spec("radam").defaults(), torch.optim.RAdam),
        Algorithm("nadam", get_spec("nadam"), get_spec("nadam").defaults(), torch.optim.NAdam),
        Algorithm(
            "adabelief", get_spec("adabelief"), get_spec("adabelief").defaults(), third_party=_third_party("adabelief")
        ),
        Algorithm("lamb", get_spec("lamb"), get_spec("lamb").defaults(), third_party=_third_party("lamb")),
        Algorithm("lion", get_spec("lion"), get_spec("lion").defaults(), third_party=_third_party("lion")),
    ]
    return {a.name: a for a in table}


class Runner:
    """One implementation with its own parameters and states, sharing the gradients."""

    name: str
    kind: str  # "portopt", "torch", "third-party" or "roofline"

    def step(self) -> None:
        raise NotImplementedError


class PortoptRunner(Runner):
    """A portopt backend's step function over the layout."""

    def __init__(self, backend: str, algorithm: Algorithm, params: list[Tensor], grads: list[Tensor]) -> None:
        self.name = f"portopt[{backend}]"
        self.kind = "portopt"
        self.step_fn: StepFunction = lookup_backend(backend).build(algorithm.spec)
        self.params, self.grads = params, grads
        self.states: list[ParamState] = [{} for _ in params]
        self.hypers = algorithm.hypers

    def step(self) -> None:
        self.step_fn(self.params, self.grads, self.states, self.hypers)


class StreamRunner(Runner):
    """The roofline, timed in the same rounds: ``a += b`` in float32 over as many bytes as the step moves.

    An in-place add reads two and writes one float32 (12 bytes per element), the same
    read/write mix as an optimizer step; under the same load as the implementations it
    gives the time this machine needs to stream the step's bytes once.
    """

    def __init__(self, bytes_per_step: int, device: str = "cpu") -> None:
        self.name = "stream a += b (roofline)"
        self.kind = "roofline"
        n = max(bytes_per_step // 12, 1)
        self.a = torch.zeros(n, device=device)
        self.b = torch.ones(n, device=device)

    def step(self) -> None:
        self.a.add_(self.b)


class ConversionFloorRunner(Runner):
    """For 16-bit storage: a compiled kernel that only converts, timed in the same rounds.

    It loads ``p``, ``g`` and ``n_states`` states of ``numel`` elements each, widens them to
    float32, adds ``g`` and stores ``p`` and the states back (rounding to nearest): the
    loads, conversions and stores of a one-pass step without its arithmetic. Where it is
    far slower than the roofline, a 16-bit step is bound by conversion instructions, not
    memory (a CPU without native bf16 conversion).
    """

    def __init__(self, numel: int, n_states: int, dtype: torch.dtype, device: str = "cpu") -> None:
        self.name = f"convert-only kernel ({dtype}, no math)"
        self.kind = "roofline"
        self.tensors = [torch.zeros(numel, dtype=dtype, device=device) for _ in range(2 + n_states)]

        def convert_only(p: Tensor, g: Tensor, *states: Tensor) -> None:
            wide = g.float()
            p.copy_(p.float() + wide)
            for s in states:
                s.copy_(s.float() + wide)

        self.kernel = torch.compile(convert_only, dynamic=False, fullgraph=True)

    def step(self) -> None:
        self.kernel(*self.tensors)


class OptimizerRunner(Runner):
    """A torch.optim.Optimizer (torch's own or a third party's) over the layout."""

    def __init__(
        self,
        name: str,
        kind: str,
        make: Callable[[list[Tensor]], torch.optim.Optimizer],
        params: list[Tensor],
        grads: list[Tensor],
    ) -> None:
        self.name, self.kind = name, kind
        leaves: list[Tensor] = [torch.nn.Parameter(p) for p in params]
        for leaf, g in zip(leaves, grads, strict=True):
            leaf.grad = g
        self.params = leaves
        self.optimizer = make(leaves)

    def step(self) -> None:
        self.optimizer.step()


def torch_variants(algorithm: Algorithm) -> list[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]]:
    """torch.optim's implementations of ``algorithm``: fused where it exists, foreach, for-loop."""
    cls = algorithm.torch_class
    if cls is None:
        return []
    kwargs = algorithm.torch_kwargs
    variants: list[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]] = []
    if algorithm.torch_fused:
        variants.append((f"torch {cls.__name__}(fused)", lambda p: cls(p, fused=True, **kwargs)))  # type: ignore[call-arg]
    variants.append((f"torch {cls.__name__}(foreach)", lambda p: cls(p, foreach=True, **kwargs)))  # type: ignore[call-arg]
    variants.append((f"torch {cls.__name__}(for-loop)", lambda p: cls(p, foreach=False, **kwargs)))  # type: ignore[call-arg]
    return variants
