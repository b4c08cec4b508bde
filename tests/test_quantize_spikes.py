"""8-bit states under gradient spikes: finite inputs give finite parameters, and a spike stays in its block.

Truth: float32 states (torch.optim's arithmetic) stay finite for any finite gradient; so must every
8-bit policy, for every algorithm, for one gradient element anywhere from 1e20 (where Adam's
``(1 − β2)·g²`` starts to overflow float32) to the largest finite gradient. Block-wise
quantisation couples only the elements of one block of 256: for element-wise algorithms every
parameter outside the spike's blocks must equal, bit for bit, the run with no spike at all.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import portopt
from portopt.algorithms import algorithm_names
from portopt.optim.named import NamedOptimizer
from portopt.precision.quantize import BLOCK_SIZE

CLASSES: dict[str, type[NamedOptimizer]] = {
    {"SparseAdam": "sparse_adam"}.get(name, name.lower()): cls
    for name, cls in ((name, getattr(portopt, name)) for name in dir(portopt))
    if isinstance(cls, type) and issubclass(cls, NamedOptimizer)
}
"""Every optimizer class, by the name of its algorithm (``AdamW`` is ``adamw``, ``SparseAdam`` ``sparse_adam``)."""
POLICIES = {  # every 8-bit preset, and 8-bit moments named one by one; min_8bit_size=0: small tensors are 8-bit too
    "q8-states,min_8bit_size=0": torch.float32,
    "mixed-bf16-q8,min_8bit_size=0": torch.bfloat16,
    "exp_avg_sq=q8,exp_avg=q8,min_8bit_size=0": torch.float32,
}
SPIKES = (1e20, 1e25, 1e30, 1e38, "max")
NUMEL = 4 * BLOCK_SIZE
AT = 2 * BLOCK_SIZE + 17  # the spike's element
COUPLED = ("lamb", "adafactor", "came")  # per-tensor norms (the trust ratio, RMS clipping) couple every element


def _run(name: str, policy: str, dtype: torch.dtype, spike: float | None, steps: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(NUMEL, generator=gen).to(dtype))
    kwargs: dict[str, Any] = {"momentum": 0.9} if name == "sgd" else {}
    opt = CLASSES[name]([param], lr=1e-3, precision=policy, **kwargs)
    for t in range(steps):
        grad = (torch.randn(NUMEL, generator=gen) * 1e-2).to(dtype)
        if t == 0 and spike is not None:
            grad[AT] = spike
        param.grad = grad
        opt.step()
    return param.detach().float()


SPARSE_ONLY = ("sparse_adam",)  # takes sparse gradients and no precision policy (torch.optim.SparseAdam's signature)


def test_every_algorithm_has_a_class() -> None:
    assert sorted(CLASSES) == sorted(algorithm_names())


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_finite_spike_keeps_every_parameter_finite_and_stays_in_its_block(name: str, policy: str) -> None:
    dtype = POLICIES[policy]
    if name in SPARSE_ONLY:
        pytest.skip(f"{name} takes sparse gradients and no precision policy (no 8-bit states)")
    if policy.startswith("exp_avg") and name not in ("adam", "adamw", "nadam", "radam", "lamb"):
        pytest.skip(f"{name} has no exp_avg/exp_avg_sq states")
    calm = _run(name, policy, dtype, None)
    outside = torch.ones(NUMEL, dtype=torch.bool)
    outside[AT // BLOCK_SIZE * BLOCK_SIZE : (AT // BLOCK_SIZE + 1) * BLOCK_SIZE] = False
    for spike in SPIKES:
        value = torch.finfo(dtype).max if spike == "max" else float(spike)
        spiked = _run(name, policy, dtype, value)
        assert bool(torch.isfinite(spiked).all()), (spike, int((~torch.isfinite(spiked)).sum()))
        if name not in COUPLED:
            assert torch.equal(spiked[outside], calm[outside]), spike
